"""The encryption-key pool on a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from mailkms import metrics
from mailkms.pki import KeyType, load_private_key_der, private_key_der
from mailkms.services import KeyPool
from mailkms.store import Certificate, PooledKey, User
from tests.conftest import make_csr, transport_pem


def _spki(key) -> bytes:  # type: ignore[no-untyped-def]
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _enrol(services, mailbox: str) -> x509.Certificate:  # type: ignore[no-untyped-def]
    token = services.users.add(mailbox, "", None, "admin:test")
    csr, _ = make_csr(mailbox)
    pem, _, _ = transport_pem()
    services.enrolment.enrol(mailbox, token, csr, pem)
    with services.db.transaction() as session:
        der = session.execute(
            select(Certificate.der)
            .join(User, User.id == Certificate.user_id)
            .where(User.email == mailbox, Certificate.kind == "encryption")
        ).scalar_one()
    return x509.load_der_x509_certificate(der)


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_issuance_takes_each_pooled_key_once_then_falls_back(services, settings, clock) -> None:  # type: ignore[no-untyped-def]
    pool = KeyPool(services.db, services.ca.derive_key("key pool"), clock, KeyType.RSA2048, size=2)
    services.issuer.keys = pool
    assert pool.refill_once(batch=5) == 2 and pool.size() == 2
    assert pool.refill_once() == 0  # full: nothing more
    # At rest the keys are sealed: no PKCS#8 structure in the stored bytes, and they open only with the key.
    with services.db.transaction() as session:
        rows = list(session.execute(select(PooledKey)).scalars())
        pooled = {_spki(pool.unseal(r.sealed, r.key_type)) for r in rows}
        assert all(private_key_der(pool.unseal(r.sealed, r.key_type))[:64] not in r.sealed for r in rows)
    other = KeyPool(services.db, b"\x01" * 32, clock, KeyType.RSA2048, size=2)
    assert other.size() == 0  # a node with another passphrase sees none of them

    taken_before = _sample("mailkms_keypool_taken_total")
    fallback_before = _sample("mailkms_keypool_fallback_total")
    first = _enrol(services, "a@example.org")
    second = _enrol(services, "b@example.org")
    used = {
        first.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        second.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
    }
    assert used == pooled  # both certificates carry pooled keys, each a different one
    assert pool.size() == 0
    third = _enrol(services, "c@example.org")  # empty pool: generated inline
    assert _spki_of(third) not in pooled
    assert _sample("mailkms_keypool_taken_total") - taken_before == 2
    assert _sample("mailkms_keypool_fallback_total") - fallback_before == 1
    assert services.verify_audit().ok


def _spki_of(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_a_rolled_back_issuance_returns_the_key(services, clock) -> None:  # type: ignore[no-untyped-def]
    pool = KeyPool(services.db, services.ca.derive_key("key pool"), clock, KeyType.RSA2048, size=1)
    pool.refill_once()
    with pytest.raises(RuntimeError), services.db.transaction() as session:
        assert pool.take(session, KeyType.RSA2048) is not None
        assert pool.take(session, KeyType.RSA2048) is None  # the only row is taken in this transaction
        raise RuntimeError("issuance failed")
    assert pool.size() == 1
    with services.db.transaction() as session:
        key = pool.take(session, KeyType.RSA2048)
    assert key is not None and pool.size() == 0


def test_store_never_fills_beyond_size(services, clock) -> None:  # type: ignore[no-untyped-def]
    pool = KeyPool(services.db, services.ca.derive_key("key pool"), clock, KeyType.RSA2048, size=3)
    from mailkms.services import generate_ders

    ders = generate_ders(KeyType.RSA2048, 2)
    assert pool.store(ders) == 2
    assert pool.store(ders[:1] * 2) == 1  # only room for one more (another node filled meanwhile)
    assert pool.size() == 3
    assert load_private_key_der(ders[0])
    assert metrics.POOL_GENERATED is not None
