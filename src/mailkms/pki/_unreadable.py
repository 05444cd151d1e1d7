"""What the libraries raise on input they cannot read.

cryptography parses a certificate's extensions, names and key only when they are first asked
for, so a certificate that loaded fine can still raise later; asn1crypto parses lazily too.
The pki functions that read what arrives from outside catch exactly these and raise a mailkms
error naming the class only (never the bytes: they may be anyone's).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

UNREADABLE: tuple[type[Exception], ...] = (
    ValueError,  # also UnicodeDecodeError, and asn1crypto's and cryptography's parse errors
    TypeError,
    KeyError,  # asn1crypto: a field or an OID it has no spec for
    IndexError,
    OverflowError,
    UnsupportedAlgorithm,  # a key, signature or content algorithm cryptography does not know
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


def unreadable(what: str, exc: BaseException) -> str:
    """The reason given for a refusal: what could not be read and the exception's class."""
    return f"{what} cannot be read ({exc.__class__.__name__})"
