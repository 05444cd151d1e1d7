"""Issue 3 end to end: real server, real SMTP sink, real client, outside judges."""

from __future__ import annotations

import email
import json
import shutil
import sqlite3
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import (
    CLIENT_PASSPHRASE,
    ClientHome,
    Deployment,
    enrolled,
    free_port,
    init_deployment,
    openssl,
    pkilint_smime,
)

MAILBOX = "alice@example.org"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_enrol_sync_judged_by_pkilint_and_openssl(deployment: Deployment, tmp_path: Path) -> None:
    deployment.start()
    client = enrolled(deployment, tmp_path, MAILBOX)

    status = client.run("status", "--json")
    assert status.code == 0
    assert '"state": "ACTIVE"' in status.out

    signing = _write(tmp_path / "signing.pem", client.run("cert", "signing").out)
    encryption = _write(tmp_path / "encryption.pem", client.run("cert", "encryption").out)
    chain = deployment.admin("ca", "chain").out
    issuing = _write(
        tmp_path / "issuing.pem", chain.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    )
    root = deployment.data / "ca" / "root.crt.pem"

    for cert in (signing, encryption):
        lint = pkilint_smime(cert)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    for cert, purpose in ((signing, "smimesign"), (encryption, "smimeencrypt")):
        res = openssl(
            "verify", "-x509_strict", "-purpose", purpose, "-CAfile", str(root), "-untrusted", str(issuing), str(cert)
        )
        assert res.returncode == 0 and b": OK" in res.stdout, res.stdout + res.stderr

    # Mail that openssl encrypts to the encryption certificate opens with the client's key.
    plain = b"Content-Type: text/plain\r\n\r\nthe quarterly numbers\r\n"
    enc = openssl("cms", "-encrypt", "-aes256", "-recip", str(encryption), input_bytes=plain)
    assert enc.returncode == 0, enc.stderr
    message = tmp_path / "encrypted.eml"
    message.write_bytes(b"From: bob@example.org\r\nTo: alice@example.org\r\nSubject: numbers\r\n" + enc.stdout)
    out = client.run("decrypt", str(message))
    assert out.code == 0, out.err
    assert "the quarterly numbers" in out.out

    # The encryption key on disk is PKCS#8 encrypted with the user's passphrase; openssl opens it.
    keyfile = next((client.home / "keys").glob("encryption-*.pem"))
    assert b"ENCRYPTED PRIVATE KEY" in keyfile.read_bytes()

    # The delivery mail is S/MIME opaque-signed by the server; openssl verifies it against the root.
    mail = deployment.mails(MAILBOX)[0]
    verify = subprocess.run(
        ["openssl", "smime", "-verify", "-CAfile", str(root), "-in", str(mail), "-purpose", "any"],
        capture_output=True,
    )
    assert verify.returncode == 0, verify.stderr
    assert b"Verification successful" in verify.stderr

    # No secret in any log line or audit record: the token, the passphrases, the private keys.
    token_file = tmp_path / "token.txt"
    secrets_made = [CLIENT_PASSPHRASE, (deployment.data / "ca" / "passphrase").read_text().strip()]
    if token_file.exists():
        secrets_made.append(token_file.read_text().strip())
    audit_rows = "\n".join(
        str(r) for r in sqlite3.connect(deployment.data / "mailkms.db").execute("select * from audit_log")
    )
    for secret in secrets_made:
        assert secret not in deployment.log() and secret not in audit_rows
    assert "PRIVATE KEY" not in deployment.log() and "PRIVATE KEY" not in audit_rows

    # admin views
    shown = deployment.admin("user", "show", MAILBOX, "--json").json()
    assert isinstance(shown, dict) and shown["state"] == "ACTIVE" and len(shown["certificates"]) == 2
    listed = deployment.admin("user", "list", "--json").json()
    assert isinstance(listed, list) and listed[0]["email"] == MAILBOX
    assert deployment.admin("audit", "verify").code == 0

    # CA certificates downloadable over plain http at the AIA paths
    der = httpx.get(f"http://127.0.0.1:{deployment.http_port}/ca/issuing.crt", timeout=5)
    assert der.status_code == 200 and der.headers["content-type"] == "application/pkix-cert"
    # OpenAPI is published
    spec = httpx.get(
        f"{deployment.url}/openapi.json", verify=ssl.create_default_context(cafile=str(root)), timeout=5
    ).json()
    assert "/api/v1/enrolments" in spec["paths"]


