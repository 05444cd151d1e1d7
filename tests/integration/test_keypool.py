"""The encryption-key pool on a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import select, text

from mailkms.pki import (
    KeyType,
    SealedSecretError,
    open_secret,
    private_key_der,
    sealed_secret_kdf,
)
from mailkms.services import KeyPool, PoolKeyring, generate_ders
from mailkms.services._keypool import POOL_CONTEXT
from mailkms.store import Base, Certificate, Database, PooledKey, PoolWrapping, User
from tests.conftest import CA_PASSPHRASE, make_csr, transport_pem


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
    pool = KeyPool(services.db, services.pool_keyring, clock, KeyType.RSA2048, size=2)
    services.issuer.keys = pool
    assert pool.refill_once(batch=5) == 2 and pool.size() == 2
    assert pool.refill_once() == 0  # full: nothing more
    # At rest the keys are sealed: no PKCS#8 structure in the stored bytes, and they open only with the key.
    with services.db.transaction() as session:
        rows = list(session.execute(select(PooledKey)).scalars())
        pooled = {_spki(pool.unseal(r.sealed, r.key_type)) for r in rows}
        assert all(private_key_der(pool.unseal(r.sealed, r.key_type))[:64] not in r.sealed for r in rows)
    other = KeyPool(services.db, PoolKeyring(services.db, b"another passphrase", clock), clock, KeyType.RSA2048, size=2)
    with services.db.transaction() as session:
        assert other.take(session, KeyType.RSA2048) is None  # a node with another passphrase opens none of them
    assert other.store(generate_ders(KeyType.RSA2048, 1)) == 0 and pool.size() == 2

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
    pool = KeyPool(services.db, services.pool_keyring, clock, KeyType.RSA2048, size=1)
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
    pool = KeyPool(services.db, services.pool_keyring, clock, KeyType.RSA2048, size=3)
    generated = _sample("mailkms_keypool_generated_total")
    ders = generate_ders(KeyType.RSA2048, 2)
    assert ders[0] != ders[1]
    assert pool.store(ders) == 2
    assert pool.store(ders[:1] * 2) == 1  # only room for one more (another node filled meanwhile)
    assert pool.size() == 3
    assert _sample("mailkms_keypool_generated_total") - generated == 3  # what was added, not offered (4)
    with services.db.transaction() as session:
        taken = [pool.take(session, KeyType.RSA2048) for _ in range(4)]
    assert taken[3] is None
    # what comes out is what went in, unwrapped: both keys, and the first once more
    assert sorted(private_key_der(k) for k in taken[:3] if k is not None) == sorted([ders[0], ders[0], ders[1]])


def _old_scheme_key(services) -> bytes:  # type: ignore[no-untyped-def]
    """The wrapping key as it was derived before migration 0008: HKDF of the CA passphrase."""
    salt = services.ca.issuing.certificate.fingerprint(hashes.SHA256())
    return HKDF(hashes.SHA256(), 32, salt, b"mailkms key pool v1").derive(CA_PASSPHRASE.encode())


def _every_value(db: Database) -> list[bytes]:
    values: list[bytes] = []
    with db.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for row in conn.execute(table.select()):
                for value in row:
                    if isinstance(value, bytes | str):
                        values.append(value if isinstance(value, bytes) else value.encode())
    return values


def test_the_store_holds_no_cheap_check_of_the_ca_passphrase(services, clock) -> None:  # type: ignore[no-untyped-def]
    pool = KeyPool(services.db, services.pool_keyring, clock, KeyType.RSA2048, size=2)
    assert pool.refill_once() == 2
    passphrase = CA_PASSPHRASE.encode()
    old = _old_scheme_key(services)
    cheap = [
        hashlib.sha256(passphrase).digest(),
        old,
        hashlib.sha256(b"mailkms pool key id" + old).hexdigest()[:16].encode(),  # the old stored check value
    ]
    cheap += [c.hex().encode() for c in cheap[:2]]
    values = _every_value(services.db)
    assert values and not [c for c in cheap for v in values if c in v]

    with services.db.transaction() as session:
        rows = list(session.execute(select(PooledKey)).scalars())
        wrapping = session.execute(select(PoolWrapping)).scalars().all()
    assert len(rows) == 2 and len(wrapping) == 1
    # The only wrapping material: a scrypt envelope (128 MiB per guess), and no key derived cheaply opens a row.
    kdf = sealed_secret_kdf(wrapping[0].envelope)
    assert kdf["name"] == "scrypt" and int(str(kdf["n"])) >= 2**17 and kdf["r"] == 8
    assert set(json.loads(wrapping[0].envelope)) == {"format", "version", "context", "kdf", "cipher", "ciphertext"}
    for row in rows:
        assert row.wrapping_key_id == wrapping[0].key_id
        for aad in (f"mailkms-pool:{row.key_type}:{row.wrapping_key_id}".encode(), None):
            with pytest.raises(InvalidTag):
                AESGCM(old).decrypt(row.sealed[:12], row.sealed[12:], aad)

    # The right passphrase opens the envelope (another process: the same key); a wrong one does not.
    context = f"{POOL_CONTEXT}|{wrapping[0].key_id}"
    assert len(open_secret(wrapping[0].envelope, passphrase, context)) == 32
    with pytest.raises(SealedSecretError):
        open_secret(wrapping[0].envelope, passphrase + b"x", context)
    fresh = KeyPool(services.db, PoolKeyring(services.db, passphrase, clock), clock, KeyType.RSA2048, size=2)
    with services.db.transaction() as session:
        assert fresh.take(session, KeyType.RSA2048) is not None
    wrong = KeyPool(services.db, PoolKeyring(services.db, b"not-the-passphrase", clock), clock, KeyType.RSA2048, size=2)
    with services.db.transaction() as session:
        assert wrong.take(session, KeyType.RSA2048) is None
    assert pool.size() == 1


def test_the_migration_drops_pool_rows_of_the_old_scheme(tmp_path: Path) -> None:
    from alembic import command

    from mailkms.store._db import alembic_config

    db = Database(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = alembic_config(db.engine)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0006")
        conn.execute(
            text(
                "INSERT INTO key_pool (key_type, wrapping_key_id, sealed, created_at) "
                "VALUES ('rsa2048', '0123456789abcdef', x'00', '2026-01-01 00:00:00')"
            )
        )
    db.migrate()
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM key_pool")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM key_pool_wrapping")).scalar_one() == 0
    db.dispose()
