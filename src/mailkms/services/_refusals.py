"""Where refusals go: per event into the audit chain when the actor proved who they are, as
counts when they did not.

An anonymous caller (a bad token, a junk signed request, a made-up nonce) could otherwise
write one audit record per request, and audit records are never pruned. Anonymous refusals
are counted in memory by (action, code, subject) and written by `flush` (at every period of
`limits.refusal_flush_seconds` and at stop) as one `refusals.counted` record per key with its
count. The keys are a closed set (actions x codes; the subject is a known mailbox or "-"), so
the chain grows by a bounded number of records per period whatever the load. The counter
`mailkms_refusals_total{action,reason}` counts both kinds at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import Counter

from mailkms import metrics
from mailkms.clock import Clock
from mailkms.errors import MailkmsError
from mailkms.services._audit import AuditLog
from mailkms.store import Database

log = logging.getLogger("mailkms.refusals")

ANONYMOUS = "anonymous"
COUNTED = "refusals.counted"
Key = tuple[str, str, str]  # action, code, subject


_RECORDED = "_mailkms_refusal_recorded"


def is_recorded(exc: BaseException) -> bool:
    """Whether a service already counted or audited this refusal (so the HTTP layer does not again)."""
    return bool(getattr(exc, _RECORDED, False))


class Refusals:
    def __init__(self, db: Database, audit: AuditLog, clock: Clock) -> None:
        self._db = db
        self._audit = audit
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: Counter[Key] = Counter()
        self._since: dt.datetime | None = None

    def identified(self, actor: str, action: str, subject: str, exc: MailkmsError, **details: object) -> None:
        """A refusal of a caller who proved who they are: one audit record now (the metric
        follows its commit through the audit observer)."""
        setattr(exc, _RECORDED, True)
        with self._db.transaction() as session:
            self._audit.append(session, actor, action, subject, reason=exc.code, **details)

    def anonymous(self, action: str, exc: MailkmsError, subject: str = "-") -> None:
        """A refusal of a caller who proved nothing: counted; audited later as a count.
        `subject` is a mailbox only when it is known to exist (e.g. a spent token of it)."""
        setattr(exc, _RECORDED, True)
        metrics.REFUSALS.labels(action=action.removesuffix(".refused"), reason=exc.code).inc()
        with self._lock:
            if self._since is None:
                self._since = self._clock.now()
            self._counts[(action, exc.code, subject)] += 1

    def pending(self) -> dict[Key, int]:
        with self._lock:
            return dict(self._counts)

    def flush(self) -> int:
        """Write one `refusals.counted` record per (action, code, subject) seen since the last
        flush; returns how many records it wrote."""
        with self._lock:
            counts, since = self._counts, self._since
            self._counts, self._since = Counter(), None
        if not counts:
            return 0
        until = self._clock.now()
        try:
            with self._db.transaction() as session:
                for (action, code, subject), count in sorted(counts.items()):
                    self._audit.append(
                        session,
                        ANONYMOUS,
                        COUNTED,
                        subject,
                        refused=action,
                        reason=code,
                        count=count,
                        since=since,
                        until=until,
                    )
        except Exception:
            with self._lock:  # keep them for the next flush
                self._counts.update(counts)
                self._since = min(self._since or until, since or until)
            raise
        return len(counts)


__all__ = ["ANONYMOUS", "COUNTED", "Refusals", "is_recorded"]
