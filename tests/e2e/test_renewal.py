"""Issue 4 end to end: the log-on question, renewal with no administrator, expiry, under faketime.

Server and client run as real processes with their clocks moved by faketime:
+11 months (no question), +12.5 months (the question; No, then Yes), +19 months (expired).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from dateutil.relativedelta import relativedelta

from tests.e2e._nodes import RecordingSink, free_port
from tests.e2e.conftest import CLIENT_PASSPHRASE, Deployment, _env, enrolled, openssl, pkilint_smime

PROMPT = (
    "Your security certificates are approaching expiration.\n"
    "Do you want to send a certificate update request to the\n"
    "Key Management Server?\n"
)
ELEVEN_MONTHS = 335  # days; the reminder point is 12 calendar months (365 days) after issue
TWELVE_AND_A_HALF = 380
NINETEEN_MONTHS = 580  # 18 calendar months is at most 549 days


def _cert(text: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(text.encode())


def _restart(dep: Deployment, offset_days: float) -> None:
    dep.stop()
    dep.start(offset_days=offset_days)


def test_logon_reminder_renewal_and_expiry(deployment: Deployment, tmp_path: Path) -> None:
    dep = deployment
    dep.start()
    alice = enrolled(dep, tmp_path, "alice@example.org")
    bob = enrolled(dep, tmp_path, "bob@example.org")
    old_signing = _cert(alice.run("cert", "signing").out)
    old_encryption_pem = tmp_path / "old-enc.pem"
    old_encryption_pem.write_text(alice.run("cert", "encryption").out)

    # 1. +11 months: no question.
    _restart(dep, ELEVEN_MONTHS)
    res = alice.run("logon", offset_days=ELEVEN_MONTHS)
    assert res.code == 0, res.err
    assert "approaching expiration" not in res.out
    assert "logged on" in res.out

    # 2. +12.5 months: exactly the three lines; No sends nothing and the next log-on asks again.
    _restart(dep, TWELVE_AND_A_HALF)
    mails_before = len(dep.mails("alice@example.org"))
    res = alice.run("logon", "--answer", "no", offset_days=TWELVE_AND_A_HALF)
    assert res.code == 0, res.err
    assert PROMPT in res.out
    assert "No update request was sent" in res.out
    time.sleep(1.5)
    assert len(dep.mails("alice@example.org")) == mails_before
    res = alice.run("logon", "--answer", "no", offset_days=TWELVE_AND_A_HALF)
    assert PROMPT in res.out
    # interactive: the question is asked on the terminal and answered "n"
    res = alice.run("logon", offset_days=TWELVE_AND_A_HALF, input_text="n\n")
    assert PROMPT in res.out and "No update request was sent" in res.out

    # 3. Yes: one mail; installed; notAfter = renewal time + 18 months - 1 s; old mail still opens.
    asked_at = dt.datetime.now(dt.UTC) + dt.timedelta(days=TWELVE_AND_A_HALF)
    res = alice.run("logon", "--answer", "yes", offset_days=TWELVE_AND_A_HALF)
    assert res.code == 0, res.err
    assert "update request was sent" in res.out and "arrive by e-mail" in res.out
    dep.wait_for_mails("alice@example.org", mails_before + 1)
    time.sleep(1)
    assert len(dep.mails("alice@example.org")) == mails_before + 1
    res = alice.run("logon", offset_days=TWELVE_AND_A_HALF)
    assert res.code == 0, res.err
    assert "Installed" in res.out
    assert "approaching expiration" not in res.out, "after renewal the next log-on asks nothing"

    new_signing = _cert(alice.run("cert", "signing").out)
    new_encryption = _cert(alice.run("cert", "encryption").out)
    assert new_signing.serial_number != old_signing.serial_number
    for cert in (new_signing, new_encryption):
        start = cert.not_valid_before_utc
        assert abs((start - asked_at).total_seconds()) < 120, "valid from the renewal, not from the old certificate"
        assert cert.not_valid_after_utc == start + relativedelta(months=18) - dt.timedelta(seconds=1)
        path = tmp_path / f"new-{cert.serial_number}.pem"
        path.write_text(
            cert.public_bytes(__import__("cryptography").hazmat.primitives.serialization.Encoding.PEM).decode()
        )
        lint = pkilint_smime(path)
        assert lint.returncode == 0, lint.stdout

    plain = b"Content-Type: text/plain\r\n\r\nsent to the old key\r\n"
    enc = openssl("cms", "-encrypt", "-aes256", "-recip", str(old_encryption_pem), input_bytes=plain)
    assert enc.returncode == 0
    msg = tmp_path / "old.eml"
    msg.write_bytes(b"From: carol@example.org\r\nTo: alice@example.org\r\nSubject: old\r\n" + enc.stdout)
    out = alice.run("decrypt", str(msg), offset_days=TWELVE_AND_A_HALF)
    assert out.code == 0, out.err
    assert "sent to the old key" in out.out
    # No administrator acted: the audit chain holds no admin action after the two enrolments.
    db = sqlite3.connect(dep.data / "mailkms.db")
    actors = [row[0] for row in db.execute("select actor from audit_log where action = 'certificate.issued'")]
    assert actors.count("alice@example.org") == 4 and all(not a.startswith("admin") for a in actors)

    # 4. bob never renewed: +19 months, expired; the client sends nothing; a forced request is refused.
    _restart(dep, NINETEEN_MONTHS)
    bob_mails = len(dep.mails("bob@example.org"))
    res = bob.run("logon", offset_days=NINETEEN_MONTHS)
    assert res.code == 6, res.out + res.err  # README: after expiry ... exits 6
    assert "expired" in res.err and "administrator" in res.err
    assert "approaching expiration" not in res.out
    received = db.execute(
        "select count(*) from audit_log where action = 'renewal.received' and subject = 'bob@example.org'"
    )
    assert received.fetchone()[0] == 0
    forced = bob.run("renew", offset_days=NINETEEN_MONTHS)
    assert forced.code == 6, forced.out + forced.err  # a request the server refuses by policy
    assert "reenrolment-required" in forced.err
    assert len(dep.mails("bob@example.org")) == bob_mails

    token = dep.admin("user", "reenroll", "bob@example.org", "--json", offset_days=NINETEEN_MONTHS).json()
    assert isinstance(token, dict)
    res = bob.enroll(dep, str(token["token"]), offset_days=NINETEEN_MONTHS)
    assert res.code == 0, res.err
    dep.wait_for_mails("bob@example.org", bob_mails + 1)
    res = bob.run("logon", offset_days=NINETEEN_MONTHS)
    assert res.code == 0 and "Installed" in res.out, res.out + res.err
    due = dep.admin("user", "list", "--expired", "--json", offset_days=NINETEEN_MONTHS).json()
    assert due == [], "bob is active again"


def _relay_to(sink: RecordingSink, **extra: str) -> dict[str, str]:
    """The server sends through `sink`, which counts every DATA (the Maildir it files into
    de-duplicates by Message-ID, so only the relay can show a double send)."""
    return {
        "MAILKMS_SMTP__MODE": "relay",
        "MAILKMS_SMTP__RELAY_HOST": "127.0.0.1",
        "MAILKMS_SMTP__RELAY_PORT": str(sink.port),
        "MAILKMS_SMTP__STARTTLS": "false",
        **extra,
    }


def _deliveries(sink: RecordingSink, mailbox: str) -> list[str]:
    """Message-IDs of the delivery mails (not reminders) the relay accepted for `mailbox`, one per DATA."""
    with sink.handler.lock:
        return [d.message_id for d in sink.handler.deliveries if d.recipient == mailbox and d.delivery]


def test_two_copies_of_a_key_store_racing_issue_one_pair(deployment: Deployment, tmp_path: Path) -> None:
    """Two copies of one key store (two machines) send their update requests at the same instant,
    past the client's own file lock: the server issues one pair and sends one mail."""
    dep = deployment
    dep.start()
    alice = enrolled(dep, tmp_path, "alice@example.org")
    dep.stop()
    copies = [tmp_path / "copy-a", tmp_path / "copy-b"]
    for copy in copies:
        shutil.copytree(alice.home, copy)
    with RecordingSink(dep.data / "mailboxes") as sink:
        dep.start(offset_days=TWELVE_AND_A_HALF, extra_env=_relay_to(sink))
        # Each racer runs under the server's faked clock, prepares everything, then waits at the
        # barrier (a line on stdin) and sends: no file lock, no process start-up between them.
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", RACER, str(home)],
                stdin=subprocess.PIPE,
                env={**_env({"MAILKMS_CLIENT_PASSPHRASE": CLIENT_PASSPHRASE}, TWELVE_AND_A_HALF)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for home in copies
        ]
        wait_until(
            lambda: all(
                (home / "ready").exists() or p.poll() is not None for home, p in zip(copies, racers, strict=True)
            ),
            60,
        )
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.write("go\n")
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.flush()
        outs = [p.communicate(timeout=120) for p in racers]
        assert all(p.returncode == 0 for p in racers), outs
        answers = [json.loads(out) for out, _err in outs]
        assert answers[0]["request_id"] == answers[1]["request_id"]
        wait_until(lambda: len(_deliveries(sink, "alice@example.org")) >= 1, 60)
        time.sleep(2)
        assert len(_deliveries(sink, "alice@example.org")) == 1
        # a retry, as after a dropped connection: the same request, nothing new
        retry = alice.run("renew", offset_days=TWELVE_AND_A_HALF)
        assert retry.code == 0, retry.err
        time.sleep(2)
        assert len(_deliveries(sink, "alice@example.org")) == 1
    db = sqlite3.connect(dep.data / "mailkms.db")
    (pairs,) = db.execute("select count(*) from issuance_requests where kind = 'renewal'").fetchone()
    assert pairs == 1
    (repeats,) = db.execute("select count(*) from audit_log where action = 'renewal.repeated'").fetchone()
    assert repeats >= 2