def test_token_refusals(deployment: Deployment, tmp_path: Path) -> None:
    deployment.start()
    token = deployment.add_user(MAILBOX)
    deployment.add_user("bob@example.org")

    wrong = ClientHome(tmp_path / "wrong", "bob@example.org").enroll(deployment, token)
    assert wrong.code != 0 and "another e-mail address" in wrong.err

    first = ClientHome(tmp_path / "a1", MAILBOX).enroll(deployment, token)
    assert first.code == 0, first.err
    again = ClientHome(tmp_path / "a2", MAILBOX).enroll(deployment, token)
    assert again.code != 0 and "already been used" in again.err

    garbage = ClientHome(tmp_path / "a3", MAILBOX).enroll(deployment, "not-a-token")
    assert garbage.code != 0 and "not valid" in garbage.err

    # Expiry: the token is valid 7 days; the server and client 8 days later refuse it.
    late = deployment.admin("user", "reenroll", MAILBOX, "--json").json()
    assert isinstance(late, dict)
    deployment.stop()
    deployment.start(offset_days=8)
    expired = ClientHome(tmp_path / "a4", MAILBOX).enroll(deployment, str(late["token"]), offset_days=8)
    assert expired.code != 0 and "expired" in expired.err

    problems = httpx.post(
        f"{deployment.url}/api/v1/enrolments",
        json={
            "mailbox": MAILBOX,
            "token": "x",
            "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "transport_certificate": "x",
        },
        verify=False,
        timeout=10,
    )
    assert problems.status_code == 400
    assert problems.headers["content-type"] == "application/problem+json"
    assert problems.json()["type"].startswith("urn:mailkms:problem:bad-csr")


def test_forged_delivery_is_refused_and_left_in_place(deployment: Deployment, tmp_path: Path) -> None:
    deployment.start()
    client = enrolled(deployment, tmp_path, MAILBOX)
    # A second, unrelated mailkms CA signs a delivery for the same mailbox.
    other = init_deployment(tmp_path / "other")
    other.start()
    try:
        token = other.add_user(MAILBOX)
        victim = ClientHome(tmp_path / "other-client", MAILBOX)
        assert victim.enroll(other, token).code == 0
        forged = other.wait_for_mails(MAILBOX, 1)[0]
    finally:
        other.stop()
    target = deployment.maildir(MAILBOX) / "new" / "forged.eml"
    # Make it look like it answers this client's request: rewrite nothing, the signature check decides.
    shutil.copy(forged, target)
    before = client.run("status", "--json").out
    res = client.run("sync")
    assert res.code == 7, res.out + res.err  # refused, nothing installed (README: User)
    assert "Refused" in res.err and "pinned" in res.err
    assert target.exists(), "refused mail must stay in the mailbox"
    assert client.run("status", "--json").out == before, "nothing may be half-installed"


