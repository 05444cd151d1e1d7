"""What the console's status pages show, read from the store: the key pool, the reminders sent and
the next one due, each CRL scope. Read-only; the pages add the process counters (/metrics)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import and_, func, select

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.pki import add_months, reminder_point
from mailkms.services._dashboard import Series, _buckets, _count
from mailkms.store import Certificate, Database, PooledKey, PublishedCRL, Reminder, User


@dataclass(frozen=True)
class PoolStatus:
    enabled: bool
    ready: int
    target: int
    added_last_hour: int  # keys still in the pool that were made in the last hour
    added_last_day: int
    oldest: dt.datetime | None

    @property
    def percent(self) -> int:
        return 100 if self.target == 0 else min(100, self.ready * 100 // self.target)


@dataclass(frozen=True)
class NextReminder:
    email: str
    group: str | None
    at: dt.datetime


@dataclass(frozen=True)
class ReminderStatus:
    per_day: Series  # reminder mails queued per day (every kind)
    by_kind: dict[str, int]  # in the same days
    due_next_week: int  # users whose reminder point falls in the next 7 days
    next_due: NextReminder | None


@dataclass(frozen=True)
class CRLScope:
    scope: str
    partition: int | None
    number: int
    this_update: dt.datetime | None
    next_update: dt.datetime | None
    entries: int
    size: int  # bytes of the DER
    assigned: int  # certificates in the partition
    waiting_since: dt.datetime | None  # revocations wait for the next CRL since then


class ConsoleStatus:
    def __init__(self, db: Database, settings: Settings, clock: Clock) -> None:
        self._db = db
        self._settings = settings
        self._clock = clock

    def pool(self) -> PoolStatus:
        now = self._clock.now()
        target = self._settings.pool.size
        key_type = self._settings.policy.encryption_key_type.value
        with self._db.read_only() as session:
            ready, oldest = session.execute(
                select(func.count(PooledKey.id), func.min(PooledKey.created_at)).where(PooledKey.key_type == key_type)
            ).one()
            recent = {
                span: int(
                    session.execute(
                        select(func.count(PooledKey.id)).where(
                            PooledKey.key_type == key_type, PooledKey.created_at >= now - span
                        )
                    ).scalar_one()
                )
                for span in (dt.timedelta(hours=1), dt.timedelta(days=1))
            }
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=dt.UTC)
        return PoolStatus(
            target > 0, int(ready), target, recent[dt.timedelta(hours=1)], recent[dt.timedelta(days=1)], oldest
        )

    def reminders(self, days: int = 30) -> ReminderStatus:
        now = self._clock.now()
        starts = _buckets(now, dt.timedelta(days=1), days, forward=False)
        with self._db.read_only() as session:
            rows = session.execute(
                select(Reminder.created_at, Reminder.kind).where(Reminder.created_at >= starts[0])
            ).all()
            soonest: NextReminder | None = None
            week = 0
            policy = self._settings.policy
            groups = list(policy.groups)
            for group in [None, *groups]:
                _, months = policy.for_group(group)
                named = func.coalesce(User.group, "")
                in_group = named.not_in(groups) if group is None else named == group
                live = and_(
                    Certificate.user_id == User.id,
                    Certificate.kind == "signing",
                    Certificate.generation == User.generation,
                )
                base = (
                    select(User.email, User.group, Certificate.not_before)
                    .join(Certificate, live)
                    .where(
                        in_group,
                        User.status == "enrolled",
                        Certificate.revoked_at.is_(None),
                        Certificate.not_before > add_months(now, -months),  # reminder point still ahead
                    )
                )
                first = session.execute(base.order_by(Certificate.not_before).limit(1)).first()
                if first is not None:
                    at = reminder_point(_aware(first[2]), months)
                    if soonest is None or at < soonest.at:
                        soonest = NextReminder(first[0], first[1], at)
                week += int(
                    session.execute(
                        select(func.count()).select_from(
                            base.where(
                                Certificate.not_before <= add_months(now + dt.timedelta(days=7), -months)
                            ).subquery()
                        )
                    ).scalar_one()
                )
        by_kind: dict[str, int] = {}
        for _, kind in rows:
            by_kind[kind] = by_kind.get(kind, 0) + 1
        counts = _count([_aware(created) for created, _ in rows], starts, dt.timedelta(days=1))
        return ReminderStatus(Series(starts, counts), by_kind, week, soonest)

    def crls(self) -> list[CRLScope]:
        with self._db.read_only() as session:
            rows = session.execute(
                select(
                    PublishedCRL.scope,
                    PublishedCRL.partition,
                    PublishedCRL.number,
                    PublishedCRL.this_update,
                    PublishedCRL.next_update,
                    PublishedCRL.entries,
                    func.coalesce(func.length(PublishedCRL.der), 0),
                    PublishedCRL.assigned,
                    PublishedCRL.dirty_since,
                ).order_by(PublishedCRL.partition.is_not(None), PublishedCRL.partition)
            ).all()
        return [
            CRLScope(
                r[0],
                r[1],
                int(r[2]),
                _maybe(r[3]),
                _maybe(r[4]),
                int(r[5] or 0),
                int(r[6]),
                int(r[7] or 0),
                _maybe(r[8]),
            )
            for r in rows
        ]


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _maybe(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else _aware(value)
