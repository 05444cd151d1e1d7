"""A pool of pre-generated encryption keys, so a burst is served at the speed of signing.

At rest each key is sealed with AES-256-GCM under the pool's wrapping key: 32 random bytes kept in
the store (`key_pool_wrapping`) only inside a scrypt envelope of the CA passphrase (N=2^17, r=8,
128 MiB; `pki.seal_secret`). Every node that knows the CA passphrase opens it once per process; a
database dump alone offers nothing that tests a passphrase guess faster than a full scrypt (the
key id is random, not derived). A node whose passphrase does not open the envelope serves no
pooled keys (it generates inline) and says so in its log.
(Enveloping to the archive certificate, as archived keys are, would not do: the server cannot
open the archive.)

A key is taken by deleting its row in the same transaction as the issuance that uses it
(SKIP LOCKED on PostgreSQL): if that transaction rolls back, the key was never used and returns
to the pool; once it commits, the row is gone, so no key is handed out twice.
Refilling is claimed through the database too (an advisory lock on PostgreSQL, the single
writer on SQLite), so several nodes never fill beyond `size`.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailkms import metrics
from mailkms.clock import Clock
from mailkms.pki import (
    SEAL_SCRYPT_N,
    KeyType,
    PrivateKey,
    SealedSecretError,
    generate_key,
    open_secret,
    private_key_der,
    seal_secret,
)
from mailkms.store import Database, PooledKey, PoolWrapping

log = logging.getLogger("mailkms.keypool")
POOL_LOCK = 0x6D6B706C  # "mkpl": advisory lock held while topping the pool up
POOL_CONTEXT = "mailkms key-pool wrapping key v1"
Generator = Callable[[KeyType, int], Sequence[bytes]]


def generate_ders(key_type: KeyType, count: int) -> list[bytes]:
    """PKCS#8 DER of `count` new keys (module-level so a worker process can run it)."""
    return [private_key_der(generate_key(key_type)) for _ in range(count)]


class PoolKeyring:
    """The pool's wrapping key: opened (or, on first use, made) once per process, never derived
    from the passphrase by anything cheaper than the envelope's scrypt."""

    def __init__(self, db: Database, passphrase: bytes, clock: Clock, *, scrypt_n: int = SEAL_SCRYPT_N) -> None:
        self._db = db
        self._passphrase = passphrase
        self._clock = clock
        self._scrypt_n = scrypt_n
        self._lock = threading.Lock()
        self._opened: tuple[str, AESGCM] | None = None
        self._failed = False

    @property
    def key_id(self) -> str | None:
        """The id of the opened key; None before the first opening or when it failed."""
        return self._opened[0] if self._opened else None

    def open(self, *, create: bool = True, session: Session | None = None) -> tuple[str, AESGCM] | None:
        """The (key id, cipher); read through `session` when the caller holds a transaction (SQLite
        has one writer: a second transaction would wait for the caller's)."""
        with self._lock:
            if self._opened is not None or self._failed:
                return self._opened
            if session is not None:
                row = session.get(PoolWrapping, 1)
                found = (row.key_id, row.envelope) if row is not None else None
            else:
                with self._db.transaction() as own:
                    row = own.get(PoolWrapping, 1)
                    found = (row.key_id, row.envelope) if row is not None else None
            if found is None:
                if not create:
                    return None
                key_id, key = self._create()
            else:
                key_id, envelope = found
                try:
                    key = open_secret(envelope, self._passphrase, f"{POOL_CONTEXT}|{key_id}")
                except SealedSecretError:
                    self._failed = True
                    log.warning(
                        "the CA passphrase does not open the key pool's wrapping key; this node generates inline"
                    )
                    return None
            self._opened = (key_id, AESGCM(key))
            return self._opened

    def _create(self) -> tuple[str, bytes]:
        key_id, key = secrets.token_hex(8), os.urandom(32)
        envelope = seal_secret(key, self._passphrase, f"{POOL_CONTEXT}|{key_id}", scrypt_n=self._scrypt_n)
        try:
            with self._db.transaction() as session:
                session.add(PoolWrapping(id=1, key_id=key_id, envelope=envelope, created_at=self._clock.now()))
            return key_id, key
        except IntegrityError:  # another node made it first: use theirs
            with self._db.transaction() as session:
                row = session.get(PoolWrapping, 1)
                assert row is not None
                theirs = (row.key_id, row.envelope)
            try:
                return theirs[0], open_secret(theirs[1], self._passphrase, f"{POOL_CONTEXT}|{theirs[0]}")
            except SealedSecretError:
                raise ValueError("another node made the pool's wrapping key under another passphrase") from None


