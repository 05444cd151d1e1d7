"""The audit hash chain on a real store (SQLite and PostgreSQL): appended in the caller's
transaction, and every edit, removal or reordering found by verify_chain."""

from __future__ import annotations

import datetime as dt
import itertools
import time

import pytest
from sqlalchemy import text

from mailkms.services import Services, verify_chain
from mailkms.services._audit import record_hash
from mailkms.store import AuditRecord

RECORDS = 5


@pytest.fixture
def chained(services: Services) -> Services:
    """Five records, one second apart."""
    for n in range(1, RECORDS + 1):
        with services.db.transaction() as session:
            services.audit.append(session, "admin:test", "test.action", f"user{n}@example.org", n=n, note="é ✓")
        services.clock.advance(dt.timedelta(seconds=1))  # type: ignore[attr-defined]
    return services


def sql(services: Services, *statements: str) -> None:
    with services.db.engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


def problems(services: Services) -> tuple[str, ...]:
    report = services.verify_audit()
    assert report.ok is (not report.problems)
    return report.problems


def test_an_untouched_chain_verifies(chained: Services) -> None:
    report = chained.verify_audit()
    assert report.ok
    assert report.records == RECORDS


def test_records_link_to_their_predecessor(chained: Services) -> None:
    with chained.db.engine.connect() as conn:
        rows = conn.execute(text("SELECT seq, prev_hash, hash FROM audit_log ORDER BY seq")).all()
        head = conn.execute(text("SELECT seq, hash FROM audit_head")).one()
    assert [r.seq for r in rows] == list(range(1, RECORDS + 1))
    assert rows[0].prev_hash == "0" * 64
    for before, after in itertools.pairwise(rows):
        assert after.prev_hash == before.hash
    assert (head.seq, head.hash) == (rows[-1].seq, rows[-1].hash)


def test_an_append_rolled_back_leaves_no_trace(chained: Services) -> None:
    with pytest.raises(RuntimeError), chained.db.transaction() as session:
        chained.audit.append(session, "admin:test", "test.action", "x@example.org")
        raise RuntimeError("the surrounding change failed")
    assert chained.verify_audit().records == RECORDS
    assert chained.verify_audit().ok


@pytest.mark.parametrize("key", ["token", "passphrase", "ca_password", "private_key", "share", "client_secret"])
def test_secret_looking_details_are_refused(services: Services, key: str) -> None:
    with pytest.raises(ValueError, match="secret"), services.db.transaction() as session:
        services.audit.append(session, "admin:test", "test.action", "x@example.org", **{key: "value"})


def test_identifiers_of_secrets_are_allowed(services: Services) -> None:
    with services.db.transaction() as session:
        services.audit.append(session, "admin:test", "test.action", "x@example.org", token_id=3, share_id=1)
    assert services.verify_audit().ok


# --- tampering ------------------------------------------------------------------------------------------------
EDITS = {
    "details": "UPDATE audit_log SET details = '[]' WHERE seq = 3",
    "actor": "UPDATE audit_log SET actor = 'someone-else' WHERE seq = 3",
    "action": "UPDATE audit_log SET action = 'nothing.happened' WHERE seq = 3",
    "subject": "UPDATE audit_log SET subject = 'mallory@example.org' WHERE seq = 3",
}


@pytest.mark.parametrize("column", list(EDITS))
def test_an_edited_record_is_reported(chained: Services, column: str) -> None:
    sql(chained, EDITS[column])
    assert problems(chained) == ("seq 3: contents do not match its hash (edited)",)


def test_an_edited_time_is_reported(chained: Services) -> None:
    with chained.db.transaction() as session:
        record = session.get(AuditRecord, 3)
        assert record is not None
        record.at = record.at - dt.timedelta(hours=1)
    assert problems(chained) == ("seq 3: contents do not match its hash (edited)",)


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(chained: Services) -> None:
    """A forger who fixes the edited record's own hash still breaks the link from record 4."""
    with chained.db.transaction() as session:
        record = session.get(AuditRecord, 3)
        assert record is not None
        record.details = '{"n":99}'
        record.hash = record_hash(
            record.seq, record.at, record.actor, record.action, record.subject, record.details, record.prev_hash
        )
    assert problems(chained) == ("seq 4: does not follow the previous record (removed or reordered)",)


