"""S/MIME (RFC 8551) on RFC 5322 messages: sign (detached and opaque), encrypt, verify, decrypt.

Writing: the message's own Content-* fields and body become the MIME entity that is signed or
encrypted (canonical CRLF, 7-bit for detached signatures); the other header fields (From, To,
Subject, Date, Message-ID...) stay outside, as mail programs do.

- `multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256` (RFC 8551 §3.5.3)
- `application/pkcs7-mime; smime-type=signed-data` (opaque, §3.5.2)
- `application/pkcs7-mime; smime-type=enveloped-data`: EnvelopedData, AES-256-CBC, RSA key
  transport (PKCS#1 v1.5), what every mail program reads (§3.3).

Reading: EnvelopedData (AES-CBC) and AuthEnvelopedData (AES-GCM, RFC 5083/5084) with RSA
key transport in PKCS#1 v1.5 or RSAES-OAEP (RFC 3560). The structures are decoded with
asn1crypto; the arithmetic is `cryptography`'s. Detached signatures are checked over the exact
bytes of the first body part, found by the RFC 2046 boundary rule on the raw message.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import enum
import quopri
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from typing import Any, ClassVar

from asn1crypto import cms as asn1_cms
from asn1crypto import core as asn1_core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import pkcs7

from mailkms.errors import BadMessage, BadSignature, NotARecipient, NotSigned
from mailkms.pki._cms import VerifiedSignedData, envelope, sign_opaque, verify_signed_data
from mailkms.pki._keys import PrivateKey, signature_hash_for

CRLF = b"\r\n"
PKCS7_MIME = ("application/pkcs7-mime", "application/x-pkcs7-mime")
PKCS7_SIGNATURE = ("application/pkcs7-signature", "application/x-pkcs7-signature")
_MICALG = {"sha256": "sha-256", "sha384": "sha-384", "sha512": "sha-512"}
_PREAMBLE = b"This is an S/MIME signed message" + CRLF


class SMimeKind(enum.StrEnum):
    SIGNED_DETACHED = "multipart/signed"
    SIGNED_OPAQUE = "signed-data"
    ENVELOPED = "enveloped-data"
    AUTH_ENVELOPED = "authEnveloped-data"
    CERTS_ONLY = "certs-only"
    PLAIN = "plain"


# --- header fields: the outside stays outside ----------------------------------------------------
@dataclass(frozen=True)
class Split:
    """A message cut into its outer fields, its content fields and its body (raw bytes)."""

    outer: tuple[bytes, ...]  # whole fields, folding kept, without line ends
    content: tuple[bytes, ...]  # Content-* fields
    body: bytes


def canonical(data: bytes) -> bytes:
    """CRLF line ends (RFC 5751 §3.1.1), whatever the file had."""
    return re.sub(rb"\r?\n", CRLF, data)


def _field_name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


def split_message(raw: bytes) -> Split:
    data = canonical(raw)
    head, sep, body = data.partition(CRLF + CRLF)
    if not sep:
        if data.startswith(CRLF):
            head, body = b"", data[2:]
        else:
            head, body = data, b""
    fields: list[bytes] = []
    for line in head.split(CRLF) if head else []:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += CRLF + line
        elif line:
            if b":" not in line:
                raise BadMessage("the message header is malformed (a line without a field name)")
            fields.append(line)
    outer = tuple(f for f in fields if not _field_name(f).startswith(b"content-") and _field_name(f) != b"mime-version")
    content = tuple(f for f in fields if _field_name(f).startswith(b"content-"))
    return Split(outer, content, body)


def _join(fields: Sequence[bytes], body: bytes) -> bytes:
    return b"".join(f + CRLF for f in fields) + CRLF + body


def _is_7bit(data: bytes) -> bool:
    return all(b < 0x80 for b in data) and b"\x00" not in data


def mime_entity(raw: bytes, *, seven_bit: bool) -> bytes:
    """The part of a message that is signed or encrypted: its Content-* fields and body, CRLF.

    With seven_bit (detached signatures must survive 7-bit transport, RFC 8551 §3.1.2) 8-bit
    bodies are re-encoded (quoted-printable or base64) by the `email` package's generator.
    """
    split = split_message(raw)
    content = list(split.content)
    if not any(_field_name(f) == b"content-type" for f in content):
        charset = b"us-ascii" if _is_7bit(split.body) else b"utf-8"
        content.insert(0, b"Content-Type: text/plain; charset=" + charset)
    entity = _join(content, split.body)
    if not seven_bit or _is_7bit(entity):
        return entity
    parsed = BytesParser(policy=email.policy.SMTP).parsebytes(entity)
    parsed_entity = parsed.as_bytes(policy=email.policy.SMTP.clone(cte_type="7bit", max_line_length=78))
    if not _is_7bit(parsed_entity):
        raise BadMessage("the message holds 8-bit data that cannot be made 7-bit for a detached signature")
    return canonical(parsed_entity)


def _outer(split: Split, content_fields: Sequence[bytes], body: bytes) -> bytes:
    return _join([*split.outer, b"MIME-Version: 1.0", *content_fields], body)


def _b64(data: bytes) -> bytes:
    text = base64.b64encode(data)
    return CRLF.join(text[i : i + 76] for i in range(0, len(text), 76)) + CRLF


# --- writing -------------------------------------------------------------------------------------
def micalg_for(key: PrivateKey) -> str:
    return _MICALG[signature_hash_for(key).name]


def sign_detached(
    raw: bytes, signer: x509.Certificate, key: PrivateKey, chain: Sequence[x509.Certificate] = ()
) -> bytes:
    """multipart/signed with an application/pkcs7-signature part (RFC 8551 §3.5.3)."""
    split = split_message(raw)
    entity = mime_entity(raw, seven_bit=True)
    builder = pkcs7.PKCS7SignatureBuilder().set_data(entity).add_signer(signer, key, signature_hash_for(key))
    for cert in chain:
        builder = builder.add_certificate(cert)
    signature = builder.sign(
        serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary]
    )
    boundary = b"----=_mailkms_" + secrets.token_hex(12).encode()
    signature_part = _join(
        [
            b'Content-Type: application/pkcs7-signature; name="smime.p7s"',
            b"Content-Transfer-Encoding: base64",
            b'Content-Disposition: attachment; filename="smime.p7s"',
            b"Content-Description: S/MIME Cryptographic Signature",
        ],
        _b64(signature),
    )
    body = (
        _PREAMBLE
        + CRLF
        + b"--"
        + boundary
        + CRLF
        + entity
        + CRLF
        + b"--"
        + boundary
        + CRLF
        + signature_part
        + CRLF
        + b"--"
        + boundary
        + b"--"
        + CRLF
    )
    content_type = (
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg='
        + micalg_for(key).encode()
        + b";"
        + CRLF
        + b' boundary="'
        + boundary
        + b'"'
    )
    return _outer(split, [content_type], body)


def _pkcs7_mime(split: Split, der: bytes, smime_type: str) -> bytes:
    fields = [
        f'Content-Type: application/pkcs7-mime; smime-type={smime_type}; name="smime.p7m"'.encode(),
        b"Content-Transfer-Encoding: base64",
        b'Content-Disposition: attachment; filename="smime.p7m"',
    ]
    return _outer(split, fields, _b64(der))


def sign_opaque_message(
    raw: bytes, signer: x509.Certificate, key: PrivateKey, chain: Sequence[x509.Certificate] = ()
) -> bytes:
    """application/pkcs7-mime; smime-type=signed-data: the content travels inside the CMS."""
    split = split_message(raw)
    return _pkcs7_mime(split, sign_opaque(mime_entity(raw, seven_bit=False), signer, key, chain), "signed-data")


def encrypt_message(raw: bytes, recipients: Sequence[x509.Certificate]) -> bytes:
    """application/pkcs7-mime; smime-type=enveloped-data, AES-256-CBC, RSA key transport."""
    if not recipients:
        raise BadMessage("no recipients to encrypt to")
    for cert in recipients:
        if not isinstance(cert.public_key(), rsa.RSAPublicKey):
            raise BadMessage("only RSA encryption certificates can be encrypted to")
    split = split_message(raw)
    return _pkcs7_mime(split, envelope(mime_entity(raw, seven_bit=False), list(recipients)), "enveloped-data")


# --- reading the MIME structure --------------------------------------------------------------------
@dataclass(frozen=True)
class SMimeParts:
    kind: SMimeKind
    split: Split
    der: bytes | None = None  # the CMS structure
    signed_entity: bytes | None = None  # detached: the exact first body part


def _content_headers(fields: Sequence[bytes]) -> Message:
    # compat32: the Content-* fields are read for their parameters only, and it is the fast reader
    return BytesParser(policy=email.policy.compat32).parsebytes(_join(fields, b""), headersonly=True)


def _header_params(split: Split) -> tuple[str, dict[str, str]]:
    """Content-Type of the whole message and its parameters, read by the `email` package."""
    msg = _content_headers(split.content)
    params = {str(k).lower(): str(v) for k, v in (msg.get_params(failobj=[], header="content-type") or [])[1:]}
    return msg.get_content_type(), params


def _decode_part_body(fields: Sequence[bytes], body: bytes) -> bytes:
    encoding = str(_content_headers(fields).get("Content-Transfer-Encoding", "7bit")).strip().lower()
    try:
        if encoding == "base64":
            payload = binascii.a2b_base64(body)  # lenient, as mail readers are: line ends and junk skipped
        elif encoding == "quoted-printable":
            payload = quopri.decodestring(body)
        elif encoding in ("7bit", "8bit", "binary"):
            payload = body
        else:
            raise BadMessage(f"unknown Content-Transfer-Encoding {encoding}")
    except binascii.Error:
        raise BadMessage("the S/MIME part is not valid base64 (damaged or truncated)") from None
    if not payload:
        raise BadMessage("the S/MIME part is empty or not decodable")
    return payload


def multipart_parts(body: bytes, boundary: str) -> list[bytes]:
    """The body parts of a multipart body, byte-exact (RFC 2046 §5.1.1).

    The CRLF before a delimiter belongs to the delimiter; transport padding after the
    boundary is allowed; the close delimiter ends the parts.
    """
    delimiter = re.compile(rb"(?:\A|\r\n)--" + re.escape(boundary.encode()) + rb"(--)?[ \t]*(?:\r\n|\Z)")
    parts: list[bytes] = []
    start: int | None = None
    for match in delimiter.finditer(body):
        if start is not None:
            parts.append(body[start : match.start()])
        if match.group(1):
            return parts
        start = match.end()
    raise BadMessage("the multipart message is truncated (no closing boundary)")


def read_smime(raw: bytes) -> SMimeParts:
    """Find the S/MIME structure of a message; PLAIN when it has none."""
    split = split_message(raw)
    ctype, params = _header_params(split)
    if ctype == "multipart/signed":
        boundary = params.get("boundary")
        if not boundary:
            raise BadMessage("multipart/signed without a boundary")
        parts = multipart_parts(split.body, boundary)
        if len(parts) != 2:
            raise BadMessage(f"multipart/signed must have 2 parts, this one has {len(parts)}")
        sig_split = split_message(parts[1])
        sig_type, _ = _header_params(sig_split)
        if sig_type not in PKCS7_SIGNATURE:
            raise BadMessage(f"the signature part is {sig_type}, not application/pkcs7-signature")
        der = _decode_part_body(sig_split.content, sig_split.body)
        return SMimeParts(SMimeKind.SIGNED_DETACHED, split, der, parts[0])
    if ctype in PKCS7_MIME or (ctype == "application/octet-stream" and params.get("name", "").endswith(".p7m")):
        der = _decode_part_body(split.content, split.body)
        return SMimeParts(_cms_kind(der), split, der)
    return SMimeParts(SMimeKind.PLAIN, split)


def _cms_kind(der: bytes) -> SMimeKind:
    try:
        content_type = asn1_cms.ContentInfo.load(der, strict=False)["content_type"].native
    except (ValueError, TypeError, KeyError):
        raise BadMessage("the S/MIME part is not a CMS structure (damaged or truncated)") from None
    kinds = {
        "enveloped_data": SMimeKind.ENVELOPED,
        "authenticated_enveloped_data": SMimeKind.AUTH_ENVELOPED,
    }
    if content_type in kinds:
        return kinds[content_type]
    if content_type == "signed_data":
        try:
            signed = asn1_cms.ContentInfo.load(der, strict=False)["content"]
            has_signers = len(signed["signer_infos"]) > 0
        except (ValueError, TypeError, KeyError):
            raise BadMessage("the S/MIME part is not a readable SignedData") from None
        return SMimeKind.SIGNED_OPAQUE if has_signers else SMimeKind.CERTS_ONLY
    raise BadMessage(f"unsupported CMS content type {content_type}")


def reassemble(split: Split, entity: bytes) -> bytes:
    """The message as the reader sees it: outer fields, then the inner MIME entity."""
    return b"".join(f + CRLF for f in split.outer) + b"MIME-Version: 1.0" + CRLF + canonical(entity)


# --- verifying -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifiedMessage:
    kind: SMimeKind
    signed: VerifiedSignedData
    message: bytes  # outer fields + the signed entity


def verify_message(raw: bytes) -> VerifiedMessage:
    """Check the CMS signature of a signed message (not the chain: the caller decides trust)."""
    parts = read_smime(raw)
    if parts.kind is SMimeKind.SIGNED_DETACHED:
        assert parts.der is not None and parts.signed_entity is not None
        try:
            signed = verify_signed_data(parts.der, canonical(parts.signed_entity))
        except BadSignature:
            if canonical(parts.signed_entity) == parts.signed_entity:
                raise
            signed = verify_signed_data(parts.der, parts.signed_entity)  # signed as the bytes were (binary)
        return VerifiedMessage(parts.kind, signed, reassemble(parts.split, parts.signed_entity))
    if parts.kind is SMimeKind.SIGNED_OPAQUE:
        assert parts.der is not None
        signed = verify_signed_data(parts.der)
        return VerifiedMessage(parts.kind, signed, reassemble(parts.split, signed.content))
    if parts.kind in (SMimeKind.ENVELOPED, SMimeKind.AUTH_ENVELOPED):
        raise NotSigned("the message is encrypted: decrypt it first, then verify what it holds")
    raise NotSigned("the message is not signed (no S/MIME signature in it)")


# --- decrypting ----------------------------------------------------------------------------------
class _GcmParams(asn1_core.Sequence):  # type: ignore[misc]
    """GCMParameters (RFC 5084 §3.2), declared for asn1crypto, which lacks it."""

    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("nonce", asn1_core.OctetString),
        ("icv_len", asn1_core.Integer, {"default": 12}),
    ]


_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_AES_KEY_BYTES = {"aes128": 16, "aes192": 24, "aes256": 32}


def _matches(rid: asn1_cms.RecipientIdentifier, cert: x509.Certificate) -> bool:
    if rid.name == "issuer_and_serial_number":
        chosen = rid.chosen
        if chosen["serial_number"].native != cert.serial_number:
            return False
        issuer_der = cert.issuer.public_bytes()
        return chosen["issuer"].dump() == issuer_der or bool(chosen["issuer"] == asn1_x509.Name.load(issuer_der))
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return False
    return bool(rid.chosen.native == ski)


def _unwrap_key(ktri: asn1_cms.KeyTransRecipientInfo, key: PrivateKey) -> bytes:
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BadMessage("only RSA key transport is supported")
    algorithm = ktri["key_encryption_algorithm"]
    name = algorithm["algorithm"].native
    encrypted = ktri["encrypted_key"].native
    pad: asym_padding.AsymmetricPadding
    if name == "rsaes_pkcs1v15":
        pad = asym_padding.PKCS1v15()
    elif name == "rsaes_oaep":
        params = algorithm["parameters"]
        digest = _HASHES.get(params["hash_algorithm"]["algorithm"].native)
        mgf_hash = _HASHES.get(params["mask_gen_algorithm"]["parameters"]["algorithm"].native)
        if digest is None or mgf_hash is None:
            raise BadMessage("unsupported RSA-OAEP hash")
        label = params["p_source_algorithm"]["parameters"].native or None
        pad = asym_padding.OAEP(mgf=asym_padding.MGF1(mgf_hash()), algorithm=digest(), label=label)
    else:
        raise BadMessage(f"unsupported key transport {name}")
    try:
        return key.decrypt(encrypted, pad)
    except ValueError:
        raise BadMessage("the message key cannot be unwrapped: the message is damaged") from None


def _content_bytes(info: asn1_cms.EncryptedContentInfo) -> bytes:
    encrypted = info["encrypted_content"]
    if encrypted.native is None:
        raise BadMessage("the encrypted message carries no content")
    return bytes(encrypted.native)


def _aes_key_for(algorithm: Any, mode: str, cek: bytes) -> None:
    """The content cipher is AES in `mode` and the unwrapped key has its size."""
    name = algorithm["algorithm"].native
    cipher = name.removesuffix("_" + mode)
    if not name.endswith("_" + mode) or cipher not in _AES_KEY_BYTES:
        raise BadMessage(f"content encryption {name} is not supported (AES-CBC or AES-GCM)")
    if len(cek) != _AES_KEY_BYTES[cipher]:
        raise BadMessage("the message key has the wrong size: the message is damaged or not for this key")


def aes_cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-CBC with PKCS#7 padding; ValueError when the data is truncated or the padding is wrong."""
    if len(data) % 16 or not data:
        raise ValueError("truncated")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(data) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(padded) + unpadder.finalize()


