"""Issue 15 end to end: the offline root's ceremony gives the S/MIME issuing CA a new key. Real
`mailkms init --offline-root`, `mailkms serve`, `mailkms-client`, `mailkms ca request --new-key`,
`mailkms ca root-ceremony sign-ca` and `mailkms ca import`; judged by pkilint, `openssl verify` and
`openssl ocsp` against the running server.

The server looks at the CA files only on SIGHUP here ([ca] reload_check_seconds set to an hour), so
the SIGHUP is what makes it take the new key. alice enrols under the old key, bob under the new one:
each verifies with its own chain only, and OCSP answers for both (alice's signed by the old key).
CRLs for the old key's certificates are not judged here (per-key CRLs: README)."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.e2e.conftest import ClientHome, Deployment, enrolled, openssl
from tests.e2e.test_ca_rekey_e2e import _crl_listing
from tests.e2e.test_ca_rekey_e2e import _verify as _verify_crl
from tests.e2e.test_offline_root_e2e import _mailkms, _pem, init_offline
from tests.judges import lint_pkix, lint_serverauth, lint_smime


def _ski(cert: x509.Certificate) -> str:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def _write(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _verify(root: Path, issuing: Path, leaf: Path) -> str:
    done = openssl(
        *("verify", "-x509_strict", "-purpose", "smimesign", "-CAfile", str(root)),
        *("-untrusted", str(issuing), str(leaf)),
    )
    return f"{done.returncode}\n" + (done.stdout + done.stderr).decode(errors="replace")


def _ocsp(dep: Deployment, root: Path, issuing: Path, leaf: Path) -> str:
    """`openssl ocsp` as a relying party over plain http; 'good' etc. for a verified answer."""
    url = f"http://127.0.0.1:{dep.http_port}/ocsp"
    done = openssl(
        *("ocsp", "-issuer", str(issuing), "-cert", str(leaf), "-url", url, "-CAfile", str(root), "-no_nonce"),
        *("-timeout", "20"),
    )
    text = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0 and "Response verify OK" in text, text
    found = re.search(rf"^{re.escape(str(leaf))}: (\w+)", text, re.MULTILINE)
    assert found, text
    return found.group(1)


def _audit(dep: Deployment, action: str) -> list[dict[str, object]]:
    with sqlite3.connect(dep.data / "mailkms.db") as db:
        rows = db.execute("SELECT details FROM audit_log WHERE action = ? ORDER BY seq", (action,)).fetchall()
    return [json.loads(r[0]) for r in rows]


def test_ceremony_rekeys_the_issuing_ca_and_a_running_server_takes_it(tmp_path: Path) -> None:
    dep, root_dir = init_offline(tmp_path)
    config = dep.data / "mailkms.toml"
    text, n = re.subn(r"(?m)^reload_check_seconds = 5\b", "reload_check_seconds = 3600", config.read_text())
    assert n == 1, "mailkms.toml names no reload_check_seconds"
    config.write_text(text)  # the server looks at the CA files on SIGHUP only

    ca = dep.data / "ca"
    root_pem = ca / "root.crt.pem"
    old_ca = _pem(ca / "issuing.crt.pem")
    old_key = (ca / "issuing.key.pem").read_bytes()
    old_pem = _write(tmp_path / "issuing-old.pem", old_ca)
    work = tmp_path / "carry"
    work.mkdir()
    try:
        dep.start()
        alice = enrolled(dep, tmp_path, "alice@example.org")
        alice_pem = tmp_path / "alice.pem"
        alice_pem.write_text(alice.run("cert", "signing").out)
        alice_cert = _pem(alice_pem)
        assert alice_cert.issuer == old_ca.subject
        alice_cert.verify_directly_issued_by(old_ca)

        # At the server: a CSR for a new key; at the root: signed; at the server: imported.
        asked = _mailkms(dep, "ca", "request", "--kind", "issuing", "--new-key", "--out", str(work / "issuing.csr"))
        assert "issuing" in asked.out
        csr = x509.load_pem_x509_csr((work / "issuing.csr").read_bytes())
        assert csr.subject == old_ca.subject and csr.public_key() != old_ca.public_key()
        assert (ca / "pending" / "issuing-ca.key.pem").exists()
        sign = ["ca", "root-ceremony", "sign-ca", "--root", str(root_dir), str(work / "issuing.csr")]
        _mailkms(dep, *sign, "--out", str(work / "issuing.crt"), root=True)
        new_ca = _pem(work / "issuing.crt")
        assert new_ca.subject == old_ca.subject and _ski(new_ca) != _ski(old_ca)
        assert new_ca.public_key() == csr.public_key()
        for verdict in (lint_pkix(new_ca), lint_serverauth(new_ca, "-d")):
            assert verdict.exit_code == 0, str(verdict)
        imported = _mailkms(dep, "ca", "import", str(work / "issuing.crt"), "--json").json()
        assert isinstance(imported, dict)
        [row] = imported["imported"]
        assert row["what"] == "issuing-ca" and row["old_key_id"] == _ski(old_ca)
        assert row["new_key_id"] == _ski(new_ca)
        kept = ca / "previous" / _ski(old_ca)
        assert row["kept_in"] == str(kept)
        assert _pem(kept / "issuing.crt.pem") == old_ca and (kept / "issuing.key.pem").read_bytes() == old_key
        assert _pem(ca / "issuing.crt.pem") == new_ca and not any((ca / "pending").glob("issuing-ca.*"))
        [rekeyed] = _audit(dep, "ca.rekeyed")
        assert rekeyed["old_key_id"] == _ski(old_ca) and rekeyed["new_key_id"] == _ski(new_ca)
        assert rekeyed["live_certificates"] == 2  # alice's signing and encryption certificates
        assert len(_audit(dep, "ca.imported")) == 1
        again = dep.admin("ca", "import", str(work / "issuing.crt"), check=False)
        assert again.code == 5 and "already in use" in again.out + again.err, again.out + again.err

        # The running server takes it on SIGHUP.
        assert dep.proc is not None
        assert "took issuing-ca" not in dep.log()
        os.kill(dep.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while not re.search(r"CA files changed: took issuing-ca\b", dep.log()):
            assert time.monotonic() < deadline and dep.proc.poll() is None, dep.log()
            time.sleep(0.2)

        # A new enrolment is issued by the new key; alice's certificate stays the old key's.
        bob = ClientHome(tmp_path / "client-bob", "bob@example.org")
        assert bob.enroll(dep, dep.add_user("bob@example.org")).code == 0
        dep.wait_for_mails("bob@example.org", 1)
        assert bob.run("sync").code == 0
        bob_pem = tmp_path / "bob.pem"
        bob_pem.write_text(bob.run("cert", "signing").out)
        bob_cert = _pem(bob_pem)
        bob_cert.verify_directly_issued_by(new_ca)
        verdict = lint_smime(bob_cert)
        assert verdict.exit_code == 0, str(verdict)
        new_pem = _write(tmp_path / "issuing-new.pem", new_ca)
        assert _verify(root_pem, new_pem, bob_pem).startswith("0\n")
        assert _verify(root_pem, old_pem, alice_pem).startswith("0\n")
        assert not _verify(root_pem, new_pem, alice_pem).startswith("0\n")  # a new key, not a new certificate
        assert not _verify(root_pem, old_pem, bob_pem).startswith("0\n")

        # OCSP answers for both, each verified against its own issuer (alice's signed by the old key).
        assert _ocsp(dep, root_pem, old_pem, alice_pem) == "good"
        assert _ocsp(dep, root_pem, new_pem, bob_pem) == "good"

        # Revoked, each is listed on the CRL its own CDP names, signed by its own key: error 23 for both.
        dep.admin("revoke", "alice@example.org", "--reason", "keyCompromise")
        dep.admin("revoke", "bob@example.org", "--reason", "keyCompromise")
        for name, cert, pem_path, issuer_pem, issuer in (
            ("alice", alice_cert, alice_pem, old_pem, old_ca),
            ("bob", bob_cert, bob_pem, new_pem, new_ca),
        ):
            crl, crl_path = _crl_listing(dep, cert, tmp_path, name, revoked=True)
            assert crl.is_signature_valid(issuer.public_key()), name
            verdict_crl = _verify_crl(pem_path, crl_path, issuer_pem, root_pem)
            out = verdict_crl.stdout + verdict_crl.stderr
            assert verdict_crl.returncode != 0 and "error 23" in out, (name, out)
    finally:
        dep.stop()
