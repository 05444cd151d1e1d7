"""The issuer's own rules: serials, key types, the paired hash, single-use signing, CA lifetimes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from mailkms.errors import BadKey, Internal
from mailkms.pki import (
    CertKind,
    KeyType,
    Validity,
    key_type_of,
    make_archive_certificate,
    make_issuing_ca,
    random_serial,
    signature_hash_for,
    subscriber_validity,
)
from tests.testca import ALL_KEY_TYPES, MAILBOX, START, URLS, SessionCA, key_of


# --- serials ---------------------------------------------------------------------------------------
def test_random_serials_are_positive_159_bit_and_fit_20_octets() -> None:
    for _ in range(1000):
        serial = random_serial()
        assert serial > 0
        assert serial.bit_length() == 159
        assert len(serial.to_bytes(20, "big", signed=True)) == 20  # DER INTEGER content, no sign octet


def test_random_serials_carry_at_least_64_random_bits() -> None:
    """Every bit below the fixed top bit takes both values over 256 draws (a counter or a
    timestamp would not); the chance of a false failure is about 158 * 2**-255."""
    serials = [random_serial() for _ in range(256)]
    assert len(set(serials)) == len(serials)
    for bit in range(158):
        seen = {(s >> bit) & 1 for s in serials}
        assert seen == {0, 1}, f"bit {bit} never changes"


def test_issued_serials_differ(rsa_ca: SessionCA) -> None:
    serials = {rsa_ca.issue(CertKind.SIGNING, key_of(KeyType.P256)).serial_number for _ in range(20)}
    assert len(serials) == 20


# --- keys ------------------------------------------------------------------------------------------------
REFUSED_KEYS = [
    pytest.param(lambda: rsa.generate_private_key(65537, 1024), "2048, 3072 or 4096", id="rsa1024"),
    pytest.param(lambda: rsa.generate_private_key(65537, 2056), "2048, 3072 or 4096", id="rsa2056"),
    pytest.param(lambda: ec.generate_private_key(ec.SECP521R1()), "secp521r1", id="p521"),
    pytest.param(lambda: ec.generate_private_key(ec.SECP256K1()), "secp256k1", id="secp256k1"),
    pytest.param(ed25519.Ed25519PrivateKey.generate, "RSA and ECDSA", id="ed25519"),
]


@pytest.mark.parametrize(("make_key", "message"), REFUSED_KEYS)
@pytest.mark.parametrize("kind", [CertKind.SIGNING, CertKind.ENCRYPTION])
def test_refused_key_types(
    rsa_ca: SessionCA, kind: CertKind, make_key: Callable[[], PrivateKeyTypes], message: str
) -> None:
    public = make_key().public_key()
    with pytest.raises(BadKey, match=message):
        rsa_ca.issuer.prepare_subscriber(
            kind,
            MAILBOX,
            public,  # type: ignore[arg-type]
            subscriber_validity(START, 18),
            ALL_KEY_TYPES,
        )


@pytest.mark.parametrize(
    ("kind", "key_type", "allowed"),
    [
        (CertKind.ENCRYPTION, KeyType.P256, (KeyType.RSA2048,)),
        (CertKind.SIGNING, KeyType.P384, (KeyType.RSA2048, KeyType.P256)),
        (CertKind.SIGNING, KeyType.RSA3072, (KeyType.RSA2048,)),
    ],
)
def test_key_types_outside_the_policy_are_refused(
    rsa_ca: SessionCA, kind: CertKind, key_type: KeyType, allowed: tuple[KeyType, ...]
) -> None:
    public = key_of(key_type).public_key()
    with pytest.raises(BadKey, match=f"{key_type.value} keys are not allowed for {kind.value}"):
        rsa_ca.issuer.prepare_subscriber(kind, MAILBOX, public, subscriber_validity(START, 18), allowed)


@pytest.mark.parametrize("key_type", [KeyType.RSA2048, KeyType.RSA3072, KeyType.P256, KeyType.P384])
def test_key_type_of_round_trips(key_type: KeyType) -> None:
    key = key_of(key_type)
    assert key_type_of(key) is key_type
    assert key_type_of(key.public_key()) is key_type


@pytest.mark.parametrize(
    ("key_type", "hash_cls"),
    [
        (KeyType.RSA2048, hashes.SHA256),
        (KeyType.RSA3072, hashes.SHA256),
        (KeyType.P256, hashes.SHA256),
        (KeyType.P384, hashes.SHA384),
    ],
)
def test_signature_hash_pairs_with_the_key(key_type: KeyType, hash_cls: type[hashes.HashAlgorithm]) -> None:
    assert isinstance(signature_hash_for(key_of(key_type)), hash_cls)
    assert isinstance(signature_hash_for(key_of(key_type).public_key()), hash_cls)


# --- signing --------------------------------------------------------------------------------------------
def test_a_prepared_certificate_is_signed_once_only(rsa_ca: SessionCA) -> None:
    issuer = rsa_ca.issuer
    prepared = issuer.prepare_subscriber(
        CertKind.SIGNING, MAILBOX, key_of(KeyType.P256).public_key(), subscriber_validity(START, 18), ALL_KEY_TYPES
    )
    cert = issuer.issue(prepared)
    assert cert.serial_number == prepared.serial
    with pytest.raises(Internal, match="once"):
        issuer.issue(prepared)


def test_no_certificate_outlives_the_issuing_ca(rsa_ca: SessionCA) -> None:
    ca_end = rsa_ca.issuing.not_valid_after_utc
    beyond = Validity(START, ca_end + dt.timedelta(seconds=1))
    with pytest.raises(Internal, match="issuing CA expires"):
        rsa_ca.issuer.prepare_subscriber(
            CertKind.SIGNING, MAILBOX, key_of(KeyType.P256).public_key(), beyond, ALL_KEY_TYPES
        )
    exactly = Validity(START, ca_end)
    cert = rsa_ca.issue(CertKind.SIGNING, key_of(KeyType.P256), validity=exactly)
    assert cert.not_valid_after_utc == ca_end


def test_root_and_subscriber_kinds_are_not_mixed(rsa_ca: SessionCA) -> None:
    with pytest.raises(ValueError, match="not a subscriber profile"):
        rsa_ca.issuer.prepare_subscriber(
            CertKind.ROOT_CA, MAILBOX, key_of(KeyType.P256).public_key(), subscriber_validity(START, 18), ALL_KEY_TYPES
        )


def test_issuing_ca_never_outlives_its_root(rsa_ca: SessionCA) -> None:
    """Made near the end of the root's life, the issuing CA ends with the root, to the second."""
    late = rsa_ca.root.not_valid_after_utc - dt.timedelta(days=100)
    issuing = make_issuing_ca(rsa_ca.root_signer, key_of(KeyType.P256), "mailkms test", "DE", URLS, late)
    assert issuing.not_valid_after_utc == rsa_ca.root.not_valid_after_utc
    assert issuing.not_valid_before_utc == late.replace(microsecond=0)


def test_archive_certificate_only_names_a_key_transport_key() -> None:
    key = key_of(KeyType.RSA3072)
    cert = make_archive_certificate(key, START)
    cert.verify_directly_issued_by(cert)
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_encipherment and not ku.digital_signature and not ku.key_cert_sign
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
