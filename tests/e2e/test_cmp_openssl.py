"""CMP end to end: a real `mailkms serve` over HTTPS, `openssl cmp` (OpenSSL 3) as the client,
pkilint and `openssl verify` as judges. One scenario: enrol with the token (ir + certConf), the
refusals openssl reports as CMP errors, the renewal a year on under faketime (kur), revocation by
the holder (rr), and expiry (kur refused: re-enrolment)."""

from __future__ import annotations

import base64
import os
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pyasn1.codec.der import decoder, encoder
from pyasn1_alt_modules import rfc9480

from mailkms.pki._cmp import parse_request
from tests.e2e.conftest import Deployment, faketime_env, init_deployment
from tests.judges import lint_smime
from tests.smime_support import require_tools

pytestmark = pytest.mark.e2e

YEAR_LATER = 395  # past the 12-month reminder point, before the 18-month notAfter
EXPIRED = 600


@dataclass
class World:
    dep: Deployment
    tmp: Path
    root: Path
    chain: Path
    offset: int = 0

    def cmp(self, *args: str, offset: int | None = None) -> subprocess.CompletedProcess[str]:
        """`openssl cmp` against the running server, under the same faked time as the server: the
        options of the README's `$CMP` (the root is the only trust the client brings)."""
        days = self.offset if offset is None else offset
        env = {**os.environ, **faketime_env(days)} if days else dict(os.environ)
        command = [
            "openssl",
            "cmp",
            "-server",
            f"localhost:{self.dep.https_port}",
            "-path",
            ".well-known/cmp",
            "-tls_used",
            "-tls_trusted",
            str(self.root),
            "-trusted",
            str(self.root),
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=self.tmp)

    def key(self, name: str) -> Path:
        path = self.tmp / name
        run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)])
        return path

    def restart(self, offset: int) -> None:
        self.dep.stop()
        self.offset = offset
        self.dep.start(offset_days=offset)


def said(done: subprocess.CompletedProcess[str]) -> str:
    """What openssl cmp printed (its errors go to stdout and stderr)."""
    return done.stdout + done.stderr


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_tools("openssl", "faketime", package="openssl, faketime")
    tmp = tmp_path_factory.mktemp("cmp")
    dep = init_deployment(tmp / "data")
    chain = tmp / "chain.pem"
    chain.write_text(dep.admin("ca", "chain").out)
    certs = x509.load_pem_x509_certificates(chain.read_bytes())
    root = tmp / "root.pem"
    root.write_bytes(certs[-1].public_bytes(serialization.Encoding.PEM))
    dep.start()
    try:
        yield World(dep, tmp, root, chain)
    finally:
        dep.stop()


