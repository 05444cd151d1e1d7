"""Path checks for mailkms's fixed hierarchy: root -> issuing CA -> end entity."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from mailkms.errors import BadMessage, BadSignature, UnknownIssuer
from mailkms.pki._unreadable import UNREADABLE, unreadable

E = TypeVar("E", bound=x509.ExtensionType)
_NOT_ISSUED: tuple[type[Exception], ...] = (InvalidSignature, *UNREADABLE)


def ca_key_id(ca: x509.Certificate) -> str:
    """A CA certificate's Subject Key Identifier, hex: what its CRLs' and certificates' AKI name."""
    return ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def signer_key_id(cert: x509.Certificate) -> str | None:
    """The key id (hex) a certificate's AKI names: which CA key signed it. None without one."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return None
    return aki.hex() if aki is not None else None


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """False also when either certificate cannot be read (e.g. the issuer's key is of an unknown
    algorithm): such a certificate is no issuer."""
    try:
        cert.verify_directly_issued_by(issuer)
    except _NOT_ISSUED:
        return False
    return True


def extension_value(cert: x509.Certificate, kind: type[E]) -> E | None:
    """The extension's value, None when absent; BadMessage when the certificate's extensions cannot
    be read (cryptography parses them only now: a duplicated extension, bad DER inside one)."""
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except UNREADABLE as exc:
        raise BadMessage(unreadable("a certificate's extensions", exc)) from None


def _valid_at(cert: x509.Certificate, at: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def _is_ca(cert: x509.Certificate) -> bool:
    """A certificate whose extensions cannot be read is no CA."""
    try:
        constraints = extension_value(cert, x509.BasicConstraints)
    except BadMessage:
        return False
    return constraints is not None and constraints.ca


def has_email_protection(cert: x509.Certificate) -> bool:
    eku = extension_value(cert, x509.ExtendedKeyUsage)
    return eku is not None and ExtendedKeyUsageOID.EMAIL_PROTECTION in eku


def _name(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except UNREADABLE:
        return "(unreadable name)"


def issuing_cas_under(candidates: Iterable[x509.Certificate], root: x509.Certificate) -> list[x509.Certificate]:
    """The CA certificates among `candidates` that `root` signed (not the root itself), in order, once each."""
    found: list[x509.Certificate] = []
    for cert in candidates:
        if cert != root and cert not in found and _is_ca(cert) and issued_by(cert, root):
            found.append(cert)
    return found


def verify_email_chain(
    leaf: x509.Certificate,
    candidates: Iterable[x509.Certificate],
    root: x509.Certificate,
    at: dt.datetime,
) -> x509.Certificate:
    """Check leaf <- issuing CA <- pinned root, all valid at `at`; returns the issuing CA.

    Raises UnknownIssuer when no path to the root exists, BadSignature when a
    certificate on the path is outside its validity or unfit for e-mail, and BadMessage when
    the leaf's extensions cannot be read. Candidates that cannot be read are passed over.
    """
    for issuing in candidates:
        if issuing == root or not _is_ca(issuing):
            continue
        if issued_by(leaf, issuing) and issued_by(issuing, root):
            for cert, what in ((root, "root CA"), (issuing, "issuing CA"), (leaf, "certificate")):
                if not _valid_at(cert, at):
                    raise BadSignature(f"the {what} {_name(cert)} was not valid at {at:%Y-%m-%d %H:%M:%S} UTC")
            if not has_email_protection(leaf):
                raise BadSignature("the certificate is not for e-mail protection")
            return issuing
    raise UnknownIssuer("the certificate does not chain to the pinned mailkms CA")


def mailboxes_of(cert: x509.Certificate) -> list[str]:
    """The rfc822Name SANs, lower case; BadMessage when the extensions cannot be read."""
    san = extension_value(cert, x509.SubjectAlternativeName)
    if san is None:
        return []
    return [name.lower() for name in san.get_values_for_type(x509.RFC822Name)]
