"""Lifecycle decisions as pure functions of certificates, policy and the clock."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from mailkms.pki import reminder_point


class UserState(enum.StrEnum):
    REGISTERED = "REGISTERED"  # token issued, never enrolled
    ACTIVE = "ACTIVE"
    DUE = "DUE"
    EXPIRED = "EXPIRED"
    REVOKED = "REVOKED"


@dataclass(frozen=True)
class CertDates:
    not_before: dt.datetime
    not_after: dt.datetime  # inclusive


def renewal_state(current: CertDates | None, revoked: bool, now: dt.datetime, reminder_months: int) -> UserState:
    """ACTIVE until the reminder point, DUE from it, EXPIRED once notAfter has passed."""
    if revoked:
        return UserState.REVOKED
    if current is None:
        return UserState.REGISTERED
    if now > current.not_after:
        return UserState.EXPIRED
    if now >= reminder_point(current.not_before, reminder_months):
        return UserState.DUE
    return UserState.ACTIVE
