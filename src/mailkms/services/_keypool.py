"""A pool of pre-generated encryption keys, so a burst is served at the speed of signing.

At rest each key is sealed with AES-256-GCM under a wrapping key derived (HKDF-SHA256) from the CA
passphrase and bound to the issuing CA certificate: every node that can open the CA key can use
the pool, a restart keeps it, a database dump alone does not open it. (Enveloping to the archive
certificate, as archived keys are, would not do: the server cannot open the archive.) If the CA
passphrase changes, old rows no longer open and are discarded.

A key is taken by deleting its row in the same transaction as the issuance that uses it
(SKIP LOCKED on PostgreSQL): if that transaction rolls back, the key was never used and returns
to the pool; once it commits, the row is gone, so no key is handed out twice.
Refilling is claimed through the database too (an advisory lock on PostgreSQL, the single
writer on SQLite), so several nodes never fill beyond `size`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from mailkms import metrics
from mailkms.clock import Clock
from mailkms.pki import KeyType, PrivateKey, generate_key, private_key_der
from mailkms.store import Database, PooledKey

POOL_LOCK = 0x6D6B706C  # "mkpl": advisory lock held while topping the pool up
Generator = Callable[[KeyType, int], Sequence[bytes]]


def generate_ders(key_type: KeyType, count: int) -> list[bytes]:
    """PKCS#8 DER of `count` new keys (module-level so a worker process can run it)."""
    return [private_key_der(generate_key(key_type)) for _ in range(count)]


class KeyPool:
    def __init__(self, db: Database, wrapping_key: bytes, clock: Clock, key_type: KeyType, size: int) -> None:
        if len(wrapping_key) != 32:
            raise ValueError("the wrapping key is 32 bytes")
        self._db = db
        self._aead = AESGCM(wrapping_key)
        self.wrapping_key_id = hashlib.sha256(b"mailkms pool key id" + wrapping_key).hexdigest()[:16]
        self._clock = clock
        self.key_type = key_type
        self.target = size

    # -- sealing -----------------------------------------------------------------------------------------
    def _aad(self, key_type: str) -> bytes:
        return f"mailkms-pool:{key_type}:{self.wrapping_key_id}".encode()

    def seal(self, der: bytes, key_type: KeyType) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, der, self._aad(key_type.value))

    def unseal(self, sealed: bytes, key_type: str) -> PrivateKey:
        der = self._aead.decrypt(sealed[:12], sealed[12:], self._aad(key_type))
        # The key was generated here and its bytes are authenticated by AES-GCM, so the costly RSA
        # consistency check (tens of milliseconds, as much as generating a key would save) is skipped.
        key = serialization.load_der_private_key(der, None, unsafe_skip_rsa_key_validation=True)
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError("not a key mailkms pools")
        return key

    # -- taking --------------------------------------------------------------------------------------------
    def take(self, session: Session, key_type: KeyType) -> PrivateKey | None:
        """A key from the pool, deleted in the caller's transaction; None when the pool is empty."""
        while True:
            query = (
                select(PooledKey)
                .where(PooledKey.key_type == key_type.value, PooledKey.wrapping_key_id == self.wrapping_key_id)
                .order_by(PooledKey.id)
                .limit(1)
            )
            if not self._db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            row = session.execute(query).scalar_one_or_none()
            if row is None:
                return None
            sealed, kind = row.sealed, row.key_type
            session.delete(row)
            session.flush()
            try:
                key = self.unseal(sealed, kind)
            except (InvalidTag, ValueError):
                continue  # damaged row: it stays deleted, try the next
            metrics.POOL_TAKEN.inc()
            return key

    # -- filling ---------------------------------------------------------------------------------------------
    def size(self) -> int:
        with self._db.transaction() as session:
            return self._count(session)

    def _count(self, session: Session) -> int:
        return int(
            session.execute(
                select(func.count(PooledKey.id)).where(
                    PooledKey.key_type == self.key_type.value, PooledKey.wrapping_key_id == self.wrapping_key_id
                )
            ).scalar_one()
        )

    def deficit(self) -> int:
        return max(0, self.target - self.size())

    def store(self, ders: Sequence[bytes]) -> int:
        """Seal and insert up to the target; surplus keys (another node filled meanwhile) are dropped."""
        now = self._clock.now()
        with self._db.transaction() as session:
            if not self._db.is_sqlite:
                session.execute(select(func.pg_advisory_xact_lock(POOL_LOCK)))
            room = max(0, self.target - self._count(session))
            for der in ders[:room]:
                session.add(
                    PooledKey(
                        key_type=self.key_type.value,
                        wrapping_key_id=self.wrapping_key_id,
                        sealed=self.seal(der, self.key_type),
                        created_at=now,
                    )
                )
            added = min(room, len(ders))
        metrics.POOL_GENERATED.inc(added)
        return added

    def refill_once(self, batch: int = 8, generator: Generator = generate_ders) -> int:
        """Generate up to `batch` keys if the pool is short; returns how many were added."""
        want = min(batch, self.deficit())
        if want == 0:
            return 0
        return self.store(generator(self.key_type, want))

    def discard_unreadable(self) -> int:
        """Drop rows sealed under another wrapping key (the CA passphrase changed)."""
        with self._db.transaction() as session:
            result = session.execute(delete(PooledKey).where(PooledKey.wrapping_key_id != self.wrapping_key_id))
            return int(getattr(result, "rowcount", 0) or 0)
