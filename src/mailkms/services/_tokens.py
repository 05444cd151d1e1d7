"""One-time enrolment tokens: 160 random bits, shown once, stored as a hash, one use, expire."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets

from cryptography.exceptions import InvalidTag
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailkms.errors import TokenExpired, TokenInvalid, TokenReplaced, TokenUsed, TokenWrongMailbox
from mailkms.services._keypool import PoolKeyring
from mailkms.store import Token, User

TOKEN_BYTES = 20  # 160 bits


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    # The token has 160 random bits, so a plain SHA-256 cannot be brute-forced.
    return hashlib.sha256(token.strip().encode()).hexdigest()


class TokenSealer:
    """Keeps a token recoverable for CMP, whose MAC (RFC 9483 §3.2) the server must compute from
    the token itself: AES-256-GCM under the key pool's wrapping key (random, inside a scrypt
    envelope of the CA passphrase, opened once per process), bound to the token's hash."""

    def __init__(self, keyring: PoolKeyring) -> None:
        self._keyring = keyring

    def prepare(self) -> bool:
        """Open (or make) the wrapping key; call it outside any transaction (it may write)."""
        return self._keyring.open() is not None

    @staticmethod
    def _aad(digest: str, key_id: str) -> bytes:
        return f"mailkms-cmp-token:{digest}:{key_id}".encode()

    def seal(self, token: str, session: Session | None = None) -> bytes | None:
        opened = self._keyring.open(create=False, session=session)
        if opened is None:
            return None
        key_id, aead = opened
        nonce = os.urandom(12)
        return (
            key_id.encode() + b"|" + nonce + aead.encrypt(nonce, token.encode(), self._aad(token_hash(token), key_id))
        )

    def open(self, row: Token, session: Session | None = None) -> str | None:
        """The token of `row`, or None when it was not sealed or this node cannot open it."""
        if row.cmp_secret is None:
            return None
        opened = self._keyring.open(create=False, session=session)
        key_id, sep, rest = row.cmp_secret.partition(b"|")
        if opened is None or not sep or key_id.decode(errors="replace") != opened[0]:
            return None
        try:
            token = opened[1].decrypt(rest[:12], rest[12:], self._aad(row.token_hash, opened[0])).decode()
        except (InvalidTag, UnicodeDecodeError):
            return None
        return token if token_hash(token) == row.token_hash else None


def issue_token(
    session: Session,
    user: User,
    purpose: str,
    now: dt.datetime,
    ttl: dt.timedelta,
    sealer: TokenSealer | None = None,
) -> str:
    """Make a token for `user`; earlier unused tokens of the user stop working. With `sealer`, the
    token is also kept sealed for CMP (call `sealer.prepare()` before the transaction)."""
    for old in session.execute(
        select(Token).where(Token.user_id == user.id, Token.used_at.is_(None), Token.revoked_at.is_(None))
    ).scalars():
        old.revoked_at = now
    token = new_token()
    session.add(
        Token(
            user_id=user.id,
            token_hash=token_hash(token),
            purpose=purpose,
            created_at=now,
            expires_at=now + ttl,
            cmp_secret=sealer.seal(token, session) if sealer is not None else None,
        )
    )
    session.flush()
    return token


def find_token(session: Session, user: User | None, token: str) -> Token:
    """The token row of `user` for this secret, locked, spent or not (TokenInvalid / TokenWrongMailbox)."""
    row = session.execute(
        select(Token).where(Token.token_hash == token_hash(token)).with_for_update()
    ).scalar_one_or_none()
    if row is None:
        raise TokenInvalid("the enrolment token is not valid; ask your administrator for a new one")
    if user is None or not hmac.compare_digest(str(row.user_id), str(user.id)):
        raise TokenWrongMailbox("this enrolment token was issued for another mailbox")
    return row


def redeem_token(session: Session, user: User | None, token: str, now: dt.datetime) -> Token:
    """Check and spend a token for `user`; each refusal has its own error."""
    row = find_token(session, user, token)
    if row.used_at is not None:
        raise TokenUsed("this enrolment token has already been used; ask your administrator for a new one")
    if row.revoked_at is not None:
        raise TokenReplaced("this enrolment token was replaced by a newer one; use the newest token you were given")
    if now > row.expires_at:
        raise TokenExpired(f"this enrolment token expired at {row.expires_at:%Y-%m-%d %H:%M} UTC; ask for a new one")
    row.used_at = now
    return row


def token_looks_usable(session: Session, mailbox: str, token: str, now: dt.datetime) -> bool:
    """A read without locks: whether `token` is an unspent, current token of `mailbox`. Only to
    decide whether to do costly work before the transaction that redeems it (and decides)."""
    row = session.execute(
        select(Token)
        .join(User, User.id == Token.user_id)
        .where(Token.token_hash == token_hash(token), User.email == mailbox)
    ).scalar_one_or_none()
    return row is not None and row.used_at is None and row.revoked_at is None and now <= row.expires_at
