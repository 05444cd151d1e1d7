"""OCSP (RFC 6960 / RFC 5019) answered by a delegated responder. Pure: no clock, no store.

The responder certificate is issued by the issuing CA with id-kp-OCSPSigning and ocsp-nocheck
(profiles); the responses carry it in `certs` (openssl needs it), name it by key hash, and answer
with the hash algorithm of the request (openssl asks with SHA-1 by default).
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from mailkms.errors import Malformed
from mailkms.pki._keys import CASigner, signature_hash_for

# BR 4.9.10: 8 h <= nextUpdate - thisUpdate <= 10 d; openssl rejects a thisUpdate in its future.
MIN_VALIDITY = dt.timedelta(hours=8)
MAX_VALIDITY = dt.timedelta(days=10) - dt.timedelta(seconds=1)
BACKDATE = dt.timedelta(minutes=1)
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
HASH_NAMES = tuple(_HASHES)


class CertStatus(enum.StrEnum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class CertState:
    status: CertStatus
    revoked_at: dt.datetime | None = None
    reason: x509.ReasonFlags | None = None


@dataclass(frozen=True, slots=True)
class OCSPQuery:
    serial: int
    hash_name: str
    issuer_name_hash: bytes
    issuer_key_hash: bytes


def parse_request(der: bytes) -> OCSPQuery:
    """One CertID (RFC 5019 §2.1.1: clients send one); anything else is malformed."""
    try:
        request = ocsp.load_der_ocsp_request(der)
        hash_name = request.hash_algorithm.name
        query = OCSPQuery(request.serial_number, hash_name, request.issuer_name_hash, request.issuer_key_hash)
    except (ValueError, TypeError, NotImplementedError) as exc:  # several CertIDs, unknown hash OIDs
        raise Malformed(f"not a single-certificate OCSP request: {exc}") from None
    if hash_name not in _HASHES:
        raise Malformed(f"CertID hash {hash_name} is not supported")
    return query


def issuer_hashes(issuing_ca: x509.Certificate, issued: x509.Certificate) -> dict[str, tuple[bytes, bytes]]:
    """(issuerNameHash, issuerKeyHash) of the CA per hash algorithm; `issued` is any certificate
    it issued (the responder's), so that cryptography computes the hashes for us."""
    out: dict[str, tuple[bytes, bytes]] = {}
    for name, algorithm in _HASHES.items():
        req = ocsp.OCSPRequestBuilder().add_certificate(issued, issuing_ca, algorithm()).build()
        out[name] = (req.issuer_name_hash, req.issuer_key_hash)
    return out


def _check_validity(validity: dt.timedelta) -> None:
    if not MIN_VALIDITY <= validity <= MAX_VALIDITY:
        raise Malformed("an OCSP response must be valid between 8 hours and 10 days (BR 4.9.10)")


def sign_response(
    responder: CASigner,
    query: OCSPQuery,
    state: CertState,
    *,
    now: dt.datetime,
    validity: dt.timedelta,
) -> bytes:
    """A signed, successful basic response for one CertID (as asked), DER."""
    _check_validity(validity)
    this_update = now.replace(microsecond=0) - BACKDATE
    revoked = state.status is CertStatus.REVOKED
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(
            query.issuer_name_hash,
            query.issuer_key_hash,
            query.serial,
            _HASHES[query.hash_name](),
            _CRYPTO_STATUS[state.status],
            this_update,
            this_update + validity,
            state.revoked_at.replace(microsecond=0) if revoked and state.revoked_at else None,
            state.reason if revoked else None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, responder.certificate)
        .certificates([responder.certificate])
    )
    key = responder.private_key
    response = builder.sign(key, signature_hash_for(key))
    return response.public_bytes(serialization.Encoding.DER)


def unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)


MALFORMED_RESPONSE = unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
UNAUTHORIZED_RESPONSE = unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
INTERNAL_ERROR_RESPONSE = unsuccessful(ocsp.OCSPResponseStatus.INTERNAL_ERROR)
TRY_LATER_RESPONSE = unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)  # RFC 6960 §2.3: busy, nothing signed

_CRYPTO_STATUS = {
    CertStatus.GOOD: ocsp.OCSPCertStatus.GOOD,
    CertStatus.REVOKED: ocsp.OCSPCertStatus.REVOKED,
    CertStatus.UNKNOWN: ocsp.OCSPCertStatus.UNKNOWN,
}