def test_unsigned_and_tampered_delivery_refused(deployment: Deployment, tmp_path: Path) -> None:
    deployment.start()
    client = enrolled(deployment, tmp_path, MAILBOX)
    original = deployment.mails(MAILBOX)[0].read_bytes()
    msg = email.message_from_bytes(original)
    payload = msg.get_payload(decode=True)
    assert isinstance(payload, bytes)
    # Flip one byte inside the signed content and re-encode.
    tampered = bytearray(payload)
    tampered[len(tampered) // 2] ^= 0x01
    msg.set_payload(bytes(tampered))
    del msg["Content-Transfer-Encoding"]
    email.encoders.encode_base64(msg)
    (deployment.maildir(MAILBOX) / "new" / "tampered.eml").write_bytes(msg.as_bytes())
    unsigned = b"From: mailkms@kms.example.org\r\nTo: alice@example.org\r\nX-Mailkms-Delivery: enrolment\r\nSubject: x\r\n\r\nhello\r\n"
    (deployment.maildir(MAILBOX) / "new" / "unsigned.eml").write_bytes(unsigned)
    res = client.run("sync")
    assert res.code == 7, res.out + res.err  # refused, nothing installed (README: User)
    assert res.err.count("Refused") == 2, res.err
    assert "not S/MIME signed" in res.err


def test_smtp_down_during_enrolment_then_exactly_one_reply(tmp_path: Path) -> None:
    from aiosmtpd.controller import Controller

    from mailkms.mail import MaildirHandler

    relay_port = free_port()
    dep = init_deployment(tmp_path / "data")
    dep.server_env = {
        "MAILKMS_SMTP__MODE": "relay",
        "MAILKMS_SMTP__RELAY_HOST": "127.0.0.1",
        "MAILKMS_SMTP__RELAY_PORT": str(relay_port),
        "MAILKMS_SMTP__STARTTLS": "false",
        "MAILKMS_SMTP__RETRY_BASE_SECONDS": "0.2",
        "MAILKMS_SMTP__RETRY_MAX_SECONDS": "1",
    }
    dep.start()
    try:
        token = dep.add_user(MAILBOX)
        client = ClientHome(tmp_path / "client", MAILBOX)
        assert client.enroll(dep, token).code == 0
        import time

        time.sleep(2)
        assert dep.mails(MAILBOX) == [], "nothing can be delivered while SMTP is down"
        assert "relay failure (connect)" in dep.log() and "1 mail(s) deferred" in dep.log()
        relay = Controller(MaildirHandler(dep.data / "mailboxes"), hostname="127.0.0.1", port=relay_port)
        relay.start()
        try:
            dep.wait_for_mails(MAILBOX, 1)
            time.sleep(2)
        finally:
            relay.stop()
        assert len(dep.mails(MAILBOX)) == 1
        res = client.run("sync")
        assert res.code == 0 and "Installed" in res.out
    finally:
        dep.stop()
    db = sqlite3.connect(dep.data / "mailkms.db")
    (sent,) = db.execute("select count(*) from outbox where sent_at is not null").fetchone()
    assert sent == 1


def test_edited_audit_row_is_detected(deployment: Deployment, tmp_path: Path) -> None:
    deployment.start()
    enrolled(deployment, tmp_path, MAILBOX)
    deployment.stop()
    assert deployment.admin("audit", "verify").code == 0
    db = sqlite3.connect(deployment.data / "mailkms.db")
    db.execute("update audit_log set actor = 'mallory' where seq = 3")
    db.commit()
    res = deployment.admin("audit", "verify", check=False)
    assert res.code == 9, res.out + res.err  # README: exit 9 when the chain was edited
    assert "seq 3" in res.out and "edited" in res.out


def test_server_restarted_two_years_later_renews_its_own_identities(deployment: Deployment, tmp_path: Path) -> None:
    deployment.start()
    enrolled(deployment, tmp_path, MAILBOX)
    tls_before = (deployment.data / "tls" / "server.crt.pem").read_bytes()
    signer_before = (deployment.data / "mail" / "signer.crt.pem").read_bytes()
    deployment.stop()
    two_years = 730
    deployment.start(offset_days=two_years)
    assert (deployment.data / "tls" / "server.crt.pem").read_bytes() != tls_before
    assert (deployment.data / "mail" / "signer.crt.pem").read_bytes() != signer_before
    # a new user enrols over TLS and installs a reply signed by the renewed mail identity
    token = deployment.add_user("dave@example.org", offset_days=two_years)
    dave = ClientHome(tmp_path / "dave", "dave@example.org")
    assert dave.enroll(deployment, token, offset_days=two_years).code == 0
    deployment.wait_for_mails("dave@example.org", 1)
    res = dave.run("sync", offset_days=two_years)
    assert res.code == 0 and "Installed" in res.out, res.out + res.err


@pytest.mark.parametrize(
    ("args", "code", "error"),
    [
        (("user", "add", MAILBOX, "--json"), 5, "user-exists"),
        (("user", "show", "nobody@example.org", "--json"), 4, "user-not-found"),
        (("user", "reenroll", "nobody@example.org", "--json"), 4, "user-not-found"),
        (("user", "add", "mailkms@kms.example.org", "--json"), 6, "reserved-mailbox"),
    ],
)
def test_admin_json_refusal_shape(deployment: Deployment, args: tuple[str, ...], code: int, error: str) -> None:
    """README (Administrator): exit codes by kind, and `--json` prints {"error", "type", "detail"} only."""
    deployment.add_user(MAILBOX)
    res = deployment.admin(*args, check=False)
    assert res.code == code, res.out + res.err
    refusal = json.loads(res.out)
    assert isinstance(refusal, dict) and sorted(refusal) == ["detail", "error", "type"]
    assert refusal["error"] == error and refusal["type"] == f"urn:mailkms:problem:{error}"
    assert isinstance(refusal["detail"], str) and refusal["detail"] and "Traceback" not in res.err
