"""Renewal, enrolment and nonces by group commit (SQLite and PostgreSQL): concurrent requests share
transactions, never records. Every renewal its own pair, audit records, archived key and mail; a
refused request in the same batch rolls back alone; the chain stays intact."""

from __future__ import annotations

import collections
import concurrent.futures
import datetime as dt
import json
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from mailkms.config import load_settings
from mailkms.errors import MailkmsError, NotDue, ReplayedNonce
from mailkms.pki import open_delivery
from mailkms.services import Services, verify_chain
from mailkms.store import ArchivedKey, AuditRecord, IssuanceRequest, OutboxMessage
from tests.conftest import CA_PASSPHRASE, PUBLIC_URL
from tests.integration.test_renewal_service import URL, Enrolled, _request

USERS = 10


@pytest.fixture(params=[0, 1], ids=["signed-in-transaction", "presigned"])
def batching(data_dir: Path, db_url: str, clock, request):  # type: ignore[no-untyped-def]
    settings = load_settings(
        data_dir,
        database_url=db_url,
        ca_passphrase=CA_PASSPHRASE,
        server={"hostname": "localhost", "public_url": PUBLIC_URL},
        # the writer lingers 200 ms for more work, so the concurrent requests surely share batches
        # signer_processes 1: renewals are signed by it before their transaction (PairIssuer.presign)
        issuance={"signer_processes": request.param, "batch_size": 64, "max_wait_ms": 200},
    )
    svc = Services.build(settings, clock)
    yield svc
    svc.close()


def _together(calls: list[object]) -> list[object]:
    """Run the calls at once from as many threads; each result or the MailkmsError it raised."""
    start = threading.Barrier(len(calls))

    def one(call: object) -> object:
        assert callable(call)
        start.wait()
        try:
            return call()
        except MailkmsError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(one, calls))


def test_concurrent_renewals_share_batches_each_with_its_own_records(batching: Services, clock) -> None:  # type: ignore[no-untyped-def]
    before = batching.commits.batches, batching.commits.units
    first = Enrolled(batching, "u0@example.org")  # alone: the first audit record of a fresh store makes its head row
    users = _together([lambda i=i: Enrolled(batching, f"u{i}@example.org") for i in range(1, USERS + 1)])
    assert all(isinstance(u, Enrolled) for u in users), users
    enrolled = [first, *(u for u in users if isinstance(u, Enrolled))]
    late = enrolled.pop()  # enrolled, but a day later: not due when the others are
    clock.advance(dt.timedelta(days=366))
    with batching.db.transaction() as session:  # the late one's certificate starts 1 day after the others'
        from mailkms.store import Certificate, User

        user = session.execute(select(User).where(User.email == late.mailbox)).scalar_one()
        for cert in session.execute(select(Certificate).where(Certificate.user_id == user.id)).scalars():
            cert.not_before += dt.timedelta(days=30)
    bodies = [_request(batching, u) for u in [*enrolled, late]]
    results = _together([lambda b=b: batching.renewal.renew(b, URL) for b in bodies])

    *renewed, refused = results
    assert isinstance(refused, NotDue), refused
    assert all(not isinstance(r, MailkmsError) and not r.already_issued for r in renewed), renewed  # type: ignore[union-attr]
    batches, units = batching.commits.batches - before[0], batching.commits.units - before[1]
    assert units > batches, (units, batches)  # requests did share transactions

    with batching.db.read_only() as session:
        requests = session.execute(select(IssuanceRequest).where(IssuanceRequest.kind == "renewal")).scalars().all()
        assert sorted(r.id for r in requests) == sorted(r.request_id for r in renewed)  # type: ignore[union-attr]
        issued = collections.Counter(
            json.loads(d)["request_id"]
            for d in session.execute(
                select(AuditRecord.details).where(AuditRecord.action == "certificate.issued")
            ).scalars()
        )
        for r in renewed:
            assert issued[r.request_id] == 2  # type: ignore[union-attr]  # signing + encryption, each its own record
        assert session.query(ArchivedKey).count() == (USERS + 1) + USERS  # every enrolment's key, every renewal's
        mails = session.execute(select(OutboxMessage).where(OutboxMessage.purpose == "delivery:renewal")).scalars()
        delivered = {open_delivery(m.body).manifest.request_id: m.recipient for m in mails}
        assert delivered == {r.request_id: r.mailbox for r in renewed}  # type: ignore[union-attr]
        refusals = (
            session.execute(select(AuditRecord.subject).where(AuditRecord.action == "renewal.refused")).scalars().all()
        )
        assert refusals == [late.mailbox]
        chain = verify_chain(session)
    assert chain.problems == ()


def test_a_nonce_spent_twice_in_one_batch_is_refused_once(batching: Services) -> None:
    nonce = batching.nonces.new()
    outcomes = _together([lambda: batching.nonces.consume(nonce) for _ in range(4)])
    assert outcomes.count(None) == 1
    assert sum(isinstance(o, ReplayedNonce) for o in outcomes) == 3
