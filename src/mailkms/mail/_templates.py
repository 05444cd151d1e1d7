"""Mail from templates: one folder per message (subject.txt, body.txt, body.html), signed S/MIME.

Placeholders are `$name` (string.Template); values are HTML-escaped in body.html, and lists become
bullet lines in text and <ul> in HTML. The message is multipart/alternative (text and HTML)
inside a detached multipart/signed (RFC 8551) by the server's mail-signing key, so every mail
program shows it, and those that speak S/MIME show it as signed by the server.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import html
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.header import Header
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from string import Template

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from mailkms.clock import Clock
from mailkms.pki import PrivateKey, signature_hash_for, wire_bytes

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str


def _text_value(value: object) -> str:
    if isinstance(value, list | tuple):
        return "".join(f"  - {v}\n" for v in value) if value else "  (none)\n"
    return str(value)


def _html_value(value: object) -> str:
    if isinstance(value, list | tuple):
        if not value:
            return "<p>(none)</p>"
        return "<ul>" + "".join(f"<li>{html.escape(str(v))}</li>" for v in value) + "</ul>"
    return html.escape(str(value))


def render(name: str, context: Mapping[str, object], root: Path = TEMPLATES) -> Rendered:
    folder = root / name
    if not folder.is_dir():
        raise LookupError(f"no mail template {name!r} in {root}")
    text_ctx = {k: _text_value(v) for k, v in context.items()}
    html_ctx = {k: _html_value(v) for k, v in context.items()}
    subject = Template((folder / "subject.txt").read_text()).substitute(text_ctx).strip()
    body_text = Template((folder / "body.txt").read_text()).substitute(text_ctx)
    body_html = Template((folder / "body.html").read_text()).substitute(html_ctx)
    return Rendered(" ".join(subject.split()), body_text, body_html)


def signed_alternative(
    rendered: Rendered,
    *,
    sender: str,
    recipient: str,
    message_id: str,
    date: dt.datetime,
    signer: x509.Certificate,
    key: PrivateKey,
    chain: Sequence[x509.Certificate],
) -> bytes:
    """multipart/signed (detached, SHA-256) around multipart/alternative (text/plain, text/html)."""
    inner = MIMEMultipart("alternative")
    inner.attach(MIMEText(rendered.text, "plain", "utf-8"))
    inner.attach(MIMEText(rendered.html, "html", "utf-8"))
    del inner["MIME-Version"]
    signed_part = wire_bytes(inner)  # CRLF, base64 bodies: nothing in transit can change them
    builder = pkcs7.PKCS7SignatureBuilder().set_data(signed_part).add_signer(signer, key, signature_hash_for(key))
    for cert in chain:
        builder = builder.add_certificate(cert)
    signature = builder.sign(
        serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary]
    )
    boundary = "=_mailkms_" + secrets.token_hex(12)
    micalg = "sha-384" if signature_hash_for(key).name == "sha384" else "sha-256"
    sig_b64 = base64.encodebytes(signature).replace(b"\n", b"\r\n")
    headers = [
        f"From: {sender}",
        f"To: {recipient}",
        f"Subject: {_header_text(rendered.subject)}",
        f"Date: {email.utils.format_datetime(date)}",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg={micalg};'
        f' boundary="{boundary}"',
    ]
    parts = [
        "\r\n".join(headers).encode(),
        b"\r\n\r\nThis is an S/MIME signed message.\r\n\r\n",
        f"--{boundary}\r\n".encode(),
        signed_part,
        f"\r\n--{boundary}\r\n".encode(),
        b"Content-Type: application/pkcs7-signature; name=smime.p7s\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=smime.p7s\r\n\r\n",
        sig_b64,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)


def _header_text(text: str) -> str:
    return text if text.isascii() else Header(text, "utf-8").encode()


class TemplateComposer:
    """The reminder service's Composer: renders a template folder and signs with the server's mail key."""

    def __init__(
        self,
        signer: Callable[[], tuple[x509.Certificate, PrivateKey, Sequence[x509.Certificate]]],
        sender: str,
        clock: Clock,
        root: Path = TEMPLATES,
    ) -> None:
        self._signer = signer
        self._sender = sender
        self._clock = clock
        self._root = root

    def compose(self, template: str, recipient: str, context: Mapping[str, object], message_id: str) -> bytes:
        cert, key, chain = self._signer()
        return signed_alternative(
            render(template, context, self._root),
            sender=self._sender,
            recipient=recipient,
            message_id=message_id,
            date=self._clock.now(),
            signer=cert,
            key=key,
            chain=chain,
        )
