"""Validity periods: calendar months, inclusive notAfter, BR cap."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from dateutil.relativedelta import relativedelta

# S/MIME BR: at most 825 days; pkilint counts inclusively and errors at 825, so 824.
MAX_SUBSCRIBER_DAYS = 824
ONE_SECOND = dt.timedelta(seconds=1)


def truncate_to_second(when: dt.datetime) -> dt.datetime:
    return when.replace(microsecond=0)


def add_months(when: dt.datetime, months: int) -> dt.datetime:
    """Calendar months: 31 Jan + 1 month = 28/29 Feb (dateutil's rule)."""
    return when + relativedelta(months=months)


@dataclass(frozen=True)
class Validity:
    not_before: dt.datetime
    not_after: dt.datetime  # inclusive, as in X.509


def subscriber_validity(start: dt.datetime, months: int) -> Validity:
    """notBefore = start (to the second); notAfter = start + months − 1 s, capped at 824 days.

    X.509 validity is inclusive of both ends, so a period of exactly `months`
    calendar months ends one second before the same wall time `months` later.
    """
    not_before = truncate_to_second(start)
    end = min(add_months(not_before, months), not_before + dt.timedelta(days=MAX_SUBSCRIBER_DAYS))
    return Validity(not_before, end - ONE_SECOND)


def fixed_validity(start: dt.datetime, duration: dt.timedelta) -> Validity:
    not_before = truncate_to_second(start)
    return Validity(not_before, not_before + duration - ONE_SECOND)


def reminder_point(not_before: dt.datetime, months: int) -> dt.datetime:
    return add_months(not_before, months)