def enrol(
    world: World, mailbox: str, token: str, key: Path, out: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return world.cmp(
        "-cmd",
        "ir",
        "-ref",
        mailbox,
        "-secret",
        f"pass:{token}",
        "-newkey",
        str(key),
        "-subject",
        f"/CN={mailbox}",
        "-recipient",
        "/CN=mailkms",
        "-certout",
        str(out),
        *extra,
    )


def genp(path: Path) -> dict[str, bytes | None]:
    """{infoType: infoValue DER or None} of the genp `openssl cmp -rspout` saved."""
    answer = parse_request(path.read_bytes())
    assert answer.body == "genp"
    return {
        str(itav["infoType"]): bytes(itav["infoValue"]) if itav["infoValue"].isValue else None
        for itav in answer.message["body"]["genp"]
    }


def test_p10cr_genm_and_a_mac_protected_rr_with_openssl(world: World) -> None:
    """Runs before the scenario below moves the server's clock."""
    dep, tmp = world.dep, world.tmp
    token = dep.add_user("carol@example.org")
    mac = ("-ref", "carol@example.org", "-secret", f"pass:{token}", "-recipient", "/CN=mailkms")

    # -- genm before enrolment, MAC-protected with the token (not spent); one -infotype per call in 3.0 ------
    expected = {
        "caCerts": "1.3.6.1.5.5.7.4.17",
        "signKeyPairTypes": "1.3.6.1.5.5.7.4.2",
        "currentCRL": "1.3.6.1.5.5.7.4.6",
        "caKeyUpdateInfo": "1.3.6.1.5.5.7.4.5",
        "certReqTemplate": "1.3.6.1.5.5.7.4.19",
    }
    answers = {}
    for name, oid in expected.items():
        out = tmp / f"genp-{name}.der"
        done = world.cmp("-cmd", "genm", "-infotype", name, *mac, "-rspout", str(out))
        assert done.returncode == 0, said(done)
        answers[name] = genp(out)
        assert list(answers[name]) == [oid], answers[name]
    value = answers["caCerts"]["1.3.6.1.5.5.7.4.17"]
    assert value is not None
    decoded, _ = decoder.decode(value, asn1Spec=rfc9480.CaCertsValue())
    got = [x509.load_der_x509_certificate(encoder.encode(c)) for c in decoded]
    assert got == x509.load_pem_x509_certificates(world.chain.read_bytes())  # issuing CA, root
    crl_der = answers["currentCRL"]["1.3.6.1.5.5.7.4.6"]
    assert crl_der is not None
    (tmp / "current.crl").write_bytes(crl_der)
    run(["openssl", "crl", "-inform", "DER", "-in", str(tmp / "current.crl"), "-CAfile", str(world.chain), "-noout"])
    assert answers["caKeyUpdateInfo"]["1.3.6.1.5.5.7.4.5"] is None  # no root CA key update
    assert answers["certReqTemplate"]["1.3.6.1.5.5.7.4.19"] is None  # no template required

    # -- p10cr: a PKCS#10 request made by openssl req, MAC-protected with the same token -------------------
    key = world.key("carol.key")
    run(["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=carol@example.org", "-out", str(tmp / "carol.csr")])
    cert_path = tmp / "carol.pem"
    done = world.cmp("-cmd", "p10cr", "-csr", str(tmp / "carol.csr"), *mac, "-certout", str(cert_path))
    assert done.returncode == 0, said(done)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.RFC822Name
    ) == ["carol@example.org"]
    verdict = lint_smime(cert)
    assert verdict.exit_code == 0, str(verdict)
    shown = dep.admin("user", "show", "carol@example.org", "--json").json()
    assert isinstance(shown, dict) and shown["generation"] == 1, shown

    # -- genm signed with the new certificate ------------------------------------------------------------
    out = tmp / "genp-signed.der"
    done = world.cmp(
        "-cmd", "genm", "-infotype", "caCerts", "-cert", str(cert_path), "-key", str(key), "-rspout", str(out)
    )
    assert done.returncode == 0, said(done)
    assert list(genp(out)) == ["1.3.6.1.5.5.7.4.17"]

    # -- rr protected by a MAC: RFC 9483 §4.2 wants it signed by the holder, so refused -----------------
    token2 = dep.add_user("dan@example.org")
    rr = world.cmp(
        "-cmd", "rr", "-oldcert", str(cert_path), "-ref", "dan@example.org", "-secret", f"pass:{token2}",
        "-recipient", "/CN=mailkms", "-revreason", "4",
    )  # fmt: skip
    assert rr.returncode != 0 and "notAuthorized" in said(rr), said(rr)
    shown = dep.admin("user", "show", "carol@example.org", "--json").json()
    assert isinstance(shown, dict) and shown["state"] != "REVOKED", shown