def _decrypt_cbc(info: asn1_cms.EncryptedContentInfo, cek: bytes) -> bytes:
    algorithm = info["content_encryption_algorithm"]
    _aes_key_for(algorithm, "cbc", cek)
    try:
        return aes_cbc_decrypt(cek, algorithm["parameters"].native, _content_bytes(info))
    except ValueError:
        raise BadMessage("the encrypted content does not decrypt: the message is damaged or truncated") from None


def _decrypt_gcm(auth: asn1_cms.AuthEnvelopedData, cek: bytes) -> bytes:
    info = auth["auth_encrypted_content_info"]
    algorithm = info["content_encryption_algorithm"]
    _aes_key_for(algorithm, "gcm", cek)
    params = _GcmParams.load(algorithm["parameters"].dump())
    tag = auth["mac"].native
    if len(tag) != params["icv_len"].native or len(tag) < 12:
        raise BadMessage("the authentication tag is malformed")
    decryptor = Cipher(algorithms.AES(cek), modes.GCM(params["nonce"].native, tag, min_tag_length=12)).decryptor()
    auth_attrs = auth["auth_attrs"]
    if auth_attrs.native is not None:
        decryptor.authenticate_additional_data(auth_attrs.untag().dump(force=True))
    plain = decryptor.update(_content_bytes(info))
    try:
        return plain + decryptor.finalize()
    except InvalidTag:
        raise BadMessage("the encrypted content fails its integrity check: the message was altered") from None


