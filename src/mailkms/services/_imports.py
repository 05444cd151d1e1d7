"""Bulk user import: the CSV format (shared by `mailkms user import` and the console) and imports
that run in the background of the server with progress an administrator can watch.

The batches go through `UserAdmin.add_many`, the service the CLI uses (one transaction and one
audit-head lock per batch). The one-time tokens are kept only in this process's memory, never
written to the store or a file, until the administrator who started the import downloads them,
once; then they are wiped. A server restart loses an unfinished import's progress page and its
undownloaded tokens (the users stay registered: `mailkms user reenroll` gives them new ones).
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from mailkms.clock import Clock
from mailkms.errors import Conflict, MailkmsError, Malformed, NotFound
from mailkms.services._users import UserAdmin, normalise_mailbox

log = logging.getLogger("mailkms.imports")
Row = tuple[str, str, str | None]
IMPORT_BATCH = 500  # users per transaction
MAX_ROWS = 200_000  # one upload; larger imports: `mailkms user import`
KEEP_JOBS = 20  # finished imports kept (their pages), per process


def parse_users_csv(lines: Iterable[str], source: str = "CSV", limit: int | None = None) -> list[Row]:
    """email,name[,group] per line; a header line starting with 'email' is skipped; '#' lines are
    comments. More than `limit` users is refused (an upload to the console)."""
    rows: list[Row] = []
    for n, row in enumerate(csv.reader(lines), start=1):
        cells = [c.strip() for c in row]
        if not cells or not cells[0] or cells[0].startswith("#"):
            continue
        if n == 1 and cells[0].lower().lstrip("\ufeff") == "email":
            continue
        if len(cells) > 3:
            raise Malformed(f"{source}:{n}: expected email,name[,group], found {len(cells)} columns")
        name = cells[1] if len(cells) > 1 else ""
        group = cells[2] if len(cells) > 2 and cells[2] else None
        rows.append((cells[0], name, group))
        if limit is not None and len(rows) > limit:
            raise Malformed(f"{source}: more than {limit:,} users in one file; split it or use `mailkms user import`")
    return rows


def normalised_or_same(email: str) -> str:
    try:
        return normalise_mailbox(email)
    except MailkmsError:
        return email


def names_by_mailbox(rows: Sequence[Row]) -> dict[str, str]:
    """Each mailbox's display name in a batch: the first row's, as the first row is the one registered."""
    names: dict[str, str] = {}
    for email, name, _ in rows:
        names.setdefault(normalised_or_same(email), name)
    return names


@dataclass(frozen=True)
class Refused:
    email: str
    code: str
    detail: str


@dataclass(frozen=True)
class Issued:
    email: str
    name: str
    token: str
    expires_at: dt.datetime


@dataclass
class ImportJob:
    """One import's progress. `tokens` is emptied when they are downloaded (`taken`)."""

    id: str
    actor: str
    total: int
    started_at: dt.datetime
    done: int = 0
    added: int = 0
    refused: list[Refused] = field(default_factory=list)
    tokens: list[Issued] = field(default_factory=list)
    taken: bool = False
    finished_at: dt.datetime | None = None
    failure: str | None = None  # the batch that stopped the import, and why (users before it are in)

    @property
    def percent(self) -> int:
        # 100 % only once the job is finished: the last batch's rows are counted before the job ends,
        # and a page at "100 %" that still reloads itself would tell two different stories
        done = 100 if self.total == 0 else self.done * 100 // self.total
        return min(done, 99) if self.running else done

    @property
    def running(self) -> bool:
        return self.finished_at is None

    def snapshot(self) -> ImportJob:
        """A copy that the import thread no longer changes: a page rendered from the live job could
        read "running" (and so reload itself) and then "100 %" once the thread finished in between."""
        return replace(self, refused=list(self.refused), tokens=[])


class UserImports:
    """Imports run on a thread of their own, one batch per transaction; `on_added` sees each batch's
    new users (the console mails their tokens when asked)."""

    def __init__(self, users: UserAdmin, clock: Clock, ttl_days: int) -> None:
        self._users = users
        self._clock = clock
        self._ttl = dt.timedelta(days=ttl_days)
        self._jobs: dict[str, ImportJob] = {}
        self._lock = threading.Lock()

    def start(
        self, rows: Sequence[Row], actor: str, on_added: Callable[[Sequence[Issued]], None] | None = None
    ) -> ImportJob:
        job = ImportJob(secrets.token_urlsafe(12), actor, len(rows), self._clock.now())
        with self._lock:
            finished = [j for j in self._jobs.values() if not j.running]
            for old in finished[: max(0, len(finished) - KEEP_JOBS + 1)]:
                del self._jobs[old.id]
            self._jobs[job.id] = job
        thread = threading.Thread(target=self._run, args=(job, list(rows), on_added), name=f"import-{job.id}")
        thread.daemon = True
        thread.start()
        return job

    def run(
        self, rows: Sequence[Row], actor: str, on_added: Callable[[Sequence[Issued]], None] | None = None
    ) -> ImportJob:
        """The same import, in the caller's thread (tests, small files)."""
        job = ImportJob(secrets.token_urlsafe(12), actor, len(rows), self._clock.now())
        with self._lock:
            self._jobs[job.id] = job
        self._run(job, list(rows), on_added)
        return job

    def _run(self, job: ImportJob, rows: list[Row], on_added: Callable[[Sequence[Issued]], None] | None) -> None:
        try:
            for start in range(0, len(rows), IMPORT_BATCH):
                batch = rows[start : start + IMPORT_BATCH]
                names = names_by_mailbox(batch)
                expires = self._clock.now() + self._ttl
                issued: list[Issued] = []
                refused: list[Refused] = []
                for email, outcome in self._users.add_many(batch, job.actor):
                    if isinstance(outcome, MailkmsError):
                        refused.append(Refused(email, outcome.code, outcome.detail))
                    else:
                        issued.append(Issued(email, names.get(email, ""), outcome, expires))
                # the batch's users are stored: their tokens go to the job before anything else can
                # fail (a token mail that fails must not leave users whose tokens nobody can see)
                with self._lock:
                    job.tokens.extend(issued)
                    job.refused.extend(refused)
                    job.added += len(issued)
                    job.done = start + len(batch)
                if on_added is not None and issued:
                    on_added(issued)
        except MailkmsError as exc:
            job.failure = f"stopped after {job.done:,} of {job.total:,} rows: {exc.detail}"
        except Exception as exc:
            log.error("user import %s stopped", job.id, exc_info=exc)
            job.failure = f"stopped after {job.done:,} of {job.total:,} rows: internal error (see the server log)"
        finally:
            job.finished_at = self._clock.now()

    def get(self, job_id: str, actor: str) -> ImportJob:
        """An import, to the administrator who started it only (its tokens are theirs to hand out)."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or not secrets.compare_digest(job.actor, actor):
            raise NotFound("no such import here (imports are kept in the server process that ran them)")
        return job

    def take_tokens(self, job_id: str, actor: str) -> list[Issued]:
        """The tokens, once: a second download gets nothing (they are wiped from memory)."""
        job = self.get(job_id, actor)
        with self._lock:
            if job.running:
                raise Malformed("the import is still running; the tokens can be downloaded when it is done")
            if job.taken:
                raise Conflict("these tokens were already downloaded; they are shown once")
            tokens, job.tokens, job.taken = job.tokens, [], True
        return tokens
