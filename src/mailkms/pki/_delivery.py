"""The delivery mail: what the server sends a user after enrolment, renewal or recovery.

An RFC 5322 message whose body is opaque-signed S/MIME (application/pkcs7-mime;
smime-type=signed-data) by the server's mail-signing key. Opaque signing keeps the signed
bytes inside the CMS structure, so no MIME canonicalisation can break the signature in
transit. Inside: a readable note, a JSON manifest, the certificates (certs-only, RFC 8551)
and each private key enveloped (CMS EnvelopedData, AES-256-CBC) to a key the client holds.
"""

from __future__ import annotations

import datetime as dt
import email.policy
import email.utils
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from email.mime.application import MIMEApplication
from email.parser import BytesParser

from cryptography import x509

from mailkms.errors import BadMessage
from mailkms.pki import _mime as mime
from mailkms.pki._cms import certs_only, envelope, load_certs_only, sign_opaque, verify_signed_data
from mailkms.pki._keys import PrivateKey
from mailkms.pki._unreadable import unreadable

DELIVERY_HEADER = "X-Mailkms-Delivery"
MANIFEST_NAME = "mailkms-delivery.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    kind: str  # "enrolment", "renewal", "recovery"
    mailbox: str
    request_id: str
    generation: int
    signing_serial: str
    encryption_serial: str
    key_serials: tuple[str, ...]  # the certificate serial each enveloped key belongs to
    issued_at: str
    reminder_at: str  # when the client starts asking, by the policy of the user's group
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "kind": self.kind,
            "mailbox": self.mailbox,
            "request_id": self.request_id,
            "generation": self.generation,
            "signing_serial": self.signing_serial,
            "encryption_serial": self.encryption_serial,
            "key_serials": list(self.key_serials),
            "issued_at": self.issued_at,
            "reminder_at": self.reminder_at,
        }

    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        """BadMessage for anything but a manifest of this version; the reasons quote none of its text."""
        if not isinstance(data, dict):
            raise BadMessage("the delivery manifest is not a JSON object")
        try:
            version = data["version"]
            if version != FORMAT_VERSION:
                shown = f" {version}" if isinstance(version, int) and not isinstance(version, bool) else ""
                raise BadMessage(f"unknown delivery format version{shown}")
            serials = data["key_serials"]
            if not isinstance(serials, list):
                raise BadMessage("key_serials must be a list")
            generation = data["generation"]
            if not isinstance(generation, int) or isinstance(generation, bool):
                raise BadMessage("the delivery manifest's generation is not a whole number")
            return cls(
                kind=str(data["kind"]),
                mailbox=str(data["mailbox"]),
                request_id=str(data["request_id"]),
                generation=generation,
                signing_serial=str(data["signing_serial"]),
                encryption_serial=str(data["encryption_serial"]),
                key_serials=tuple(str(s) for s in serials),
                issued_at=str(data["issued_at"]),
                reminder_at=str(data["reminder_at"]),
            )
        except KeyError as exc:
            name = exc.args[0] if exc.args and exc.args[0] in _FIELDS else "a field"
            raise BadMessage(f"the delivery manifest lacks {name!r}") from None


_FIELDS = frozenset(Manifest.__dataclass_fields__)

# Bytes for the wire from MIME entities built with email.mime whose headers mailkms makes itself
# (Content-Type, Content-Transfer-Encoding, Content-Disposition with our own file names): the
# compat32 generator with CRLF line ends. It writes the same bytes as `email.policy.SMTP` for
# such entities (tests/unit/pki/test_wire.py compares them) at a fifth of the cost: the SMTP
# policy parses every header again through the header registry before folding it (a third of a
# renewal's time went to that). Not for headers carrying addresses or a Message-ID: compat32
# folds a value too long for one line differently (before it, leaving a trailing space).
WIRE_POLICY = email.policy.compat32.clone(linesep="\r\n")


def wire_bytes(entity: Message) -> bytes:
    """A MIME entity made by mailkms (Content-* headers only) as CRLF bytes."""
    return entity.as_bytes(policy=WIRE_POLICY)


@dataclass(frozen=True)
class EnvelopedKey:
    serial: str
    der: bytes  # EnvelopedData holding the PKCS#8 private key


@dataclass(frozen=True)
class DeliveryContent:
    manifest: Manifest
    certificates: tuple[x509.Certificate, ...]
    keys: tuple[EnvelopedKey, ...]
    signer: x509.Certificate
    signed_certificates: tuple[x509.Certificate, ...] = field(default=())


_NOTE = {
    "enrolment": "Your S/MIME certificates for {mailbox} are attached.",
    "renewal": "Your renewed S/MIME certificates for {mailbox} are attached.",
    "recovery": "Your S/MIME certificates and recovered encryption keys for {mailbox} are attached.",
}


