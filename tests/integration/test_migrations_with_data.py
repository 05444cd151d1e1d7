"""A database that holds data at the first revision is upgraded one Alembic revision at a time to head.

After every step the rows written at 0001 must still be there (counts and a few values), and at head
the ORM must read them. Run on SQLite and, through a schema of its own, on PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import select

from mailkms.clock import UTC
from mailkms.store import (
    ArchivedKey,
    AuditHead,
    AuditRecord,
    Certificate,
    Database,
    IssuanceRequest,
    OutboxMessage,
    Token,
    User,
)
from mailkms.store._db import alembic_config
from tests.conftest import pg_schema

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
HOUR = dt.timedelta(hours=1)

# Rows as the code at revision 0001 wrote them: two users (one revoked), their certificates, tokens,
# an archived key, an issuance request that points at an outbox message, a short audit chain.
ROWS: dict[str, list[dict[str, object]]] = {
    "users": [
        {
            "id": 1,
            "email": "alice@example.org",
            "display_name": "Alice Liddell",
            "user_group": "staff",
            "status": "enrolled",
            "generation": 1,
            "created_at": T0,
            "revoked_at": None,
        },
        {
            "id": 2,
            "email": "bob@example.org",
            "display_name": "Bob",
            "user_group": None,
            "status": "revoked",
            "generation": 1,
            "created_at": T0,
            "revoked_at": T0 + 5 * HOUR,
        },
    ],
    "outbox": [
        {
            "id": 1,
            "message_id": "<r1@kms.example.org>",
            "sender": "mailkms@kms.example.org",
            "recipient": "alice@example.org",
            "body": b"From: mailkms\r\n\r\nhello\r\n",
            "purpose": "delivery",
            "created_at": T0,
            "next_attempt_at": T0,
            "attempts": 1,
            "claimed_by": None,
            "claimed_until": None,
            "sent_at": T0 + HOUR,
            "last_error": None,
        },
        {
            "id": 2,
            "message_id": "<r2@kms.example.org>",
            "sender": "mailkms@kms.example.org",
            "recipient": "bob@example.org",
            "body": b"pending",
            "purpose": "delivery",
            "created_at": T0,
            "next_attempt_at": T0 + 2 * HOUR,
            "attempts": 3,
            "claimed_by": None,
            "claimed_until": None,
            "sent_at": None,
            "last_error": "421 try again later",
        },
    ],
    "certificates": [
        {
            "id": 1,
            "serial": "0a1b2c",
            "user_id": 1,
            "kind": "signing",
            "generation": 1,
            "not_before": T0,
            "not_after": T0 + 365 * 24 * HOUR,
            "der": b"\x30\x82sig",
            "revoked_at": None,
            "revocation_reason": None,
        },
        {
            "id": 2,
            "serial": "0a1b2d",
            "user_id": 1,
            "kind": "encryption",
            "generation": 1,
            "not_before": T0,
            "not_after": T0 + 365 * 24 * HOUR,
            "der": b"\x30\x82enc",
            "revoked_at": None,
            "revocation_reason": None,
        },
        {
            "id": 3,
            "serial": "0b0001",
            "user_id": 2,
            "kind": "signing",
            "generation": 1,
            "not_before": T0,
            "not_after": T0 + 365 * 24 * HOUR,
            "der": b"\x30\x82bob",
            "revoked_at": T0 + 5 * HOUR,
            "revocation_reason": "keyCompromise",
        },
        {
            "id": 4,
            "serial": "5e4ee4",
            "user_id": None,
            "kind": "tls",
            "generation": 0,
            "not_before": T0,
            "not_after": T0 + 90 * 24 * HOUR,
            "der": b"\x30\x82tls",
            "revoked_at": None,
            "revocation_reason": None,
        },
    ],
    "archived_keys": [
        {
            "id": 1,
            "user_id": 1,
            "certificate_serial": "0a1b2d",
            "envelope": b"cms-envelope",
            "archive_key_id": "ab" * 32,
            "created_at": T0,
        },
    ],
    "issuance_requests": [
        {"id": "req-0001", "user_id": 1, "kind": "enrolment", "generation": 1, "created_at": T0, "outbox_id": 1},
    ],
    "tokens": [
        {
            "id": 1,
            "user_id": 1,
            "token_hash": "11" * 32,
            "purpose": "enrolment",
            "created_at": T0,
            "expires_at": T0 + 72 * HOUR,
            "used_at": T0 + HOUR,
            "revoked_at": None,
        },
        {
            "id": 2,
            "user_id": 2,
            "token_hash": "22" * 32,
            "purpose": "enrolment",
            "created_at": T0,
            "expires_at": T0 + 72 * HOUR,
            "used_at": None,
            "revoked_at": T0 + 5 * HOUR,
        },
    ],
    "audit_log": [
        {
            "seq": 1,
            "at": T0,
            "actor": "admin",
            "action": "user.add",
            "subject": "alice@example.org",
            "details": "{}",
            "prev_hash": "0" * 64,
            "hash": "a1" * 32,
        },
        {
            "seq": 2,
            "at": T0 + HOUR,
            "actor": "alice@example.org",
            "action": "enrol",
            "subject": "alice@example.org",
            "details": '{"generation": 1}',
            "prev_hash": "a1" * 32,
            "hash": "a2" * 32,
        },
        {
            "seq": 3,
            "at": T0 + 5 * HOUR,
            "actor": "admin",
            "action": "user.revoke",
            "subject": "bob@example.org",
            "details": '{"reason": "keyCompromise"}',
            "prev_hash": "a2" * 32,
            "hash": "a3" * 32,
        },
    ],
    "audit_head": [{"id": 1, "seq": 3, "hash": "a3" * 32}],
    # Nonces are short-lived; 0009 drops the row-nonces of the old scheme on purpose.
    "nonces": [{"value": "ff" * 32, "created_at": T0, "expires_at": T0 + HOUR, "used_at": None}],
}
DROPPED_BY = {"nonces": "0009"}  # table -> revision that deliberately empties it


def _revisions(cfg: object) -> list[str]:
    script = ScriptDirectory.from_config(cfg)  # type: ignore[arg-type]
    return [s.revision for s in reversed(list(script.walk_revisions("base", "heads")))]


def _check_rows(conn: sa.Connection, rev: str, order: list[str]) -> None:
    for table, rows in ROWS.items():
        count = conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
        gone = table in DROPPED_BY and order.index(rev) >= order.index(DROPPED_BY[table])
        assert count == (0 if gone else len(rows)), f"{table} after {rev}"
    assert conn.execute(sa.text("SELECT email FROM users ORDER BY id")).scalars().all() == [
        "alice@example.org",
        "bob@example.org",
    ], rev
    assert conn.execute(sa.text("SELECT revocation_reason FROM certificates WHERE serial = '0b0001'")).scalar_one() == (
        "keyCompromise"
    ), rev
    assert bytes(conn.execute(sa.text("SELECT der FROM certificates WHERE id = 2")).scalar_one()) == b"\x30\x82enc"
    assert conn.execute(sa.text("SELECT seq, hash FROM audit_head WHERE id = 1")).one() == (3, "a3" * 32), rev
    assert conn.execute(sa.text("SELECT outbox_id FROM issuance_requests")).scalar_one() == 1, rev


def _upgrade_with_data(url: str) -> None:
    db = Database(url)
    cfg = alembic_config(db.engine)
    order = _revisions(cfg)
    assert order[0] == "0001" and len(order) >= 9, order
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        meta = sa.MetaData()
        meta.reflect(conn)
        for table, rows in ROWS.items():  # in an order that satisfies the foreign keys
            conn.execute(meta.tables[table].insert(), rows)
    with db.engine.connect() as conn:
        _check_rows(conn, "0001", order)
    for rev in order[1:]:
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, rev)
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
            assert version == rev
        with db.engine.connect() as conn:
            _check_rows(conn, rev, order)
    db.migrate()  # head: nothing more to do

    with db.read_only() as s:
        alice = s.execute(select(User).where(User.email == "alice@example.org")).scalar_one()
        bob = s.execute(select(User).where(User.email == "bob@example.org")).scalar_one()
        assert (alice.status, alice.group, alice.generation, alice.created_at) == ("enrolled", "staff", 1, T0)
        assert bob.revoked_at == T0 + 5 * HOUR and bob.revoked_at.tzinfo is not None
        certs = {c.serial: c for c in s.execute(select(Certificate)).scalars()}
        assert set(certs) == {"0a1b2c", "0a1b2d", "0b0001", "5e4ee4"}
        assert certs["0b0001"].revocation_reason == "keyCompromise"
        assert certs["0a1b2c"].not_after == T0 + 365 * 24 * HOUR
        assert certs["5e4ee4"].user_id is None
        pending = s.execute(select(OutboxMessage).where(OutboxMessage.sent_at.is_(None))).scalar_one()
        assert (pending.recipient, pending.attempts, pending.last_error) == (
            "bob@example.org",
            3,
            "421 try again later",
        )
        assert pending.last_error_kind is None  # added by 0007
        assert s.execute(select(Token).where(Token.user_id == 2)).scalar_one().revoked_at == T0 + 5 * HOUR
        assert s.execute(select(ArchivedKey)).scalar_one().envelope == b"cms-envelope"
        assert s.execute(select(IssuanceRequest)).scalar_one().outbox_id == 1
        chain = s.execute(select(AuditRecord).order_by(AuditRecord.seq)).scalars().all()
        assert [r.action for r in chain] == ["user.add", "enrol", "user.revoke"]
        assert chain[-1].at == T0 + 5 * HOUR
        assert s.get(AuditHead, 1) is not None
    db.dispose()


def test_sqlite_database_with_data_survives_every_migration(tmp_path: Path) -> None:
    _upgrade_with_data(f"sqlite:///{tmp_path / 'v0001.db'}")


@pytest.fixture
def fresh_pg_url(pg_schema_url: str) -> Iterator[str]:
    """An empty schema of its own (the session schema is already at head); skip/fail as pg_schema_url does."""
    with pg_schema("mkmig") as url:
        yield url


def test_postgresql_database_with_data_survives_every_migration(fresh_pg_url: str) -> None:
    _upgrade_with_data(fresh_pg_url)
