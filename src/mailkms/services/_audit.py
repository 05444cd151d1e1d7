"""The audit chain: every change of state, hash-chained so edits, gaps and reorders show."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from mailkms.clock import Clock
from mailkms.store import AuditHead, AuditRecord

GENESIS = "0" * 64
_SECRET_WORDS = ("token", "passphrase", "password", "private", "share", "secret")


def _canonical(seq: int, at: dt.datetime, actor: str, action: str, subject: str, details: str, prev: str) -> bytes:
    return json.dumps(
        [seq, at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), actor, action, subject, details, prev],
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def record_hash(seq: int, at: dt.datetime, actor: str, action: str, subject: str, details: str, prev: str) -> str:
    return hashlib.sha256(_canonical(seq, at, actor, action, subject, details, prev)).hexdigest()


AuditObserver = Callable[[str, Mapping[str, object]], None]
_PENDING = "mailkms_audit_pending"  # (observers, action, details) to tell after commit


def _after_commit(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    if not pending:
        return
    for observers, action, details in pending:
        for observer in observers:
            observer(action, details)


def _after_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)


event.listen(Session, "after_commit", _after_commit)
event.listen(Session, "after_rollback", _after_rollback)


class AuditLog:
    def __init__(self, clock: Clock, observers: Sequence[AuditObserver] = ()) -> None:
        self._clock = clock
        self._observers = tuple(observers)  # told of each record once its transaction has committed

    def append(self, session: Session, actor: str, action: str, subject: str, **details: object) -> AuditRecord:
        """Append in the caller's transaction; the head row lock orders concurrent writers."""
        for key in details:
            if any(word in key.lower() for word in _SECRET_WORDS) and not key.endswith("_id"):
                raise ValueError(f"audit detail {key!r} looks like a secret; audit records never hold secrets")
        head = session.execute(select(AuditHead).where(AuditHead.id == 1).with_for_update()).scalar_one_or_none()
        if head is None:
            head = AuditHead(id=1, seq=0, hash=GENESIS)
            session.add(head)
            session.flush()
        seq = head.seq + 1
        at = self._clock.now()
        text = json.dumps(details, sort_keys=True, default=str, separators=(",", ":"))
        digest = record_hash(seq, at, actor, action, subject, text, head.hash)
        record = AuditRecord(
            seq=seq, at=at, actor=actor, action=action, subject=subject, details=text, prev_hash=head.hash, hash=digest
        )
        session.add(record)
        head.seq = seq
        head.hash = digest
        session.flush()
        if self._observers:
            session.info.setdefault(_PENDING, []).append((self._observers, action, details))
        return record


@dataclass(frozen=True)
class AuditReport:
    records: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(session: Session) -> AuditReport:
    """Recompute every hash in order; report edited, removed or reordered records."""
    problems: list[str] = []
    prev = GENESIS
    expected_seq = 1
    count = 0
    for record in session.execute(select(AuditRecord).order_by(AuditRecord.seq)).scalars():
        count += 1
        if record.seq != expected_seq:
            problems.append(f"record {expected_seq}..{record.seq - 1} missing (gap before seq {record.seq})")
        if record.prev_hash != prev:
            problems.append(f"seq {record.seq}: does not follow the previous record (removed or reordered)")
        digest = record_hash(
            record.seq, record.at, record.actor, record.action, record.subject, record.details, record.prev_hash
        )
        if digest != record.hash:
            problems.append(f"seq {record.seq}: contents do not match its hash (edited)")
        prev = record.hash
        expected_seq = record.seq + 1
    head = session.get(AuditHead, 1)
    if head is None and count:
        problems.append(f"the chain head is missing (records after seq {expected_seq - 1} may have been removed)")
    if head is not None and (head.seq != expected_seq - 1 or head.hash != prev):
        problems.append(
            f"the chain ends at seq {expected_seq - 1} but the head says {head.seq} (records removed at the end)"
        )
    return AuditReport(count, tuple(problems))
