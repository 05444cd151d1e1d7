"""The audit chain: every change of state, hash-chained so edits, gaps and reorders show."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import event, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from mailkms.clock import Clock
from mailkms.errors import ConfigError
from mailkms.pki import Checkpoint, CheckpointInvalid, key_id_of, sign_checkpoint, verify_checkpoint
from mailkms.services._bulk import defer_insert
from mailkms.services._files import write_atomically
from mailkms.store import AuditHead, AuditRecord, Database

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
_HEAD = "mailkms_audit_head"  # the head row, locked by this transaction's first append


def _after_commit(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint released: the transaction (and its lock on the head) goes on
    session.info.pop(_HEAD, None)
    pending = session.info.pop(_PENDING, None)
    if not pending:
        return
    for observers, action, details in pending:
        for observer in observers:
            observer(action, details)


def _after_rollback(session: Session) -> None:
    session.info.pop(_HEAD, None)
    session.info.pop(_PENDING, None)


def _after_soft_rollback(session: Session, _previous: object) -> None:
    session.info.pop(_HEAD, None)  # a savepoint rolled back: read the head again (still locked)


event.listen(Session, "after_commit", _after_commit)
event.listen(Session, "after_rollback", _after_rollback)
event.listen(Session, "after_soft_rollback", _after_soft_rollback)


def audit_mark(session: Session) -> int:
    """Where this transaction's records-to-announce stand (before a savepoint)."""
    return len(session.info.get(_PENDING, ()))


def audit_rewind(session: Session, mark: int) -> None:
    """A savepoint rolled back: its records are gone, so are their announcements and the cached head."""
    session.info.pop(_HEAD, None)
    pending = session.info.get(_PENDING)
    if pending is not None:
        del pending[mark:]


def lock_audit_head(session: Session) -> AuditHead:
    """The head row, locked FOR UPDATE in the caller's transaction; made first on a fresh store.

    Race-free for first writers: the genesis row goes in with ON CONFLICT DO NOTHING, so a second
    writer waits for the first one's row (PostgreSQL: on its uncommitted key) and then locks it,
    instead of failing on the primary key.
    """
    query = select(AuditHead).where(AuditHead.id == 1).with_for_update()
    head = session.execute(query).scalar_one_or_none()
    if head is not None:
        return head
    dialect = session.get_bind().dialect.name
    upsert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(upsert(AuditHead).values(id=1, seq=0, hash=GENESIS).on_conflict_do_nothing())
    return session.execute(query.execution_options(populate_existing=True)).scalar_one()


class AuditLog:
    def __init__(self, clock: Clock, observers: Sequence[AuditObserver] = ()) -> None:
        self._clock = clock
        self._observers = tuple(observers)  # told of each record once its transaction has committed

    def append(self, session: Session, actor: str, action: str, subject: str, **details: object) -> AuditRecord:
        """Append in the caller's transaction; the head row lock orders concurrent writers. The
        lock is taken once per transaction: a batch of appends (group commit) reads the head once,
        and the records are flushed with the caller's next statement or commit."""
        head = self._locked_head(session)
        record = self._next(session, head, actor, action, subject, details)
        session.add(record)
        return record

    def append_deferred(self, session: Session, actor: str, action: str, subject: str, **details: object) -> None:
        """As `append`, but the record is written with the transaction's other deferred rows, in one
        INSERT with them just before the commit (`defer_insert`): for bulk units of group commit."""
        head = self._locked_head(session)
        defer_insert(session, AuditRecord, self._fields(session, head, actor, action, subject, details))

    def append_many(
        self, session: Session, actor: str, entries: Sequence[tuple[str, str, Mapping[str, object]]]
    ) -> None:
        """(action, subject, details) records in order, one head lock and one INSERT for all of them.

        Each entry is still its own record in the chain; only the round trips are shared (bulk work).
        """
        if not entries:
            return
        head = self._locked_head(session)
        rows = [self._fields(session, head, actor, action, subject, details) for action, subject, details in entries]
        session.execute(insert(AuditRecord), rows)
        session.flush()

    @staticmethod
    def _locked_head(session: Session) -> AuditHead:
        """The head row, locked by this transaction's first append and kept for the rest of it."""
        head: AuditHead | None = session.info.get(_HEAD)
        if head is not None:
            return head
        head = lock_audit_head(session)
        session.info[_HEAD] = head
        return head

    def _next(
        self, session: Session, head: AuditHead, actor: str, action: str, subject: str, details: Mapping[str, object]
    ) -> AuditRecord:
        """The record after `head` (not yet added to the session); moves the head."""
        return AuditRecord(**self._fields(session, head, actor, action, subject, details))

    def _fields(
        self, session: Session, head: AuditHead, actor: str, action: str, subject: str, details: Mapping[str, object]
    ) -> dict[str, object]:
        """The columns of the record after `head`; moves the head."""
        for key in details:
            if any(word in key.lower() for word in _SECRET_WORDS) and not key.endswith("_id"):
                raise ValueError(f"audit detail {key!r} looks like a secret; audit records never hold secrets")
        seq = head.seq + 1
        at = self._clock.now()
        text = json.dumps(details, sort_keys=True, default=str, separators=(",", ":"))
        digest = record_hash(seq, at, actor, action, subject, text, head.hash)
        record = {
            "seq": seq,
            "at": at,
            "actor": actor,
            "action": action,
            "subject": subject,
            "details": text,
            "prev_hash": head.hash,
            "hash": digest,
        }
        head.seq = seq
        head.hash = digest
        if self._observers:
            session.info.setdefault(_PENDING, []).append((self._observers, action, details))
        return record


