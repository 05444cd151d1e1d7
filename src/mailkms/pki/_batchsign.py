"""Signing many subscriber certificates in a worker process: pure (DER in, DER out, no I/O).

`init_signer` gives the process its issuing CA once (certificate and key as DER, handed over by
the parent through the pipe multiprocessing opens); `sign_chunk` then signs requests against it.
Kept in the PKI core so a worker process imports only the core, not the services and the store.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mailkms.errors import BadCSR, BadKey, MailkmsError
from mailkms.pki._csr import check_csr
from mailkms.pki._issuer import Issuer
from mailkms.pki._keys import KeyType, PublicKey, SoftSigner, generate_key, load_private_key_der, private_key_der
from mailkms.pki._pkcs11 import TokenKeyRef, open_token_key
from mailkms.pki._profiles import CertKind, PublicURLs
from mailkms.pki._validity import Validity


@dataclass(frozen=True)
class SignJob:
    """One subscriber certificate to sign: from a CSR (checked by the signer: its signature, and that
    it names no other mailbox) or from a bare public key (SubjectPublicKeyInfo DER)."""

    kind: str  # CertKind value
    mailbox: str
    not_before: dt.datetime
    not_after: dt.datetime
    allowed: tuple[str, ...]  # KeyType values
    csr: bytes = b""
    public_key_der: bytes = b""
    crl_partition: int | None = None  # the CRL partition its CDP names; None: the whole-CA CRL


SignOutcome = bytes | tuple[str, str]  # the certificate's DER, or (error class, detail)

_ISSUER: Issuer | None = None  # the worker's own, set once by init_signer


def init_signer(cert_der: bytes, key: bytes | TokenKeyRef, public_url: str, ca_issuers: str | None = None) -> None:
    """`key`: PKCS#8 DER, or where the key lives in a PKCS#11 token (this process opens its own session)."""
    global _ISSUER
    private = open_token_key(key) if isinstance(key, TokenKeyRef) else load_private_key_der(key)
    signer = SoftSigner(x509.load_der_x509_certificate(cert_der), private)
    _ISSUER = Issuer(signer, PublicURLs(public_url), ca_issuers)


def _sign_one(issuer: Issuer, job: SignJob) -> bytes:
    if job.csr:
        checked = check_csr(job.csr)
        if any(e.lower() != job.mailbox for e in checked.claimed_emails):
            raise BadCSR("the certificate request names another mailbox")
        public_key: PublicKey = checked.public_key
    else:
        loaded = serialization.load_der_public_key(job.public_key_der)
        if not isinstance(loaded, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise BadKey("only RSA and ECDSA keys are certified")
        public_key = loaded
    prepared = issuer.prepare_subscriber(
        CertKind(job.kind),
        job.mailbox,
        public_key,
        Validity(job.not_before, job.not_after),
        [KeyType(a) for a in job.allowed],
        job.crl_partition,
    )
    return issuer.issue(prepared).public_bytes(serialization.Encoding.DER)


def sign_chunk(jobs: Sequence[SignJob], issuer: Issuer | None = None) -> list[SignOutcome]:
    """Module level, so a worker process can run it; each job's refusal is its own."""
    issuer = issuer or _ISSUER
    if issuer is None:
        raise RuntimeError("signer process not initialised")
    out: list[SignOutcome] = []
    for job in jobs:
        try:
            out.append(_sign_one(issuer, job))
        except MailkmsError as exc:
            out.append((type(exc).__name__, exc.detail))
        except ValueError as exc:
            out.append(("BadKey", f"the public key cannot be used: {exc}"))
    return out


def generate_key_der(key_type: str) -> bytes:
    """PKCS#8 DER of a new key (module level, so a worker process can make it)."""
    return private_key_der(generate_key(KeyType(key_type)))
