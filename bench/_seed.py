"""Bulk seeding of users with a current signing certificate row (for sweeps; no real keys needed)."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable

from sqlalchemy import insert, select

from mailkms.store import Certificate, Database, User


def seed_users(
    db: Database,
    count: int,
    not_before: Callable[[int], dt.datetime],
    lifetime: dt.timedelta,
    *,
    prefix: str = "user",
    chunk: int = 5000,
    created: dt.datetime | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """`count` enrolled users, user i with a signing certificate valid from not_before(i)."""
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        with db.transaction() as session:
            session.execute(
                insert(User),
                [
                    {
                        "email": f"{prefix}{i}@example.org",
                        "display_name": f"User {i}",
                        "group": None,
                        "status": "enrolled",
                        "generation": 1,
                        "created_at": created or not_before(i),
                    }
                    for i in range(start, stop)
                ],
            )
            ids = dict(
                session.execute(
                    select(User.email, User.id).where(
                        User.email.in_([f"{prefix}{i}@example.org" for i in range(start, stop)])
                    )
                ).all()
            )
            session.execute(
                insert(Certificate),
                [
                    {
                        "serial": format(secrets.randbits(127) | 1 << 126, "x"),  # as serial_hex stores them
                        "user_id": ids[f"{prefix}{i}@example.org"],
                        "kind": "signing",
                        "generation": 1,
                        "not_before": not_before(i),
                        "not_after": not_before(i) + lifetime - dt.timedelta(seconds=1),
                        "der": b"",
                    }
                    for i in range(start, stop)
                ],
            )
        if progress:
            progress(stop)
