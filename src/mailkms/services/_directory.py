"""The directory: each active user's current encryption certificate, as the address book had it.

Served only while the user is ACTIVE or DUE: revoked, expired and never-enrolled users are
answered alike ("not in the directory"), so the answer says nothing about why.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from sqlalchemy import select

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import NotInDirectory
from mailkms.services._ca import CAContext
from mailkms.services._lifecycle import UserState
from mailkms.services._users import current_encryption, normalise_mailbox, state_of
from mailkms.store import Database, User

PUBLISHED = (UserState.ACTIVE, UserState.DUE)


@dataclass(frozen=True)
class DirectoryEntry:
    mailbox: str
    certificate: x509.Certificate
    issuing: x509.Certificate  # so that a client can build the path to the root it pinned


class Directory:
    def __init__(self, db: Database, ca: CAContext, settings: Settings, clock: Clock) -> None:
        self._db = db
        self._ca = ca
        self._settings = settings
        self._clock = clock

    def lookup(self, email: str) -> DirectoryEntry:
        mailbox = normalise_mailbox(email)
        now = self._clock.now()
        missing = NotInDirectory(f"no current encryption certificate is published for {mailbox}")
        with self._db.read_only() as session:
            user = session.execute(select(User).where(User.email == mailbox)).scalar_one_or_none()
            if user is None:
                raise missing
            state, _ = state_of(session, user, self._settings, now)
            if state not in PUBLISHED:
                raise missing
            row = current_encryption(session, user)
            if row is None or row.revoked_at is not None or not row.not_before <= now <= row.not_after:
                raise missing
            der = row.der
        return DirectoryEntry(mailbox, x509.load_der_x509_certificate(der), self._ca.issuing.certificate)


__all__ = ["Directory", "DirectoryEntry"]
