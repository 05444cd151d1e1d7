"""The outbox worker against a real relay: Postfix submission (STARTTLS required, SASL login via
Dovecot) delivering into Dovecot (tests/mailstack.py). Messages are counted AT THE RELAY
(`Postfix.accepted`, from its log), so a mail sent twice shows twice whatever the mailbox does."""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailkms.config import load_settings
from mailkms.mail import OutboxWorker, sender_for
from mailkms.services import Services
from mailkms.store import OutboxMessage
from tests.conftest import CA_PASSPHRASE, PUBLIC_URL
from tests.mailstack import Dovecot, Postfix, TLSFiles, mail_stack, mail_tools_missing
from tests.outbox_support import queue_mails

pytestmark = pytest.mark.e2e  # starts Postfix and Dovecot

SENDER_LOGIN = "mailkms@example.org"
SENDER_PASSWORD = "relay-login-made-for-this-run"
ALICE = "alice@example.org"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Postfix, Dovecot, TLSFiles]]:
    if missing := mail_tools_missing():
        pytest.fail(f"{', '.join(missing)} not installed (scripts/system-deps.sh installs them)")
    users = {SENDER_LOGIN: SENDER_PASSWORD, ALICE: "alice-imap-password"}
    with mail_stack(tmp_path_factory.mktemp("mailstack-logs"), users) as running:
        yield running


@pytest.fixture
def relay(stack) -> Iterator[tuple[Postfix, Dovecot, TLSFiles]]:  # type: ignore[no-untyped-def]
    postfix = stack[0]
    if postfix.proc is None:  # a test that stopped it failed half way
        postfix.start()
    yield stack
    if postfix.proc is None:
        postfix.start()


@pytest.fixture
def services(data_dir: Path, tmp_path: Path, clock) -> Iterator[Services]:  # type: ignore[no-untyped-def]
    settings = load_settings(
        data_dir,
        database_url=f"sqlite:///{tmp_path / 'store.db'}",
        ca_passphrase=CA_PASSPHRASE,
        server={"hostname": "localhost", "public_url": PUBLIC_URL},
    )
    svc = Services.build(settings, clock)
    yield svc
    svc.close()


def _smtp(postfix: Postfix, tls: TLSFiles, **overrides: Any) -> Any:
    from mailkms.config import SMTPConfig

    values: dict[str, Any] = {
        "mode": "relay",
        "relay_host": "localhost",
        "relay_port": postfix.submission_port,
        "username": SENDER_LOGIN,
        "password": SENDER_PASSWORD,
        "ca_file": tls.ca_pem,
        "timeout_seconds": 5,
    }
    values.update(overrides)
    return SMTPConfig(**values)


def _worker(services: Services, clock, smtp) -> OutboxWorker:  # type: ignore[no-untyped-def]
    return OutboxWorker(services.db, sender_for(smtp), clock, services.audit, retry_base=2, retry_max=60)


def _queue(services: Services, n: int = 1) -> list[str]:
    ids = [f"<{uuid.uuid4().hex}@kms.example.org>" for _ in range(n)]
    queue_mails(services, [(message_id, ALICE) for message_id in ids], subject="your certificates")
    return ids


def _row(services: Services, message_id: str) -> OutboxMessage:
    with services.db.transaction() as session:
        row = session.query(OutboxMessage).filter_by(message_id=message_id).one()
        session.expunge(row)
        return row


def _in_maildir(dovecot: Dovecot, message_id: str) -> list[Path]:
    box = dovecot.maildir(ALICE)
    return [p for p in [*box.glob("new/*"), *box.glob("cur/*")] if message_id.encode() in p.read_bytes()]


