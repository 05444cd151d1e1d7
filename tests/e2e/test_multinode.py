"""Two real `mailkms serve` processes on one PostgreSQL share the outbox: each mail goes out once."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailkms.clock import SystemClock
from mailkms.services import AuditLog, queue_message
from mailkms.store import Database, OutboxMessage
from tests.e2e._nodes import RecordingSink, make_data_dir, run_mailkms, start_node, wait_for

# The store fixture on PostgreSQL only: a migrated, emptied schema of the session.
pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)]


def _queue(url: str, count: int, tag: str) -> set[str]:
    """Queue `count` small mails in one transaction, as the services do (outbox row + audit record)."""
    db = Database(url)
    db.migrate()
    audit = AuditLog(SystemClock())
    ids = set()
    with db.transaction() as session:
        now = SystemClock().now()
        for i in range(count):
            message_id = f"<{tag}-{i}@kms.example.org>"
            rcpt = f"user{i % 25}@example.org"
            body = (
                f"From: mailkms@kms.example.org\r\nTo: {rcpt}\r\nSubject: test {i}\r\n"
                f"Message-ID: {message_id}\r\n\r\nmail number {i}\r\n"
            ).encode()
            queue_message(
                session,
                audit,
                now,
                message_id=message_id,
                sender="mailkms@kms.example.org",
                recipient=rcpt,
                body=body,
                purpose="test",
            )
            ids.add(message_id)
    db.dispose()
    return ids


def _rows(url: str) -> list[OutboxMessage]:
    db = Database(url)
    try:
        with db.transaction() as session:
            return list(session.execute(select(OutboxMessage)).scalars())
    finally:
        db.dispose()


def _unsent(url: str) -> int:
    db = Database(url)
    try:
        with db.transaction() as session:
            return int(session.execute(select(func.count()).where(OutboxMessage.sent_at.is_(None))).scalar_one())
    finally:
        db.dispose()


def _env(tmp_path: Path, url: str, sink: RecordingSink) -> dict[str, str]:
    env = make_data_dir(tmp_path / "data")
    env.update(
        MAILKMS_DATABASE_URL=url,
        MAILKMS_SMTP__MODE="relay",
        MAILKMS_SMTP__RELAY_HOST="127.0.0.1",
        MAILKMS_SMTP__RELAY_PORT=str(sink.port),
        MAILKMS_SMTP__STARTTLS="false",
        MAILKMS_POOL__SIZE="0",
        MAILKMS_REMINDERS__ENABLED="false",
    )
    return env


def _audit_ok(env: dict[str, str]) -> dict[str, object]:
    done = run_mailkms(["audit", "verify", "--json"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    return report


def test_500_mails_exactly_once_between_two_nodes(tmp_path: Path, db_url: str) -> None:
    with RecordingSink(tmp_path / "maildirs", delay=0.002) as sink:
        env = _env(tmp_path, db_url, sink)
        nodes = [
            start_node(env, tmp_path / f"node{i}.log", OUTBOX__BATCH_SIZE="20", OUTBOX__POLL_SECONDS="0.2")
            for i in range(2)
        ]
        try:
            expected = _queue(db_url, 500, "burst")
            wait_for(lambda: _unsent(db_url) == 0, 180, "all 500 mails sent")
        finally:
            for node in nodes:
                node.stop()
        per_message = sink.per_message()
        # At the SMTP level: every message handed over exactly once (no de-duplication helps here).
        assert set(per_message) == expected
        assert max(per_message.values()) == 1
        assert sink.count == 500
        # In the Maildirs: 500 files; in the store: every row marked sent once.
        assert len(sink.maildir_files()) == 500
        rows = _rows(db_url)
        assert len(rows) == 500 and all(r.sent_at is not None and r.attempts == 1 for r in rows)
        # Both nodes did part of the work.
        senders = {r.claimed_by.split(":")[1] for r in rows if r.claimed_by}
        assert senders == {str(n.pid) for n in nodes}
        report = _audit_ok(env)
        assert report["ok"] is True and int(str(report["records"])) >= 1000  # queued + sent, two writers


def test_node_killed_mid_batch_the_other_finishes(tmp_path: Path, db_url: str) -> None:
    with RecordingSink(tmp_path / "maildirs", delay=0.02) as sink:
        env = _env(tmp_path, db_url, sink)
        lease = {"OUTBOX__LEASE_SECONDS": "3", "OUTBOX__BATCH_SIZE": "40", "OUTBOX__POLL_SECONDS": "0.2"}
        victim = start_node(env, tmp_path / "victim.log", **lease)
        expected = _queue(db_url, 300, "kill")
        survivor = None
        try:
            # Let the victim work alone until it is in the middle of a batch, then kill it without warning.
            def victim_mid_batch() -> bool:
                mine = [r for r in _rows(db_url) if r.claimed_by and r.claimed_by.split(":")[1] == str(victim.pid)]
                return any(r.sent_at for r in mine) and any(r.sent_at is None and r.claimed_until for r in mine)

            wait_for(victim_mid_batch, 60, "the victim node to be mid-batch", every=0.05)
            os.kill(victim.pid, signal.SIGKILL)
            victim.proc.wait(10)
            stranded = {
                r.message_id
                for r in _rows(db_url)
                if r.sent_at is None and r.claimed_by and r.claimed_by.split(":")[1] == str(victim.pid)
            }
            assert stranded, "the victim held no claimed rows when it was killed"
            survivor = start_node(env, tmp_path / "survivor.log", **lease)
            wait_for(lambda: _unsent(db_url) == 0, 180, "the survivor to finish")
        finally:
            victim.stop()
            if survivor is not None:
                survivor.stop()
        rows = {r.message_id: r for r in _rows(db_url)}
        assert all(r.sent_at is not None for r in rows.values())
        # The rows the dead node had claimed were taken over once its lease ran out.
        assert all(rows[m].claimed_by.split(":")[1] == str(survivor.pid) for m in stranded)
        per_message = sink.per_message()
        assert set(per_message) == expected
        # At most the one message on the wire when the node died may have gone out twice (sent, not yet
        # marked); the Maildir files it once, by Message-ID.
        twice = [m for m, n in per_message.items() if n > 1]
        assert len(twice) <= 1 and max(per_message.values()) <= 2
        assert len(sink.maildir_files()) == 300
        assert _audit_ok(env)["ok"] is True
