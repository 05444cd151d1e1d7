"""`mailkms ca rekey` on a running server, real processes (issue 15): the server takes the new key on
SIGHUP, a user enrolled afterwards gets a certificate of the new key, and each key's certificates
name a CRL signed by that key. `mailkms revoke` (another process) revokes one user of each key;
openssl fetches nothing itself, so the test takes each CRL from the URL the certificate's CDP names
and `openssl verify -crl_check` says error 23 for both revoked ones, OK for an unrevoked one of the
new key; pkilint finds nothing in either CRL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailkms.pki import ca_key_id, crl_urls, verify_message
from tests.e2e.conftest import PUBLIC_URL, ClientHome, Deployment, enrolled, init_deployment
from tests.judges import pkilint


def _verify(cert: Path, crl: Path, issuer: Path, root: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["openssl", "verify", "-crl_check", "-CAfile", str(root), "-untrusted", str(issuer), "-CRLfile", str(crl)]
    return subprocess.run([*cmd, str(cert)], capture_output=True, text=True, timeout=60)


def _issuing_ca(dep: Deployment, key_id: str | None = None) -> x509.Certificate | None:
    """/ca/issuing.crt, or the issuing CA certificate of key `key_id` (None while the server does not know it)."""
    path = f"ca/issuing/{key_id}.crt" if key_id else "ca/issuing.crt"
    got = httpx.get(f"http://127.0.0.1:{dep.http_port}/{path}")
    return x509.load_der_x509_certificate(got.content) if got.status_code == 200 else None


def _ca_issuers(cert: x509.Certificate) -> str:
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    (url,) = [d.access_location.value for d in aia if d.access_method == x509.AuthorityInformationAccessOID.CA_ISSUERS]
    return url


def _crl_listing(
    dep: Deployment, cert: x509.Certificate, work: Path, name: str, revoked: bool
) -> tuple[x509.CertificateRevocationList, Path]:
    """The CRL the certificate's CDP names; for a revoked one, once the server serves one listing it (30 s at most)."""
    (url,) = crl_urls(cert)
    path = url.removeprefix(PUBLIC_URL)
    deadline = time.monotonic() + 30
    while True:
        got = httpx.get(f"http://127.0.0.1:{dep.http_port}/{path}")
        assert got.status_code == 200, (url, got.status_code)
        crl = x509.load_der_x509_crl(got.content)
        listed = crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        if listed == revoked or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    out = work / f"{name}.crl.pem"
    out.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return crl, out


