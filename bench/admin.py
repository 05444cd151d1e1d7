"""The console's user list at scale: one page of users (filters in SQL, server-side paging, the
match count bounded at 10,000 as the console asks) beside the CLI's `user list` path (every user
loaded and judged in Python, then cut to a page), on the same store of N enrolled users, in the same
run; SQLite and PostgreSQL (a throw-away schema in the test database), with EXPLAIN of the page's
two queries (count, page) on PostgreSQL to show which indexes they use.

    .venv/bin/python bench/admin.py [--quick] [--users 100000] [--db sqlite|postgresql|both]

Rows are printed as `| figure | mailkms | peer | goal | met |` (bench/run.py collects them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import event

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._seed import seed_users  # noqa: E402
from bench.run import PGSchema, pg_available  # noqa: E402
from mailkms.api._console import COUNT_UP_TO  # noqa: E402
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


def _explain(db: Database, fn: Callable[[], object]) -> list[str]:
    """EXPLAIN (ANALYZE) of the two queries of `fn` over users (the count, then the page; not the
    per-user look-ups after), each cut to its plan nodes that name a scan, a limit or an aggregate."""
    seen: list[tuple[str, object]] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        text = statement.lower()
        if text.startswith("select count(*)") or "order by users.email" in text:
            seen.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        fn()
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    out = []
    with db.engine.connect() as conn:
        for what, (statement, parameters) in zip(("count", "page"), seen[:2], strict=True):
            plan = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, COSTS OFF) {statement}", parameters).scalars()  # type: ignore[arg-type]
            keep = [
                line.strip() for line in plan if any(k in line for k in ("Scan", "Limit", "Aggregate", "Execution"))
            ]
            out.append(f"{what}: " + " / ".join(keep))
    return out


def run(db: Database, store: str, count: int, rounds: int, skip_peer: bool = False) -> None:
    settings = load_settings(Path(tempfile.mkdtemp()), server={"hostname": "localhost"})
    db.migrate()
    started = time.perf_counter()
    # notBefore spread over two years: some ACTIVE, some DUE, some EXPIRED at NOW
    seed_users(db, count, lambda i: NOW - dt.timedelta(days=730 * i / count), dt.timedelta(days=548))
    if not db.is_sqlite:
        with db.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    print(f"- {store}: seeded {count:,} users in {time.perf_counter() - started:.1f} s (not timed)", file=sys.stderr)
    clock = FakeClock(NOW)
    users = UserAdmin(db, settings, clock, AuditLog(clock))

    def peer(state: UserState | None, offset: int) -> list[object]:
        return list(users.list({state} if state else None)[offset : offset + 50])

    def due(count_up_to: int | None) -> Callable[[], object]:
        return lambda: users.page(state=UserState.DUE, offset=950, limit=50, count_up_to=count_up_to)

    # The peer's cost is one full load whatever the filter: it is measured on the first two cases only.
    cases: list[tuple[str, Callable[[], object], Callable[[], object] | None]] = [
        ("first page, no filter", lambda: users.page(limit=50, count_up_to=COUNT_UP_TO), lambda: peer(None, 0)),
        ("DUE, page 20", due(COUNT_UP_TO), lambda: peer(UserState.DUE, 950)),
        ("DUE, page 20, exact count (the admin API)", due(None), None),
        ("expiring within 30 days", lambda: users.page(due_within_days=30, limit=50, count_up_to=COUNT_UP_TO), None),
        ("text search", lambda: users.page(query="user 4242", limit=50, count_up_to=COUNT_UP_TO), None),
    ]
    for name, ours, theirs in cases:
        ms = _median_ms(ours, rounds)
        peer_ms = "(not run)" if skip_peer and theirs else "(as above)"
        if theirs is not None and not skip_peer:
            peer_ms = f"{_median_ms(theirs, 1):.0f}"
        met = "yes" if ms <= GOAL_MS else "no"
        print(
            f"| console user list at {count:,} users, {store}, {name} (median ms; peer: `user list` path, all users "
            f"judged in Python) | {ms:.0f} | {peer_ms} | <= {GOAL_MS:.0f} | {met} |"
        )
    shown = users.page(state=UserState.DUE, offset=950, limit=50, count_up_to=COUNT_UP_TO)
    print(f"- {store}: DUE page 20 says {'' if shown.exact else 'more than '}{shown.total:,} users", file=sys.stderr)
    if not db.is_sqlite:
        for line in _explain(db, due(COUNT_UP_TO)):
            print(f"- {store} EXPLAIN DUE page 20 {line}", file=sys.stderr)
    print(f"- load average after {store}: {os.getloadavg()[0]:.2f}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--skip-peer", action="store_true", help="do not time the `user list` path (minutes)")
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args()
    count = 2_000 if args.quick else args.users
    rounds = 3 if args.quick else 5
    print(f"- load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    if args.db in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as folder:
            db = Database(f"sqlite:///{folder}/bench.db")
            run(db, "SQLite", count, rounds, args.skip_peer)
            db.dispose()
    if args.db in ("postgresql", "both"):
        if not pg_available():
            print("- PostgreSQL not reachable: its rows are skipped", file=sys.stderr)
            return
        schema = PGSchema()
        try:
            db = Database(schema.url)
            run(db, "PostgreSQL", count, rounds, args.skip_peer)
            db.dispose()
        finally:
            schema.drop()


if __name__ == "__main__":
    main()