def build_delivery(
    manifest: Manifest,
    certificates: Sequence[x509.Certificate],
    keys: Sequence[tuple[str, bytes, x509.Certificate]],
    *,
    sender: str,
    signer_cert: x509.Certificate,
    signer_key: PrivateKey,
    signer_chain: Sequence[x509.Certificate],
    message_id: str,
    date: dt.datetime,
) -> bytes:
    """keys: (certificate serial, PKCS#8 DER, recipient certificate to envelope it to)."""
    note = _NOTE.get(manifest.kind, _NOTE["enrolment"]).format(mailbox=manifest.mailbox)
    note += (
        "\n\nmailkms-client installs them for you: run `mailkms-client sync` or log on"
        " with `mailkms-client logon`. Nothing else needs to be done.\n"
    )
    parts = [
        mime.utf8_text(note),
        mime.base64_attachment(
            json.dumps(manifest.to_dict(), sort_keys=True).encode(), "application/json", MANIFEST_NAME
        ),
        mime.base64_attachment(certs_only(certificates), "application/pkcs7-mime", "certs.p7c", "certs-only"),
    ]
    for serial, key_der, recipient in keys:
        parts.append(
            mime.base64_attachment(
                envelope(key_der, [recipient]), "application/pkcs7-mime", f"key-{serial}.p7m", "enveloped-data"
            )
        )
    content = mime.multipart("mixed", parts)
    signed = sign_opaque(content, signer_cert, signer_key, signer_chain)
    headers = {
        "From": sender,
        "To": manifest.mailbox,
        "Subject": _SUBJECT.get(manifest.kind, _SUBJECT["enrolment"]),
        "Date": email.utils.format_datetime(date),
        "Message-ID": message_id,
        DELIVERY_HEADER: f"{manifest.kind}; request={manifest.request_id}",
    }
    return _outer(signed, headers)


_SUBJECT = {
    "enrolment": "Your S/MIME certificates",
    "renewal": "Your renewed S/MIME certificates",
    "recovery": "Your recovered S/MIME keys",
}


def _outer(signed: bytes, headers: dict[str, str]) -> bytes:
    """The signed CMS as the whole message. Header lines mailkms can write as they are (ASCII,
    short) are written directly; otherwise (a long or non-ASCII From, say) `email.policy.SMTP`
    encodes and folds them."""
    lines = [f"{name}: {value}" for name, value in headers.items()]
    if all(line.isascii() and len(line) <= mime.FOLD_AT and "\r" not in line and "\n" not in line for line in lines):
        return mime.entity(
            [
                mime.base64_attachment_headers("application/pkcs7-mime", "smime.p7m", "signed-data"),
                *(line.encode() + b"\r\n" for line in lines),
            ],
            mime.base64_body(signed),
        )
    outer = MIMEApplication(signed, "pkcs7-mime", name="smime.p7m")
    outer.set_param("smime-type", "signed-data")
    outer.add_header("Content-Disposition", "attachment", filename="smime.p7m")
    for name, value in headers.items():
        outer[name] = value
    return outer.as_bytes(policy=email.policy.SMTP)


def is_delivery(message: Message) -> bool:
    return DELIVERY_HEADER in message


def parse_message(raw: bytes) -> EmailMessage:
    msg = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


def open_delivery(raw: bytes) -> DeliveryContent:
    """Verify the CMS signature (not yet the chain) and take the delivery apart."""
    outer = parse_message(raw)
    signed_der = None
    for part in outer.walk():
        if part.get_content_type() in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
            if part.get_param("smime-type") in ("signed-data", None):
                payload = part.get_payload(decode=True)
                if isinstance(payload, bytes):
                    signed_der = payload
                    break
    if signed_der is None:
        raise BadMessage("the mail is not S/MIME signed (no application/pkcs7-mime signed-data part)")
    verified = verify_signed_data(signed_der)
    inner = parse_message(verified.content)
    manifest: Manifest | None = None
    certificates: list[x509.Certificate] = []
    keys: list[EnvelopedKey] = []
    for part in inner.walk():
        filename = part.get_filename() or ""
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            continue
        if filename == MANIFEST_NAME:
            try:
                parsed = json.loads(data)
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
                raise BadMessage(unreadable("the delivery manifest", exc)) from None
            manifest = Manifest.from_dict(parsed)
        elif part.get_param("smime-type") == "certs-only":
            certificates.extend(load_certs_only(data))
        elif part.get_param("smime-type") == "enveloped-data" and filename.startswith("key-"):
            keys.append(EnvelopedKey(filename.removeprefix("key-").removesuffix(".p7m"), data))
    if manifest is None:
        raise BadMessage("the signed mail holds no mailkms delivery manifest")
    return DeliveryContent(manifest, tuple(certificates), tuple(keys), verified.signer, verified.certificates)
