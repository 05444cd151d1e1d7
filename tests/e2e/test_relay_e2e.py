"""`mailkms serve` with smtp.mode = relay against a real relay: Postfix submission (STARTTLS
required, SASL login through Dovecot) delivering into Dovecot (tests/mailstack.py). The user's
client reads the delivery from Dovecot's Maildir. Messages are counted at the relay."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import ClientHome, Deployment, init_deployment
from tests.mailstack import Dovecot, Postfix, mail_stack, mail_tools_missing

pytestmark = pytest.mark.e2e

ALICE = "alice@example.org"
BOB = "bob@example.org"
LOGIN = "mailkms@example.org"
PASSWORD = "relay-login-password-of-this-run"
# A mail deferred once waits 10 minutes unless an administrator says `mailkms outbox retry`: the
# retry, not the backoff, sends it, however slow the machine is.
RETRY_SECONDS = 600


def _wait(what: str, check: Callable[[], object], timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _fingerprint(dep: Deployment) -> str:
    """What `mailkms ca fingerprint` prints, without another process."""
    from cryptography import x509

    from mailkms.pki import fingerprint_sha256

    return fingerprint_sha256(x509.load_pem_x509_certificate((dep.data / "ca" / "root.crt.pem").read_bytes()))


def _message_id(maildir: Path) -> str:
    from email.parser import BytesHeaderParser

    [path] = list(maildir.glob("new/*"))
    return str(BytesHeaderParser().parsebytes(path.read_bytes())["Message-ID"])


def _enroll(dep: Deployment, dovecot: Dovecot, tmp_path: Path, mailbox: str) -> ClientHome:
    token = dep.add_user(mailbox)
    client = ClientHome(tmp_path / f"client-{mailbox}", mailbox)
    res = client.run(
        "enroll",
        "--server",
        dep.url,
        "--fingerprint",
        _fingerprint(dep),
        "--email",
        mailbox,
        "--token",
        token,
        "--maildir",
        str(dovecot.maildir(mailbox)),  # Dovecot's Maildir: files of the mail user, read here as root
    )
    assert res.code == 0, res.err
    return client


def _outbox(dep: Deployment, *args: str) -> dict[str, object]:
    data = dep.admin("outbox", *args, "--json").json()
    assert isinstance(data, dict)
    return data


def _metric(dep: Deployment, series: str) -> float:
    text = subprocess.run(
        ["curl", "-sS", "--cacert", str(dep.data / "ca" / "root.crt.pem"), f"{dep.url}/metrics"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    match = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{series} not in /metrics"
    return float(match.group(1))


def _sync(client: ClientHome) -> None:
    res = client.run("sync")
    assert res.code == 0 and "Installed" in res.out, res.out + res.err


def _one_at_the_relay(postfix: Postfix, message_id: str) -> None:
    _wait(f"{message_id} at the relay", lambda: postfix.accepted(message_id))
    time.sleep(2)  # a second copy, if any, would be in the relay's log by now
    assert len(postfix.accepted(message_id)) == 1, postfix.log()[-3000:]


def test_serve_sends_through_the_relay_and_an_outage_waits_visibly(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    if missing := mail_tools_missing():
        pytest.fail(f"{', '.join(missing)} not installed (scripts/system-deps.sh installs them)")
    users = {LOGIN: PASSWORD, ALICE: "alice-imap", BOB: "bob-imap"}
    with mail_stack(tmp_path / "mailstack-logs", users) as (postfix, dovecot, tls):
        password_file = tmp_path / "smtp-password"
        password_file.write_text(PASSWORD + "\n")
        password_file.chmod(0o600)
        dep = init_deployment(tmp_path / "data")
        dep.server_env = {
            "MAILKMS_SMTP__MODE": "relay",
            "MAILKMS_SMTP__RELAY_HOST": "localhost",
            "MAILKMS_SMTP__RELAY_PORT": str(postfix.submission_port),
            "MAILKMS_SMTP__USERNAME": LOGIN,
            "MAILKMS_SMTP__PASSWORD_FILE": str(password_file),
            "MAILKMS_SMTP__CA_FILE": str(tls.ca_pem),
            "MAILKMS_SMTP__RETRY_BASE_SECONDS": str(RETRY_SECONDS),
            "MAILKMS_SMTP__RETRY_MAX_SECONDS": str(RETRY_SECONDS),
            "MAILKMS_SMTP__TIMEOUT_SECONDS": "5",
        }
        dep.start()
        try:
            # 1. The relay is up: the enrolment's delivery goes through it into Alice's mailbox.
            alice = _enroll(dep, dovecot, tmp_path, ALICE)
            _wait("the delivery in Alice's Dovecot Maildir", lambda: list(dovecot.maildir(ALICE).glob("new/*")))
            _one_at_the_relay(postfix, _message_id(dovecot.maildir(ALICE)))
            _sync(alice)

            # 2. The relay is down for Bob's whole enrolment: the mail waits, and says why.
            postfix.stop()
            bob = _enroll(dep, dovecot, tmp_path, BOB)
            _wait(
                "the delivery to Bob to fail once",
                lambda: _metric(dep, 'mailkms_outbox_send_failures_total{kind="connect"}') >= 1,
            )
            listing = _outbox(dep)
            assert listing["waiting"] == 1 and listing["by_kind"] == {"connect": 1}
            [waiting] = listing["messages"]  # type: ignore[misc]
            assert waiting["recipient"] == BOB and waiting["state"] == "waiting" and waiting["attempts"] >= 1
            assert waiting["last_error_kind"] == "connect" and "(at connect)" in waiting["last_error"]
            assert waiting["purpose"] == "delivery:enrolment" and waiting["claimed_by"]
            message_id = str(waiting["message_id"])
            text = dep.admin("outbox").out
            assert "1 mail(s) waiting" in text and "connect 1" in text and BOB in text and "Connection refused" in text
            assert _metric(dep, "mailkms_outbox_depth") == 1
            assert _metric(dep, 'mailkms_outbox_waiting{kind="connect"}') == 1
            assert _metric(dep, "mailkms_mail_sent_total") == 1
            assert postfix.accepted(message_id) == []

            # 3. The relay is back; the administrator does not wait out the backoff.
            postfix.start()
            back = time.monotonic()
            assert dep.admin("outbox", "retry", "--all").out.strip() == "1 mail(s) due now"
            retried = time.monotonic()
            _wait("Bob's delivery at the relay", lambda: postfix.accepted(message_id))
            out = time.monotonic()
            record_property("seconds_from_retry_command_to_relay", round(out - retried, 2))
            record_property("seconds_from_relay_back_to_relay", round(out - back, 2))
            print(f"\nBob's mail at the relay {out - retried:.2f} s after `mailkms outbox retry` returned")
            print(f"({out - back:.2f} s after the relay was back, the command's own run included)")
            _one_at_the_relay(postfix, message_id)
            _wait("the delivery in Bob's Dovecot Maildir", lambda: list(dovecot.maildir(BOB).glob("new/*")))
            _sync(bob)
            listing = _outbox(dep, "--all")
            assert listing["waiting"] == 0
            [bobs] = [m for m in listing["messages"] if m["message_id"] == message_id]  # type: ignore[union-attr]
            assert bobs["sent_at"] < waiting["next_attempt_at"], "sent before its backoff ran out: the retry did it"
            assert bobs["attempts"] == 2  # one failure during the outage, one success
            assert _metric(dep, "mailkms_outbox_depth") == 0
            assert _metric(dep, "mailkms_mail_sent_total") == 2
        finally:
            dep.stop()
        log = dep.log()
        assert "relay failure (connect)" in log
        assert PASSWORD not in log
        assert json.dumps(PASSWORD) not in (tmp_path / "data" / "mailkms.toml").read_text()
