"""Issue 15 §1 end to end: the issuing CA, OCSP-responder and mail-signing keys in a PKCS#11 token
(SoftHSM2, initialised here with softhsm2-util), a real `mailkms serve`, and outside judges:
openssl verify (chain, CRL), openssl ocsp, pkilint, curl as the EST client; renewal under faketime;
the token taken away mid-run (its folder moved) and given back without a restart."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.e2e.conftest import PUBLIC_URL, ClientHome, Deployment, enrolled, openssl
from tests.e2e.test_cmp_openssl import World as CMPClient
from tests.e2e.test_cmp_openssl import enrol as cmp_ir
from tests.e2e.test_cmp_openssl import said
from tests.judges import lint_smime, openssl_verify
from tests.smime_support import require_tools

pytestmark = pytest.mark.e2e

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "4711-test-pin"
RENEWAL_DAYS = 380  # past the 12-month reminder point: the log-on question and renewal


@dataclass
class SoftHSM:
    folder: Path

    @property
    def conf(self) -> Path:
        return self.folder / "softhsm2.conf"

    @property
    def tokens(self) -> Path:
        return self.folder / "tokens"

    @property
    def pin_file(self) -> Path:
        return self.folder / "pin"

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def uri(self, label: str = "mailkms-ca") -> str:
        return f"pkcs11:token=kms;object={label}?module-path={MODULE}&pin-source=file:{self.pin_file}"


def init_softhsm(folder: Path) -> SoftHSM:
    """A token of its own, in a temporary folder (SOFTHSM2_CONF), with its user PIN in a 0600 file."""
    require_tools("softhsm2-util", package="softhsm2")
    hsm = SoftHSM(folder)
    hsm.tokens.mkdir(parents=True)
    hsm.conf.write_text(f"directories.tokendir = {hsm.tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    done = subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "kms", "--pin", PIN, "--so-pin", "so-" + PIN],
        env={**os.environ, **hsm.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    hsm.pin_file.write_text(PIN + "\n")
    hsm.pin_file.chmod(0o600)
    return hsm


@pytest.fixture
def hsm(tmp_path: Path) -> SoftHSM:
    return init_softhsm(tmp_path / "hsm")


def token_keys(hsm: SoftHSM) -> dict[str, dict[str, object]]:
    """What the token itself says about its private keys (python-pkcs11 in this process)."""
    import pkcs11

    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    try:
        lib = pkcs11.lib(MODULE)
        lib.reinitialize()  # SoftHSM reads its configuration at C_Initialize; one library per process
        return _token_keys(lib.get_token(token_label="kms"))
    finally:
        if old is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old


def _token_keys(token: Any) -> dict[str, dict[str, object]]:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass
    from pkcs11.util.ec import encode_ec_public_key
    from pkcs11.util.rsa import encode_rsa_public_key

    found: dict[str, dict[str, object]] = {}
    with token.open(user_pin=PIN) as session:
        for key in list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})):
            label = str(key[Attribute.LABEL])
            try:
                key[Attribute.VALUE if key.key_type == pkcs11.KeyType.EC else Attribute.PRIVATE_EXPONENT]
                readable = True
            except pkcs11.exceptions.AttributeSensitive:
                readable = False
            public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=key[Attribute.ID])
            der = encode_rsa_public_key(public) if key.key_type == pkcs11.KeyType.RSA else encode_ec_public_key(public)
            spki = serialization.load_der_public_key(der).public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            found.setdefault(label, {"sensitive": [], "extractable": [], "readable": [], "spki": []})
            for name, value in (
                ("sensitive", key[Attribute.SENSITIVE]),
                ("extractable", key[Attribute.EXTRACTABLE]),
                ("readable", readable),
                ("spki", spki),
            ):
                found[label][name].append(value)  # type: ignore[attr-defined]
    return found


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def deployment(hsm: SoftHSM, tmp_path: Path) -> Iterator[Deployment]:
    dep = Deployment(tmp_path / "data", server_env=hsm.env)
    dep.admin(
        "init", "--hostname", "localhost", "--public-url", PUBLIC_URL, "--key-type", "p256", "--key-store", hsm.uri()
    )
    yield dep
    dep.stop()


def pem_file(folder: Path, name: str, cert: x509.Certificate) -> Path:
    path = folder / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def client_cert(home: ClientHome, which: str, offset_days: float | None = None) -> x509.Certificate:
    res = home.run("cert", which, offset_days=offset_days)
    assert res.code == 0, res.err
    return x509.load_pem_x509_certificate(res.out.encode())


def judge(cert: x509.Certificate, root: x509.Certificate, issuing: x509.Certificate, at: dt.datetime) -> None:
    verdict = openssl_verify(cert, root, [issuing], purpose="smimesign", at=at)
    assert verdict.exit_code == 0, verdict
    lint = lint_smime(cert)
    assert lint.exit_code == 0, lint


def test_ca_keys_in_softhsm_enrol_est_crl_ocsp_token_gone_and_renewal(
    deployment: Deployment, hsm: SoftHSM, tmp_path: Path
) -> None:
    dep = deployment
    ca = dep.data / "ca"
    # -- init: the keys are in the token, the configuration has the URI and no PIN -------------------
    config = (dep.data / "mailkms.toml").read_text()
    assert f"key_store = {json.dumps(hsm.uri())}" in config and PIN not in config
    for key in (ca / "issuing.key.pem", dep.data / "ocsp/responder.key.pem", dep.data / "mail/signer.key.pem"):
        assert not key.exists(), f"{key} must not exist: the key is in the token"
        assert PIN not in key.with_suffix(".pkcs11").read_text()
    root = x509.load_pem_x509_certificate((ca / "root.crt.pem").read_bytes())
    issuing = x509.load_pem_x509_certificate((ca / "issuing.crt.pem").read_bytes())
    keys = token_keys(hsm)
    assert set(keys) == {"mailkms-ca", "mailkms-ca-ocsp", "mailkms-ca-mail"}, keys
    for label, facts in keys.items():
        assert facts["sensitive"] == [True] and facts["extractable"] == [False], (label, facts)
        assert facts["readable"] == [False], f"{label}: the token gave out private key material"
    assert keys["mailkms-ca"]["spki"] == [spki(issuing)], "the issuing CA certificate certifies the token's key"
    responder = x509.load_pem_x509_certificate((dep.data / "ocsp/responder.crt.pem").read_bytes())
    assert keys["mailkms-ca-ocsp"]["spki"] == [spki(responder)]
    lint_ca = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", str(ca / "root.crt.pem"), str(ca / "issuing.crt.pem")],
        capture_output=True,
        text=True,
    )
    assert lint_ca.returncode == 0, lint_ca.stderr

    # -- enrolment (two users) and EST, certificates signed in the token ------------------------------
    dep.start()
    alice = enrolled(dep, tmp_path, "alice@example.org")
    dave = enrolled(dep, tmp_path, "dave@example.org")
    est_cert = est_simpleenroll(dep, tmp_path, "bob@example.org")
    # CMP (openssl cmp): ir protected by the token's MAC; the kur a year on is answered under the
    # signature of the issuing CA key in the token, which openssl checks against the root
    cmp = CMPClient(dep, tmp_path, ca / "root.crt.pem", ca / "issuing.crt.pem")
    frank_key, frank_pem = cmp.key("frank.key"), tmp_path / "frank.pem"
    done = cmp_ir(cmp, "frank@example.org", dep.add_user("frank@example.org"), frank_key, frank_pem)
    assert done.returncode == 0, said(done)
    cmp_cert = x509.load_pem_x509_certificate(frank_pem.read_bytes())
    now = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    for cert in (client_cert(alice, "signing"), client_cert(dave, "signing"), est_cert, cmp_cert):
        judge(cert, root, issuing, now)

    # -- revocation: the CRL and the OCSP answer, both signed by token keys --------------------------
    dave_cert = client_cert(dave, "signing")
    dep.admin("revoke", "dave@example.org", "--reason", "keyCompromise")
    crl = wait_for_crl_listing(dep, dave_cert.serial_number)
    crl_pem = tmp_path / "issuing.crl.pem"
    crl_pem.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    issuing_pem = pem_file(tmp_path, "issuing", issuing)
    root_pem = pem_file(tmp_path, "root", root)
    dave_pem = pem_file(tmp_path, "dave", dave_cert)
    checked = openssl("crl", "-in", str(crl_pem), "-noout", "-CAfile", str(issuing_pem), "-verify")
    assert checked.returncode == 0 and b"verify OK" in checked.stdout + checked.stderr, checked.stderr
    revoked = openssl(
        *("verify", "-crl_check", "-CRLfile", str(crl_pem), "-CAfile", str(root_pem)),
        *("-untrusted", str(issuing_pem), str(dave_pem)),
    )
    assert revoked.returncode != 0 and b"certificate revoked" in revoked.stdout + revoked.stderr
    wait_for_ocsp(dep, tmp_path, issuing_pem, root_pem, dave_pem, "revoked")
    alice_pem = pem_file(tmp_path, "alice", client_cert(alice, "signing"))
    wait_for_ocsp(dep, tmp_path, issuing_pem, root_pem, alice_pem, "good")

    # -- the token goes away: a clear refusal, nothing issued; it comes back: works, no restart -------
    carol = ClientHome(tmp_path / "client-carol", "carol@example.org")
    token = dep.add_user("carol@example.org")
    away = hsm.folder / "tokens-away"
    bob_pem = pem_file(tmp_path, "bob", est_cert)  # never asked for by OCSP: its answer must be signed now
    hsm.tokens.rename(away)
    try:
        refused = carol.enroll(dep, token)
        wait_for_ocsp(dep, tmp_path, issuing_pem, root_pem, bob_pem, "trylater")  # unsigned, RFC 6960
    finally:
        away.rename(hsm.tokens)
    assert refused.code != 0
    assert "key store" in refused.err and "not" in refused.err, refused.err
    assert "refused POST /api/v1/enrolments: key-store-unavailable" in dep.log(), dep.log()[-2000:]
    db = sqlite3.connect(dep.data / "mailkms.db")
    stored = db.execute(
        "select count(*) from certificates c join users u on u.id = c.user_id where u.email = 'carol@example.org'"
    ).fetchone()[0]
    assert stored == 0, "a certificate was stored while the token was gone"
    assert dep.mails("carol@example.org") == []
    again = carol.enroll(dep, token)  # the same token: the refused attempt did not spend it
    assert again.code == 0, again.err
    dep.wait_for_mails("carol@example.org", 1)
    assert carol.run("sync").code == 0
    judge(client_cert(carol, "signing"), root, issuing, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2))
    wait_for_ocsp(dep, tmp_path, issuing_pem, root_pem, bob_pem, "good")

    # -- renewal a year on (faketime): the server renews its OCSP and mail-signing keys in the token --
    dep.stop()
    dep.start(offset_days=RENEWAL_DAYS)
    before = len(dep.mails("alice@example.org"))
    res = alice.run("logon", "--answer", "yes", offset_days=RENEWAL_DAYS)
    assert res.code == 0, res.err
    dep.wait_for_mails("alice@example.org", before + 1)
    res = alice.run("logon", offset_days=RENEWAL_DAYS)
    assert res.code == 0 and "Installed" in res.out, res.out + res.err
    renewed = client_cert(alice, "signing", offset_days=RENEWAL_DAYS)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=RENEWAL_DAYS, seconds=2)
    assert abs((renewed.not_valid_before_utc - later).total_seconds()) < 600
    judge(renewed, root, issuing, later)
    cmp.offset = RENEWAL_DAYS
    frank_new, frank_renewed = cmp.key("frank-new.key"), tmp_path / "frank-renewed.pem"
    kur = cmp.cmp(
        *("-cmd", "kur", "-cert", str(frank_pem), "-key", str(frank_key)),
        *("-newkey", str(frank_new), "-certout", str(frank_renewed)),
    )
    assert kur.returncode == 0, said(kur)
    judge(x509.load_pem_x509_certificate(frank_renewed.read_bytes()), root, issuing, later)
    # The keys of the first responder (30 days) and mail signer (12 months) are destroyed in the token:
    # their certificates have expired; only the current ones are left (the token's own listing).
    keys = token_keys(hsm)
    new_responder = x509.load_pem_x509_certificate((dep.data / "ocsp/responder.crt.pem").read_bytes())
    new_mail = x509.load_pem_x509_certificate((dep.data / "mail/signer.crt.pem").read_bytes())
    assert spki(new_responder) != spki(responder)
    assert keys["mailkms-ca-ocsp"]["spki"] == [spki(new_responder)], keys
    assert keys["mailkms-ca-mail"]["spki"] == [spki(new_mail)], keys

    # -- a locked token (wrong PIN) for a new process: exit 75 and a plain reason, no traceback ---------
    hsm.pin_file.write_text("not-the-pin\n")
    locked = dep.admin("user", "add", "erin@example.org", check=False)
    assert locked.code == 75, locked.err + locked.out
    assert "log-in failed" in locked.err and "Traceback" not in locked.err and "not-the-pin" not in locked.err


def est_simpleenroll(dep: Deployment, folder: Path, mailbox: str) -> x509.Certificate:
    """curl as the EST client (RFC 7030 simpleenroll, HTTP basic with the one-time token), openssl
    for its key and request."""
    token = dep.add_user(mailbox)
    key, der, b64 = folder / "est.key", folder / "est.der", folder / "est.b64"
    assert (
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)).returncode == 0
    )
    req = openssl(
        "req",
        "-new",
        "-key",
        str(key),
        "-subj",
        f"/CN={mailbox}/emailAddress={mailbox}",
        "-outform",
        "DER",
        "-out",
        str(der),
    )
    assert req.returncode == 0, req.stderr
    b64.write_bytes(openssl("base64", "-in", str(der)).stdout)
    answer = subprocess.run(
        [
            "curl",
            "-sS",
            "-k",
            "--fail-with-body",
            "--data-binary",
            f"@{b64}",
            "-H",
            "Content-Type: application/pkcs10",
            "-u",
            f"{mailbox}:{token}",
            f"{dep.url}/.well-known/est/simpleenroll",
        ],
        capture_output=True,
        timeout=60,
    )
    assert answer.returncode == 0, answer.stdout + answer.stderr
    p7 = openssl("base64", "-d", input_bytes=answer.stdout).stdout
    pems = openssl("pkcs7", "-inform", "DER", "-print_certs", input_bytes=p7)
    assert pems.returncode == 0, pems.stderr
    return x509.load_pem_x509_certificates(pems.stdout)[0]


def wait_for_crl_listing(dep: Deployment, serial: int) -> x509.CertificateRevocationList:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://localhost:{dep.http_port}/crl/issuing.crl", timeout=5) as answer:
            crl = x509.load_der_x509_crl(answer.read())
        if crl.get_revoked_certificate_by_serial_number(serial) is not None:
            return crl
        time.sleep(0.3)
    pytest.fail("the served CRL never listed the revoked certificate")


def wait_for_ocsp(dep: Deployment, folder: Path, issuing: Path, root: Path, cert: Path, status: str) -> None:
    """`openssl ocsp` against the server: the response verifies up to the root and says `status`."""
    url = f"http://localhost:{dep.http_port}/ocsp"
    args = ["ocsp", "-issuer", str(issuing), "-cert", str(cert), "-url", url, "-CAfile", str(root), "-no_nonce"]
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        done = openssl(*args)
        text = (done.stdout + done.stderr).decode(errors="replace")
        if status == "trylater" and "Responder Error: trylater" in text:
            return
        if done.returncode == 0 and "Response verify OK" in text and f": {status}" in text:
            return
        time.sleep(0.5)
    pytest.fail(f"openssl ocsp never said {status}: {text}")
