"""Issuing: `prepare` checks and builds, single-use `issue` is the only call that signs."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID

from mailkms.errors import BadKey, Internal, Malformed
from mailkms.pki._chain import ca_key_id
from mailkms.pki._keys import (
    CASigner,
    KeyType,
    PrivateKey,
    PublicKey,
    key_type_of,
    signature_hash_for,
)
from mailkms.pki._profiles import (
    CertKind,
    Extension,
    PublicURLs,
    archive_extensions,
    ca_name,
    infrastructure_ca_extensions,
    issuing_ca_extensions,
    mailbox_name,
    ocsp_responder_extensions,
    root_extensions,
    subscriber_extensions,
    tls_server_extensions,
)
from mailkms.pki._validity import ONE_SECOND, Validity, fixed_validity

ROOT_LIFETIME = dt.timedelta(days=9132)  # TLS BR root maximum, used here as a sane ceiling
ISSUING_LIFETIME = dt.timedelta(days=5 * 365)
TLS_LIFETIME = dt.timedelta(days=90)
OCSP_RESPONDER_LIFETIME = dt.timedelta(days=30)
ARCHIVE_LIFETIME = dt.timedelta(days=30 * 365)


def random_serial() -> int:
    """At least 64 random bits (BR 7.1); 159 bits, positive, fits 20 octets."""
    return secrets.randbits(159) | (1 << 158)


@dataclass
class PreparedCertificate:
    kind: CertKind
    builder: x509.CertificateBuilder
    serial: int
    validity: Validity
    _used: bool = field(default=False, repr=False)


class Issuer:
    """Holds only signing. Policy (who may get what) lives in services."""

    def __init__(self, signer: CASigner, urls: PublicURLs, ca_issuers: str | None = None) -> None:
        self._signer = signer
        self.urls = urls
        self.key_id = ca_key_id(signer.certificate)  # which CRL scopes its certificates may join
        # AIA caIssuers: where this key's certificate is published (None: /ca/issuing.crt, the first key's)
        self.ca_issuers = ca_issuers

    @property
    def certificate(self) -> x509.Certificate:
        return self._signer.certificate

    def prepare_subscriber(
        self,
        kind: CertKind,
        mailbox: str,
        public_key: PublicKey,
        validity: Validity,
        allowed_keys: Sequence[KeyType],
        crl_partition: int | None = None,
    ) -> PreparedCertificate:
        key_type = key_type_of(public_key)
        if key_type not in allowed_keys:
            allowed = ", ".join(k.value for k in allowed_keys)
            raise BadKey(f"{key_type.value} keys are not allowed for {kind.value} certificates ({allowed})")
        ca_not_after = self._signer.certificate.not_valid_after_utc
        if validity.not_after > ca_not_after:
            raise Internal("the issuing CA expires before this certificate would; renew the issuing CA")
        serial = random_serial()
        extensions = subscriber_extensions(
            kind, mailbox, public_key, self._signer.certificate, self.urls, crl_partition, self.ca_issuers
        )
        builder = _builder(
            mailbox_name(mailbox),
            self._signer.certificate.subject,
            public_key,
            serial,
            validity,
            extensions,
        )
        return PreparedCertificate(kind, builder, serial, validity)

    def prepare_ocsp_responder(self, public_key: PublicKey, now: dt.datetime) -> PreparedCertificate:
        validity = fixed_validity(now - dt.timedelta(minutes=5), OCSP_RESPONDER_LIFETIME)
        serial = random_serial()
        name = _delegate_name(self._signer.certificate.subject, "mailkms OCSP responder")
        ext = ocsp_responder_extensions(public_key, self._signer.certificate)
        builder = _builder(name, self._signer.certificate.subject, public_key, serial, validity, ext)
        return PreparedCertificate(CertKind.OCSP_RESPONDER, builder, serial, validity)

    def issue(self, prepared: PreparedCertificate) -> x509.Certificate:
        if prepared._used:
            raise Internal("a prepared certificate is signed once only")
        prepared._used = True
        key = self._signer.private_key
        return prepared.builder.sign(key, signature_hash_for(key))


def _delegate_name(ca_subject: x509.Name, common_name: str) -> x509.Name:
    """The CA's own C and O with a CN of its own: a CA-operated delegate is named like a CA
    (TLS BR 7.1.2.10.2, which pkilint applies with `-t OCSP-RESPONDER`)."""
    kept = [a for a in ca_subject if a.oid in (NameOID.COUNTRY_NAME, NameOID.ORGANIZATION_NAME)]
    return x509.Name([*kept, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: PublicKey,
    serial: int,
    validity: Validity,
    extensions: list[Extension],
) -> x509.CertificateBuilder:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder


# --- the CA's own certificates (made at init and on renewal of the server's identities) ------
def make_root(key: PrivateKey, organization: str, country: str | None, now: dt.datetime) -> x509.Certificate:
    name = ca_name(f"{organization} S/MIME Root CA", organization, country)
    validity = fixed_validity(now, ROOT_LIFETIME)
    public = key.public_key()
    builder = _builder(name, name, public, random_serial(), validity, root_extensions(public))
    return builder.sign(key, signature_hash_for(key))


def make_issuing_ca(
    root: CASigner,
    key: PrivateKey,
    organization: str,
    country: str | None,
    urls: PublicURLs,
    now: dt.datetime,
) -> x509.Certificate:
    name = ca_name(f"{organization} S/MIME Issuing CA", organization, country)
    return certify_ca(root, CertKind.ISSUING_CA, key.public_key(), name, urls, now)


def make_infrastructure_ca(
    root: CASigner,
    key: PrivateKey,
    organization: str,
    country: str | None,
    urls: PublicURLs,
    now: dt.datetime,
) -> x509.Certificate:
    name = ca_name(f"{organization} Infrastructure CA", organization, country)
    return certify_ca(root, CertKind.INFRASTRUCTURE_CA, key.public_key(), name, urls, now)


_CA_PROFILES = {
    CertKind.ISSUING_CA: issuing_ca_extensions,
    CertKind.INFRASTRUCTURE_CA: infrastructure_ca_extensions,
}
_CA_NAME_ATTRIBUTES = (NameOID.COUNTRY_NAME, NameOID.ORGANIZATION_NAME, NameOID.COMMON_NAME)


def certify_ca(
    root: CASigner,
    kind: CertKind,
    public: PublicKey,
    name: x509.Name,
    urls: PublicURLs,
    now: dt.datetime,
    lifetime: dt.timedelta = ISSUING_LIFETIME,
) -> x509.Certificate:
    """An intermediate below the root (the S/MIME issuing CA or the infrastructure CA), never
    outliving the root. The name may hold C, O and CN only (BR 7.1.4 for CAs); the key must be
    one mailkms issues with."""
    profile = _CA_PROFILES.get(kind)
    if profile is None:
        raise Malformed(f"{kind.value} is not an intermediate CA kind ({', '.join(k.value for k in _CA_PROFILES)})")
    odd = sorted({a.oid.dotted_string for a in name if a.oid not in _CA_NAME_ATTRIBUTES})
    if odd or not name.get_attributes_for_oid(NameOID.COMMON_NAME):
        raise Malformed(f"a CA name holds C, O and CN only, CN required (found {', '.join(odd) or 'no CN'})")
    key_type_of(public)  # refuses keys of other kinds and sizes
    end = min(now + lifetime, root.certificate.not_valid_after_utc + ONE_SECOND)
    validity = Validity(now.replace(microsecond=0), end.replace(microsecond=0) - ONE_SECOND)
    ext = profile(public, root.certificate, urls)
    builder = _builder(name, root.certificate.subject, public, random_serial(), validity, ext)
    return builder.sign(root.private_key, signature_hash_for(root.private_key))


def make_tls_server(
    root: CASigner, public: PublicKey, hostnames: Sequence[str], now: dt.datetime, urls: PublicURLs | None = None
) -> x509.Certificate:
    """`root` is the infrastructure CA's signer (the root itself on installs from before it); with
    `urls` the certificate names the infrastructure CA's CRL (CDP) and certificate (AIA)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    validity = fixed_validity(now - dt.timedelta(minutes=5), TLS_LIFETIME)
    ext = tls_server_extensions(hostnames, public, root.certificate, urls)
    builder = _builder(name, root.certificate.subject, public, random_serial(), validity, ext)
    return builder.sign(root.private_key, signature_hash_for(root.private_key))


def make_archive_certificate(key: PrivateKey, now: dt.datetime) -> x509.Certificate:
    """Self-signed: it only names the public key the archive is enveloped to."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailkms key archive")])
    public = key.public_key()
    builder = _builder(
        name,
        name,
        public,
        random_serial(),
        fixed_validity(now, ARCHIVE_LIFETIME),
        archive_extensions(public),
    )
    return builder.sign(key, signature_hash_for(key))