RACER = """
import json, os, sys
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mailkms.client import Client
from mailkms.clock import SystemClock

home = Path(sys.argv[1])
client = Client(home, SystemClock(), lambda: os.environ["MAILKMS_CLIENT_PASSPHRASE"].encode())
client.unlock()
state = client.state()
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, state.mailbox)])
csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
pem = csr.public_bytes(serialization.Encoding.PEM).decode()
(home / "ready").touch()
sys.stdin.readline()  # the barrier: the test writes to every racer at once
print(json.dumps(client._signed_post(state, "/api/v1/renewals", {"csr": pem})))
"""


def wait_until(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s")


def test_server_killed_before_mailing_sends_once(deployment: Deployment, tmp_path: Path) -> None:
    """Killed while the relay is unreachable: the reply waits in the outbox and goes out once,
    counted at the relay, across two more restarts."""
    dep = deployment
    dep.start()
    alice = enrolled(dep, tmp_path, "alice@example.org")
    dep.stop()
    # A node killed while it holds a mail's lease leaves that mail until the lease runs out (then
    # another node sends it): keep the lease short here so the restart picks it up within the wait.
    short_lease = {"MAILKMS_OUTBOX__LEASE_SECONDS": "5"}
    with RecordingSink(dep.data / "mailboxes") as sink:
        dead = {**_relay_to(sink), "MAILKMS_SMTP__RELAY_PORT": str(free_port()), **short_lease}
        dep.start(offset_days=TWELVE_AND_A_HALF, extra_env=dead)
        res = alice.run("logon", "--answer", "yes", offset_days=TWELVE_AND_A_HALF)
        assert res.code == 0, res.err
        dep.stop(signal.SIGKILL)
        assert _deliveries(sink, "alice@example.org") == []
        for _ in range(2):
            dep.start(offset_days=TWELVE_AND_A_HALF, extra_env=_relay_to(sink, **short_lease))
            wait_until(lambda: len(_deliveries(sink, "alice@example.org")) >= 1, 60)
            time.sleep(2)
            dep.stop()
        assert len(_deliveries(sink, "alice@example.org")) == 1
    db = sqlite3.connect(dep.data / "mailkms.db")
    (sent,) = db.execute(
        "select count(*) from outbox where purpose = 'delivery:renewal' and sent_at is not null"
    ).fetchone()
    assert sent == 1
    res = alice.run("sync", offset_days=TWELVE_AND_A_HALF)
    assert res.code == 0 and "Installed" in res.out


def test_server_killed_during_a_slow_data_sends_again_with_the_same_message_id(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The one window no SMTP client can close: the relay has the whole message but has not said
    250 when the node dies. The restarted node sends it again, with the same Message-ID, so the
    relay counts two DATA and the client installs it once. This test shows the window is exactly that."""
    dep = deployment
    dep.start()
    alice = enrolled(dep, tmp_path, "alice@example.org")
    dep.stop()
    # no reminder mails: the one DATA held open must be the reply
    short_lease = {"MAILKMS_OUTBOX__LEASE_SECONDS": "3", "MAILKMS_REMINDERS__ENABLED": "false"}
    with RecordingSink(dep.data / "mailboxes", delay=4.0) as sink:
        dep.start(offset_days=TWELVE_AND_A_HALF, extra_env=_relay_to(sink, **short_lease))
        res = alice.run("logon", "--answer", "yes", offset_days=TWELVE_AND_A_HALF)
        assert res.code == 0, res.err
        # the reply's DATA is in and queued at the relay, its 250 held back for 4 s: kill now
        wait_until(lambda: len(_deliveries(sink, "alice@example.org")) == 1, 60)
        dep.stop(signal.SIGKILL)
        assert sink.handler.answered == 0, "the relay answered before the kill: the window was missed"
        dep.start(offset_days=TWELVE_AND_A_HALF, extra_env=_relay_to(sink, **short_lease))
        wait_until(lambda: len(_deliveries(sink, "alice@example.org")) == 2, 90)
        time.sleep(2)
        dep.stop()
        sent = _deliveries(sink, "alice@example.org")
    assert len(sent) == 2 and sent[0] == sent[1]  # twice on the wire, one Message-ID
    res = alice.run("sync", offset_days=TWELVE_AND_A_HALF)
    assert res.code == 0 and res.out.count("Installed") == 1, res.out
    again = alice.run("sync", offset_days=TWELVE_AND_A_HALF)
    assert "Installed" not in again.out
