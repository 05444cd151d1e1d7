"""Mails put straight into the outbox, for the tests of the worker, the relay and `mailkms outbox`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mailkms.services import queue_message


def queue_mails(
    services: Any,
    mails: Iterable[tuple[str, str]],
    *,
    subject: str = "test",
    purpose: str = "test",
    sender: str = "mailkms@kms.example.org",
) -> None:
    """(Message-ID, recipient) pairs, queued in one transaction; `subject` is the raw header text."""
    with services.db.transaction() as session:
        for message_id, recipient in mails:
            queue_message(
                session,
                services.audit,
                services.clock.now(),
                message_id=message_id,
                sender=sender,
                recipient=recipient,
                body=f"From: {sender}\r\nTo: {recipient}\r\nMessage-ID: {message_id}\r\nSubject: {subject}\r\n\r\n"
                "hello\r\n".encode(),
                purpose=purpose,
            )
