"""Group commit: units of work from many callers stored by one writer, a batch per transaction.

A caller hands `GroupCommit.run` a function of a session and blocks. One writer thread per
process takes whatever units are waiting (up to `batch_size`, lingering `max_wait` for more),
runs each inside a SAVEPOINT of one transaction, commits, and only then answers every caller of
the batch: with the unit's result, or with the exception the unit raised (its savepoint rolled
back, the rest of the batch unharmed). If the commit itself fails, every caller of the batch gets
that error: nobody is ever answered for work that is not durable. So a caller sees exactly what it
saw with a transaction of its own, only sooner under load: one transaction, one audit-head lock
and one commit for the whole batch instead of one per unit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar, cast

from sqlalchemy.orm import Session

from mailkms.services._audit import audit_mark, audit_rewind
from mailkms.services._bulk import discard_deferred, flush_deferred
from mailkms.store import Database

log = logging.getLogger("mailkms.batching")
T = TypeVar("T")
Item = TypeVar("Item")
_STOP = object()


class Batcher(Generic[Item]):
    """One daemon thread drains a queue into batches and hands each to `handler`, which must
    settle every future of the batch (at once or later). Started on the first submit."""

    def __init__(
        self,
        name: str,
        handler: Callable[[list[tuple[Item, Future[Any]]]], None],
        batch_size: int,
        max_wait: float,
    ) -> None:
        self._name = name
        self._handler = handler
        self._batch_size = batch_size
        self._max_wait = max_wait
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.batches = 0  # handed to the handler so far (for tests and metrics)
        self.items = 0

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def submit(self, item: Item) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put((item, future))
        return future

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [cast("tuple[Item, Future[Any]]", first)]
            deadline = time.monotonic() + self._max_wait
            stop = False
            while len(batch) < self._batch_size:
                try:
                    left = deadline - time.monotonic()
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(cast("tuple[Item, Future[Any]]", nxt))
            self.batches += 1
            self.items += len(batch)
            try:
                self._handler(batch)
            except BaseException as exc:  # noqa: BLE001 -- the handler failed as a whole: every caller hears it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            if stop:
                return

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(30)


Work = tuple[Callable[[Session], Any], bool]  # (work, isolated)


class _Abort(Exception):
    """A unit without a savepoint of its own failed: the batch is undone and its units run alone."""


class GroupCommit:
    """`run(work)`: `work(session)` inside this process's next batch; returns its result once the
    batch is committed. batch_size 1 runs each unit in a transaction of its own, on the caller's thread.

    `isolated` (the default) gives the unit a SAVEPOINT, so its refusal (an exception) undoes only
    its own writes. A unit that only inserts what cannot clash (a certificate under a fresh random
    serial, its audit record) may go without (`isolated=False`: two statements fewer per unit); if
    it raises after all, or the commit fails, the batch is rolled back and every unit of it is run
    again in a transaction of its own, so each caller still gets its own answer."""

    def __init__(self, db: Database, batch_size: int, max_wait: float = 0.0) -> None:
        self._db = db
        self.batch_size = batch_size
        self._batcher: Batcher[Work] = Batcher("mailkms-group-commit", self._commit, batch_size, max_wait)
        self.retried_batches = 0

    @property
    def batches(self) -> int:
        return self._batcher.batches

    @property
    def units(self) -> int:
        return self._batcher.items

    def run(self, work: Callable[[Session], T], *, isolated: bool = True) -> T:
        if not self.batches_units:
            with self._db.transaction() as session:
                return work(session)
        return self.submit(work, isolated=isolated).result()

    @property
    def batches_units(self) -> bool:
        """Whether `submit` may be used here: batches of more than one, and not on the writer itself."""
        return self.batch_size > 1 and threading.current_thread() is not self._batcher.thread

    def submit(self, work: Callable[[Session], T], *, isolated: bool = True) -> Future[T]:
        """As `run`, without waiting: the future settles once the unit's batch is committed (or refused)."""
        return self._batcher.submit((work, isolated))

    def _commit(self, batch: list[tuple[Work, Future[Any]]]) -> None:
        try:
            outcomes = self._together(batch)
        except Exception:
            if len(batch) == 1:
                raise  # the Batcher hands it to the caller
            self.retried_batches += 1
            log.warning("a batch of %d failed as a whole; its units are committed one by one", len(batch))
            outcomes = [self._alone(work, future) for work, future in batch]
        # Committed: now, and only now, the callers are answered.
        for future, ok, value in outcomes:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _together(self, batch: list[tuple[Work, Future[Any]]]) -> list[tuple[Future[Any], bool, Any]]:
        outcomes: list[tuple[Future[Any], bool, Any]] = []
        with self._db.transaction() as session:
            for (work, isolated), future in batch:
                if not isolated:
                    try:
                        outcomes.append((future, True, work(session)))
                    except Exception as exc:
                        raise _Abort() from exc
                    continue
                flush_deferred(session)  # earlier units' bulk rows stay out of this unit's savepoint
                mark = audit_mark(session)
                try:
                    with session.begin_nested():
                        value = work(session)
                except Exception as exc:  # noqa: BLE001 -- this unit only: its savepoint is rolled back
                    audit_rewind(session, mark)
                    # Deferred rows waiting now are this unit's only (earlier units' were flushed
                    # above): they go with its savepoint.
                    discard_deferred(session)
                    outcomes.append((future, False, exc))
                else:
                    outcomes.append((future, True, value))
        return outcomes

    def _alone(self, unit: Work, future: Future[Any]) -> tuple[Future[Any], bool, Any]:
        work, _ = unit
        try:
            with self._db.transaction() as session:
                value = work(session)
        except Exception as exc:  # noqa: BLE001 -- handed to the caller, as its own transaction would
            return future, False, exc
        return future, True, value

    def close(self) -> None:
        self._batcher.close()
