"""Reminder mails from the server: at the reminder point, a last notice before expiry, a daily summary.

Each reminder is claimed through the database — a `reminders` row unique on (user, certificate
generation, kind), inserted with ON CONFLICT DO NOTHING in the same transaction as its outbox row —
so it goes out once per generation, across restarts and across any number of nodes sweeping at once.
The periodic administrator summary is claimed the same way, once per UTC day (`job_claims`).
Mails are composed (rendered and signed) before the claiming transaction, so the audit chain's
lock is held only for the inserts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import and_, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.pki import add_months, reminder_point
from mailkms.services._audit import AuditLog
from mailkms.services._issuance import queue_message
from mailkms.store import Certificate, Database, IssuanceRequest, JobClaim, Reminder, User

DUE = "due"
FINAL = "final"
SUMMARY_JOB = "admin-summary"
SUMMARY_LIST_MAX = 200
# The SQL pre-filter works in days; calendar months vary by up to 3 days, so widen it and decide exactly in Python.
_SLACK = dt.timedelta(days=4)


class Composer(Protocol):
    """Renders a message from its template folder and signs it; returns RFC 5322 bytes."""

    def compose(self, template: str, recipient: str, context: Mapping[str, object], message_id: str) -> bytes: ...


@dataclass(frozen=True)
class Candidate:
    user_id: int
    email: str
    display_name: str
    group: str | None
    generation: int
    not_before: dt.datetime
    not_after: dt.datetime


@dataclass
class SweepReport:
    scanned: int = 0
    due_sent: int = 0
    final_sent: int = 0
    already_claimed: int = 0  # composed, but another node (or an earlier run) had sent it
    summary_sent: bool = False
    sent_to: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "scanned": self.scanned,
            "due_sent": self.due_sent,
            "final_sent": self.final_sent,
            "already_claimed": self.already_claimed,
            "summary_sent": self.summary_sent,
        }


Progress = Callable[[int, int], None]  # (done, total)


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


class ReminderSweep:
    def __init__(
        self, db: Database, settings: Settings, clock: Clock, audit: AuditLog, composer: Composer, node: str = "system"
    ) -> None:
        self._db = db
        self._settings = settings
        self._clock = clock
        self._audit = audit
        self._composer = composer
        self._node = node[:100]

    # -- decisions -----------------------------------------------------------------------------------
    def kind_for(self, c: Candidate, now: dt.datetime) -> str | None:
        """Which reminder (if any) a user's current generation calls for now: pure, no I/O."""
        if now > c.not_after:
            return None
        final_days = self._settings.reminders.final_notice_days
        if final_days and now >= c.not_after - dt.timedelta(days=final_days):
            return FINAL
        _, months = self._settings.policy.for_group(c.group)
        if now >= reminder_point(c.not_before, months):
            return DUE
        return None

    # -- the sweep -----------------------------------------------------------------------------------
    def candidates(self, session: Session, kind: str, now: dt.datetime, unclaimed: bool = True) -> list[Candidate]:
        """Enrolled users whose current certificate may call for `kind` (without such a reminder yet)."""
        signing = and_(
            Certificate.user_id == User.id,
            Certificate.kind == "signing",
            Certificate.generation == User.generation,
        )
        query = (
            select(
                User.id,
                User.email,
                User.display_name,
                User.group,
                User.generation,
                Certificate.not_before,
                Certificate.not_after,
            )
            .join(Certificate, signing)
            .where(User.status == "enrolled", Certificate.revoked_at.is_(None), Certificate.not_after >= now)
            .order_by(User.id)
        )
        if unclaimed:
            claimed = and_(Reminder.user_id == User.id, Reminder.generation == User.generation, Reminder.kind == kind)
            query = query.outerjoin(Reminder, claimed).where(Reminder.id.is_(None))
        if kind == FINAL:
            days = self._settings.reminders.final_notice_days
            query = query.where(Certificate.not_after <= now + dt.timedelta(days=days) + _SLACK)
        else:
            months = min([self._settings.policy.reminder_months] + [m for _, m in self._group_policies()])
            query = query.where(Certificate.not_before <= add_months(now, -months) + _SLACK)
        return [
            Candidate(r[0], r[1], r[2], r[3], r[4], _aware(r[5]), _aware(r[6])) for r in session.execute(query).all()
        ]

    def _group_policies(self) -> Iterable[tuple[int, int]]:
        return (self._settings.policy.for_group(name) for name in self._settings.policy.groups)

    def sweep(self, progress: Progress | None = None) -> SweepReport:
        """Send every reminder that is due now and not yet sent; then the daily summary, if configured."""
        report = SweepReport()
        now = self._clock.now()
        with self._db.transaction() as session:
            found: dict[int, tuple[str, Candidate]] = {}
            for kind in (FINAL, DUE):
                for c in self.candidates(session, kind, now):
                    if c.user_id not in found and self.kind_for(c, now) == kind:
                        found[c.user_id] = (kind, c)
        todo = [found[k] for k in sorted(found)]
        report.scanned = len(todo)
        batch = self._settings.reminders.batch_size
        for start in range(0, len(todo), batch):
            self._send_batch(todo[start : start + batch], now, report)
            if progress:
                progress(min(start + batch, len(todo)), len(todo))
        if progress and not todo:
            progress(0, 0)
        if self._settings.reminders.admins:
            report.summary_sent = self.send_summary()
        return report

    def _message_id(self, kind: str, c: Candidate) -> str:
        domain = self._settings.server.effective_mail_from.rsplit("@", 1)[-1]
        return f"<reminder-{kind}-{c.user_id}-g{c.generation}@{domain}>"

    def _context(self, kind: str, c: Candidate) -> dict[str, object]:
        _, months = self._settings.policy.for_group(c.group)
        days_left = max(0, (c.not_after - self._clock.now()).days)
        return {
            "name": c.display_name or c.email,
            "email": c.email,
            "expires": f"{c.not_after:%d %B %Y}",
            "expires_iso": c.not_after.isoformat(),
            "days_left": days_left,
            "reminder_date": f"{reminder_point(c.not_before, months):%d %B %Y}",
            "server": self._settings.server.effective_public_url,
            "mail_from": self._settings.server.effective_mail_from,
        }

    def _send_batch(self, items: Sequence[tuple[str, Candidate]], now: dt.datetime, report: SweepReport) -> None:
        composed = []
        for kind, c in items:
            message_id = self._message_id(kind, c)
            body = self._composer.compose(f"reminder-{kind}", c.email, self._context(kind, c), message_id)
            composed.append((kind, c, message_id, body))
        with self._db.transaction() as session:
            won = self._claim(session, [(c.user_id, c.generation, kind, mid) for kind, c, mid, _ in composed], now)
            for kind, c, message_id, body in composed:
                if (c.user_id, c.generation, kind) not in won:
                    report.already_claimed += 1
                    continue
                self._queue(session, now, message_id, c.email, body, f"reminder:{kind}")
                self._audit.append(
                    session, "system", f"reminder.{kind}", c.email, generation=c.generation, node=self._node
                )
                if kind == DUE:
                    report.due_sent += 1
                else:
                    report.final_sent += 1
                report.sent_to.append(c.email)

    def _queue(
        self, session: Session, now: dt.datetime, message_id: str, recipient: str, body: bytes, purpose: str
    ) -> None:
        sender = self._settings.server.effective_mail_from
        queue_message(
            session,
            self._audit,
            now,
            message_id=message_id,
            sender=sender,
            recipient=recipient,
            body=body,
            purpose=purpose,
        )

    def _claim(
        self, session: Session, rows: Sequence[tuple[int, int, str, str]], now: dt.datetime
    ) -> set[tuple[int, int, str]]:
        """INSERT .. ON CONFLICT DO NOTHING RETURNING: the rows this transaction won."""
        if not rows:
            return set()
        values = [
            {"user_id": u, "generation": g, "kind": k, "message_id": m, "created_at": now, "claimed_by": self._node}
            for u, g, k, m in rows
        ]
        insert: Any = postgresql.insert if self._db.engine.dialect.name == "postgresql" else sqlite.insert
        stmt = (
            insert(Reminder)
            .values(values)
            .on_conflict_do_nothing(index_elements=["user_id", "generation", "kind"])
            .returning(Reminder.user_id, Reminder.generation, Reminder.kind)
        )
        return {(r[0], r[1], r[2]) for r in session.execute(stmt).all()}

    # -- the administrators' summary -------------------------------------------------------------------
    def claim_job(self, session: Session, job: str, period: str, now: dt.datetime) -> bool:
        insert: Any = postgresql.insert if self._db.engine.dialect.name == "postgresql" else sqlite.insert
        stmt = (
            insert(JobClaim)
            .values(job=job, period=period, claimed_by=self._node, claimed_at=now)
            .on_conflict_do_nothing(index_elements=["job", "period"])
            .returning(JobClaim.id)
        )
        return session.execute(stmt).first() is not None

    def summary_context(self, session: Session, now: dt.datetime) -> dict[str, object]:
        previous = session.execute(
            select(func.max(JobClaim.claimed_at)).where(JobClaim.job == SUMMARY_JOB, JobClaim.claimed_at < now)
        ).scalar_one_or_none()
        since = _aware(previous) if previous is not None else now - dt.timedelta(days=1)
        due = [
            c.email
            for kind in (FINAL, DUE)
            for c in self.candidates(session, kind, now, unclaimed=False)
            if self.kind_for(c, now) is not None
        ]
        due = sorted(set(due))
        renewed = sorted(
            session.execute(
                select(User.email)
                .join(IssuanceRequest, IssuanceRequest.user_id == User.id)
                .where(IssuanceRequest.kind == "renewal", IssuanceRequest.created_at >= since)
            ).scalars()
        )
        expired = sorted(
            session.execute(
                select(User.email)
                .join(
                    Certificate,
                    and_(
                        Certificate.user_id == User.id,
                        Certificate.kind == "signing",
                        Certificate.generation == User.generation,
                    ),
                )
                .where(Certificate.not_after >= since, Certificate.not_after < now, User.status == "enrolled")
            ).scalars()
        )
        return {
            "since": f"{since:%Y-%m-%d %H:%M} UTC",
            "now": f"{now:%Y-%m-%d %H:%M} UTC",
            "due": due,
            "renewed": renewed,
            "expired": expired,
        }

    def send_summary(self, force_period: str | None = None) -> bool:
        """Mail the administrators who is due, who renewed and who expired; once per UTC day across nodes."""
        admins = self._settings.reminders.admins
        if not admins:
            return False
        now = self._clock.now()
        period = force_period or f"{now:%Y-%m-%d}"
        with self._db.transaction() as session:
            context = self.summary_context(session, now)
        text_ctx = {
            "since": context["since"],
            "now": context["now"],
            **{f"{k}_count": len(_seq(context[k])) for k in ("due", "renewed", "expired")},
            **{f"{k}_list": _capped(_seq(context[k])) for k in ("due", "renewed", "expired")},
        }
        domain = self._settings.server.effective_mail_from.rsplit("@", 1)[-1]
        bodies = [
            (admin, f"<summary-{period}-{i}@{domain}>")
            for i, admin in enumerate(sorted(set(a.lower() for a in admins)))
        ]
        composed = [(a, mid, self._composer.compose("admin-summary", a, text_ctx, mid)) for a, mid in bodies]
        with self._db.transaction() as session:
            if not self.claim_job(session, SUMMARY_JOB, period, now):
                return False
            for admin, message_id, body in composed:
                self._queue(session, now, message_id, admin, body, "summary")
            self._audit.append(
                session,
                "system",
                "summary.sent",
                ",".join(a for a, _, _ in composed)[:320],
                period=period,
                due=text_ctx["due_count"],
                renewed=text_ctx["renewed_count"],
                expired=text_ctx["expired_count"],
            )
        return True


def _capped(items: list[str]) -> list[str]:
    if len(items) <= SUMMARY_LIST_MAX:
        return items
    return [*items[:SUMMARY_LIST_MAX], f"... and {len(items) - SUMMARY_LIST_MAX} more"]


def _seq(value: object) -> list[str]:
    assert isinstance(value, list)
    return [str(v) for v in value]
