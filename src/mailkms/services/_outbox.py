"""The outbox as an administrator sees it: what waits and why, and a way to try again now.

The worker that sends (mailkms.mail.OutboxWorker) writes `attempts`, `next_attempt_at`,
`last_error_kind` and `last_error` on each row; this reads them (`mailkms outbox`, `/metrics`)
and lets an administrator who fixed the relay move the next attempt to now
(`mailkms outbox retry`), so nobody waits out the backoff. Nothing here sends or drops mail.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import default as default_policy

from sqlalchemy import LargeBinary, func, select, type_coerce, update

from mailkms.clock import Clock
from mailkms.errors import Conflict, NotFound
from mailkms.services._audit import AuditLog
from mailkms.services._token_mail import SEALED_MAGIC
from mailkms.store import Database, OutboxMessage

HEAD_BYTES = 4096  # enough of a message for its headers (Subject), without loading whole bodies


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def _subject(head: bytes | None) -> str | None:
    if not head:
        return None
    if head.startswith(SEALED_MAGIC):
        return "(sealed: carries a secret)"
    header_block = head.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    try:
        subject = BytesHeaderParser(policy=default_policy).parsebytes(header_block + b"\r\n\r\n")["Subject"]
    except Exception:  # noqa: BLE001 - a listing never fails on one odd message
        return None
    return str(subject) if subject is not None else None


def outbox_depth(db: Database) -> tuple[int, dt.datetime | None]:
    """(messages not yet sent, when the oldest of them was queued)."""
    with db.transaction() as session:
        count, oldest = session.execute(
            select(func.count(OutboxMessage.id), func.min(OutboxMessage.created_at)).where(
                OutboxMessage.sent_at.is_(None)
            )
        ).one()
    return int(count), _aware(oldest)


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    recipient: str
    message_id: str
    purpose: str
    subject: str | None
    created_at: dt.datetime
    attempts: int
    next_attempt_at: dt.datetime | None  # None once sent
    sent_at: dt.datetime | None
    last_error_kind: str | None
    last_error: str | None
    claimed_by: str | None
    claimed_until: dt.datetime | None

    @property
    def state(self) -> str:
        return "sent" if self.sent_at is not None else "waiting"

    def to_dict(self) -> dict[str, object]:
        def iso(value: dt.datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "id": self.id,
            "state": self.state,
            "recipient": self.recipient,
            "message_id": self.message_id,
            "purpose": self.purpose,
            "subject": self.subject,
            "queued_at": iso(self.created_at),
            "attempts": self.attempts,
            "next_attempt_at": iso(self.next_attempt_at),
            "sent_at": iso(self.sent_at),
            "last_error_kind": self.last_error_kind,
            "last_error": self.last_error,
            "claimed_by": self.claimed_by,
            "claimed_until": iso(self.claimed_until),
        }


@dataclass(frozen=True)
class OutboxListing:
    waiting: int  # all unsent rows, also those beyond the limit
    oldest_queued_at: dt.datetime | None
    by_kind: dict[str, int]  # unsent rows by the kind of their last failure ("none": not failed yet)
    entries: tuple[OutboxEntry, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "waiting": self.waiting,
            "oldest_queued_at": self.oldest_queued_at.isoformat() if self.oldest_queued_at else None,
            "by_kind": self.by_kind,
            "messages": [e.to_dict() for e in self.entries],
        }


class OutboxQueue:
    def __init__(self, db: Database, clock: Clock, audit: AuditLog) -> None:
        self._db = db
        self._clock = clock
        self._audit = audit

    def depth(self) -> tuple[int, dt.datetime | None]:
        return outbox_depth(self._db)

    def waiting_by_kind(self) -> dict[str, int]:
        """Unsent messages by the kind of their last failure; "none" for those not failed yet."""
        with self._db.transaction() as session:
            rows = session.execute(
                select(OutboxMessage.last_error_kind, func.count(OutboxMessage.id))
                .where(OutboxMessage.sent_at.is_(None))
                .group_by(OutboxMessage.last_error_kind)
            ).all()
        return {(kind or "none"): int(n) for kind, n in rows}

    def list(self, *, include_sent: bool = False, limit: int = 100) -> OutboxListing:
        """Unsent messages, oldest first (at most `limit`); with `include_sent`, also the `limit`
        most recently sent."""
        columns = (
            OutboxMessage.id,
            OutboxMessage.recipient,
            OutboxMessage.message_id,
            OutboxMessage.purpose,
            type_coerce(func.substr(OutboxMessage.body, 1, HEAD_BYTES), LargeBinary),
            OutboxMessage.created_at,
            OutboxMessage.attempts,
            OutboxMessage.next_attempt_at,
            OutboxMessage.sent_at,
            OutboxMessage.last_error_kind,
            OutboxMessage.last_error,
            OutboxMessage.claimed_by,
            OutboxMessage.claimed_until,
        )
        with self._db.transaction() as session:
            rows = list(
                session.execute(
                    select(*columns)
                    .where(OutboxMessage.sent_at.is_(None))
                    .order_by(OutboxMessage.created_at, OutboxMessage.id)
                    .limit(limit)
                )
            )
            if include_sent:
                rows += list(
                    session.execute(
                        select(*columns)
                        .where(OutboxMessage.sent_at.is_not(None))
                        .order_by(OutboxMessage.sent_at.desc(), OutboxMessage.id.desc())
                        .limit(limit)
                    )
                )
        entries = tuple(
            OutboxEntry(
                id=r[0],
                recipient=r[1],
                message_id=r[2],
                purpose=r[3],
                subject=_subject(r[4]),
                created_at=r[5],
                attempts=r[6],
                next_attempt_at=None if r[8] is not None else r[7],
                sent_at=r[8],
                last_error_kind=r[9],
                last_error=r[10],
                claimed_by=r[11],
                claimed_until=r[12],
            )
            for r in rows
        )
        waiting, oldest = self.depth()
        return OutboxListing(waiting, oldest, self.waiting_by_kind(), entries)

    def retry(
        self,
        ids: Sequence[int] = (),
        *,
        every: bool = False,
        kinds: Collection[str] = (),
        actor: str = "system",
    ) -> int:
        """Make unsent messages due now: the ones named, or all (`every`), or those whose last
        failure was one of `kinds`. Leases are left alone: a message being sent stays with its
        sender. Returns how many were made due. A named id that is unknown, or already sent, is
        refused (NotFound, Conflict) and nothing changes."""
        now = self._clock.now()
        with self._db.transaction() as session:
            query = update(OutboxMessage).where(OutboxMessage.sent_at.is_(None))
            if ids:
                found = dict(
                    session.execute(
                        select(OutboxMessage.id, OutboxMessage.sent_at).where(OutboxMessage.id.in_(list(ids)))
                    ).all()
                )
                missing = [i for i in ids if i not in found]
                if missing:
                    raise NotFound(f"no message {', '.join(map(str, missing))} in the outbox")
                sent = [i for i in ids if found[i] is not None]
                if sent:
                    raise Conflict(f"message {', '.join(map(str, sent))} was already sent")
                query = query.where(OutboxMessage.id.in_(list(ids)))
            elif kinds:
                query = query.where(OutboxMessage.last_error_kind.in_(list(kinds)))
            elif not every:
                raise ValueError("name messages, kinds, or every")
            query = query.where(OutboxMessage.next_attempt_at > now).values(next_attempt_at=now)
            result = session.execute(query)
            count = int(getattr(result, "rowcount", 0) or 0)
            if count:
                detail: dict[str, object] = {"messages": count}
                if ids:
                    detail["ids"] = list(ids)
                if kinds:
                    detail["kinds"] = sorted(kinds)
                self._audit.append(session, actor, "mail.retry-requested", "outbox", **detail)
        return count