KeySource = PrivateKey | Callable[[], PrivateKey]


def decrypt_cms(der: bytes, keys: Sequence[tuple[x509.Certificate, KeySource]]) -> tuple[bytes, x509.Certificate]:
    """Open EnvelopedData or AuthEnvelopedData with whichever of `keys` it is addressed to.

    A key may be given as a callable: it is loaded only when the message is addressed to its
    certificate (a key store's keys are slow to unlock). Returns the content and the certificate.
    """
    try:
        info = asn1_cms.ContentInfo.load(der, strict=False)
        content_type = info["content_type"].native
        if content_type not in ("enveloped_data", "authenticated_enveloped_data"):
            raise BadMessage("the message is not encrypted (no EnvelopedData)")
        content = info["content"]
        recipients = [r.chosen for r in content["recipient_infos"] if r.name == "ktri"]
        for cert, key in keys:
            for ktri in recipients:
                if not _matches(ktri["rid"], cert):
                    continue
                cek = _unwrap_key(ktri, key() if callable(key) else key)
                if content_type == "enveloped_data":
                    return _decrypt_cbc(content["encrypted_content_info"], cek), cert
                return _decrypt_gcm(content, cek), cert
    except BadMessage:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise BadMessage(
            f"the encrypted message cannot be read ({exc.__class__.__name__}): damaged or truncated"
        ) from None
    raise NotARecipient("the message is not encrypted to any of your keys (it is addressed to someone else)")


@dataclass(frozen=True)
class DecryptedMessage:
    kind: SMimeKind
    message: bytes  # outer fields + the decrypted entity
    recipient: x509.Certificate


def decrypt_message(raw: bytes, keys: Sequence[tuple[x509.Certificate, KeySource]]) -> DecryptedMessage:
    parts = read_smime(raw)
    if parts.kind not in (SMimeKind.ENVELOPED, SMimeKind.AUTH_ENVELOPED):
        raise BadMessage("the message is not S/MIME encrypted (no application/pkcs7-mime enveloped-data)")
    assert parts.der is not None
    entity, cert = decrypt_cms(parts.der, keys)
    return DecryptedMessage(parts.kind, reassemble(parts.split, entity), cert)
