"""wire_bytes: the fast generator writes exactly what email.policy.SMTP writes for mailkms's messages."""

from __future__ import annotations

import email.policy
import os
from email.message import Message
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

from mailkms.pki import wire_bytes


def _attachment(data: bytes, filename: str, smime_type: str | None) -> MIMEApplication:
    part = MIMEApplication(data, "pkcs7-mime", name=filename)
    part.add_header("Content-Disposition", "attachment", filename=filename)
    if smime_type:
        part.set_param("smime-type", smime_type)
    return part


def delivery_like() -> Message:
    inner = MIMEMultipart("mixed")
    inner.attach(MIMEText("Your renewed S/MIME certificates for a.very.long.mailbox@example.org.\n", "plain", "utf-8"))
    inner.attach(_attachment(b'{"kind": "renewal"}' * 40, "mailkms-delivery.json", None))
    inner.attach(_attachment(os.urandom(5000), "certs.p7c", "certs-only"))
    for serial in ("7f3a9c0e5b2d4e6f8a1b3c5d7e9f0a2b", "1" * 40):  # 40 hex digits: a 159-bit serial
        inner.attach(_attachment(os.urandom(2100), f"key-{serial}.p7m", "enveloped-data"))
    return inner


def outer_like() -> Message:
    """Headers with addresses and ids are not for wire_bytes (see the next test)."""
    outer = _attachment(os.urandom(9000), "smime.p7m", "signed-data")
    outer["Message-ID"] = "<resync-0123456789abcdef.0f8b2c1e-9d7a-4b3c-8e2f-1a2b3c4d5e6f@kms.example.org>"
    return outer


def reminder_like() -> Message:
    inner = MIMEMultipart("alternative")
    inner.attach(MIMEText("Grüße, Zoë: your certificates expire on 04 June 2027.\n" * 20, "plain", "utf-8"))
    inner.attach(MIMEText("<p>Grüße, Zoë &amp; co</p>\n" * 20, "html", "utf-8"))
    del inner["MIME-Version"]
    return inner


@pytest.mark.parametrize("build", [delivery_like, reminder_like])
def test_same_bytes_as_the_smtp_policy(build: object) -> None:
    assert callable(build)
    message = build()
    fast = wire_bytes(message)
    assert fast == message.as_bytes(policy=email.policy.SMTP)
    assert b"\n" not in fast.replace(b"\r\n", b"")


def test_a_long_message_id_is_why_outer_headers_keep_the_smtp_policy() -> None:
    """compat32 folds an id too long for one line before it (`Message-ID: \\r\\n <...>`): a resync's
    byte replacement of the Message-ID line would then miss. The outer headers stay on email.policy.SMTP."""
    message = outer_like()
    assert b"Message-ID: <resync-" in message.as_bytes(policy=email.policy.SMTP)
    assert b"Message-ID: <resync-" not in wire_bytes(message)
