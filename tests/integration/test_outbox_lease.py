"""Outbox leases on a real store (SQLite and PostgreSQL): a dead worker's rows come back after the lease."""

from __future__ import annotations

import datetime as dt

from mailkms.mail import OutboxWorker
from mailkms.services import queue_message
from mailkms.store import OutboxMessage


class Recorder:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, sender: str, recipient: str, body: bytes) -> None:
        self.sent.append(body)


def _queue(services, n: int) -> None:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        for i in range(n):
            queue_message(
                session,
                services.audit,
                services.clock.now(),
                message_id=f"<m{i}@x>",
                sender="a@x",
                recipient="b@example.org",
                body=f"Message-ID: <m{i}@x>\r\n\r\nhi".encode(),
                purpose="test",
            )


def test_lease_expiry_hands_rows_to_another_worker(services, clock) -> None:  # type: ignore[no-untyped-def]
    _queue(services, 5)
    lease = dt.timedelta(seconds=30)
    dead = OutboxWorker(services.db, Recorder(), clock, services.audit, worker_id="dead", lease=lease)
    alive_sender = Recorder()
    alive = OutboxWorker(services.db, alive_sender, clock, services.audit, worker_id="alive", lease=lease)
    assert len(dead._claim(3)) == 3  # claimed, then the process "dies" before sending
    assert alive.run_once(10) == 2  # only the unclaimed rows
    clock.advance(lease - dt.timedelta(seconds=1))
    assert alive.run_once(10) == 0  # the lease still holds
    clock.advance(dt.timedelta(seconds=2))
    assert alive.run_once(10) == 3
    assert len(alive_sender.sent) == 5
    # The dead worker wakes up late: its lease is gone, so it sends nothing again.
    late = Recorder()
    dead._sender = late
    assert dead.run_once(10) == 0 and late.sent == []
    with services.db.transaction() as session:
        rows = session.query(OutboxMessage).all()
        assert all(r.sent_at is not None and r.claimed_by == "alive" for r in rows)
    assert services.verify_audit().ok


def test_a_stale_claim_is_not_sent(services, clock) -> None:  # type: ignore[no-untyped-def]
    """A worker whose lease ran out between claiming and sending leaves the row to the new owner."""
    _queue(services, 1)
    lease = dt.timedelta(seconds=10)
    slow_sender = Recorder()
    slow = OutboxWorker(services.db, slow_sender, clock, services.audit, worker_id="slow", lease=lease)
    ids = slow._claim(1)
    clock.advance(lease + dt.timedelta(seconds=1))
    other = OutboxWorker(services.db, Recorder(), clock, services.audit, worker_id="other", lease=lease)
    assert other._claim(1) == ids
    assert slow._renew_lease(ids[0]) is False
