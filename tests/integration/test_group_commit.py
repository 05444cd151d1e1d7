"""Group commit and signer processes on a real store (SQLite and PostgreSQL) and real worker
processes: concurrent issuances all stored, each its own audit record, the chain intact, serials
unique; a refused unit leaves its batch intact; nobody answered for work that is not durable
(a process killed mid-run, with real processes)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailkms.config import load_settings
from mailkms.errors import BadCSR, Conflict
from mailkms.pki import KeyType, generate_key
from mailkms.services import GroupCommit, Services, serial_hex, verify_chain
from mailkms.store import AuditRecord, Certificate, Database
from tests.conftest import CA_PASSPHRASE, PUBLIC_URL, make_csr

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fast_services(data_dir: Path, db_url: str, clock):  # type: ignore[no-untyped-def]
    settings = load_settings(
        data_dir,
        database_url=db_url,
        ca_passphrase=CA_PASSPHRASE,
        server={"hostname": "localhost", "public_url": PUBLIC_URL},
        issuance={"signer_processes": 2, "batch_size": 32},
    )
    svc = Services.build(settings, clock)
    yield svc
    svc.close()


def csrs(n: int, prefix: str = "c") -> list[tuple[bytes, str]]:
    key = generate_key(KeyType.P256)  # one key, many requests: the CA key type is what is measured
    return [(make_csr(f"{prefix}{i}@example.org", key)[0], f"{prefix}{i}@example.org") for i in range(n)]


def stored(db: Database) -> dict[str, bytes]:
    with db.read_only() as session:
        return {s: d for s, d in session.execute(select(Certificate.serial, Certificate.der)).all()}


def issued_records(db: Database) -> list[dict[str, object]]:
    with db.read_only() as session:
        rows = session.execute(
            select(AuditRecord.subject, AuditRecord.details).where(AuditRecord.action == "certificate.issued")
        ).all()
    return [{"subject": subject, **json.loads(details)} for subject, details in rows]


def test_concurrent_issuances_are_all_stored_each_with_its_own_audit_record(fast_services: Services) -> None:
    requests = csrs(120)
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        certs = list(pool.map(lambda r: fast_services.issuance.issue_signing(r[0], r[1], "admin:test"), requests))

    serials = [serial_hex(c.serial_number) for c in certs]
    assert len(set(serials)) == len(requests)  # unique serials across both signer processes
    rows = stored(fast_services.db)
    for cert, serial in zip(certs, serials, strict=True):
        assert rows[serial] == cert.public_bytes(serialization.Encoding.DER)  # what was answered is what is stored
        assert cert.issuer == fast_services.ca.issuing.certificate.subject
    records = issued_records(fast_services.db)
    assert sorted(r["serial"] for r in records) == sorted(serials)  # one record per certificate
    by_serial = {r["serial"]: r["subject"] for r in records}
    for cert, (_, mailbox) in zip(certs, requests, strict=True):
        assert by_serial[serial_hex(cert.serial_number)] == mailbox
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.RFC822Name) == [mailbox]
    report = fast_services.verify_audit()
    assert report.ok, report.problems
    assert fast_services.commits.units == len(requests)
    assert fast_services.commits.batches < len(requests)  # transactions were shared


def test_a_request_naming_another_mailbox_is_refused_by_the_signer_process(fast_services: Services) -> None:
    csr, _ = make_csr("mallory@example.org")
    with pytest.raises(BadCSR):
        fast_services.issuance.issue_signing(csr, "alice@example.org", "admin:test")
    assert stored(fast_services.db) == {}
    good = fast_services.issuance.issue_signing(make_csr("alice@example.org")[0], "alice@example.org", "admin:test")
    assert serial_hex(good.serial_number) in stored(fast_services.db)


def _hold_the_writer(commits: GroupCommit) -> tuple[threading.Event, threading.Event, concurrent.futures.Future[None]]:
    """Occupy the writer with one unit until released, so what is submitted meanwhile forms one batch."""
    entered, release = threading.Event(), threading.Event()

    def blocker(_session: Session) -> None:
        entered.set()
        release.wait(30)

    runner = concurrent.futures.ThreadPoolExecutor(1)
    held = runner.submit(commits.run, blocker)
    assert entered.wait(30)
    runner.shutdown(wait=False)
    return entered, release, held


def _actions_in_an_intact_chain(db: Database) -> list[str]:
    with db.read_only() as session:
        chain = verify_chain(session)
        assert chain.ok, chain.problems
        return list(session.execute(select(AuditRecord.action).order_by(AuditRecord.seq)).scalars())


def _appends(services: Services, n: int):  # type: ignore[no-untyped-def]
    """A unit of work that appends one audit record and returns its sequence number."""
    return lambda session: services.audit.append(session, "test", "test.ok", f"u{n}@example.org", n=n).seq


def test_a_refused_unit_rolls_back_alone_and_the_batch_commits(fast_services: Services) -> None:
    commits, audit = fast_services.commits, fast_services.audit
    _, release, held = _hold_the_writer(commits)

    def refused(session: Session) -> None:
        audit.append(session, "test", "test.refused", "bad@example.org")
        raise Conflict("refused after writing")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(commits.run, _appends(fast_services, n)) for n in range(3)]
        bad = pool.submit(commits.run, refused)
        futures += [pool.submit(commits.run, _appends(fast_services, n)) for n in range(3, 6)]
        time.sleep(0.3)  # all seven wait behind the held writer
        batches_before = commits.batches
        release.set()
        held.result(30)
        seqs = [f.result(30) for f in futures]
        with pytest.raises(Conflict):
            bad.result(30)
    assert commits.batches - batches_before == 1  # the seven went in one transaction
    with fast_services.db.read_only() as session:
        actions = session.execute(select(AuditRecord.action).order_by(AuditRecord.seq)).scalars().all()
        chain = verify_chain(session)
    assert actions.count("test.ok") == 6 and "test.refused" not in actions
    assert sorted(seqs) == list(range(min(seqs), min(seqs) + 6))  # no gap where the refused record was
    assert chain.ok, chain.problems


def test_a_failing_unit_without_savepoint_is_run_alone_and_the_others_still_commit(fast_services: Services) -> None:
    commits, audit = fast_services.commits, fast_services.audit
    _, release, held = _hold_the_writer(commits)

    def broken(session: Session) -> None:
        audit.append(session, "test", "test.broken", "bad@example.org")
        raise Conflict("broken")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(commits.run, _appends(fast_services, n), isolated=False) for n in range(4)]
        bad = pool.submit(commits.run, broken, isolated=False)
        time.sleep(0.3)
        release.set()
        held.result(30)
        assert len({f.result(30) for f in futures}) == 4
        with pytest.raises(Conflict):
            bad.result(30)
    assert commits.retried_batches == 1
    actions = _actions_in_an_intact_chain(fast_services.db)
    assert actions.count("test.ok") == 4 and "test.broken" not in actions


def test_a_killed_issuing_process_answered_nothing_it_had_not_stored(
    data_dir: Path, db_url: str, tmp_path: Path
) -> None:
    """Real processes: the load process (32 callers, 2 signer processes, group commit) prints each
    serial as its caller is answered; it is killed (SIGKILL, with its signers) mid-run. Every
    answered serial must be in the store, audited, and the chain intact."""
    folder = tmp_path / "csrs"
    folder.mkdir()
    key = generate_key(KeyType.P256)
    for i in range(64):
        (folder / f"u{i:03d}.csr").write_bytes(make_csr(f"u{i:03d}@example.org", key)[0])
    Database(db_url).migrate()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "issuance_load.py"), str(data_dir), db_url, str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its signer processes share its process group: killed with it
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    answered: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if line.startswith("ISSUED "):
                answered.append(line.split()[1])
            if len(answered) >= 400 or time.monotonic() > deadline:
                break
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        os.killpg(proc.pid, signal.SIGKILL)  # mid-run: batches in flight, callers waiting
        rest, _ = proc.communicate(timeout=30)
        answered += [line.split()[1] for line in rest.splitlines() if line.startswith("ISSUED ")]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert len(answered) >= 400
    db = Database(db_url)
    try:
        rows = stored(db)
        missing = [s for s in answered if s not in rows]
        assert not missing, f"{len(missing)} answered certificates are not stored"
        audited = {str(r["serial"]) for r in issued_records(db)}
        assert audited == set(rows)  # every stored certificate has its record, and only those
        with db.read_only() as session:
            chain = verify_chain(session)
            count = session.execute(select(func.count(Certificate.id))).scalar_one()
        assert chain.ok, chain.problems
        assert count >= len(answered)  # stored but not yet answered is allowed (the answer was lost)
    finally:
        db.dispose()


def _signer_pids() -> list[int]:
    """This process's children started by multiprocessing's spawn (the signer processes)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == me and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def test_a_killed_signer_process_is_replaced(fast_services: Services) -> None:
    requests = csrs(3, "k")
    # Spawned children of earlier tests in this pytest process (CRL workers, other pools) may still
    # be winding down: the signers are the children that appear with this start.
    before = set(_signer_pids())
    fast_services.signers.start()
    fast_services.issuance.issue_signing(*requests[0], "admin:test")
    pids = [pid for pid in _signer_pids() if pid not in before]
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(0.5)
    try:  # the request in flight when a signer dies may fail (never answered as issued) ...
        fast_services.issuance.issue_signing(*requests[1], "admin:test")
    except Exception as exc:  # BrokenProcessPool, by design
        assert "process" in str(exc).lower()
    cert = fast_services.issuance.issue_signing(*requests[2], "admin:test")  # ... the next one is served
    assert serial_hex(cert.serial_number) in stored(fast_services.db)
    assert pids[0] not in _signer_pids()
    assert fast_services.verify_audit().ok


