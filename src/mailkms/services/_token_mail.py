"""Enrolment tokens sent by mail, and outbox bodies sealed at rest.

A token is a secret, so a mail that carries one is kept in the outbox only SEALED: AES-256-GCM
under the server's at-rest key (the key pool's wrapping key: 32 random bytes in the store only
inside a scrypt envelope of the CA passphrase, opened once per process, as TOTP secrets and CMP
tokens are), bound to the row's Message-ID. The outbox worker opens it just before handing it to
the relay. Other mail (certificate deliveries, reminders) holds nothing secret and stays in clear,
so rows written before this existed, and every row that is not sealed, are read as they are
(a sealed body starts with SEALED_MAGIC, which no RFC 5322 message does).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import ConfigError
from mailkms.services._audit import AuditLog
from mailkms.services._issuance import queue_message
from mailkms.services._keypool import PoolKeyring
from mailkms.services._reminders import Composer
from mailkms.store import Database

SEALED_MAGIC = b"mailkms-sealed-v1:"
TOKEN_MAIL_PURPOSE = "token"


class SealedBodyError(Exception):
    """A sealed outbox body this node cannot open (another CA passphrase, or altered)."""


def is_sealed(body: bytes) -> bool:
    return body.startswith(SEALED_MAGIC)


class OutboxSealer:
    """Seals and opens outbox bodies under the server's at-rest key, bound to the Message-ID."""

    def __init__(self, keyring: PoolKeyring) -> None:
        self._keyring = keyring

    @staticmethod
    def _aad(message_id: str, key_id: str) -> bytes:
        return f"mailkms-outbox:{message_id}:{key_id}".encode()

    def seal(self, message_id: str, body: bytes) -> bytes:
        opened = self._keyring.open()
        if opened is None:
            raise ConfigError("the CA passphrase does not open the server's at-rest key; a secret cannot be queued")
        key_id, aead = opened
        nonce = os.urandom(12)
        return SEALED_MAGIC + key_id.encode() + b":" + nonce + aead.encrypt(nonce, body, self._aad(message_id, key_id))

    def open(self, message_id: str, stored: bytes) -> bytes:
        """The message as sent; a body that was never sealed is returned as it is."""
        if not is_sealed(stored):
            return stored
        key_id, sep, rest = stored[len(SEALED_MAGIC) :].partition(b":")
        opened = self._keyring.open(create=False)
        if opened is None or not sep or key_id.decode(errors="replace") != opened[0]:
            raise SealedBodyError("this node cannot open the sealed mail (another at-rest key or CA passphrase)")
        try:
            return opened[1].decrypt(rest[:12], rest[12:], self._aad(message_id, opened[0]))
        except InvalidTag:
            raise SealedBodyError("the sealed mail does not open (altered, or moved to another row)") from None


@dataclass(frozen=True)
class TokenMail:
    email: str
    name: str
    token: str
    expires_at: dt.datetime


class TokenMailer:
    """Queues a user's one-time token as a signed mail to that user, sealed in the outbox."""

    def __init__(
        self,
        db: Database,
        sealer: OutboxSealer,
        settings: Settings,
        clock: Clock,
        audit: AuditLog,
        composer: Callable[[], Composer],
    ) -> None:
        self._db = db
        self._sealer = sealer
        self._settings = settings
        self._clock = clock
        self._audit = audit
        self._composer = composer

    def send(self, mails: Sequence[TokenMail], actor: str) -> list[str]:
        """Queue one mail per token (in one transaction); returns their Message-IDs."""
        if not mails:
            return []
        composer = self._composer()
        sender = self._settings.server.effective_mail_from
        domain = sender.rsplit("@", 1)[-1]
        now = self._clock.now()
        sealed: list[tuple[TokenMail, str, bytes]] = []
        for mail in mails:
            message_id = f"<token-{secrets.token_hex(12)}@{domain}>"
            context = {
                "name": mail.name or mail.email,
                "email": mail.email,
                "token": mail.token,
                "expires": f"{mail.expires_at:%d %B %Y %H:%M} UTC",
                "server": self._settings.server.effective_public_url,
                "mail_from": sender,
            }
            body = composer.compose("enrolment-token", mail.email, context, message_id)
            sealed.append((mail, message_id, self._sealer.seal(message_id, body)))
        with self._db.transaction() as session:
            for mail, message_id, body in sealed:
                queue_message(
                    session,
                    self._audit,
                    now,
                    message_id=message_id,
                    sender=sender,
                    recipient=mail.email,
                    body=body,
                    purpose=TOKEN_MAIL_PURPOSE,
                )
                self._audit.append(session, actor, "token.mailed", mail.email, message_id=message_id)
        return [message_id for _, message_id, _ in sealed]

    def expiry(self) -> dt.datetime:
        """When a token issued now stops working (for the mail's text)."""
        return self._clock.now() + dt.timedelta(days=self._settings.policy.token_ttl_days)