def test_a_removed_middle_record_is_reported(chained: Services) -> None:
    sql(chained, "DELETE FROM audit_log WHERE seq = 3")
    found = problems(chained)
    assert "record 3..3 missing (gap before seq 4)" in found
    assert "seq 4: does not follow the previous record (removed or reordered)" in found
    assert chained.verify_audit().records == RECORDS - 1


def test_two_swapped_records_are_reported(chained: Services) -> None:
    sql(
        chained,
        "UPDATE audit_log SET seq = 1000 WHERE seq = 2",
        "UPDATE audit_log SET seq = 2 WHERE seq = 3",
        "UPDATE audit_log SET seq = 3 WHERE seq = 1000",
    )
    found = problems(chained)
    assert "seq 2: does not follow the previous record (removed or reordered)" in found
    assert "seq 3: does not follow the previous record (removed or reordered)" in found


def test_swapped_contents_are_reported(chained: Services) -> None:
    """Exchange everything but the sequence numbers between records 2 and 3."""
    columns = "at, actor, action, subject, details, prev_hash, hash"
    with chained.db.engine.begin() as conn:
        two = conn.execute(text(f"SELECT {columns} FROM audit_log WHERE seq = 2")).one()
        three = conn.execute(text(f"SELECT {columns} FROM audit_log WHERE seq = 3")).one()
        update = text(
            "UPDATE audit_log SET at = :at, actor = :actor, action = :action, subject = :subject, "
            "details = :details, prev_hash = :prev_hash, hash = :hash WHERE seq = :seq"
        )
        conn.execute(update, {**three._asdict(), "seq": 2})
        conn.execute(update, {**two._asdict(), "seq": 3})
    assert len(problems(chained)) >= 2


def test_a_removed_last_record_is_reported(chained: Services) -> None:
    sql(chained, f"DELETE FROM audit_log WHERE seq = {RECORDS}")
    assert problems(chained) == (
        f"the chain ends at seq {RECORDS - 1} but the head says {RECORDS} (records removed at the end)",
    )


def test_a_removed_last_record_with_its_head_is_reported(chained: Services) -> None:
    sql(chained, f"DELETE FROM audit_log WHERE seq = {RECORDS}", "DELETE FROM audit_head")
    assert problems(chained) == (f"the chain head is missing (records after seq {RECORDS - 1} may have been removed)",)


def test_all_records_removed_is_reported(chained: Services) -> None:
    sql(chained, "DELETE FROM audit_log")
    assert problems(chained) == (f"the chain ends at seq 0 but the head says {RECORDS} (records removed at the end)",)


def test_verify_chain_reads_in_its_own_transaction(chained: Services) -> None:
    with chained.db.transaction() as session:
        report = verify_chain(session)
    assert report.ok and report.records == RECORDS


def test_two_first_writers_on_a_fresh_store_both_append(db_url: str) -> None:
    """No head row yet, two writers at once: the second waits for the first's head instead of
    clashing with it on the primary key (PostgreSQL: IntegrityError before the fix)."""
    import threading

    from mailkms.clock import FakeClock
    from mailkms.services._audit import AuditLog
    from mailkms.store import AuditHead, Database

    first, second = Database(db_url), Database(db_url)
    first.migrate()
    audit = AuditLog(FakeClock())
    inserted, failures = threading.Event(), []

    def write_first() -> None:
        with first.transaction() as session:
            audit.append(session, "admin:a", "test.first", "a@example.org")
            session.flush()
            inserted.set()  # the head row is in, uncommitted: the other writer comes now
            time.sleep(0.5)

    def write_second() -> None:
        inserted.wait(10)
        try:
            with second.transaction() as session:
                audit.append(session, "admin:b", "test.second", "b@example.org")
        except Exception as exc:  # the failure is the finding
            failures.append(exc)

    threads = [threading.Thread(target=write_first), threading.Thread(target=write_second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert failures == []
        with first.transaction() as session:
            head = session.get(AuditHead, 1)
            assert head is not None and head.seq == 2
            actions = [r.action for r in session.query(AuditRecord).order_by(AuditRecord.seq)]
            report = verify_chain(session)
        assert actions == ["test.first", "test.second"]
        assert report.ok, report.problems
    finally:
        first.dispose()
        second.dispose()