@dataclass(frozen=True)
class AuditReport:
    records: int
    problems: tuple[str, ...]
    checkpoints: int = 0  # signed checkpoints checked against the chain

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


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: dt.datetime
    actor: str
    action: str
    subject: str
    details: str  # canonical JSON

    def to_dict(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "details": json.loads(self.details),
        }


def search_records(
    session: Session,
    *,
    actor: str | None = None,
    subject: str | None = None,
    action: str | None = None,
    before_seq: int | None = None,
    limit: int = 50,
) -> list[AuditEntry]:
    """Newest first, keyset-paged on seq (`before_seq`); `action` matches a prefix (user. -> user.*)."""
    query = select(AuditRecord).order_by(AuditRecord.seq.desc()).limit(max(1, min(limit, 500)))
    if actor:
        query = query.where(AuditRecord.actor == actor)
    if subject:
        query = query.where(AuditRecord.subject == subject)
    if action:
        query = query.where(AuditRecord.action.startswith(action, autoescape=True))
    if before_seq is not None:
        query = query.where(AuditRecord.seq < before_seq)
    return [AuditEntry(r.seq, r.at, r.actor, r.action, r.subject, r.details) for r in session.execute(query).scalars()]


# --- signed checkpoints of the head, kept outside the database ----------------------------------------
class AuditCheckpoints:
    """Whoever can write the database can rewrite the chain and recompute every hash and the head.
    So the head (sequence number, hash, time) is signed with a key the database does not hold and
    appended, one JSON line each, to a file outside the store; `verify` then checks that the chain
    still passes through every checkpointed hash at its sequence number."""

    def __init__(
        self,
        db: Database,
        path: Path,
        public_key_path: Path,
        clock: Clock,
        signer: Callable[[], ec.EllipticCurvePrivateKey],
    ) -> None:
        self._db = db
        self.path = path
        self._public_key_path = public_key_path
        self._clock = clock
        self._signer = signer
        self._lock = threading.Lock()
        self._last: tuple[int, str] | None = None
        self.marker = public_key_path.with_name("checkpoints.written")

    def head(self) -> tuple[int, str]:
        with self._db.transaction() as session:
            row = session.get(AuditHead, 1)
            return (row.seq, row.hash) if row is not None else (0, GENESIS)

    def write(self, *, force: bool = False) -> Checkpoint | None:
        """Sign and append the current head; nothing when it has not moved since this process's last
        checkpoint (unless `force`)."""
        with self._lock:
            seq, digest = self.head()
            if not force and self._last == (seq, digest):
                return None
            key = self._signer()
            now = self._clock.now()
            line = sign_checkpoint(key, seq, digest, now)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._last = (seq, digest)
            self._write_marker(seq, now)
            return Checkpoint(seq, digest, now, key_id_of(key.public_key()))

    def _write_marker(self, seq: int, now: dt.datetime) -> None:
        marker = {"file": str(self.path.resolve()), "seq": seq, "at": now.isoformat()}
        write_atomically(self.marker, (json.dumps(marker) + "\n").encode())

    def _expected(self, path: Path) -> tuple[int, str] | str | None:
        """(seq, time) of the last checkpoint written to `path` by the marker; None when the marker
        names no checkpoint in `path`; a problem text when the marker cannot be read."""
        try:
            marker = json.loads(self.marker.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return f"the checkpoint marker {self.marker} is unreadable: checkpoints were written, cannot tell where"
        if not isinstance(marker, dict) or marker.get("file") != str(path.resolve()):
            return None
        try:
            return int(marker["seq"]), str(marker["at"])
        except (KeyError, TypeError, ValueError):
            return f"the checkpoint marker {self.marker} is unreadable: checkpoints were written, cannot tell where"

    def public_key(self) -> ec.EllipticCurvePublicKey:
        try:
            key = serialization.load_pem_public_key(self._public_key_path.read_bytes())
        except (OSError, ValueError):
            raise ConfigError(f"the audit checkpoint key {self._public_key_path} is missing or unreadable") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ConfigError(f"{self._public_key_path} is not an EC public key")
        return key

    def verify(self, session: Session, path: Path | None = None) -> tuple[int, list[str]]:
        """(checkpoints checked, problems): each line's signature, and that the chain in the store
        still has, at each checkpointed sequence number, the checkpointed hash.

        Beside the checkpoint key, a marker (`checkpoints.written`) names the file the last checkpoint
        went to and its sequence number: a checkpoints file that is then missing, empty, or ends before
        that record is a problem, not a silent pass. A data folder that never wrote a checkpoint (fresh
        from `init`, `serve` never run) has no marker, and verifies on the chain alone."""
        path = path or self.path
        expected = self._expected(path)
        if isinstance(expected, str):
            return 0, [expected]
        text = path.read_text() if path.exists() else ""
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not lines:
            if expected is None:
                return 0, []
            state = "missing" if not path.exists() else "empty"
            return 0, [
                f"the checkpoints file {path} is {state}, but checkpoints were written to it (the last one of "
                f"record {expected[0]} at {expected[1]}): restore it, or verify against a copy with --checkpoints"
            ]
        try:
            public = self.public_key()
        except ConfigError as exc:
            return 0, [f"checkpoints cannot be checked: {exc.detail}"]
        problems: list[str] = []
        checked: list[tuple[int, Checkpoint]] = []
        for number, line in lines:
            try:
                checked.append((number, verify_checkpoint(line, public)))
            except CheckpointInvalid as exc:
                problems.append(f"checkpoint line {number} of {path}: {exc}")
        wanted = sorted({cp.seq for _, cp in checked if cp.seq > 0})
        hashes: dict[int, str] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            rows = session.execute(select(AuditRecord.seq, AuditRecord.hash).where(AuditRecord.seq.in_(chunk)))
            hashes.update({int(seq): str(digest) for seq, digest in rows})
        newest = max((cp.seq for _, cp in checked), default=-1)
        if expected is not None and newest < expected[0]:
            problems.append(
                f"the checkpoints file {path} ends at record {max(newest, 0)}, but a checkpoint of record "
                f"{expected[0]} was written to it at {expected[1]} (checkpoints removed)"
            )
        for number, cp in checked:
            if cp.seq == 0:
                continue
            found = hashes.get(cp.seq)
            when = cp.at.strftime("%Y-%m-%d %H:%M:%S")
            if found is None:
                problems.append(
                    f"checkpoint line {number} ({when} UTC): the chain no longer has record {cp.seq} (records removed)"
                )
            elif found != cp.head:
                problems.append(
                    f"checkpoint line {number} ({when} UTC): record {cp.seq} no longer has the checkpointed hash "
                    "(the chain was rewritten)"
                )
        return len(checked), problems
