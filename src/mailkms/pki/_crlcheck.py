"""Revocation status of an end-entity certificate from a CRL (RFC 5280 §6.3), pure.

The caller fetches the CRL (the client does, from the certificate's CRL distribution point);
this module only judges it: signed by the issuer, current, and whether it lists the serial.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from cryptography import x509


class RevocationStatus(enum.StrEnum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"  # not checked: no CRL reachable, or none usable


@dataclass(frozen=True)
class RevocationResult:
    status: RevocationStatus
    detail: str
    revoked_at: dt.datetime | None = None
    source: str = ""
    reason: x509.ReasonFlags | None = None  # the CRL entry's reasonCode; None when it gives none
    invalid_since: dt.datetime | None = None  # the entry's invalidityDate, if any


# Reasons that say the key itself stayed sound: a signature made before the revocation keeps its
# worth. Any other (keyCompromise, or no reason given) says nothing of when the key was lost, and
# the signing time is written by whoever holds the key: no signature by it can be trusted.
KEY_SOUND_REASONS = frozenset(
    {
        x509.ReasonFlags.superseded,
        x509.ReasonFlags.affiliation_changed,
        x509.ReasonFlags.cessation_of_operation,
        x509.ReasonFlags.privilege_withdrawn,
    }
)


def revoked_signature_problem(result: RevocationResult, signed_at: dt.datetime | None) -> str | None:
    """Why a signature by a revoked certificate is not to be trusted, or None when it still counts:
    revoked for a reason that keeps the key sound, after the time the message says it was signed."""
    if result.status is not RevocationStatus.REVOKED:
        return None
    if result.revoked_at is None:  # a checker that knows no date: nothing to weigh the signing time against
        return f"the signer's certificate has been {result.detail}."
    when = f"{result.revoked_at:%Y-%m-%d %H:%M:%S} UTC"
    if result.reason not in KEY_SOUND_REASONS:
        why = "its key was compromised" if result.reason is x509.ReasonFlags.key_compromise else "no reason given"
        since = f", the key unsafe since {result.invalid_since:%Y-%m-%d %H:%M:%S} UTC" if result.invalid_since else ""
        return (
            f"the signer's certificate was revoked on {when} ({why}{since}): no signature made with its key "
            "can be trusted, whatever signing time the message claims."
        )
    name = result.reason.name.replace("_", " ") if result.reason else ""
    if signed_at is None:
        return (
            f"the signer's certificate was revoked on {when} ({name}) and the message does not say when it was signed."
        )
    if signed_at >= result.revoked_at:
        return f"the signer's certificate was revoked on {when} ({name}), before the message says it was signed."
    return None


def crl_urls(cert: x509.Certificate) -> list[str]:
    """The http(s) CRL distribution points of a certificate."""
    try:
        cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    urls: list[str] = []
    for point in cdp:
        for name in point.full_name or []:
            if isinstance(name, x509.UniformResourceIdentifier) and name.value.lower().startswith(
                ("http://", "https://")
            ):
                urls.append(name.value)
    return urls


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


def check_crl(
    crl: x509.CertificateRevocationList,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    now: dt.datetime,
    source: str = "",
) -> RevocationResult:
    """GOOD or REVOKED from a CRL that is the issuer's and current; UNKNOWN otherwise."""
    if crl.issuer != issuer.subject or not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        return RevocationResult(
            RevocationStatus.UNKNOWN, "the CRL is not signed by the certificate's issuer", None, source
        )
    next_update = crl.next_update_utc
    if next_update is not None and now > next_update:
        return RevocationResult(
            RevocationStatus.UNKNOWN,
            f"the CRL is out of date (next update was {next_update:%Y-%m-%d %H:%M} UTC)",
            None,
            source,
        )
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is None:
        return RevocationResult(
            RevocationStatus.GOOD, f"not revoked (CRL of {crl.last_update_utc:%Y-%m-%d %H:%M} UTC)", None, source
        )
    reason: x509.ReasonFlags | None = None
    invalid_since: dt.datetime | None = None
    try:
        extensions = list(entry.extensions)
    except (ValueError, x509.DuplicateExtension):
        extensions = []  # unreadable: no reason, so judged as strictly as keyCompromise
    for extension in extensions:
        if isinstance(extension.value, x509.CRLReason):
            reason = extension.value.reason
        elif isinstance(extension.value, x509.InvalidityDate):
            invalid_since = extension.value.invalidity_date_utc
    named = f" ({reason.name.replace('_', ' ')})" if reason is not None and reason.name != "unspecified" else ""
    return RevocationResult(
        RevocationStatus.REVOKED,
        f"revoked on {entry.revocation_date_utc:%Y-%m-%d %H:%M:%S} UTC{named}",
        entry.revocation_date_utc,
        source,
        None if reason is x509.ReasonFlags.unspecified else reason,
        invalid_since,
    )