class KeyPool:
    def __init__(self, db: Database, keyring: PoolKeyring, clock: Clock, key_type: KeyType, size: int) -> None:
        self._db = db
        self._keyring = keyring
        self._clock = clock
        self.key_type = key_type
        self.target = size

    # -- sealing -----------------------------------------------------------------------------------------
    @property
    def wrapping_key_id(self) -> str | None:
        return self._keyring.key_id

    def _key(self, *, create: bool = True) -> tuple[str, AESGCM]:
        opened = self._keyring.open(create=create)
        if opened is None:
            raise ValueError("the pool's wrapping key is not available on this node")
        return opened

    @staticmethod
    def _aad(key_type: str, key_id: str) -> bytes:
        return f"mailkms-pool:{key_type}:{key_id}".encode()

    def seal(self, der: bytes, key_type: KeyType) -> bytes:
        key_id, aead = self._key()
        nonce = os.urandom(12)
        return nonce + aead.encrypt(nonce, der, self._aad(key_type.value, key_id))

    def unseal(self, sealed: bytes, key_type: str) -> PrivateKey:
        key_id, aead = self._key(create=False)  # opened by take() before
        der = aead.decrypt(sealed[:12], sealed[12:], self._aad(key_type, key_id))
        # The key was generated here and its bytes are authenticated by AES-GCM, so the costly RSA
        # consistency check (tens of milliseconds, as much as generating a key would save) is skipped.
        key = serialization.load_der_private_key(der, None, unsafe_skip_rsa_key_validation=True)
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError("not a key mailkms pools")
        return key

    # -- taking --------------------------------------------------------------------------------------------
    def take(self, session: Session, key_type: KeyType) -> PrivateKey | None:
        """A key from the pool, deleted in the caller's transaction; None when the pool is empty."""
        if self._keyring.key_id is None:
            # Open (one scrypt) only when there is something to take.
            if (
                session.execute(select(PooledKey.id).where(PooledKey.key_type == key_type.value).limit(1)).first()
                is None
            ):
                return None
            if self._keyring.open(create=False, session=session) is None:
                return None
        while True:
            oldest = (
                select(PooledKey.id)
                .where(PooledKey.key_type == key_type.value, PooledKey.wrapping_key_id == self._keyring.key_id)
                .order_by(PooledKey.id)
                .limit(1)
            )
            if not self._db.is_sqlite:
                oldest = oldest.with_for_update(skip_locked=True)
            # One statement takes it: found, deleted and read back (RETURNING; SQLite >= 3.35).
            taken = session.execute(
                delete(PooledKey)
                .where(PooledKey.id == oldest.scalar_subquery())
                .returning(PooledKey.sealed, PooledKey.key_type)
                .execution_options(synchronize_session=False)
            ).first()
            if taken is None:
                return None
            sealed, kind = taken
            try:
                key = self.unseal(sealed, kind)
            except (InvalidTag, ValueError):
                continue  # damaged row: it stays deleted, try the next
            metrics.POOL_TAKEN.inc()
            return key

    def claim(self, key_type: KeyType, count: int) -> list[PrivateKey]:
        """Up to `count` keys taken in one transaction of their own (a commit per batch of requests,
        not per request); fewer, or none, when the pool holds fewer."""
        keys: list[PrivateKey] = []
        with self._db.transaction() as session:
            while len(keys) < count:
                key = self.take(session, key_type)
                if key is None:
                    break
                keys.append(key)
        return keys

    def available(self, key_type: KeyType) -> bool:
        """Whether a key of this type waits (a read that takes no lock; `take` may still find none)."""
        with self._db.read_only() as session:
            query = select(PooledKey.id).where(PooledKey.key_type == key_type.value).limit(1)
            return session.execute(query).first() is not None

    # -- filling ---------------------------------------------------------------------------------------------
    def size(self) -> int:
        with self._db.transaction() as session:
            return self._count(session)

    def _count(self, session: Session) -> int:
        """Keys under the opened wrapping key; before it is opened (no scrypt for /metrics), every
        key of the type (rows under another key are dropped when the pool worker starts)."""
        query = select(func.count(PooledKey.id)).where(PooledKey.key_type == self.key_type.value)
        if self._keyring.key_id is not None:
            query = query.where(PooledKey.wrapping_key_id == self._keyring.key_id)
        return int(session.execute(query).scalar_one())

    def deficit(self) -> int:
        return max(0, self.target - self.size())

    def store(self, ders: Sequence[bytes]) -> int:
        """Seal and insert up to the target; surplus keys (another node filled meanwhile) are dropped."""
        if self._keyring.open() is None:
            return 0
        key_id, _ = self._key()
        now = self._clock.now()
        with self._db.transaction() as session:
            if not self._db.is_sqlite:
                session.execute(select(func.pg_advisory_xact_lock(POOL_LOCK)))
            room = max(0, self.target - self._count(session))
            for der in ders[:room]:
                session.add(
                    PooledKey(
                        key_type=self.key_type.value,
                        wrapping_key_id=key_id,
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
        """Drop rows sealed under another wrapping key (the wrapping row was replaced)."""
        opened = self._keyring.open()
        if opened is None:
            return 0
        with self._db.transaction() as session:
            result = session.execute(delete(PooledKey).where(PooledKey.wrapping_key_id != opened[0]))
            return int(getattr(result, "rowcount", 0) or 0)