def _wait_accepted(postfix: Postfix, message_id: str, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := postfix.accepted(message_id):
            return found
        time.sleep(0.1)
    raise AssertionError(f"{message_id} not accepted by the relay:\n{postfix.log()[-3000:]}")


def _settle_then_count(postfix: Postfix, message_id: str) -> int:
    """The relay's count, after giving a second copy (if any) time to show in its log."""
    _wait_accepted(postfix, message_id)
    time.sleep(1.0)
    return len(postfix.accepted(message_id))


def test_starttls_login_verified_and_delivered(relay, services, clock) -> None:  # type: ignore[no-untyped-def]
    postfix, dovecot, tls = relay
    [message_id] = _queue(services)
    assert _worker(services, clock, _smtp(postfix, tls)).run_once() == 1
    assert _settle_then_count(postfix, message_id) == 1
    deadline = time.monotonic() + 15
    while not _in_maildir(dovecot, message_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_in_maildir(dovecot, message_id)) == 1, postfix.log()[-2000:]
    row = _row(services, message_id)
    assert row.sent_at is not None and row.attempts == 1 and row.last_error_kind is None


def test_wrong_password_waits_as_auth_then_goes_once_with_the_right_one(  # type: ignore[no-untyped-def]
    relay, services, clock, caplog
) -> None:
    postfix, _, tls = relay
    [message_id] = _queue(services)
    # Dovecot (the relay's SASL) answers each failed login later than the one before (2 s, 4 s, ...,
    # up to 15 s): a short timeout would see a timeout at AUTH rather than the 535.
    wrong = _worker(services, clock, _smtp(postfix, tls, password="not-the-relay-password", timeout_seconds=30))
    with caplog.at_level(logging.ERROR, logger="mailkms.outbox"):
        assert wrong.run_once() == 0
    row = _row(services, message_id)
    assert row.sent_at is None and row.last_error_kind == "auth"
    assert "535" in (row.last_error or "") and "(at AUTH)" in (row.last_error or "")
    assert row.next_attempt_at == clock.now() + dt.timedelta(seconds=2)
    assert "relay failure (auth)" in caplog.text and "not-the-relay-password" not in caplog.text
    assert wrong.run_once() == 0 and _row(services, message_id).attempts == 1  # backoff: not yet
    clock.advance(dt.timedelta(seconds=3))
    assert wrong.run_once() == 0  # retried, still wrong
    row = _row(services, message_id)
    assert row.attempts == 2 and row.next_attempt_at == clock.now() + dt.timedelta(seconds=4)
    assert "not-the-relay-password" not in (row.last_error or "")
    assert postfix.accepted(message_id) == []
    # The administrator fixes the password and restarts: the new process makes it due again.
    assert services.outbox.retry(kinds=["auth"]) == 1
    assert _worker(services, clock, _smtp(postfix, tls, timeout_seconds=30)).run_once() == 1
    assert _settle_then_count(postfix, message_id) == 1


@pytest.mark.parametrize("trust", ["system-store", "another-ca"])
def test_a_relay_certificate_that_does_not_verify_sends_nothing_and_loses_nothing(  # type: ignore[no-untyped-def]
    relay, services, clock, tmp_path, trust
) -> None:
    postfix, _, tls = relay
    [message_id] = _queue(services)
    ca_file = None if trust == "system-store" else TLSFiles.make(tmp_path / "other", ca_name="another CA").ca_pem
    assert _worker(services, clock, _smtp(postfix, tls, ca_file=ca_file)).run_once() == 0
    row = _row(services, message_id)
    assert row.sent_at is None and row.last_error_kind == "tls-verify"
    assert "certificate verify failed" in (row.last_error or "")
    assert postfix.accepted(message_id) == []
    # with the relay's CA the same row goes, once
    clock.advance(dt.timedelta(seconds=3))
    assert _worker(services, clock, _smtp(postfix, tls)).run_once() == 1
    assert _settle_then_count(postfix, message_id) == 1


def test_relay_down_then_up_each_queued_mail_once_at_the_relay(relay, services, clock) -> None:  # type: ignore[no-untyped-def]
    postfix, _, tls = relay
    worker = _worker(services, clock, _smtp(postfix, tls))
    postfix.stop()
    ids = _queue(services, 3)
    for _ in range(4):  # the outage lasts a few rounds, the backoff grows
        assert worker.run_once() == 0
        clock.advance(dt.timedelta(seconds=60))
    assert services.outbox.waiting_by_kind() == {"connect": 3}
    assert {_row(services, m).attempts for m in ids} == {4}
    postfix.start()
    ids += _queue(services, 1)  # and one queued after the relay came back
    assert worker.run_once() == 4
    assert [_settle_then_count(postfix, m) for m in ids] == [1, 1, 1, 1]
    assert services.outbox.depth()[0] == 0
    assert services.verify_audit().ok
