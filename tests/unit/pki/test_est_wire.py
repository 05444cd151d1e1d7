"""EST wire pieces: base64 bodies, what a request names, the sealed key hand-over, multipart."""

from __future__ import annotations

import base64
import email
import subprocess
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from mailkms.errors import BadBase64, BadCSR
from mailkms.pki import (
    KeyType,
    decode_body,
    encode_body,
    generate_key,
    inspect_csr,
    open_with_secret,
    seal_with_secret,
    serverkeygen_response,
)
from mailkms.pki._est import ASYMMETRIC_DECRYPT_KEY_ID, DECRYPT_KEY_ID

KEY = generate_key(KeyType.P256)


def _csr(names: Sequence[tuple[x509.ObjectIdentifier, str]], san: Sequence[str] = (), attribute: str = "") -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(oid, value) for oid, value in names])
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(m) for m in san]), False)
    if attribute:
        builder = builder.add_attribute(x509.ObjectIdentifier(attribute), b"key-id")
    return builder.sign(KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


# --- base64 bodies ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 47, 48, 49, 1000])
def test_encoded_bodies_decode_back_and_openssl_reads_them(size: int) -> None:
    der = bytes(range(256)) * 4
    der = der[:size]
    body = encode_body(der)
    assert all(len(line) <= 64 for line in body.split(b"\r\n"))
    assert decode_body(body) == der
    out = subprocess.run(["openssl", "base64", "-d"], input=body, capture_output=True, check=True).stdout
    assert out == der


def test_whitespace_and_line_breaks_are_tolerated() -> None:
    der = b"\x30\x03\x02\x01\x05"
    text = base64.b64encode(der)
    assert decode_body(b"  " + text[:3] + b"\n\t" + text[3:] + b"\r\n") == der


@pytest.mark.parametrize(
    "body", [b"", b"   \n", b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n", b"\x30\x82\x01\x00", b"abc"]
)
def test_bodies_that_are_not_base64_are_refused(body: bytes) -> None:
    with pytest.raises(BadBase64):
        decode_body(body)


# --- what a request names ------------------------------------------------------------------------
def test_names_come_from_email_address_cn_with_at_and_san() -> None:
    der = _csr(
        [(NameOID.COMMON_NAME, "Alice@Example.org"), (NameOID.EMAIL_ADDRESS, "alice@example.org")],
        san=["alias@example.org"],
    )
    view = inspect_csr(der)
    assert view.mailboxes == ("Alice@Example.org", "alice@example.org", "alias@example.org")
    assert not view.wants_encrypted_key


def test_a_cn_without_at_is_not_a_mailbox() -> None:
    assert inspect_csr(_csr([(NameOID.COMMON_NAME, "Alice Example")])).mailboxes == ()


@pytest.mark.parametrize("oid", [DECRYPT_KEY_ID, ASYMMETRIC_DECRYPT_KEY_ID])
def test_a_request_for_an_encrypted_key_is_seen(oid: str) -> None:
    assert inspect_csr(_csr([(NameOID.COMMON_NAME, "a@example.org")], attribute=oid)).wants_encrypted_key


def test_the_signature_is_not_looked_at() -> None:
    """serverkeygen must ignore the CSR's key and signature (RFC 7030 §4.4.1)."""
    der = bytearray(_csr([(NameOID.EMAIL_ADDRESS, "a@example.org")]))
    der[-3] ^= 0xFF  # inside the signature
    assert inspect_csr(bytes(der)).mailboxes == ("a@example.org",)


@pytest.mark.parametrize("der", [b"", b"\x30\x03\x02\x01\x05", b"hello world", b"\x30\x82\xff\xff"])
def test_what_is_not_a_csr_is_refused(der: bytes) -> None:
    with pytest.raises(BadCSR):
        inspect_csr(der)


# --- the sealed hand-over ----------------------------------------------------------------------
def test_sealed_value_opens_only_with_its_secret_and_context() -> None:
    sealed = seal_with_secret("token-one", b"PKCS8 bytes", b"ctx")
    assert b"PKCS8 bytes" not in sealed
    assert open_with_secret("token-one", sealed, b"ctx") == b"PKCS8 bytes"
    assert open_with_secret(" token-one\n", sealed, b"ctx") == b"PKCS8 bytes"  # tokens are stripped
    for secret, context in (("token-two", b"ctx"), ("token-one", b"other")):
        with pytest.raises(ValueError):
            open_with_secret(secret, sealed, context)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(ValueError):
        open_with_secret("token-one", tampered, b"ctx")
    with pytest.raises(ValueError):
        open_with_secret("token-one", b"\x01short", b"ctx")


def test_two_seals_of_the_same_value_differ() -> None:
    assert seal_with_secret("t", b"x", b"c") != seal_with_secret("t", b"x", b"c")


# --- serverkeygen's multipart ----------------------------------------------------------------------
def test_serverkeygen_response_is_key_part_then_certificate_part() -> None:
    content_type, body = serverkeygen_response(b"KEY-DER", b"CERTS-DER")
    assert content_type.startswith("multipart/mixed; boundary=")
    message = email.message_from_bytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    parts = message.get_payload()
    assert isinstance(parts, list) and len(parts) == 2
    key, certs = parts
    assert key.get_content_type() == "application/pkcs8"
    assert certs.get_content_type() == "application/pkcs7-mime"
    assert certs.get_param("smime-type") == "certs-only"
    assert [p["Content-Transfer-Encoding"] for p in parts] == ["base64", "base64"]
    assert decode_body(key.get_payload().encode()) == b"KEY-DER"
    assert decode_body(certs.get_payload().encode()) == b"CERTS-DER"
