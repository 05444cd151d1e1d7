"""Certificate requests, parsed leniently.

Only the public key and the proof of possession are taken from a CSR: subject and SAN are
always built from the enrolled mailbox. `cryptography` parses the ordinary request (strict DER);
what it refuses or what is out of the ordinary goes to asn1crypto, which parses leniently (it
accepts, for example, certmonger's PrintableString CN holding '@'). `cryptography` checks the
signature.
"""

from __future__ import annotations

from dataclasses import dataclass

from asn1crypto import csr as asn1_csr
from asn1crypto import pem as asn1_pem
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from mailkms.errors import BadCSR, BadCSRSignature
from mailkms.pki._keys import PublicKey, key_type_of

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


@dataclass(frozen=True)
class CheckedCSR:
    public_key: PublicKey
    der: bytes
    claimed_emails: tuple[str, ...]  # what the requester wrote; informative only


def _to_der(data: bytes) -> bytes:
    stripped = data.strip()
    if asn1_pem.detect(stripped):
        try:
            _, _, der = asn1_pem.unarmor(stripped)
        except ValueError as exc:
            raise BadCSR(f"the PEM armour is broken: {exc}") from None
        return bytes(der)
    return bytes(data)


# Signature algorithms of the fast path: (signature algorithm as asn1crypto names it, hash).
_FAST_ALGORITHMS: dict[x509.ObjectIdentifier, tuple[str, str]] = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: ("ecdsa", "sha256"),
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: ("ecdsa", "sha384"),
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: ("ecdsa", "sha512"),
    SignatureAlgorithmOID.RSA_WITH_SHA256: ("rsassa_pkcs1v15", "sha256"),
    SignatureAlgorithmOID.RSA_WITH_SHA384: ("rsassa_pkcs1v15", "sha384"),
    SignatureAlgorithmOID.RSA_WITH_SHA512: ("rsassa_pkcs1v15", "sha512"),
}


_Parsed = tuple[
    object, str, str | None, bytes, bytes, tuple[str, ...]
]  # key (or its SPKI DER), algo, hash, sig, tbs, emails


def _parse_fast(der: bytes) -> _Parsed | None:
    """What `check_csr` reads from a request, parsed by `cryptography` (strict DER, in Rust; about
    a third of the lenient parse's cost); None when anything is out of the ordinary (another
    algorithm, a subject `cryptography` refuses, more than one emailAddress), for the lenient parse."""
    try:
        request = x509.load_der_x509_csr(der)
        algorithm = _FAST_ALGORITHMS.get(request.signature_algorithm_oid)
        emails = request.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)
        if algorithm is None or len(emails) > 1:
            return None
        claimed = tuple(str(e.value) for e in emails)
        return (
            request.public_key(),
            algorithm[0],
            algorithm[1],
            request.signature,
            request.tbs_certrequest_bytes,
            claimed,
        )
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None


def _parse_lenient(der: bytes) -> _Parsed:
    try:
        request = asn1_csr.CertificationRequest.load(der, strict=True)
        info = request["certification_request_info"]
        spki_der = info["subject_pk_info"].dump()
        algo = request["signature_algorithm"]
        signature_algo = algo.signature_algo
        hash_name = None if signature_algo == "rsassa_pss" else algo.hash_algo
        signature = request["signature"].native
        tbs = info.dump()
        claimed = (
            tuple(str(v) for k, v in info["subject"].native.items() if k == "email_address")
            if isinstance(info["subject"].native, dict)
            else ()
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise BadCSR(f"not a PKCS#10 certificate request ({exc.__class__.__name__})") from None
    return spki_der, signature_algo, hash_name, signature, tbs, claimed


def check_csr(data: bytes) -> CheckedCSR:
    """Parse a PEM or DER PKCS#10 request and verify its self-signature."""
    der = _to_der(data)
    key, signature_algo, hash_name, signature, tbs, claimed = _parse_fast(der) or _parse_lenient(der)
    try:
        loaded = serialization.load_der_public_key(key) if isinstance(key, bytes) else key
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise BadCSR("the request's public key cannot be read") from None
    if not isinstance(loaded, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise BadCSR("only RSA and ECDSA keys are accepted")
    key_type_of(loaded)  # refuses sizes and curves we do not issue for
    if signature_algo == "rsassa_pss":  # before the hash: PSS names its hash in parameters (SHA-1 by default)
        raise BadCSR("RSASSA-PSS request signatures are not supported; sign with PKCS#1 v1.5 or ECDSA")
    if hash_name not in _HASHES:
        raise BadCSR(f"signature hash {hash_name} is not accepted (SHA-256/384/512)")
    digest = _HASHES[hash_name]()
    try:
        if isinstance(loaded, rsa.RSAPublicKey):
            if signature_algo != "rsassa_pkcs1v15":
                raise BadCSR("the request's signature algorithm does not match its RSA key")
            loaded.verify(signature, tbs, padding.PKCS1v15(), digest)
        else:
            if signature_algo != "ecdsa":
                raise BadCSR("the request's signature algorithm does not match its EC key")
            loaded.verify(signature, tbs, ec.ECDSA(digest))
    except InvalidSignature:
        raise BadCSRSignature() from None
    return CheckedCSR(public_key=loaded, der=der, claimed_emails=claimed)
