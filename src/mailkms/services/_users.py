"""Administrator use cases on users, and the user's view of state."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import Conflict, Malformed, ReservedMailbox, UserExists, UserNotFound
from mailkms.pki import reminder_point
from mailkms.services._audit import AuditLog
from mailkms.services._lifecycle import CertDates, UserState, renewal_state
from mailkms.services._tokens import TokenSealer, issue_token
from mailkms.store import Certificate, Database, User

# RFC 5321 dot-atom local part (no leading, trailing or double dot; at most 64 characters) and a
# domain of LDH labels of at most 63 characters under an alphabetic (or IDNA) top-level label:
# what pkilint accepts as an rfc822Name in a certificate.
_ATOM = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_TLD = r"(?:[a-z]{2,63}|xn--[a-z0-9-]{1,59})"
_MAILBOX = re.compile(rf"^(?P<local>{_ATOM}(?:\.{_ATOM})*)@(?:{_LABEL}\.)+{_TLD}$")


def normalise_mailbox(text: str) -> str:
    """ASCII mailboxes, compared and certified in lower case."""
    value = text.strip().lower()
    match = _MAILBOX.match(value)
    if len(value) > 254 or match is None or len(match["local"]) > 64:
        raise Malformed(f"{text!r} is not a valid e-mail address")
    return value


@dataclass(frozen=True)
class CertView:
    serial: str
    kind: str
    generation: int
    not_before: dt.datetime
    not_after: dt.datetime
    revoked_at: dt.datetime | None
    revocation_reason: str | None


@dataclass(frozen=True)
class UserView:
    email: str
    display_name: str
    group: str | None
    state: UserState
    generation: int
    created_at: dt.datetime
    reminder_at: dt.datetime | None
    expires_at: dt.datetime | None
    certificates: tuple[CertView, ...] = field(default=())

    def to_dict(self) -> dict[str, object]:
        return {
            "email": self.email,
            "name": self.display_name,
            "group": self.group,
            "state": self.state.value,
            "generation": self.generation,
            "created_at": self.created_at.isoformat(),
            "reminder_at": self.reminder_at.isoformat() if self.reminder_at else None,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "certificates": [
                {
                    "serial": c.serial,
                    "kind": c.kind,
                    "generation": c.generation,
                    "not_before": c.not_before.isoformat(),
                    "not_after": c.not_after.isoformat(),
                    "revoked_at": c.revoked_at.isoformat() if c.revoked_at else None,
                    "revocation_reason": c.revocation_reason,
                }
                for c in self.certificates
            ],
        }


def current_signing(session: Session, user: User) -> Certificate | None:
    if user.generation == 0:
        return None
    return session.execute(
        select(Certificate).where(
            Certificate.user_id == user.id, Certificate.kind == "signing", Certificate.generation == user.generation
        )
    ).scalar_one_or_none()


def current_encryption(session: Session, user: User) -> Certificate | None:
    return session.execute(
        select(Certificate).where(
            Certificate.user_id == user.id, Certificate.kind == "encryption", Certificate.generation == user.generation
        )
    ).scalar_one_or_none()


def state_of(
    session: Session, user: User, settings: Settings, now: dt.datetime
) -> tuple[UserState, Certificate | None]:
    cert = current_signing(session, user)
    _, reminder = settings.policy.for_group(user.group)
    dates = CertDates(cert.not_before, cert.not_after) if cert else None
    revoked = user.status == "revoked"
    return renewal_state(dates, revoked, now, reminder), cert


class UserAdmin:
    def __init__(
        self, db: Database, settings: Settings, clock: Clock, audit: AuditLog, sealer: TokenSealer | None = None
    ) -> None:
        self._db = db
        self._sealer = sealer
        self._settings = settings
        self._clock = clock
        self._audit = audit

    @property
    def _ttl(self) -> dt.timedelta:
        return dt.timedelta(days=self._settings.policy.token_ttl_days)

    def add(self, email: str, display_name: str, group: str | None, actor: str) -> str:
        """Register a user and return their one-time enrolment token (shown once)."""
        mailbox = normalise_mailbox(email)
        if mailbox == self._settings.server.effective_mail_from.strip().lower():
            # Its certificate would let the holder sign mail that clients accept as deliveries.
            raise ReservedMailbox(
                f"{mailbox} is the server's own mail identity (server.mail_from) and cannot be registered as a user"
            )
        if group is not None and group not in self._settings.policy.groups:
            raise Malformed(f"unknown group {group!r}; groups are configured under [policy.groups]")
        now = self._clock.now()
        self._prepare_sealer()
        with self._db.transaction() as session:
            if session.execute(select(User).where(User.email == mailbox)).scalar_one_or_none():
                raise UserExists(f"{mailbox} is already registered; use `mailkms user reenroll` for a new token")
            user = User(
                email=mailbox, display_name=display_name, group=group, status="registered", generation=0, created_at=now
            )
            session.add(user)
            session.flush()
            token = issue_token(session, user, "enrol", now, self._ttl, self._cmp_sealer)
            self._audit.append(session, actor, "user.added", mailbox, group=group)
            self._audit.append(session, actor, "token.issued", mailbox, purpose="enrol", expires_in_days=self._ttl.days)
        return token

    def reenroll(self, email: str, actor: str) -> str:
        """A new one-time token for an expired, revoked or lost user; archived keys stay archived."""
        mailbox = normalise_mailbox(email)
        now = self._clock.now()
        self._prepare_sealer()
        with self._db.transaction() as session:
            user = self._user(session, mailbox)
            token = issue_token(session, user, "reenrol", now, self._ttl, self._cmp_sealer)
            self._audit.append(
                session, actor, "token.issued", mailbox, purpose="reenrol", expires_in_days=self._ttl.days
            )
        return token

    @property
    def _cmp_sealer(self) -> TokenSealer | None:
        """Tokens are sealed for CMP only while it is on (`cmp.enabled`)."""
        return self._sealer if self._settings.cmp.enabled else None

    def _prepare_sealer(self) -> None:
        if self._cmp_sealer is not None:
            self._cmp_sealer.prepare()

    def show(self, email: str) -> UserView:
        with self._db.transaction() as session:
            return self._view(session, self._user(session, normalise_mailbox(email)), with_certs=True)

    def list(self, states: set[UserState] | None = None) -> list[UserView]:
        with self._db.transaction() as session:
            users = session.execute(select(User).order_by(User.email)).scalars().all()
            views = [self._view(session, u, with_certs=False) for u in users]
        return [v for v in views if states is None or v.state in states]

    def _user(self, session: Session, mailbox: str) -> User:
        user = session.execute(select(User).where(User.email == mailbox)).scalar_one_or_none()
        if user is None:
            raise UserNotFound(f"no user {mailbox}")
        return user

    def _view(self, session: Session, user: User, with_certs: bool) -> UserView:
        now = self._clock.now()
        state, cert = state_of(session, user, self._settings, now)
        _, reminder = self._settings.policy.for_group(user.group)
        certs: tuple[CertView, ...] = ()
        if with_certs:
            rows = session.execute(
                select(Certificate)
                .where(Certificate.user_id == user.id)
                .order_by(Certificate.generation, Certificate.kind)
            ).scalars()
            certs = tuple(
                CertView(c.serial, c.kind, c.generation, c.not_before, c.not_after, c.revoked_at, c.revocation_reason)
                for c in rows
            )
        return UserView(
            email=user.email,
            display_name=user.display_name,
            group=user.group,
            state=state,
            generation=user.generation,
            created_at=user.created_at,
            reminder_at=reminder_point(cert.not_before, reminder) if cert else None,
            expires_at=cert.not_after if cert else None,
            certificates=certs,
        )


__all__ = ["Conflict", "UserAdmin", "UserView", "normalise_mailbox", "state_of"]
