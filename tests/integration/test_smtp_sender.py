"""SMTPSender and the failure kinds against a real SMTP server in this process (aiosmtpd), for
what the Postfix of tests/mailstack.py cannot be made to do on demand: a certificate for another
name, no STARTTLS, implicit TLS, a 5xx for one recipient. The Postfix tests are test_relay_postfix.py."""

from __future__ import annotations

import datetime as dt
import logging
import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailkms.config import SMTPConfig
from mailkms.mail import OutboxWorker, SMTPSender, classify, relay_tls_context, sender_for
from mailkms.store import OutboxMessage
from tests.mailstack import TLSFiles, free_port
from tests.outbox_support import queue_mails

USER, PASSWORD = "mailkms", "relay-password-for-the-test"


class Relay:
    """Accepts mail for anyone but nobody@...: 550 for that one, as a relay does for an unknown user."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if address.startswith("nobody@"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.content)
        return "250 OK queued"


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    # a certificate for another name (and 127.0.0.1): "localhost" does not match it
    return TLSFiles.make(tmp_path_factory.mktemp("tls"), name="relay.example.org")


def _server_context(tls: TLSFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_pem, tls.key_pem)
    return context


def _start(relay: Relay, **kwargs: Any) -> tuple[Controller, int]:
    port = free_port()
    kwargs.setdefault("auth_require_tls", True)
    controller = Controller(relay, hostname="127.0.0.1", port=port, authenticator=_authenticator, **kwargs)
    controller.start()
    return controller, port


@pytest.fixture
def starttls_relay(tls: TLSFiles) -> Iterator[tuple[Relay, int]]:
    relay = Relay()
    controller, port = _start(relay, tls_context=_server_context(tls), require_starttls=True)
    yield relay, port
    controller.stop()


def _relay_config(port: int, tls: TLSFiles, **overrides: Any) -> SMTPConfig:
    values: dict[str, Any] = {
        "mode": "relay",
        "relay_host": "127.0.0.1",
        "relay_port": port,
        "username": USER,
        "password": PASSWORD,
        "ca_file": tls.ca_pem,
        "timeout_seconds": 5,
    }
    values.update(overrides)
    return SMTPConfig(**values)


MAIL = b"Message-ID: <t@x>\r\nSubject: test\r\n\r\nhello\r\n"


def test_starttls_with_the_relay_ca_and_its_ip_name(starttls_relay, tls) -> None:  # type: ignore[no-untyped-def]
    relay, port = starttls_relay
    sender_for(_relay_config(port, tls)).send("mailkms@example.org", "alice@example.org", MAIL)
    assert len(relay.messages) == 1


def test_a_name_the_certificate_does_not_carry_is_tls_verify(starttls_relay, tls) -> None:  # type: ignore[no-untyped-def]
    relay, port = starttls_relay
    with pytest.raises(ssl.SSLCertVerificationError) as caught:
        sender_for(_relay_config(port, tls, relay_host="localhost")).send("a@x", "alice@example.org", MAIL)
    failure = classify(caught.value)
    assert failure.kind.code == "tls-verify" and "Hostname mismatch" in failure.text
    assert failure.kind.config and failure.kind.scope == "relay"
    assert relay.messages == []


def test_verify_false_sends_and_warns_loudly(starttls_relay, tls, caplog) -> None:  # type: ignore[no-untyped-def]
    relay, port = starttls_relay
    with caplog.at_level(logging.WARNING, logger="mailkms.outbox"):
        sender = sender_for(_relay_config(port, tls, relay_host="localhost", ca_file=None, verify=False))
    assert "NOT authenticated" in caplog.text and PASSWORD not in caplog.text
    sender.send("a@x", "alice@example.org", MAIL)
    assert len(relay.messages) == 1


def test_wrong_password_is_auth(starttls_relay, tls) -> None:  # type: ignore[no-untyped-def]
    _, port = starttls_relay
    with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
        sender_for(_relay_config(port, tls, password="wrong")).send("a@x", "alice@example.org", MAIL)
    failure = classify(caught.value)
    assert failure.kind.code == "auth" and "535" in failure.text and "wrong" not in failure.text


def test_no_starttls_offered_is_starttls_missing(tls) -> None:  # type: ignore[no-untyped-def]
    relay = Relay()
    controller, port = _start(relay)
    try:
        with pytest.raises(smtplib.SMTPNotSupportedError) as caught:
            sender_for(_relay_config(port, tls)).send("a@x", "alice@example.org", MAIL)
    finally:
        controller.stop()
    assert classify(caught.value).kind.code == "starttls-missing"
    assert relay.messages == []


def test_implicit_tls(tls) -> None:  # type: ignore[no-untyped-def]
    relay = Relay()
    # aiosmtpd does not count implicit TLS as TLS for auth_require_tls; the session is TLS all the same
    controller, port = _start(relay, ssl_context=_server_context(tls), auth_require_tls=False)
    try:
        sender = sender_for(_relay_config(port, tls, implicit_tls=True))
        sender.send("a@x", "alice@example.org", MAIL)
        # STARTTLS on an implicit-TLS port: the greeting never comes in clear
        plain = SMTPSender(
            "127.0.0.1", port, starttls=True, timeout=2, context=relay_tls_context(_relay_config(port, tls))
        )
        with pytest.raises(Exception) as caught:  # which one depends on timing; the kind is the point
            plain.send("a@x", "alice@example.org", MAIL)
    finally:
        controller.stop()
    assert len(relay.messages) == 1
    assert classify(caught.value).kind.code in {"timeout", "disconnected", "connect", "smtp"}


def test_nothing_listening_is_connect() -> None:
    with pytest.raises(OSError) as caught:
        SMTPSender("127.0.0.1", free_port(), timeout=2).send("a@x", "b@x", MAIL)
    assert classify(caught.value).kind.code == "connect"


# --- the worker: a 5xx for one recipient ----------------------------------------------------------------
def test_a_refused_recipient_waits_at_the_longest_interval_and_others_still_go(  # type: ignore[no-untyped-def]
    services, clock, starttls_relay, tls, caplog
) -> None:
    relay, port = starttls_relay
    queue_mails(services, [("<refused@x>", "nobody@example.org"), ("<fine@x>", "alice@example.org")])
    worker = OutboxWorker(
        services.db, sender_for(_relay_config(port, tls)), clock, services.audit, retry_base=2, retry_max=600
    )
    with caplog.at_level(logging.ERROR, logger="mailkms.outbox"):
        assert worker.run_once() == 1  # a message-level failure does not hold the others back
    assert len(relay.messages) == 1
    assert "recipient-refused" in caplog.text and "nobody@example.org" in caplog.text
    with services.db.transaction() as session:
        row = session.query(OutboxMessage).filter_by(message_id="<refused@x>").one()
        assert row.sent_at is None and row.attempts == 1
        assert row.last_error_kind == "recipient-refused" and "550" in (row.last_error or "")
        assert row.next_attempt_at == clock.now() + dt.timedelta(seconds=600)
    clock.advance(dt.timedelta(seconds=599))
    assert worker.run_once() == 0 and len(relay.messages) == 1  # not before retry_max
    clock.advance(dt.timedelta(seconds=2))
    assert worker.run_once() == 0
    with services.db.transaction() as session:
        row = session.query(OutboxMessage).filter_by(message_id="<refused@x>").one()
        assert row.sent_at is None and row.attempts == 2  # kept, never dropped
    listing = services.outbox.list()
    assert listing.waiting == 1 and listing.by_kind == {"recipient-refused": 1}
    assert listing.entries[0].subject == "test"


def test_a_relay_failure_defers_the_whole_batch_after_one_connection(services, clock) -> None:  # type: ignore[no-untyped-def]
    from mailkms import metrics

    queue_mails(services, [(f"<down{i}@x>", "alice@example.org") for i in range(5)])
    before = metrics.MAIL_SEND_FAILURES.labels(kind="connect")._value.get()
    worker = OutboxWorker(services.db, SMTPSender("127.0.0.1", free_port(), timeout=2), clock, services.audit)
    assert worker.run_once() == 0
    assert metrics.MAIL_SEND_FAILURES.labels(kind="connect")._value.get() == before + 1
    assert services.outbox.waiting_by_kind() == {"connect": 5}
    assert all(e.attempts == 1 for e in services.outbox.list().entries)


def test_config_error_kinds_are_the_ones_serve_retries_at_start() -> None:
    from mailkms.mail import FAILURE_KINDS

    config = {code for code, kind in FAILURE_KINDS.items() if kind.config}
    assert {"auth", "tls-verify", "starttls-missing"} <= config
    assert "connect" not in config and "recipient-refused" not in config


def test_a_failing_quit_after_accepted_data_is_not_a_failure(tmp_path: Path) -> None:
    """The relay has the message once sendmail returned; a broken QUIT must not cause a resend."""

    class QuitBreaks(Relay):
        async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
            return "554 not now"

    relay = QuitBreaks()
    controller, port = _start(relay)
    try:
        SMTPSender("127.0.0.1", port, timeout=5).send("a@x", "alice@example.org", MAIL)
    finally:
        controller.stop()
    assert len(relay.messages) == 1
