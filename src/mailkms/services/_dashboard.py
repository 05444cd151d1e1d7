"""What the console's dashboard draws: counts per week and per day, read from the store."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from sqlalchemy import and_, select

from mailkms.clock import Clock
from mailkms.services._refusals import COUNTED
from mailkms.store import AuditRecord, Certificate, Database, IssuanceRequest, User


@dataclass(frozen=True)
class Series:
    """Counts per bucket; `starts[i]` is where bucket i begins (UTC)."""

    starts: tuple[dt.datetime, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)


def _buckets(now: dt.datetime, size: dt.timedelta, n: int, forward: bool) -> tuple[dt.datetime, ...]:
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if forward:
        return tuple(day + i * size for i in range(n))
    first = day - (n - 1) * size
    return tuple(first + i * size for i in range(n))


def _count(times: list[dt.datetime], starts: tuple[dt.datetime, ...], size: dt.timedelta) -> tuple[int, ...]:
    counts = [0] * len(starts)
    for when in times:
        index = int((when - starts[0]) / size)
        if 0 <= index < len(counts):
            counts[index] += 1
    return tuple(counts)


class Dashboard:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    def expiring_per_week(self, weeks: int = 78) -> Series:
        """Current signing certificates of users not revoked, by the week their notAfter falls in."""
        size = dt.timedelta(weeks=1)
        starts = _buckets(self._clock.now(), size, weeks, forward=True)
        with self._db.read_only() as session:
            times = list(
                session.execute(
                    select(Certificate.not_after)
                    .join(User, and_(User.id == Certificate.user_id, User.generation == Certificate.generation))
                    .where(
                        Certificate.kind == "signing",
                        User.status != "revoked",
                        Certificate.not_after >= starts[0],
                        Certificate.not_after < starts[-1] + size,
                    )
                ).scalars()
            )
        return Series(starts, _count(times, starts, size))

    def issued_per_day(self, kind: str, days: int = 30) -> Series:
        """Pairs issued per day by kind (enrolment, renewal, recovery), the last `days` days."""
        size = dt.timedelta(days=1)
        starts = _buckets(self._clock.now(), size, days, forward=False)
        with self._db.read_only() as session:
            times = list(
                session.execute(
                    select(IssuanceRequest.created_at).where(
                        IssuanceRequest.kind == kind, IssuanceRequest.created_at >= starts[0]
                    )
                ).scalars()
            )
        return Series(starts, _count(times, starts, size))

    def refusals_per_day(self, days: int = 30) -> Series:
        """Refused requests per day: each identified refusal, and the anonymous counts."""
        size = dt.timedelta(days=1)
        starts = _buckets(self._clock.now(), size, days, forward=False)
        times: list[dt.datetime] = []
        with self._db.read_only() as session:
            rows = session.execute(
                select(AuditRecord.at, AuditRecord.action, AuditRecord.details).where(
                    AuditRecord.at >= starts[0],
                    (AuditRecord.action.endswith(".refused")) | (AuditRecord.action == COUNTED),
                )
            ).all()
        for at, action, details in rows:
            count = int(json.loads(details).get("count", 1)) if action == COUNTED else 1
            times.extend([at] * count)
        return Series(starts, _count(times, starts, size))


__all__ = ["Dashboard", "Series"]
