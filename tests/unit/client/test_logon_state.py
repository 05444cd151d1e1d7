"""logon_state: what the client decides at log-on, from its installed generation and the clock."""

from __future__ import annotations

import datetime as dt

import pytest

from mailkms.client._core import PROMPT, LogonState, logon_state
from mailkms.client._store import Generation
from mailkms.clock import UTC, FakeClock
from mailkms.pki import reminder_point, subscriber_validity

ONE_SECOND = dt.timedelta(seconds=1)
ISSUED = dt.datetime(2026, 1, 15, 9, 30, 0, tzinfo=UTC)
VALIDITY = subscriber_validity(ISSUED, 18)
REMINDER = reminder_point(VALIDITY.not_before, 12)


def generation(not_after: dt.datetime = VALIDITY.not_after, reminder_at: dt.datetime = REMINDER) -> Generation:
    """Stored as the client stores it: ISO strings from the certificate and the delivery manifest."""
    return Generation(
        generation=1,
        signing_serial="1a",
        encryption_serial="2b",
        signing_pem="",
        encryption_pem="",
        reminder_at=reminder_at.isoformat(),
        not_before=VALIDITY.not_before.isoformat(),
        not_after=not_after.isoformat(),
        installed_at=ISSUED.isoformat(),
        request_id="req-1",
    )


MOMENTS = [
    (ISSUED, LogonState.ACTIVE),
    (ISSUED + dt.timedelta(days=334), LogonState.ACTIVE),  # +11 months
    (REMINDER - ONE_SECOND, LogonState.ACTIVE),
    (REMINDER, LogonState.DUE),
    (REMINDER + ONE_SECOND, LogonState.DUE),
    (ISSUED + dt.timedelta(days=380), LogonState.DUE),  # +12.5 months
    (VALIDITY.not_after - ONE_SECOND, LogonState.DUE),
    (VALIDITY.not_after, LogonState.DUE),  # notAfter is the last valid second
    (VALIDITY.not_after + ONE_SECOND, LogonState.EXPIRED),
    (ISSUED + dt.timedelta(days=578), LogonState.EXPIRED),  # +19 months
]


@pytest.mark.parametrize(("moment", "state"), MOMENTS, ids=[f"{m:%Y-%m-%dT%H:%M:%S}" for m, _ in MOMENTS])
def test_logon_state_across_the_marks(moment: dt.datetime, state: LogonState) -> None:
    clock = FakeClock(moment)
    assert logon_state(generation(), clock.now()) is state


def test_not_enrolled() -> None:
    assert logon_state(None, ISSUED) is LogonState.NOT_ENROLLED


def test_the_server_sets_the_reminder_point() -> None:
    """The client asks from the reminder_at the delivery carried (the group's policy), not from 12 months."""
    early = generation(reminder_at=ISSUED + dt.timedelta(days=120))
    assert logon_state(early, ISSUED + dt.timedelta(days=121)) is LogonState.DUE
    assert logon_state(generation(), ISSUED + dt.timedelta(days=121)) is LogonState.ACTIVE


def test_z_suffixed_times_are_read_too() -> None:
    stored = generation()
    zulu = Generation(**{**stored.__dict__, "not_after": VALIDITY.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")})
    assert logon_state(zulu, VALIDITY.not_after) is LogonState.DUE
    assert logon_state(zulu, VALIDITY.not_after + ONE_SECOND) is LogonState.EXPIRED


def test_the_prompt_is_exactly_the_three_lines() -> None:
    assert PROMPT.split("\n") == [
        "Your security certificates are approaching expiration.",
        "Do you want to send a certificate update request to the",
        "Key Management Server?",
    ]
