"""Validity periods: calendar months, inclusive notAfter (start + months − 1 s), the 824-day cap."""

from __future__ import annotations

import calendar
import datetime as dt

import pytest

from mailkms.clock import UTC
from mailkms.pki import MAX_SUBSCRIBER_DAYS, Validity, add_months, reminder_point, subscriber_validity
from mailkms.pki._validity import fixed_validity

ONE_SECOND = dt.timedelta(seconds=1)
CAP = dt.timedelta(days=MAX_SUBSCRIBER_DAYS)


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def calendar_months_later(when: dt.datetime, months: int) -> dt.datetime:
    """An oracle independent of dateutil: same day and time, clipped to the last day of the month."""
    year, month0 = divmod(when.month - 1 + months, 12)
    year += when.year
    day = min(when.day, calendar.monthrange(year, month0 + 1)[1])
    return when.replace(year=year, month=month0 + 1, day=day)


# (start, months, expected inclusive notAfter)
TABLE = [
    (utc(2026, 1, 15, 9, 30, 0), 18, utc(2027, 7, 15, 9, 29, 59)),
    (utc(2025, 8, 31, 9, 30, 0), 18, utc(2027, 2, 28, 9, 29, 59)),  # 31 Aug + 18 months: end of February
    (utc(2026, 8, 31, 9, 30, 0), 18, utc(2028, 2, 29, 9, 29, 59)),  # ... of a leap year
    (utc(2024, 2, 29, 0, 0, 0), 18, utc(2025, 8, 28, 23, 59, 59)),  # 29 Feb + 18 months = 29 Aug, minus 1 s
    (utc(2028, 2, 29, 12, 0, 0), 12, utc(2029, 2, 28, 11, 59, 59)),  # 29 Feb + 1 year: 28 Feb
    (utc(2025, 12, 31, 23, 59, 59), 18, utc(2027, 6, 30, 23, 59, 58)),  # 31 Dec + 18 months: 30 Jun
    (utc(2025, 12, 31, 0, 0, 0), 12, utc(2026, 12, 30, 23, 59, 59)),
    (utc(2026, 1, 1, 0, 0, 0), 18, utc(2027, 6, 30, 23, 59, 59)),  # midnight: the day before
    (utc(2026, 1, 31, 12, 0, 0), 1, utc(2026, 2, 28, 11, 59, 59)),
    (utc(2026, 3, 31, 8, 0, 0), 18, utc(2027, 9, 30, 7, 59, 59)),
    (utc(2026, 5, 31, 8, 0, 0), 6, utc(2026, 11, 30, 7, 59, 59)),
]


@pytest.mark.parametrize(("start", "months", "not_after"), TABLE, ids=[f"{s:%Y-%m-%d}+{m}" for s, m, _ in TABLE])
def test_subscriber_validity_table(start: dt.datetime, months: int, not_after: dt.datetime) -> None:
    assert subscriber_validity(start, months) == Validity(start, not_after)


def test_truncates_to_the_second() -> None:
    validity = subscriber_validity(utc(2026, 1, 15, 9, 30, 0).replace(microsecond=999_999), 18)
    assert validity == Validity(utc(2026, 1, 15, 9, 30, 0), utc(2027, 7, 15, 9, 29, 59))
    assert validity.not_before.microsecond == 0
    assert validity.not_after.microsecond == 0


def _starts() -> list[dt.datetime]:
    """Every day from 2024 to 2028 (two leap years), at an odd time with microseconds."""
    first = utc(2024, 1, 1, 13, 37, 42).replace(microsecond=123_456)
    return [first + dt.timedelta(days=n) for n in range(0, 5 * 366)]


@pytest.mark.parametrize("months", [1, 6, 12, 18, 24, 27])
def test_uncapped_lifetimes_end_one_second_before_the_same_wall_time(months: int) -> None:
    for start in _starts():
        v = subscriber_validity(start, months)
        not_before = start.replace(microsecond=0)
        assert v.not_before == not_before
        assert v.not_after == calendar_months_later(not_before, months) - ONE_SECOND, start
        assert v.not_after - v.not_before + ONE_SECOND <= CAP, start


@pytest.mark.parametrize("months", [28, 30, 36, 120])
def test_long_lifetimes_are_capped_at_824_days_inclusive(months: int) -> None:
    for start in _starts():
        v = subscriber_validity(start, months)
        # pkilint measures notAfter − notBefore + 1 s and errors at 825 days
        assert v.not_after - v.not_before + ONE_SECOND == CAP, start


def test_the_cap_is_824_days() -> None:
    assert MAX_SUBSCRIBER_DAYS == 824


def test_27_months_is_the_longest_lifetime_never_capped() -> None:
    longest = max(
        subscriber_validity(s, 27).not_after - subscriber_validity(s, 27).not_before + ONE_SECOND for s in _starts()
    )
    assert longest < CAP
    assert longest >= dt.timedelta(days=820)


@pytest.mark.parametrize(
    ("not_before", "months", "expected"),
    [
        (utc(2026, 1, 15, 9, 30, 0), 12, utc(2027, 1, 15, 9, 30, 0)),
        (utc(2025, 8, 31, 9, 30, 0), 12, utc(2026, 8, 31, 9, 30, 0)),
        (utc(2025, 8, 31, 9, 30, 0), 6, utc(2026, 2, 28, 9, 30, 0)),
        (utc(2028, 2, 29, 0, 0, 0), 12, utc(2029, 2, 28, 0, 0, 0)),
        (utc(2025, 12, 31, 23, 59, 59), 12, utc(2026, 12, 31, 23, 59, 59)),
        (utc(2025, 12, 31, 23, 59, 59), 2, utc(2026, 2, 28, 23, 59, 59)),
    ],
)
def test_reminder_point_is_calendar_months_after_issue(
    not_before: dt.datetime, months: int, expected: dt.datetime
) -> None:
    assert reminder_point(not_before, months) == expected


@pytest.mark.parametrize(("lifetime", "reminder"), [(18, 12), (12, 6), (6, 5), (27, 26), (2, 1)])
def test_reminder_point_lies_inside_the_validity(lifetime: int, reminder: int) -> None:
    for start in _starts()[::7]:
        v = subscriber_validity(start, lifetime)
        assert v.not_before < reminder_point(v.not_before, reminder) <= v.not_after, start


def test_add_months_agrees_with_the_oracle() -> None:
    for start in _starts():
        for months in (1, 11, 12, 13, 18, 25):
            assert add_months(start, months) == calendar_months_later(start, months)


def test_fixed_validity_is_inclusive_and_truncated() -> None:
    v = fixed_validity(utc(2026, 1, 15, 9, 30, 0).replace(microsecond=5), dt.timedelta(days=90))
    assert v == Validity(utc(2026, 1, 15, 9, 30, 0), utc(2026, 4, 15, 9, 29, 59))