def _signed_without_chain(home: ClientHome, work: Path) -> Path:
    """A mail signed by `home`'s signing key (from its PKCS#12 export) that carries the signer's certificate only."""
    p12 = work / f"{home.mailbox}.p12"
    exported = home.run("export", "--out", str(p12), env_extra={"MAILKMS_EXPORT_PASSWORD": "export-pw-run"})
    assert exported.code == 0, exported.err
    signing = x509.load_pem_x509_certificate(home.run("cert", "signing").out.encode())
    keys = subprocess.run(
        ["openssl", "pkcs12", "-in", str(p12), "-passin", "pass:export-pw-run", "-nocerts", "-nodes"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    blocks = [b.split("-----END PRIVATE KEY-----")[0] for b in keys.split("-----BEGIN PRIVATE KEY-----")[1:]]
    loaded = [
        serialization.load_pem_private_key(f"-----BEGIN PRIVATE KEY-----{b}-----END PRIVATE KEY-----\n".encode(), None)
        for b in blocks
    ]
    (key,) = [k for k in loaded if k.public_key() == signing.public_key()]
    key_pem = work / "signer.key"
    key_pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_pem = work / "signer.pem"
    cert_pem.write_bytes(signing.public_bytes(serialization.Encoding.PEM))
    body = work / "body.txt"
    body.write_text(
        f"To: someone@example.org\r\nFrom: {home.mailbox}\r\nSubject: hello\r\n\r\nsigned by the old key\r\n"
    )
    out = work / "signed.eml"
    done = subprocess.run(
        [
            "openssl",
            "cms",
            "-sign",
            "-in",
            str(body),
            "-signer",
            str(cert_pem),
            "-inkey",
            str(key_pem),
            "-out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return out


def test_a_rekey_on_a_running_server_keeps_every_certificate_checkable_by_crl(tmp_path: Path) -> None:
    dep = init_deployment(tmp_path / "data")
    work = tmp_path / "work"
    work.mkdir()
    root = dep.data / "ca" / "root.crt.pem"
    dep.start()
    try:
        bob = enrolled(dep, work, "bob@example.org")
        old_ca = _issuing_ca(dep)
        assert old_ca is not None
        done = dep.admin("ca", "rekey", "--json")  # another process, while the server runs
        rekeyed = json.loads(done.out)
        assert rekeyed["old_key_id"] == ca_key_id(old_ca)
        assert dep.proc is not None
        os.kill(dep.proc.pid, signal.SIGHUP)  # take it now rather than within reload_check_seconds
        deadline = time.monotonic() + 30
        while _issuing_ca(dep, rekeyed["new_key_id"]) is None and time.monotonic() < deadline:
            time.sleep(0.3)
        new_ca = _issuing_ca(dep, rekeyed["new_key_id"])
        assert new_ca is not None and ca_key_id(new_ca) == rekeyed["new_key_id"]
        assert _issuing_ca(dep) == old_ca  # what the AIA of the old key's certificates names
        carol = enrolled(dep, work, "carol@example.org")
        dave = enrolled(dep, work, "dave@example.org")

        issuers = {"old": work / "old-issuing.pem", "new": work / "new-issuing.pem"}
        issuers["old"].write_bytes(old_ca.public_bytes(serialization.Encoding.PEM))
        issuers["new"].write_bytes(new_ca.public_bytes(serialization.Encoding.PEM))
        certs: dict[str, tuple[x509.Certificate, Path]] = {}
        for name, home in (("bob", bob), ("carol", carol), ("dave", dave)):
            path = work / f"{name}.pem"
            path.write_text(home.run("cert", "signing").out)
            certs[name] = (x509.load_pem_x509_certificate(path.read_bytes()), path)
        assert crl_urls(certs["bob"][0]) == [f"{PUBLIC_URL}crl/issuing.crl"]  # the old key's, as issued
        assert crl_urls(certs["carol"][0]) == [f"{PUBLIC_URL}crl/issuing/1.crl"]  # the new key's own
        assert _ca_issuers(certs["bob"][0]) == f"{PUBLIC_URL}ca/issuing.crt"
        assert _ca_issuers(certs["carol"][0]) == f"{PUBLIC_URL}ca/issuing/{rekeyed['new_key_id']}.crt"
        for name, key in (("bob", "old"), ("carol", "new"), ("dave", "new")):  # each chains to its own key
            chain = subprocess.run(
                ["openssl", "verify", "-CAfile", str(root), "-untrusted", str(issuers[key]), str(certs[name][1])],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert chain.returncode == 0, (name, chain.stdout + chain.stderr)

        # carol (enrolled after the rekey) learnt the old issuing CA from her delivery mail: a mail bob signs
        # with his old-key certificate alone (no chain in it) is trusted by her client, CRL checked.
        mail = _signed_without_chain(bob, work)
        verdict = carol.run("verify", str(mail), "--json")
        assert verdict.code == 0, verdict.out + verdict.err
        assert "bob@example.org" in verdict.out
        # bob (enrolled before the rekey, no delivery since) has never seen the new issuing CA: his client
        # fetches it by the key id in the AKI of carol's certificate (pinned TLS), uses it because the
        # root signed it, and keeps it, so the next such mail needs no fetch.
        state = json.loads((bob.home / "state.json").read_text())
        assert not any(new_ca == x509.load_pem_x509_certificate(p.encode()) for p in state["ca_chain_pem"])
        mail = _signed_without_chain(carol, work)
        verdict = bob.run("verify", str(mail), "--json")
        assert verdict.code == 0, verdict.out + verdict.err
        assert "carol@example.org" in verdict.out
        state = json.loads((bob.home / "state.json").read_text())
        assert any(new_ca == x509.load_pem_x509_certificate(p.encode()) for p in state["ca_chain_pem"])
        # carol's client knows both issuing CAs; a mail she signs carries hers only
        message = work / "to-sign.eml"
        message.write_bytes(b"From: carol@example.org\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nhello\r\n")
        signed = carol.run("sign", str(message))
        assert signed.code == 0, signed.err
        carried = verify_message(signed.out.encode()).signed.certificates
        assert new_ca in carried and old_ca not in carried

        dep.admin("revoke", "bob@example.org", "--reason", "keyCompromise")
        dep.admin("revoke", "carol@example.org", "--reason", "keyCompromise")
        for name, key, revoked in (("bob", "old", True), ("carol", "new", True), ("dave", "new", False)):
            cert, path = certs[name]
            crl, crl_path = _crl_listing(dep, cert, work, name, revoked)
            expected_ca = old_ca if key == "old" else new_ca
            assert crl.is_signature_valid(expected_ca.public_key()), name
            verdict = _verify(path, crl_path, issuers[key], root)
            out = verdict.stdout + verdict.stderr
            if revoked:
                assert verdict.returncode != 0 and "error 23" in out and "certificate revoked" in out, (name, out)
            else:
                assert verdict.returncode == 0 and "OK" in out, (name, out)
            lint = pkilint("lint_crl", ["-t", "CRL", "-p", "BR", "-s", "WARNING"], crl_path.read_bytes())
            assert lint.exit_code == 0, (name, str(lint))
    finally:
        dep.stop()


def test_openssl_cmp_renews_a_certificate_of_the_replaced_key(tmp_path: Path) -> None:
    """`openssl cmp -cmd kur` (with its certConf) signed with a certificate the replaced key issued, a year
    on under faketime: the new certificate comes from the new key, and verifies with the new chain."""
    from tests.e2e.test_cmp_openssl import YEAR_LATER, World, enrol, said

    dep = init_deployment(tmp_path / "data")
    chain = tmp_path / "chain.pem"
    chain.write_text(dep.admin("ca", "chain").out)
    root = tmp_path / "root.pem"
    root.write_bytes(x509.load_pem_x509_certificates(chain.read_bytes())[-1].public_bytes(serialization.Encoding.PEM))
    world = World(dep, tmp_path, root, chain)
    dep.start()
    try:
        key, cert = world.key("erin.key"), tmp_path / "erin.pem"
        done = enrol(world, "erin@example.org", dep.add_user("erin@example.org"), key, cert)
        assert done.returncode == 0, said(done)
        old_ca = _issuing_ca(dep)
        assert old_ca is not None
        x509.load_pem_x509_certificate(cert.read_bytes()).verify_directly_issued_by(old_ca)
        rekeyed = json.loads(dep.admin("ca", "rekey", "--json").out)
        world.restart(YEAR_LATER)  # a year on: due for renewal; the server starts with the new key
        renewed = tmp_path / "erin-renewed.pem"
        kur = world.cmp(
            "-cmd", "kur", "-cert", str(cert), "-key", str(key), "-newkey", str(world.key("erin2.key")),
            "-certout", str(renewed),
        )  # fmt: skip
        assert kur.returncode == 0, said(kur)
        new_ca = _issuing_ca(dep, rekeyed["new_key_id"])
        assert new_ca is not None
        x509.load_pem_x509_certificate(renewed.read_bytes()).verify_directly_issued_by(new_ca)
    finally:
        dep.stop()
