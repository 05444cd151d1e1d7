"""`mailkms ca rekey` beside a running server's services (issue 15): what the old key issued keeps
being renewable and answerable. OCSP for an old-key certificate is signed by the old CA key itself
(RFC 6960 §4.2.2.2), for a new-key certificate by the responder the new key issued; `openssl ocsp`
judges each against its own issuer."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.x509 import ocsp

from mailkms.pki import issued_by
from mailkms.services import rekey_issuing_ca
from tests.conftest import CA_PASSPHRASE
from tests.integration.test_revocation import RENEW_URL, Enrolled, _ocsp_request, certificates_of
from tests.judges import pem, pkilint


def _openssl_ocsp(tmp: Path, name: str, der: bytes, issuer: x509.Certificate, root: x509.Certificate, at: int) -> str:
    (tmp / f"{name}.der").write_bytes(der)
    (tmp / f"{name}-issuer.pem").write_bytes(pem(issuer))
    (tmp / "root.pem").write_bytes(pem(root))
    cmd = ["openssl", "ocsp", "-respin", str(tmp / f"{name}.der"), "-issuer", str(tmp / f"{name}-issuer.pem")]
    cmd += ["-CAfile", str(tmp / "root.pem"), "-no_nonce", "-attime", str(at), "-resp_text"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def test_old_and_new_key_certificates_renew_revoke_and_answer_ocsp(services, clock, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    services.ensure_server_identities()
    ann = Enrolled(services, "ann@example.org")
    old_ca = services.ca.issuing.certificate
    done = rekey_issuing_ca(services.ca.paths, CA_PASSPHRASE.encode(), "", services.ca.urls, clock.now())
    changed = services.reload_ca()  # serve: every [ca] reload_check_seconds, and on SIGHUP
    assert changed[0] == "issuing-ca" and {"ocsp-responder", "mail-signer"} <= set(changed), changed
    assert "ocsp-responder:" + done.old_key_id in changed  # the old key certified the new responder key
    assert issued_by(services.ca.require_mail_signer().certificate, services.ca.issuing.certificate)
    assert len(services.ca.previous_issuers()) == 1
    new_ca = services.ca.issuing.certificate
    assert new_ca != old_ca and new_ca.subject == old_ca.subject
    assert done.new_key_id != done.old_key_id
    responder = services.ca.require_ocsp_responder().certificate
    assert issued_by(responder, new_ca)

    ben = Enrolled(services, "ben@example.org")
    assert issued_by(ben.signing, new_ca) and issued_by(ann.signing, old_ca)
    clock.advance(dt.timedelta(days=370))  # ann is due for renewal
    services.ensure_server_identities()
    services.renewal.renew(ann.renewal_request(services), RENEW_URL)  # signed with the old key's certificate
    renewed = [c for c in certificates_of(services, ann.mailbox) if c not in ann.certs]
    assert renewed and all(issued_by(c, new_ca) for c in renewed)

    at = int(clock.now().timestamp())
    for who, issuer in ((ann, old_ca), (ben, new_ca)):
        good = services.ocsp.answer(_ocsp_request(who.signing, issuer))
        assert good.status == "good", who.mailbox
        services.revocation.revoke_serial(f"0x{who.signing.serial_number:x}", "keyCompromise", "admin:test")
        answer = services.ocsp.answer(_ocsp_request(who.signing, issuer))
        assert answer.status == "revoked", who.mailbox
        response = ocsp.load_der_ocsp_response(answer.der)
        assert response.certificate_status is ocsp.OCSPCertStatus.REVOKED
        out = _openssl_ocsp(tmp_path, who.mailbox, answer.der, issuer, services.ca.root, at)
        assert "Response verify OK" in out and "Cert Status: revoked" in out, out
        verdict = pkilint("lint_ocsp_response", ["-s", "WARNING"], answer.der)
        assert verdict.exit_code == 0, str(verdict)
    # Each key's answers come from a delegated responder that key issued, for one responder key pair:
    # no process answering OCSP needs a CA key.
    old_answer = ocsp.load_der_ocsp_response(services.ocsp.answer(_ocsp_request(ann.signing, old_ca)).der)
    (old_responder,) = old_answer.certificates
    assert issued_by(old_responder, old_ca) and old_responder != old_ca
    assert old_responder.public_key() == services.ca.require_ocsp_responder().certificate.public_key()
    assert old_responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING]
    )
    # The OCSP-only listener's view: the responder files only, and it answers for both keys.
    from mailkms.services._ocsp import FileResponderKeys, OCSPResponder

    files = FileResponderKeys(services.ca.paths, CA_PASSPHRASE.encode())
    assert [c.public_key() for c, _ in files.answering_for_previous()] == [old_ca.public_key()]
    assert all(s.certificate == old_responder for _, s in files.answering_for_previous())
    listener = OCSPResponder(services.db, files, services.settings, clock)
    try:
        for who, issuer in ((ann, old_ca), (ben, new_ca)):
            heard = listener.answer(_ocsp_request(who.signing, issuer))
            assert heard.status == "revoked", who.mailbox
            out = _openssl_ocsp(tmp_path, f"listener-{who.mailbox}", heard.der, issuer, services.ca.root, at)
            assert "Response verify OK" in out and "Cert Status: revoked" in out, out
    finally:
        listener.close()
    # Both issuing CA certificates are published by key identifier; /ca/issuing.crt stays the first key's (the AIA
    # of what it issued), a later key's certificates name its own URL.
    from fastapi.testclient import TestClient

    from mailkms.api import create_http_app

    client = TestClient(create_http_app(services))
    for ca in (old_ca, new_ca):
        got = client.get(
            f"/ca/issuing/{ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()}.crt"
        )
        assert got.status_code == 200 and x509.load_der_x509_certificate(got.content) == ca
    assert x509.load_der_x509_certificate(client.get("/ca/issuing.crt").content) == old_ca
    for who, ca in ((ann.signing, old_ca), (ben.signing, new_ca)):
        aia = who.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        (url,) = [
            d.access_location.value for d in aia if d.access_method == x509.AuthorityInformationAccessOID.CA_ISSUERS
        ]
        got = client.get(url.removeprefix("http://kms.example.org"))
        assert x509.load_der_x509_certificate(got.content) == ca, url
    assert client.get("/ca/issuing/00.crt").status_code == 404
    # A serial asked of the wrong issuer is not that issuer's: unauthorized, unsigned.
    assert services.ocsp.answer(_ocsp_request(ann.signing, new_ca)).status == "unused"
    assert services.ocsp.answer(_ocsp_request(ben.signing, old_ca)).status == "unused"


def test_the_rekey_command_rekeys_with_live_certificates_and_records_them(services, cli_env) -> None:  # type: ignore[no-untyped-def]
    """CRLs are signed per key now, so live certificates no longer stop a rekey; --force is still accepted."""
    import json

    from sqlalchemy import select
    from typer.testing import CliRunner

    from mailkms.cli._main import app
    from mailkms.store import AuditRecord

    services.ensure_server_identities()
    Enrolled(services, "cid@example.org")
    before = services.ca.paths.issuing_cert.read_bytes()
    runner = CliRunner()
    done = runner.invoke(app, ["ca", "rekey", "--json"])
    assert done.exit_code == 0, done.output
    shown = json.loads(done.output)
    new = x509.load_pem_x509_certificate(services.ca.paths.issuing_cert.read_bytes())
    assert shown["old_key_id"] != shown["new_key_id"] and new.serial_number == int(shown["serial"], 16)
    assert Path(shown["kept_in"], "issuing.crt.pem").read_bytes() == before
    forced = runner.invoke(app, ["ca", "rekey", "--force", "--json"])  # scripts from before keep working
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.output)["old_key_id"] == shown["new_key_id"]
    with services.db.read_only() as session:
        rows = session.execute(select(AuditRecord).where(AuditRecord.action == "ca.rekeyed")).scalars().all()
        details = [json.loads(r.details) for r in rows]
    assert len(details) == 2 and details[0]["new_key_id"] == shown["new_key_id"]
    assert details[0]["live_certificates"] == 2  # the pair the old key still answers for
