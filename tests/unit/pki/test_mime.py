"""pki/_mime writes what the `email` package would: same parts, same headers, same bodies, read back
by the `email` package's own parser (the judge here; mailkms reads no MIME itself)."""

from __future__ import annotations

import email.policy
import os
from email.message import EmailMessage, Message
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import BytesParser

import pytest

from mailkms.pki import _mime as mime

SERIAL = "7f3a9c0e5b2d4e6f8a1b3c5d7e9f0a2b" + "1" * 8  # 40 hex digits: the longest file name made


def _reference_attachment(data: bytes, subtype: str, filename: str, smime_type: str | None) -> MIMEApplication:
    part = MIMEApplication(data, subtype, name=filename)
    part.add_header("Content-Disposition", "attachment", filename=filename)
    if smime_type:
        part.set_param("smime-type", smime_type)
    return part


def _read(raw: bytes) -> EmailMessage:
    message = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    assert not message.defects
    return message


def _view(message: Message) -> list[tuple[object, ...]]:
    """Every entity's headers (name, unfolded value, in any order) and decoded body."""
    out: list[tuple[object, ...]] = []
    for part in message.walk():
        headers = sorted((k.lower(), " ".join(str(v).split())) for k, v in part.items())
        body = None if part.is_multipart() else part.get_payload(decode=True)
        out.append((part.get_content_type(), part.get_params(), part.get_filename(), headers, body))
        assert not part.defects
    return out


def _delivery_parts() -> list[tuple[bytes, Message]]:
    note = "Your renewed S/MIME certificates for a.very.long.mailbox@example.org are attached.\n" * 3
    cases = [(mime.utf8_text(note), MIMEText(note, "plain", "utf-8"))]
    for data, subtype, name, smime_type in (
        (b'{"kind": "renewal"}' * 40, "json", "mailkms-delivery.json", None),
        (os.urandom(5000), "pkcs7-mime", "certs.p7c", "certs-only"),
        (os.urandom(2100), "pkcs7-mime", f"key-{SERIAL}.p7m", "enveloped-data"),
        (b"", "pkcs7-mime", "empty.p7m", None),
        (b"x" * 57, "pkcs7-mime", "one-line.p7m", None),  # exactly one full base64 line
    ):
        fast = mime.base64_attachment(data, f"application/{subtype}", name, smime_type)
        cases.append((fast, _reference_attachment(data, subtype, name, smime_type)))
    return cases


@pytest.mark.parametrize("index", range(6))
def test_each_part_reads_as_the_email_package_wrote_it(index: int) -> None:
    fast, reference = _delivery_parts()[index]
    assert _view(_read(fast)) == _view(_read(reference.as_bytes(policy=email.policy.SMTP)))


def test_a_multipart_reads_as_the_email_package_wrote_it() -> None:
    cases = _delivery_parts()
    boundary = mime.new_boundary()
    fast = mime.multipart("mixed", [part for part, _ in cases], boundary)
    reference = MIMEMultipart("mixed", boundary=boundary)
    for _, part in cases:
        reference.attach(part)
    expected = reference.as_bytes(policy=email.policy.SMTP)
    assert _view(_read(fast)) == _view(_read(expected))
    assert len(_read(fast).get_payload()) == len(cases)


def test_lines_are_crlf_and_short() -> None:
    raw = mime.multipart("mixed", [part for part, _ in _delivery_parts()])
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78


def test_a_long_content_type_is_folded_before_a_parameter() -> None:
    line = mime.header("Content-Type", "application/pkcs7-mime", ("name", f"key-{SERIAL}.p7m"), ("smime-type", "x"))
    assert (
        line == (f'Content-Type: application/pkcs7-mime;\r\n name="key-{SERIAL}.p7m";\r\n smime-type="x"\r\n').encode()
    )


@pytest.mark.parametrize(
    "value, params",
    [("grüße", ()), ("a\r\nBcc: x@y", ()), ("a", (("name", 'x"; evil="y'),)), ("a", (("name", "x\ny"),))],
)
def test_refuses_what_it_cannot_write_safely(value: str, params: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(ValueError):
        mime.header("X-Test", value, *params)


def test_boundaries_differ_and_take_the_email_package_form() -> None:
    first, second = mime.new_boundary(), mime.new_boundary()
    assert first != second
    assert first.startswith("=" * 15) and first.endswith("==") and len(first) == 15 + 19 + 2


def _outer_headers(sender: str) -> dict[str, str]:
    return {
        "From": sender,
        "To": "a.user@example.org",
        "Subject": "Your renewed S/MIME certificates",
        "Date": "Sat, 05 Dec 2026 05:00:00 +0000",
        "Message-ID": "<0f8b2c1e-9d7a-4b3c-8e2f-1a2b3c4d5e6f@kms.example.org>",
        "X-Mailkms-Delivery": "renewal; request=0f8b2c1e-9d7a-4b3c-8e2f-1a2b3c4d5e6f",
    }


@pytest.mark.parametrize(
    "sender",
    ["kms@example.org", "Key Management Server of a rather long organisation name <kms@example.org>"],
)
def test_the_delivery_outer_entity_reads_as_the_email_package_wrote_it(sender: str) -> None:
    from mailkms.pki._delivery import _outer

    signed = os.urandom(9000)
    headers = _outer_headers(sender)
    fast = _outer(signed, headers)
    reference = _reference_attachment(signed, "pkcs7-mime", "smime.p7m", "signed-data")
    for name, value in headers.items():
        reference[name] = value
    assert _view(_read(fast)) == _view(_read(reference.as_bytes(policy=email.policy.SMTP)))
    assert max(len(line) for line in fast.split(b"\r\n")) <= 78
    # resync replaces the Message-ID line by bytes: it must be one line
    assert f"\r\nMessage-ID: {headers['Message-ID']}\r\n".encode() in fast