def test_cmp_with_openssl(world: World) -> None:
    dep, tmp = world.dep, world.tmp
    token = dep.add_user("alice@example.org")
    key = world.key("sign.key")
    cert_path = tmp / "sign.pem"

    # -- a wrong secret: refused with a CMP error (badMessageCheck), the token is not spent ---------------
    wrong = enrol(world, "alice@example.org", "not-the-token", key, cert_path)
    assert wrong.returncode != 0
    assert "badMessageCheck" in said(wrong) and "bad-cmp-protection" in said(wrong), said(wrong)
    assert not cert_path.exists()

    # -- ir with the token; certConf/pkiConf; the request is kept for the replay below -------------------
    done = enrol(
        world, "alice@example.org", token, key, cert_path, "-reqout", "ir.der,certconf.der", "-cacertsout", "ca.pem"
    )
    assert done.returncode == 0, said(done)
    assert x509.load_pem_x509_certificates((tmp / "ca.pem").read_bytes()) == [  # caPubs: the trust anchor
        x509.load_pem_x509_certificate(world.root.read_bytes())
    ]
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["alice@example.org"]
    verdict = lint_smime(cert)
    assert verdict.exit_code == 0, str(verdict)
    run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(world.root),
            "-untrusted",
            str(world.chain),
            "-purpose",
            "smimesign",
            str(cert_path),
        ]
    )

    # the encryption key the server made, collected with the same token as after EST simpleenroll
    keygen = httpx.post(
        f"{dep.url}/.well-known/est/serverkeygen",
        auth=("alice@example.org", token),
        headers={"Content-Type": "application/pkcs10"},
        content=_csr(world, key, "alice@example.org"),
        verify=ssl.create_default_context(cafile=str(world.root)),
    )
    assert keygen.status_code == 200 and b"application/pkcs8" in keygen.content, keygen.text

    # -- a certificate the client rejects (its -out_trusted does not lead to our root) is revoked ------------
    stranger_key = world.key("stranger.key")
    run(["openssl", "req", "-x509", "-new", "-key", str(stranger_key), "-subj", "/CN=Stranger CA", "-days", "30",
         "-out", str(tmp / "stranger.pem")])  # fmt: skip
    bob_token = dep.add_user("bob@example.org")
    rejected = enrol(
        world,
        "bob@example.org",
        bob_token,
        world.key("bob.key"),
        tmp / "bob.pem",
        "-out_trusted",
        str(tmp / "stranger.pem"),
    )
    assert rejected.returncode != 0, said(rejected)
    shown = dep.admin("user", "show", "bob@example.org", "--json").json()
    assert isinstance(shown, dict) and shown["state"] == "REVOKED", shown

    # -- the same ir again (replay): transactionID in use -------------------------------------------------
    replay = world.cmp(
        "-cmd",
        "ir",
        "-reqin",
        "ir.der",
        "-recipient",
        "/CN=mailkms",
        "-secret",
        f"pass:{token}",
        "-ref",
        "alice@example.org",
        "-newkey",
        str(key),
        "-certout",
        str(tmp / "again.pem"),
    )
    assert replay.returncode != 0
    assert "transactionIdInUse" in said(replay) or "badSenderNonce" in said(replay), said(replay)

    # -- the certConf again: its transaction is closed ----------------------------------------------------
    confirm = httpx.post(
        f"{dep.url}/.well-known/cmp/p/smime",
        content=(tmp / "certconf.der").read_bytes(),
        headers={"Content-Type": "application/pkixcmp"},
        verify=ssl.create_default_context(cafile=str(world.root)),
    )
    assert confirm.status_code == 200
    parsed = subprocess.run(
        ["openssl", "asn1parse", "-inform", "DER", "-i"], input=confirm.content, capture_output=True, timeout=30
    )
    assert b"cmp-unknown-transaction" in parsed.stdout, parsed.stdout

    # -- the token is spent (and its sealed copy erased at certConf): a new ir with it is refused ------------
    spent = enrol(world, "alice@example.org", token, world.key("other.key"), tmp / "other.pem")
    assert spent.returncode != 0 and "badMessageCheck" in said(spent), said(spent)

    # -- a body that is not CMP: an error PKIMessage, HTTP 200 ---------------------------------------------
    garbage = httpx.post(
        f"{dep.url}/.well-known/cmp",
        content=b"\x30\x03\x02\x01\x05 not cmp",
        headers={"Content-Type": "application/pkixcmp"},
        verify=ssl.create_default_context(cafile=str(world.root)),
    )
    assert garbage.status_code == 200 and garbage.headers["content-type"] == "application/pkixcmp"
    parsed = subprocess.run(
        ["openssl", "asn1parse", "-inform", "DER", "-i"], input=garbage.content, capture_output=True, timeout=30
    )
    assert parsed.returncode == 0 and b"bad-cmp-message" in parsed.stdout, parsed.stdout

    # -- kur before the reminder point: not due --------------------------------------------------------------
    new_key = world.key("sign2.key")
    early = world.cmp(
        "-cmd",
        "kur",
        "-cert",
        str(cert_path),
        "-key",
        str(key),
        "-newkey",
        str(new_key),
        "-certout",
        str(tmp / "early.pem"),
    )
    assert early.returncode != 0 and "not-due" in said(early) and "notAuthorized" in said(early), said(early)

    # -- a year on: kur renews (the same rules as the client's update request) -----------------------------------
    world.restart(YEAR_LATER)
    renewed_path = tmp / "sign2.pem"
    kur = world.cmp(
        "-cmd", "kur", "-cert", str(cert_path), "-key", str(key), "-newkey", str(new_key), "-certout", str(renewed_path)
    )
    assert kur.returncode == 0, said(kur)
    renewed = x509.load_pem_x509_certificate(renewed_path.read_bytes())
    assert renewed.serial_number != cert.serial_number
    assert lint_smime(renewed).exit_code == 0
    shown = dep.admin("user", "show", "alice@example.org", "--json", offset_days=YEAR_LATER).json()
    assert isinstance(shown, dict) and shown["generation"] == 2

    # -- rr signed by the holder; the revoked certificate can no longer update -------------------------------------
    rr = world.cmp(
        "-cmd", "rr", "-oldcert", str(renewed_path), "-cert", str(renewed_path), "-key", str(new_key), "-revreason", "4"
    )
    assert rr.returncode == 0, said(rr)
    shown = dep.admin("user", "show", "alice@example.org", "--json", offset_days=YEAR_LATER).json()
    assert isinstance(shown, dict) and shown["state"] == "REVOKED", shown
    after = world.cmp(
        "-cmd",
        "kur",
        "-cert",
        str(renewed_path),
        "-key",
        str(new_key),
        "-newkey",
        str(world.key("k3.key")),
        "-certout",
        str(tmp / "k3.pem"),
    )
    assert after.returncode != 0


def _csr(world: World, key: Path, mailbox: str) -> bytes:
    der = subprocess.run(
        ["openssl", "req", "-new", "-key", str(key), "-subj", f"/CN={mailbox}", "-outform", "DER"],
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout
    return base64.b64encode(der)