def _release_and_expect_conflict(
    release: threading.Event,
    held: concurrent.futures.Future[None],
    futures: list[concurrent.futures.Future[None]],
    bad: concurrent.futures.Future[None],
) -> None:
    release.set()
    held.result(30)
    for f in futures:
        f.result(30)
    with pytest.raises(Conflict):
        bad.result(30)


def test_deferred_rows_survive_a_refused_unit_later_in_the_batch_and_vanish_with_a_failed_batch(
    fast_services: Services,
) -> None:
    """Bulk units (rows written by one INSERT at commit) beside isolated ones in one transaction:
    a refused unit's savepoint does not take the bulk rows queued before it; a batch that fails as
    a whole writes none of its bulk rows, and each unit is then run (and stored) alone."""
    commits, audit = fast_services.commits, fast_services.audit

    def bulk(n: int):  # type: ignore[no-untyped-def]
        return lambda session: audit.append_deferred(session, "test", "test.bulk", f"b{n}@example.org", n=n)

    def refused(session: Session) -> None:
        audit.append_deferred(session, "test", "test.refused", "bad@example.org")
        raise Conflict("refused after queueing a bulk row")

    _, release, held = _hold_the_writer(commits)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(commits.run, bulk(n), isolated=False) for n in range(3)]
        time.sleep(0.2)  # queued in this order
        bad = pool.submit(commits.run, refused)
        time.sleep(0.2)
        futures += [pool.submit(commits.run, bulk(n), isolated=False) for n in range(3, 5)]
        time.sleep(0.3)
        batches_before = commits.batches
        _release_and_expect_conflict(release, held, futures, bad)
    assert commits.batches - batches_before == 1
    actions = _actions_in_an_intact_chain(fast_services.db)
    assert actions.count("test.bulk") == 5 and "test.refused" not in actions

    def broken(session: Session) -> None:
        audit.append_deferred(session, "test", "test.broken", "bad@example.org")
        raise Conflict("broken")

    _, release, held = _hold_the_writer(commits)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(commits.run, bulk(n), isolated=False) for n in range(5, 8)]
        bad = pool.submit(commits.run, broken, isolated=False)
        time.sleep(0.3)
        _release_and_expect_conflict(release, held, futures, bad)
    assert commits.retried_batches == 1
    actions = _actions_in_an_intact_chain(fast_services.db)
    assert actions.count("test.bulk") == 8 and "test.broken" not in actions
