"""renewal_state: a pure function of the current certificate, revocation, the clock and the policy."""

from __future__ import annotations

import datetime as dt

import pytest

from mailkms.clock import UTC, FakeClock
from mailkms.pki import reminder_point, subscriber_validity
from mailkms.services import CertDates, UserState, renewal_state

ONE_SECOND = dt.timedelta(seconds=1)
ISSUED = dt.datetime(2026, 1, 15, 9, 30, 0, tzinfo=UTC)


def dates(start: dt.datetime = ISSUED, months: int = 18) -> CertDates:
    v = subscriber_validity(start, months)
    return CertDates(v.not_before, v.not_after)


def state_at(
    clock: FakeClock, current: CertDates | None, reminder_months: int = 12, revoked: bool = False
) -> UserState:
    return renewal_state(current, revoked, clock.now(), reminder_months)


# (moment, state) for the default policy: 18 months, reminder at 12
MOMENTS = [
    (ISSUED, UserState.ACTIVE),
    (ISSUED + dt.timedelta(days=30 * 11), UserState.ACTIVE),  # +11 months: no prompt yet
    (dt.datetime(2027, 1, 15, 9, 29, 59, tzinfo=UTC), UserState.ACTIVE),  # reminder − 1 s
    (dt.datetime(2027, 1, 15, 9, 30, 0, tzinfo=UTC), UserState.DUE),  # the reminder point
    (dt.datetime(2027, 1, 15, 9, 30, 1, tzinfo=UTC), UserState.DUE),  # reminder + 1 s
    (dt.datetime(2027, 1, 30, 0, 0, 0, tzinfo=UTC), UserState.DUE),  # +12.5 months
    (dt.datetime(2027, 7, 15, 9, 29, 58, tzinfo=UTC), UserState.DUE),  # notAfter − 1 s
    (dt.datetime(2027, 7, 15, 9, 29, 59, tzinfo=UTC), UserState.DUE),  # notAfter itself (inclusive)
    (dt.datetime(2027, 7, 15, 9, 30, 0, tzinfo=UTC), UserState.EXPIRED),  # notAfter + 1 s
    (dt.datetime(2027, 8, 15, 0, 0, 0, tzinfo=UTC), UserState.EXPIRED),  # +19 months
]


@pytest.mark.parametrize(("moment", "state"), MOMENTS, ids=[f"{m:%Y-%m-%dT%H:%M:%S}" for m, _ in MOMENTS])
def test_state_across_the_reminder_point_and_expiry(moment: dt.datetime, state: UserState) -> None:
    clock = FakeClock(ISSUED)
    clock.set(moment)
    assert state_at(clock, dates()) is state


def test_moving_the_clock_second_by_second_across_both_marks() -> None:
    current = dates()
    reminder = reminder_point(current.not_before, 12)
    clock = FakeClock(reminder - 2 * ONE_SECOND)
    seen = []
    for _ in range(4):
        seen.append(state_at(clock, current))
        clock.advance(ONE_SECOND)
    assert seen == [UserState.ACTIVE, UserState.ACTIVE, UserState.DUE, UserState.DUE]
    clock.set(current.not_after - 2 * ONE_SECOND)
    seen = []
    for _ in range(4):
        seen.append(state_at(clock, current))
        clock.advance(ONE_SECOND)
    assert seen == [UserState.DUE, UserState.DUE, UserState.DUE, UserState.EXPIRED]


@pytest.mark.parametrize(
    ("start", "months", "reminder", "due_from", "expired_from"),
    [
        # 31 Aug + 12 months = 31 Aug; + 18 months = 28 Feb (clipped), expiry at the end of 27 Feb + ...
        (
            dt.datetime(2025, 8, 31, 12, 0, tzinfo=UTC),
            18,
            12,
            dt.datetime(2026, 8, 31, 12, 0, tzinfo=UTC),
            dt.datetime(2027, 2, 28, 12, 0, tzinfo=UTC),
        ),
        # 29 Feb: the reminder a year on is 28 Feb
        (
            dt.datetime(2028, 2, 29, 8, 0, tzinfo=UTC),
            18,
            12,
            dt.datetime(2029, 2, 28, 8, 0, tzinfo=UTC),
            dt.datetime(2029, 8, 29, 8, 0, tzinfo=UTC),
        ),
        # a group policy: 6 months, reminder at 4
        (
            dt.datetime(2025, 12, 31, 23, 0, tzinfo=UTC),
            6,
            4,
            dt.datetime(2026, 4, 30, 23, 0, tzinfo=UTC),
            dt.datetime(2026, 6, 30, 23, 0, tzinfo=UTC),
        ),
    ],
    ids=["31-aug", "29-feb", "group-6-4"],
)
def test_month_ends(
    start: dt.datetime, months: int, reminder: int, due_from: dt.datetime, expired_from: dt.datetime
) -> None:
    current = dates(start, months)
    assert renewal_state(current, False, due_from - ONE_SECOND, reminder) is UserState.ACTIVE
    assert renewal_state(current, False, due_from, reminder) is UserState.DUE
    assert renewal_state(current, False, expired_from - ONE_SECOND, reminder) is UserState.DUE
    assert renewal_state(current, False, expired_from, reminder) is UserState.EXPIRED


@pytest.mark.parametrize("moment", [ISSUED, ISSUED + dt.timedelta(days=400), ISSUED + dt.timedelta(days=600)])
def test_revoked_wins_over_everything(moment: dt.datetime) -> None:
    assert renewal_state(dates(), True, moment, 12) is UserState.REVOKED
    assert renewal_state(None, True, moment, 12) is UserState.REVOKED


def test_never_enrolled_is_registered() -> None:
    assert renewal_state(None, False, ISSUED, 12) is UserState.REGISTERED


def test_the_reminder_comes_from_the_policy_not_a_constant() -> None:
    current = dates()
    moment = dt.datetime(2026, 10, 1, tzinfo=UTC)  # +8.5 months
    assert renewal_state(current, False, moment, 12) is UserState.ACTIVE
    assert renewal_state(current, False, moment, 8) is UserState.DUE
