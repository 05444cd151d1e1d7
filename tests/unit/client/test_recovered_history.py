"""The client files earlier keys of a recovery delivery only with their own certificate."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from mailkms.client._core import _check_history
from mailkms.errors import DeliveryRefused
from mailkms.pki import KeyType, PrivateKey, generate_key

NOW = dt.datetime(2026, 1, 15, tzinfo=dt.UTC)


def _cert(key: PrivateKey, mailbox: str, serial: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, mailbox)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW - dt.timedelta(days=800))
        .not_valid_after(NOW - dt.timedelta(days=250))  # expired: earlier keys may well be
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(mailbox)]), critical=False)
        .sign(key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def keys() -> tuple[PrivateKey, PrivateKey, PrivateKey]:
    return generate_key(KeyType.RSA2048), generate_key(KeyType.RSA2048), generate_key(KeyType.RSA2048)


def test_earlier_keys_with_matching_certificates_pass(keys) -> None:  # type: ignore[no-untyped-def]
    new, old1, old2 = keys
    certs = {
        "a": _cert(new, "u@example.org", 0xA),
        "b": _cert(old1, "u@example.org", 0xB),
        "c": _cert(old2, "u@example.org", 0xC),
    }
    _check_history({"a": new, "b": old1, "c": old2}, certs, "a", "u@example.org")


@pytest.mark.parametrize(
    ("certs", "words"),
    [
        (lambda n, o: {"a": _cert(n, "u@example.org", 0xA)}, "lacks the certificate"),
        (lambda n, o: {"b": _cert(o, "other@example.org", 0xB)}, "another mailbox"),
        (lambda n, o: {"b": _cert(n, "u@example.org", 0xB)}, "does not match"),
    ],
)
def test_earlier_keys_without_their_own_certificate_are_refused(keys, certs, words) -> None:  # type: ignore[no-untyped-def]
    new, old, _ = keys
    with pytest.raises(DeliveryRefused, match=words):
        _check_history({"a": new, "b": old}, certs(new, old), "a", "u@example.org")
