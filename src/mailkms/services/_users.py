"""Administrator use cases on users, and the user's view of state."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Column, ColumnElement, and_, false, func, insert, inspect, or_, select, true
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.visitors import replacement_traverse

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import Conflict, MailkmsError, Malformed, ReservedMailbox, UserExists, UserNotFound
from mailkms.pki import add_months, reminder_point
from mailkms.services._audit import AuditLog
from mailkms.services._lifecycle import CertDates, UserState, renewal_state
from mailkms.services._tokens import TokenSealer, issue_token, new_token, token_hash
from mailkms.store import Certificate, Database, Token, User

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


@dataclass(frozen=True)
class UserPage:
    """One page of users in e-mail order, and how many match the filters in all (`exact`), or at
    least (`exact` False: more than `total` match; the count stopped there)."""

    users: tuple[UserView, ...]
    total: int
    offset: int
    limit: int
    exact: bool = True

    def to_dict(self) -> dict[str, object]:
        return {
            "total": self.total,
            "offset": self.offset,
            "limit": self.limit,
            "users": [u.to_dict() for u in self.users],
        }


# A reminder point is notBefore + N calendar months; month ends clamp (31 Jan + 1 = 28 Feb), so which
# notBefore values are past it is decided exactly, in Python, only inside this window after the cut.
_CLAMP_WINDOW = dt.timedelta(days=4)
MAX_OFFSET = 10**9
MAX_DAYS = 36_600  # a century: certificates live at most 825 days


def probe_dates(condition: ColumnElement[bool], cert: type[Certificate]) -> ColumnElement[bool]:
    """`condition` with the certificate's dates as coalesce(d, d): the same value, but no index on
    a date can serve it, so the join goes through (user_id, kind, generation)."""
    dates = {"not_before", "not_after"}
    table = inspect(cert).selectable

    def swap(element: Any) -> Any:
        if isinstance(element, Column) and element.table is table and element.key in dates:
            return func.coalesce(element, element)
        return None

    options: dict[str, Any] = {}
    return cast(ColumnElement[bool], replacement_traverse(condition, options, swap))  # type: ignore[call-overload]


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
    return state_with(user, cert, settings, now), cert


def state_with(user: User, cert: Certificate | None, settings: Settings, now: dt.datetime) -> UserState:
    """`state_of` for a caller that already read the user's current signing certificate `cert`."""
    _, reminder = settings.policy.for_group(user.group)
    dates = CertDates(cert.not_before, cert.not_after) if cert else None
    revoked = user.status == "revoked"
    return renewal_state(dates, revoked, now, reminder)


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
        mailbox = self._admissible(email, group)
        self._prepare_sealer()
        with self._db.transaction() as session:
            if session.execute(select(User).where(User.email == mailbox)).scalar_one_or_none():
                raise UserExists(f"{mailbox} is already registered; use `mailkms user reenroll` for a new token")
            return self._register(session, mailbox, display_name, group, actor)

    def add_many(self, rows: Sequence[tuple[str, str, str | None]], actor: str) -> list[tuple[str, str | MailkmsError]]:
        """Register a batch in ONE transaction: (mailbox, token) per row, or (email, error) for a row refused.

        One commit and one audit-head lock per batch instead of per user: an import of 100,000 users
        is bound by hashing and inserting, not by fsyncs. Each user still gets their own audit records.
        """
        results: list[tuple[str, str | MailkmsError]] = []
        admissible: list[tuple[int, str, str, str | None]] = []
        for index, (email, name, group) in enumerate(rows):
            try:
                admissible.append((index, self._admissible(email, group), name, group))
            except MailkmsError as exc:
                results.append((email, exc))
        self._prepare_sealer()
        with self._db.transaction() as session:
            wanted = [mailbox for _, mailbox, _, _ in admissible]
            taken = (
                set(session.execute(select(User.email).where(User.email.in_(wanted))).scalars()) if wanted else set()
            )
            fresh: list[tuple[str, str, str | None]] = []
            for _, mailbox, name, group in admissible:
                if mailbox in taken:
                    results.append((mailbox, UserExists(f"{mailbox} is already registered")))
                else:
                    taken.add(mailbox)  # the same mailbox twice in one file: the first row wins
                    fresh.append((mailbox, name, group))
            results.extend(self._register_new(session, fresh, actor))
        return results

    def _register_new(
        self, session: Session, users: Sequence[tuple[str, str, str | None]], actor: str
    ) -> list[tuple[str, str | MailkmsError]]:
        """Users known not to exist yet, with bulk INSERTs (they have no earlier tokens to revoke)."""
        if not users:
            return []
        now = self._clock.now()
        ids = dict(
            session.execute(
                insert(User).returning(User.email, User.id),
                [
                    {
                        "email": m,
                        "display_name": n,
                        "group": g,
                        "status": "registered",
                        "generation": 0,
                        "created_at": now,
                    }
                    for m, n, g in users
                ],
            ).all()
        )
        tokens = {mailbox: new_token() for mailbox, _, _ in users}
        sealer = self._cmp_sealer
        session.execute(
            insert(Token),
            [
                {
                    "user_id": ids[m],
                    "token_hash": token_hash(t),
                    "purpose": "enrol",
                    "created_at": now,
                    "expires_at": now + self._ttl,
                    "cmp_secret": sealer.seal(t, session) if sealer is not None else None,
                }
                for m, t in tokens.items()
            ],
        )
        entries: list[tuple[str, str, Mapping[str, object]]] = []
        for mailbox, _, group in users:
            entries.append(("user.added", mailbox, {"group": group}))
            entries.append(("token.issued", mailbox, {"purpose": "enrol", "expires_in_days": self._ttl.days}))
        self._audit.append_many(session, actor, entries)
        return [(mailbox, tokens[mailbox]) for mailbox, _, _ in users]

    def _admissible(self, email: str, group: str | None) -> str:
        """The normalised mailbox, or the reason it may not be registered (no store needed)."""
        mailbox = normalise_mailbox(email)
        if mailbox == self._settings.server.effective_mail_from.strip().lower():
            # Its certificate would let the holder sign mail that clients accept as deliveries.
            raise ReservedMailbox(
                f"{mailbox} is the server's own mail identity (server.mail_from) and cannot be registered as a user"
            )
        if group is not None and group not in self._settings.policy.groups:
            raise Malformed(f"unknown group {group!r}; groups are configured under [policy.groups]")
        return mailbox

    def _register(self, session: Session, mailbox: str, display_name: str, group: str | None, actor: str) -> str:
        now = self._clock.now()
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

    def page(
        self,
        *,
        state: UserState | None = None,
        due_within_days: int | None = None,
        query: str | None = None,
        group: str | None = None,
        offset: int = 0,
        limit: int = 50,
        count_up_to: int | None = None,
    ) -> UserPage:
        """Server-side paging and filtering (state, certificates expiring within N days, text in the
        mailbox or name, policy group: "" for the default) on indexed columns; the states agree
        with `renewal_state`. `count_up_to`: count the matches only that far (or to the end of this
        page if further), as large consoles say "more than 10,000"; None counts them all."""
        if not 0 <= offset <= MAX_OFFSET or not 1 <= limit <= 500:
            raise Malformed(f"offset must be 0..{MAX_OFFSET} and limit 1..500")
        if due_within_days is not None and not 0 <= due_within_days <= MAX_DAYS:
            raise Malformed(f"due within days must be 0..{MAX_DAYS}")
        now = self._clock.now()
        with self._db.read_only() as session:
            cert = aliased(Certificate)
            joined = and_(cert.user_id == User.id, cert.kind == "signing", cert.generation == User.generation)
            conds: list[ColumnElement[bool]] = []
            if query:
                like = f"%{query.strip().lower()}%"
                conds.append(or_(User.email.like(like), func.lower(User.display_name).like(like)))
            if group is not None:
                conds.append(User.group.is_(None) if group == "" else User.group == group)
            live = and_(User.status != "revoked", cert.id.is_not(None), cert.not_after >= now)
            if state is not None:
                conds.append(self._state_condition(session, state, cert, live, now))
            if due_within_days is not None:
                conds.append(and_(live, cert.not_after <= now + dt.timedelta(days=due_within_days)))
            needs_cert = state is not None or due_within_days is not None

            def filtered(what: Any) -> Any:
                query_ = select(what)
                return (query_.outerjoin(cert, joined) if needs_cert else query_).where(*conds)

            if count_up_to is None:
                total, exact = session.execute(filtered(func.count(User.id))).scalar_one(), True
            else:  # the planner's own way (a date index for states), stopping after `bound` + 1 matches
                bound = max(count_up_to, offset + limit)
                counted = filtered(User.id).limit(bound + 1).subquery()
                total = session.execute(select(func.count()).select_from(counted)).scalar_one()
                total, exact = min(total, bound), total <= bound
            # In e-mail order (the unique index), each user's certificate found by (user, kind,
            # generation): the database stops after offset + limit matches. The dates are wrapped so
            # that no planner drives this from a date index and sorts every match by e-mail (1 s at
            # 100,000 users on SQLite; docs/PERFORMANCE.md).
            # dense matches ("expiring within" is sparse); on SQLite only: PostgreSQL's planner, given
            # the wrapped dates, scans both tables whole (hash join, 67 ms at 100k) instead
            if state is not None and due_within_days is None and session.get_bind().dialect.name == "sqlite":
                conds = [probe_dates(c, cert) for c in conds]
            ids = list(session.execute(filtered(User).order_by(User.email).offset(offset).limit(limit)).scalars())
            views = tuple(self._view(session, u, with_certs=False) for u in ids)
        return UserPage(views, int(total), offset, limit, exact)

    def _state_condition(
        self, session: Session, state: UserState, cert: type[Certificate], live: ColumnElement[bool], now: dt.datetime
    ) -> ColumnElement[bool]:
        revoked = User.status == "revoked"
        if state is UserState.REVOKED:
            return revoked
        if state is UserState.REGISTERED:
            return and_(~revoked, cert.id.is_(None))
        if state is UserState.EXPIRED:
            return and_(~revoked, cert.not_after < now)
        due = self._due_condition(session, cert, now)
        return and_(live, due) if state is UserState.DUE else and_(live, ~due)

    def _due_condition(self, session: Session, cert: type[Certificate], now: dt.datetime) -> ColumnElement[bool]:
        """notBefore + the group's reminder months <= now, per policy group."""
        policy = self._settings.policy
        groups = list(policy.groups)
        parts: list[ColumnElement[bool]] = []
        for group in [None, *groups]:
            _, months = policy.for_group(group)
            # No NULL in the test (three-valued logic would make NOT(due) unknown for users without a group).
            named = func.coalesce(User.group, "")
            in_group = (named.not_in(groups) if groups else true()) if group is None else named == group
            cut = add_months(now, -months) - _CLAMP_WINDOW
            window = session.execute(
                select(User.id, cert.not_before)
                .join(cert, and_(cert.user_id == User.id, cert.kind == "signing", cert.generation == User.generation))
                .where(in_group, cert.not_before > cut, cert.not_before <= cut + 2 * _CLAMP_WINDOW)
            ).all()
            exact = [uid for uid, nb in window if reminder_point(nb, months) <= now]
            parts.append(and_(in_group, or_(cert.not_before <= cut, User.id.in_(exact) if exact else false())))
        return or_(*parts)

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


__all__ = ["Conflict", "UserAdmin", "UserPage", "UserView", "normalise_mailbox", "state_of"]
