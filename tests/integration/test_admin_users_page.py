"""The console's user list filters in SQL; they must say what `renewal_state` says for every user,
also where calendar months clamp (31 Jan + 1 month = 28 Feb) and per policy group."""

from __future__ import annotations

import datetime as dt

import pytest

from mailkms.clock import UTC
from mailkms.config import load_settings
from mailkms.services import Services, UserState
from mailkms.store import Certificate, User
from tests.conftest import CA_PASSPHRASE, PUBLIC_URL


@pytest.fixture
def grouped(data_dir, db_url, clock):  # type: ignore[no-untyped-def]
    settings = load_settings(
        data_dir,
        database_url=db_url,
        ca_passphrase=CA_PASSPHRASE,
        server={"hostname": "localhost", "public_url": PUBLIC_URL},
        policy={"groups": {"short": {"lifetime_months": 6, "reminder_months": 1}}},
    )
    svc = Services.build(settings, clock)
    yield svc
    svc.close()


def _starts() -> list[dt.datetime]:
    """notBefore values around month ends, at several times of day."""
    out = []
    for base in (dt.date(2025, 1, 24), dt.date(2025, 12, 24), dt.date(2026, 1, 24), dt.date(2024, 1, 26)):
        for day in range(12):
            for hour in (0, 9, 23):
                d = base + dt.timedelta(days=day)
                out.append(dt.datetime(d.year, d.month, d.day, hour, 17, tzinfo=UTC))
    return out


def test_state_filters_agree_with_renewal_state(grouped, clock) -> None:
    svc = grouped
    starts = _starts()
    with svc.db.transaction() as session:
        for i, nb in enumerate(starts):
            group = "short" if i % 3 == 0 else None
            revoked = i % 17 == 0
            user = User(
                email=f"u{i:04d}@example.org",
                display_name=f"User {i}",
                group=group,
                status="revoked" if revoked else "enrolled",
                generation=1,
                created_at=nb,
            )
            session.add(user)
            session.flush()
            months = 6 if group else 18
            session.add(
                Certificate(
                    serial=f"{i + 1:040x}",
                    user_id=user.id,
                    kind="signing",
                    generation=1,
                    not_before=nb,
                    not_after=nb + dt.timedelta(days=30 * months),
                    der=b"-",
                )
            )
        for i in range(5):
            session.add(
                User(
                    email=f"new{i}@example.org",
                    display_name="",
                    status="registered",
                    generation=0,
                    created_at=starts[0],
                )
            )
    for now in (
        dt.datetime(2026, 2, 28, 10, 0, tzinfo=UTC),
        dt.datetime(2026, 2, 28, 23, 30, tzinfo=UTC),
        dt.datetime(2026, 3, 1, 0, 10, tzinfo=UTC),
        dt.datetime(2025, 2, 28, 9, 17, tzinfo=UTC),
        dt.datetime(2027, 1, 30, 12, 0, tzinfo=UTC),
    ):
        clock.set(now)
        truth: dict[UserState, set[str]] = {}
        for view in svc.users.list():
            truth.setdefault(view.state, set()).add(view.email)
        assert len(truth) >= 3, f"too few states at {now} to judge: {truth.keys()}"
        for state in UserState:
            page = svc.users.page(state=state, limit=500)
            got = {u.email for u in page.users}
            assert page.total == len(got) and page.exact
            capped = svc.users.page(state=state, limit=2, count_up_to=5)  # the console's bounded count
            n = len(got)
            assert (capped.total, capped.exact) == ((n, True) if n <= 5 else (5, False)), (state, n)
            assert got == truth.get(state, set()), (
                f"{state} at {now}: extra {got - truth.get(state, set())}, missing {truth.get(state, set()) - got}"
            )
        within = svc.users.page(due_within_days=45, limit=500)
        expected = {
            v.email
            for v in svc.users.list()
            if v.state in (UserState.ACTIVE, UserState.DUE)
            and v.expires_at
            and v.expires_at <= now + dt.timedelta(days=45)
        }
        assert {u.email for u in within.users} == expected


def test_paging_is_stable_and_counts_everything(services) -> None:
    for i in range(23):
        services.users.add(f"p{i:02d}@example.org", f"Person {i}", None, "admin:test")
    seen: list[str] = []
    for offset in range(0, 30, 10):
        page = services.users.page(offset=offset, limit=10)
        assert page.total == 23
        seen += [u.email for u in page.users]
    assert seen == sorted(f"p{i:02d}@example.org" for i in range(23))
    assert [u.email for u in services.users.page(query="PERSON 1", limit=50).users] == [
        f"p{i:02d}@example.org" for i in (1, *range(10, 20))
    ]


def test_bounded_count_stops_but_never_short_of_the_page(services) -> None:
    """count_up_to: "more than N" once N match; never less than the end of the page asked for."""
    for i in range(23):
        services.users.add(f"b{i:02d}@example.org", f"Bounded {i}", None, "admin:test")
    first = services.users.page(limit=10, count_up_to=15)
    assert (first.total, first.exact, len(first.users)) == (15, False, 10)
    deep = services.users.page(offset=20, limit=10, count_up_to=15)  # the bound moves to the page's end
    assert (deep.total, deep.exact, len(deep.users)) == (23, True, 3)
    assert (services.users.page(limit=10, count_up_to=23).total, services.users.page(count_up_to=23).exact) == (
        23,
        True,
    )
