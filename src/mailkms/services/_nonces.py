"""Server nonces (RFC 8555 §6.5) that cost no write to hand out.

A nonce is base64url(version | issued at (8 bytes, seconds) | 16 random bytes | tag), the tag the
first 16 bytes of HMAC-SHA256 under the store's `nonce-hmac` key over what precedes it. Any node
checks any node's nonce with that key and its clock. Only spending writes: a row in `nonces`
(the replay set) whose primary key refuses a second spend, purged once the nonce is stale anyway.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import secrets
import struct
import threading

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailkms.clock import Clock
from mailkms.errors import BadNonce, ReplayedNonce, StaleNonce
from mailkms.services._batching import GroupCommit
from mailkms.store import NONCE_KEY, Database, Nonce, ServerKey

VERSION = b"\x01"
_RANDOM, _TAG = 16, 16
_LENGTH = len(VERSION) + 8 + _RANDOM + _TAG
MAX_SKEW = dt.timedelta(seconds=60)  # nodes' clocks may differ this much


class Nonces:
    def __init__(self, db: Database, clock: Clock, ttl: dt.timedelta, commits: GroupCommit | None = None) -> None:
        self._db = db
        self._commits = commits or GroupCommit(db, 1)  # spent in a batch's savepoint, durable before the answer
        self._clock = clock
        self._ttl = ttl
        self._key: bytes | None = None
        self._lock = threading.Lock()

    @property
    def ttl(self) -> dt.timedelta:
        return self._ttl

    def _hmac_key(self) -> bytes:
        """The shared key, read once per process (made by migration 0007; made here if it went missing)."""
        if self._key is None:
            with self._lock:
                if self._key is None:
                    self._key = self._load_key()
        return self._key

    def _load_key(self) -> bytes:
        with self._db.read_only() as session:
            found = session.execute(select(ServerKey.secret).where(ServerKey.name == NONCE_KEY)).scalar_one_or_none()
        if found is not None:
            return bytes(found)
        try:
            with self._db.transaction() as session:
                session.add(ServerKey(name=NONCE_KEY, secret=secrets.token_bytes(32)))
        except IntegrityError:
            pass  # another node made it first
        with self._db.read_only() as session:
            return bytes(session.execute(select(ServerKey.secret).where(ServerKey.name == NONCE_KEY)).scalar_one())

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._hmac_key(), body, hashlib.sha256).digest()[:_TAG]

    def new(self) -> str:
        """A fresh nonce; touches no table."""
        body = VERSION + struct.pack(">q", int(self._clock.now().timestamp())) + secrets.token_bytes(_RANDOM)
        return base64.urlsafe_b64encode(body + self._tag(body)).rstrip(b"=").decode()

    def issued_at(self, value: str) -> dt.datetime:
        """When the nonce was made, if this server made it and it is still fresh (BadNonce, StaleNonce)."""
        unknown = BadNonce("the nonce is unknown to this server; fetch a fresh one")
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            raise unknown from None
        if len(raw) != _LENGTH or raw[:1] != VERSION:
            raise unknown
        body, tag = raw[:-_TAG], raw[-_TAG:]
        if not hmac.compare_digest(self._tag(body), tag):
            raise unknown
        (seconds,) = struct.unpack(">q", raw[1:9])
        try:
            issued = dt.datetime.fromtimestamp(seconds, dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise unknown from None
        now = self._clock.now()
        if issued > now + MAX_SKEW:
            raise unknown
        if now > issued + self._ttl:
            raise StaleNonce("the nonce has expired; fetch a fresh one")
        return issued

    def consume(self, value: str) -> None:
        """Spend a nonce in its own committed transaction, so a later refusal cannot un-spend it.
        The one write a nonce ever costs, and only for one this server made and that is fresh."""
        issued = self.issued_at(value)
        now = self._clock.now()

        def spend(session: Session) -> None:
            session.add(Nonce(value=value, created_at=issued, expires_at=issued + self._ttl, used_at=now))
            session.flush()

        try:
            self._commits.run(spend)
        except IntegrityError:
            raise ReplayedNonce("the nonce has already been used: the request was replayed") from None

    def purge(self) -> int:
        """Forget spent nonces that are stale anyway (a replay of one is refused as stale)."""
        cutoff = self._clock.now() - MAX_SKEW
        with self._db.transaction() as session:
            result = session.execute(delete(Nonce).where(Nonce.expires_at < cutoff))
            return int(getattr(result, "rowcount", 0) or 0)

    def spent(self) -> int:
        """Rows in the replay set (for tests and /metrics)."""
        with self._db.read_only() as session:
            return int(session.execute(select(func.count()).select_from(Nonce)).scalar_one())


__all__ = ["MAX_SKEW", "Nonces"]
