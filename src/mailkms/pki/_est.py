"""EST (RFC 7030) wire pieces: base64 DER bodies, what a request names, the key hand-over.

Pure: no I/O, no clock. The services decide who may have what; this module only encodes,
decodes and seals.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass

from asn1crypto import csr as asn1_csr
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mailkms.errors import BadBase64, BadCSR

# RFC 7030 §4.4.1.1 and §4.4.1.2: CSR attributes asking for the key to be encrypted to a key
# the client names (id-aa-decryptKeyID, id-aa-asymmDecryptKeyID).
DECRYPT_KEY_ID = "1.2.840.113549.1.9.16.2.37"
ASYMMETRIC_DECRYPT_KEY_ID = "1.2.840.113549.1.9.16.2.54"
# PKCS#9 challengePassword: a bare re-enrolment request carries the server's nonce in it.
CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
PKCS8 = "application/pkcs8"
_LINE = 64  # `openssl base64 -d` reads lines of at most 64 characters


def decode_body(body: bytes) -> bytes:
    """An EST body: base64 of DER. RFC 8951: whitespace and line breaks are tolerated, and any
    Content-Transfer-Encoding header is ignored."""
    compact = b"".join(body.split())
    if not compact:
        raise BadBase64("the body is empty; EST bodies are base64-encoded DER")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise BadBase64(
            "the body is not valid base64: send base64-encoded DER (`openssl base64`), not PEM or raw DER"
        ) from None


def encode_body(der: bytes) -> bytes:
    """Base64 in 64-character CRLF lines, which both RFC 8951 readers and `openssl base64 -d` take."""
    text = base64.b64encode(der)
    return b"".join(text[i : i + _LINE] + b"\r\n" for i in range(0, len(text), _LINE))


@dataclass(frozen=True)
class RequestView:
    """What a certificate request names, read without trusting it (its signature is not checked)."""

    mailboxes: tuple[str, ...]  # subject emailAddress, a CN holding '@', SAN rfc822Name; as written
    wants_encrypted_key: bool  # a DecryptKeyIdentifier or AsymmetricDecryptKeyIdentifier attribute
    challenge_password: str | None = None  # the challengePassword attribute (PKCS#9), if exactly one value


def inspect_csr(der: bytes) -> RequestView:
    """Read a PKCS#10 structure leniently (asn1crypto accepts what `cryptography` refuses, e.g. a
    PrintableString CN holding '@'). serverkeygen must ignore the key and the signature (RFC 7030
    §4.4.1), so neither is looked at here; `check_csr` checks them where they matter."""
    try:
        request = asn1_csr.CertificationRequest.load(der, strict=True)
        info = request["certification_request_info"]
        names: list[str] = []
        for rdn in info["subject"].chosen:
            for atv in rdn:
                kind = atv["type"].native
                value = str(atv["value"].native)
                if kind == "email_address" or (kind == "common_name" and "@" in value):
                    names.append(value)
        encrypted = False
        challenge: str | None = None
        for attribute in info["attributes"]:
            oid = attribute["type"].dotted
            if oid in (DECRYPT_KEY_ID, ASYMMETRIC_DECRYPT_KEY_ID):
                encrypted = True
            elif oid == CHALLENGE_PASSWORD:
                values = attribute["values"].native
                challenge = str(values[0]) if len(values) == 1 else None
            elif attribute["type"].native == "extension_request":
                for extensions in attribute["values"]:
                    for extension in extensions:
                        if extension["extn_id"].native != "subject_alt_name":
                            continue
                        for general_name in extension["extn_value"].parsed:
                            if general_name.name == "rfc822_name":
                                names.append(str(general_name.native))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BadCSR(f"not a PKCS#10 certificate request in DER ({exc.__class__.__name__})") from None
    return RequestView(tuple(names), encrypted, challenge)


def serverkeygen_response(key_der: bytes, certs_only_der: bytes) -> tuple[str, bytes]:
    """RFC 7030 §4.4.2: multipart/mixed, the private key part (PKCS#8) then the certificate part
    (certs-only, as /simpleenroll answers). Returns (Content-Type, body)."""
    boundary = "est-" + secrets.token_hex(16)
    body = b""
    for content_type, der in ((PKCS8, key_der), (CERTS_ONLY, certs_only_der)):
        head = f"--{boundary}\r\nContent-Type: {content_type}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        body += head.encode() + encode_body(der)
    body += f"--{boundary}--\r\n".encode()
    return f"multipart/mixed; boundary={boundary}", body


# --- the hand-over of a server-made key ------------------------------------------------------
# Between simpleenroll and serverkeygen the key waits sealed under a key derived from the
# enrolment token. The server keeps only SHA-256(token), from which HKDF(token) cannot be had,
# so at rest it cannot open what waits: only a request presenting the token can.
_SEAL_VERSION = b"\x01"
_SEAL_INFO = b"mailkms EST server-generated key hand-over v1"
_SALT, _NONCE, _TAG = 16, 12, 16


def _seal_key(secret: str, salt: bytes) -> AESGCM:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_SEAL_INFO).derive(secret.strip().encode())
    return AESGCM(derived)


def seal_with_secret(secret: str, plaintext: bytes, context: bytes) -> bytes:
    """AES-256-GCM under HKDF-SHA256(secret); `context` (authenticated, not stored) binds the use."""
    salt, nonce = secrets.token_bytes(_SALT), secrets.token_bytes(_NONCE)
    return _SEAL_VERSION + salt + nonce + _seal_key(secret, salt).encrypt(nonce, plaintext, context)


def open_with_secret(secret: str, sealed: bytes, context: bytes) -> bytes:
    """ValueError if `secret` or `context` is not the one it was sealed with, or it was altered."""
    if len(sealed) < 1 + _SALT + _NONCE + _TAG or sealed[:1] != _SEAL_VERSION:
        raise ValueError("not a sealed value")
    salt, nonce, ciphertext = (
        sealed[1 : 1 + _SALT],
        sealed[1 + _SALT : 1 + _SALT + _NONCE],
        sealed[1 + _SALT + _NONCE :],
    )
    try:
        return _seal_key(secret, salt).decrypt(nonce, ciphertext, context)
    except InvalidTag:
        raise ValueError("the secret does not open this value") from None
