"""Path checks for mailkms's fixed hierarchy: root -> issuing CA -> end entity."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from mailkms.errors import BadSignature, UnknownIssuer


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _valid_at(cert: x509.Certificate, at: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def has_email_protection(cert: x509.Certificate) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.EMAIL_PROTECTION in eku


def verify_email_chain(
    leaf: x509.Certificate,
    candidates: Iterable[x509.Certificate],
    root: x509.Certificate,
    at: dt.datetime,
) -> x509.Certificate:
    """Check leaf <- issuing CA <- pinned root, all valid at `at`; returns the issuing CA.

    Raises UnknownIssuer when no path to the root exists and BadSignature when a
    certificate on the path is outside its validity or unfit for e-mail.
    """
    for issuing in candidates:
        if issuing == root or not _is_ca(issuing):
            continue
        if issued_by(leaf, issuing) and issued_by(issuing, root):
            for cert, what in ((root, "root CA"), (issuing, "issuing CA"), (leaf, "certificate")):
                if not _valid_at(cert, at):
                    raise BadSignature(
                        f"the {what} {cert.subject.rfc4514_string()} was not valid at {at:%Y-%m-%d %H:%M:%S} UTC"
                    )
            if not has_email_protection(leaf):
                raise BadSignature("the certificate is not for e-mail protection")
            return issuing
    raise UnknownIssuer("the certificate does not chain to the pinned mailkms CA")


def mailboxes_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [name.lower() for name in san.get_values_for_type(x509.RFC822Name)]
