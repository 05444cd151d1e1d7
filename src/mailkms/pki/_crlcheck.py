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
    return RevocationResult(
        RevocationStatus.REVOKED,
        f"revoked on {entry.revocation_date_utc:%Y-%m-%d %H:%M:%S} UTC",
        entry.revocation_date_utc,
        source,
    )
