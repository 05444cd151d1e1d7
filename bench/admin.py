"""The console's user list at scale: one page of users (filters in SQL, server-side paging) beside
the CLI's `user list` path (every user loaded and judged in Python, then cut to a page), on the
same SQLite store of N enrolled users, in the same run.

    .venv/bin/python bench/admin.py [--quick] [--users 100000]

Rows are printed as `| figure | mailkms | peer | goal | met |` (bench/run.py collects them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._seed import seed_users  # noqa: E402
from mailkms.clock import UTC, FakeClock  # noqa: E402
from mailkms.config import load_settings  # noqa: E402
from mailkms.services import AuditLog, UserAdmin, UserState  # noqa: E402
from mailkms.store import Database  # noqa: E402

NOW = dt.datetime(2027, 6, 1, 12, 0, tzinfo=UTC)
GOAL_MS = 250.0


def _median_ms(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--users", type=int, default=100_000)
    args = parser.parse_args()
    count = 2_000 if args.quick else args.users
    rounds = 3 if args.quick else 5
    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings(Path(folder), server={"hostname": "localhost"})
        db = Database(f"sqlite:///{folder}/bench.db")
        db.migrate()
        # notBefore spread over two years: some ACTIVE, some DUE, some EXPIRED at NOW
        seed_users(db, count, lambda i: NOW - dt.timedelta(days=730 * i / count), dt.timedelta(days=548))
        clock = FakeClock(NOW)
        users = UserAdmin(db, settings, clock, AuditLog(clock))

        def peer(state: UserState | None, offset: int) -> list[object]:
            return list(users.list({state} if state else None)[offset : offset + 50])

        # The peer's cost is one full load whatever the filter: it is measured on the first two cases only.
        cases: list[tuple[str, Callable[[], object], Callable[[], object] | None]] = [
            ("first page, no filter", lambda: users.page(limit=50), lambda: peer(None, 0)),
            (
                "DUE, page 20",
                lambda: users.page(state=UserState.DUE, offset=950, limit=50),
                lambda: peer(UserState.DUE, 950),
            ),
            ("expiring within 30 days", lambda: users.page(due_within_days=30, limit=50), None),
            ("text search", lambda: users.page(query="user 4242", limit=50), None),
        ]
        for name, ours, theirs in cases:
            ms = _median_ms(ours, rounds)
            peer_ms = f"{_median_ms(theirs, 1):.0f}" if theirs is not None else "(as above)"
            met = "yes" if ms <= GOAL_MS else "no"
            print(
                f"| console user list at {count:,} users, {name} (median ms; peer: `user list` path, all users judged "
                f"in Python) | {ms:.0f} | {peer_ms} | <= {GOAL_MS:.0f} | {met} |"
            )
        db.dispose()


if __name__ == "__main__":
    main()
