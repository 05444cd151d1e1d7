"""The console's import, outbox-retry and status pages, in process on SQLite and PostgreSQL: a CSV
import in the background with its progress page, the rows refused with reasons and the tokens
downloadable once; retry one or all waiting mails; roles refused at the server (an auditor gets 403
on every POST and on the import pages) and forms without their CSRF token refused; the key pool,
reminders and CRL/OCSP pages show what the store holds; the users list filters by group."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from mailkms.api import create_app
from mailkms.services import Role, Services, queue_message, token_hash
from mailkms.store import Certificate, OutboxMessage, PooledKey, Reminder, Token, User
from tests.conftest import store_settings
from tests.integration.test_admin_api import _admin, _login

GOOD = ["ann@example.org", "ben@example.org", "cat@example.org", "dan@example.org"]


@pytest.fixture
def svc(data_dir, db_url, clock):  # type: ignore[no-untyped-def]
    policy = {"groups": {"staff": {"lifetime_months": 12, "reminder_months": 10}}}
    services = Services.build(store_settings(data_dir, db_url, policy=policy, pool={"size": 4}), clock)
    yield services
    services.close()


def _client(services: Services, name: str, role: Role, now: dt.datetime) -> tuple[TestClient, str]:
    _, totp = _admin(services, name, role)
    client = TestClient(create_app(services), base_url="https://testserver")
    return client, _login(client, name, totp, now)


def _wait_done(client: TestClient, url: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        page = client.get(url)
        assert page.status_code == 200, page.text
        if 'http-equiv="refresh"' not in page.text:
            return page.text
        assert time.monotonic() < deadline, page.text
        time.sleep(0.05)


def test_csv_import_in_the_background_with_refusals_and_tokens_once(svc, clock) -> None:
    op, csrf = _client(svc, "olga", Role.OPERATOR, clock.now())
    au, au_csrf = _client(svc, "aldo", Role.AUDITOR, clock.now())
    svc.users.add("dan@example.org", "Dan", None, "admin:test")  # already registered: refused
    body = (
        "email,name,group\n"
        "# a comment\n"
        "Ann@Example.org,Ann A,staff\n"
        "ben@example.org,Ben B\n"
        'cat@example.org,"Cat, C",\n'
        "not-an-address,Nobody\n"
        "dan@example.org,Dan again\n"
        "eve@example.org,Eve,nosuchgroup\n"
        "ann@example.org,Ann twice\n"
    )
    upload = {"csv_file": ("users.csv", body.encode(), "text/csv")}

    form = op.get("/admin/users/import")
    assert form.status_code == 200 and 'type="file"' in form.text and "<script" not in form.text
    assert op.post("/admin/users/import", files=upload).status_code == 403  # no CSRF token
    assert op.post("/admin/users/import", files=upload, data={"csrf": "forged"}).status_code == 403
    assert au.get("/admin/users/import").status_code == 403
    assert au.post("/admin/users/import", files=upload, data={"csrf": au_csrf}).status_code == 403
    assert "Import users" not in au.get("/admin/users").text
    assert svc.users.page().total == 1  # nothing was imported by the refused posts

    bad = op.post(
        "/admin/users/import",
        files={"csv_file": ("x.csv", b"a@example.org,A,g,extra\n", "text/csv")},
        data={"csrf": csrf},
    )
    assert bad.status_code == 400 and "expected email,name[,group]" in bad.text
    assert (
        op.post(
            "/admin/users/import", files={"csv_file": ("x.csv", b"\xff\xfe\x00", "text/csv")}, data={"csrf": csrf}
        ).status_code
        == 400
    )

    started = op.post("/admin/users/import", files=upload, data={"csrf": csrf}, follow_redirects=False)
    assert started.status_code == 303, started.text
    url = started.headers["location"]
    assert re.fullmatch(r"/admin/imports/[A-Za-z0-9_-]+", url)
    assert au.get(url).status_code == 403  # the auditor may not see it
    other, _ = _client(svc, "omar", Role.OPERATOR, clock.now())
    assert other.get(url).status_code == 404  # nor another operator: the tokens are olga's to hand out

    done = _wait_done(op, url)
    assert "<script" not in done
    assert re.search(r'<progress id="progress" max="7" value="7">', done)
    assert '<output id="percent" for="progress">100 %</output>' in done
    assert "3 added, 4 refused" in done
    refused = dict(re.findall(r"<tr><td>([^<]+)</td><td>([a-z-]+)</td>", done))
    assert refused == {
        "not-an-address": "malformed",
        "dan@example.org": "user-exists",
        "eve@example.org": "malformed",
        "ann@example.org": "user-exists",
    }
    assert "unknown group" in done

    assert au.post(f"{url}/tokens", data={"csrf": au_csrf}).status_code == 403
    assert op.post(f"{url}/tokens", data={}).status_code == 403
    download = op.post(f"{url}/tokens", data={"csrf": csrf})
    assert download.status_code == 200 and download.headers["content-type"].startswith("text/csv")
    assert "attachment" in download.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(download.text)))
    assert [r["email"] for r in rows] == ["ann@example.org", "ben@example.org", "cat@example.org"]
    assert [r["name"] for r in rows] == ["Ann A", "Ben B", "Cat, C"]
    with svc.db.read_only() as session:
        hashes = set(session.execute(select(Token.token_hash)).scalars())
        group = session.execute(select(User.group).where(User.email == "ann@example.org")).scalar_one()
    assert {token_hash(r["token"]) for r in rows} <= hashes and group == "staff"
    again = op.post(f"{url}/tokens", data={"csrf": csrf})
    assert again.status_code == 409 and "already downloaded" in again.text
    assert "no longer on the server" in op.get(url).text
    assert all(r["token"] not in op.get(url).text for r in rows)
    added = [r.subject for r in svc.audit_records(actor="admin:olga", action="user.added", limit=10)]
    assert sorted(added) == ["ann@example.org", "ben@example.org", "cat@example.org"]
    assert svc.verify_audit().ok


def _queue(svc: Services, n: int, later: dt.timedelta) -> list[int]:
    now = svc.clock.now()
    with svc.db.transaction() as session:
        ids = []
        for i in range(n):
            row = queue_message(
                session,
                svc.audit,
                now,
                message_id=f"<m{i}@example.org>",
                sender="kms@example.org",
                recipient=f"r{i}@example.org",
                body=b"Subject: hello\r\n\r\nhi\r\n",
                purpose="delivery",
            )
            row.next_attempt_at = now + later
            row.attempts = 3
            row.last_error_kind = "connect"
            row.last_error = "connection refused"
            ids.append(row.id)
    return ids


def _next_attempts(svc: Services) -> dict[int, dt.datetime]:
    with svc.db.read_only() as session:
        rows = session.execute(select(OutboxMessage.id, OutboxMessage.next_attempt_at)).all()
    return {i: (t if t.tzinfo else t.replace(tzinfo=dt.UTC)) for i, t in rows}


def test_outbox_retry_buttons_one_and_all(svc, clock) -> None:
    ids = _queue(svc, 3, dt.timedelta(minutes=30))
    later = clock.now() + dt.timedelta(minutes=30)
    op, csrf = _client(svc, "olga", Role.OPERATOR, clock.now())
    au, au_csrf = _client(svc, "aldo", Role.AUDITOR, clock.now())

    listing = op.get("/admin/outbox").text
    assert listing.count('action="/admin/outbox/retry"') == 4  # one per message and one for all
    assert f'aria-label="Retry message {ids[0]} now"' in listing
    assert "/admin/outbox/retry" not in au.get("/admin/outbox").text
    assert au.post("/admin/outbox/retry", data={"csrf": au_csrf, "message": ids[0]}).status_code == 403
    assert op.post("/admin/outbox/retry", data={"message": ids[0]}).status_code == 403
    assert op.post("/admin/outbox/retry", data={"csrf": csrf}).status_code == 400  # neither one nor all
    assert op.post("/admin/outbox/retry", data={"csrf": csrf, "message": 999999}).status_code == 404
    assert set(_next_attempts(svc).values()) == {later}  # nothing moved

    one = op.post("/admin/outbox/retry", data={"csrf": csrf, "message": ids[1]})
    assert one.status_code == 200 and "1 mail due now" in one.text
    assert _next_attempts(svc) == {ids[0]: later, ids[1]: clock.now(), ids[2]: later}
    every = op.post("/admin/outbox/retry", data={"csrf": csrf, "all": "yes"})
    assert every.status_code == 200 and "2 mails due now" in every.text
    assert set(_next_attempts(svc).values()) == {clock.now()}
    audit = svc.audit_records(actor="admin:olga", action="mail.retry-requested", limit=5)
    assert [json.loads(r.details) for r in audit][::-1] == [{"messages": 1, "ids": [ids[1]]}, {"messages": 2}]


def test_status_pages_and_group_filter(svc, clock) -> None:
    now = clock.now()
    with svc.db.transaction() as session:
        for i, (group, months_ago) in enumerate([("staff", 9), (None, 2), (None, 13), ("staff", 1)]):
            user = User(
                email=f"s{i}@example.org", display_name="", group=group, status="enrolled", generation=1, created_at=now
            )
            session.add(user)
            session.flush()
            nb = now - dt.timedelta(days=30 * months_ago + 3)
            session.add(
                Certificate(
                    serial=f"{i + 1:032x}",
                    user_id=user.id,
                    kind="signing",
                    generation=1,
                    not_before=nb,
                    not_after=nb + dt.timedelta(days=540),
                    der=b"-",
                )
            )
            if months_ago == 13:
                session.add(
                    Reminder(
                        user_id=user.id, generation=1, kind="due", created_at=now - dt.timedelta(days=2), claimed_by="n"
                    )
                )
        for i in range(3):
            session.add(
                PooledKey(
                    key_type="rsa2048",
                    wrapping_key_id="x",
                    sealed=b"-",
                    created_at=now - dt.timedelta(minutes=10 + 60 * i),
                )
            )
    svc.revocation.publish_crl(force=True)
    au, _ = _client(svc, "aldo", Role.AUDITOR, now)

    pool = au.get("/admin/keypool")
    assert pool.status_code == 200 and "<script" not in pool.text
    key_type = svc.settings.policy.encryption_key_type.value
    expected = 3 if key_type == "rsa2048" else 0
    assert f'<dd id="pool-ready">{expected}</dd>' in pool.text and '<dd id="pool-target">4</dd>' in pool.text
    if expected:
        assert '<dd id="pool-hour">1 key (still in the pool)</dd>' in pool.text
        assert '<dd id="pool-day">3 keys (still in the pool)</dd>' in pool.text

    reminders = au.get("/admin/reminders").text
    bars = [int(n) for n in re.findall(r'data-count="(\d+)"', reminders)]
    assert len(bars) == 30 and bars[-3] == 1 and sum(bars) == 1
    assert '<span class="tag">due: 1</span>' in reminders
    # s0 (staff, 10-month reminder, 9 months in) is next; s1 (18-month default policy, 12-month reminder) later
    assert 'href="/admin/users/s0%40example.org">s0@example.org</a> (group staff)' in reminders

    crl = au.get("/admin/revocation").text
    row = re.search(r"<tr><td>issuing</td><td>(\d+)</td>.*?<td>(\d+)</td><td>(\d+)</td>", crl, re.S)
    assert row is not None and int(row.group(1)) >= 1 and int(row.group(3)) > 100, crl
    latest = svc.revocation.latest
    assert latest is not None and int(row.group(1)) == latest.number
    assert '<th scope="col">good</th>' in crl

    staff = au.get("/admin/users", params={"group": "staff"}).text
    assert "s0@example.org" in staff and "s3@example.org" in staff and "s1@example.org" not in staff
    default = au.get("/admin/users", params={"group": "-"}).text
    assert "s1@example.org" in default and "s2@example.org" in default and "s0@example.org" not in default
    assert "2 users" in default


def test_users_list_says_more_than_when_its_count_stops(data_dir, db_url, clock, monkeypatch) -> None:
    """The list counts matches only so far (10,000 in use; 3 here) and then says "more than", with a
    next page still offered; below the bound the count is exact."""
    import mailkms.api._console as console

    monkeypatch.setattr(console, "COUNT_UP_TO", 3)
    svc = Services.build(store_settings(data_dir, db_url, admin={"page_size": 2}), clock)
    for i in range(5):
        svc.users.add(f"m{i}@example.org", "", None, "admin:test")
    au, _ = _client(svc, "aldo", Role.AUDITOR, clock.now())
    first = au.get("/admin/users").text
    assert "More than 3 users; page 1 of more than 2." in first and 'rel="next"' in first
    last = au.get("/admin/users", params={"page": 3}).text  # the bound moves to the page's end: exact
    assert "5 users; page 3 of 3." in last and 'rel="next"' not in last and "m4@example.org" in last
    svc.close()
