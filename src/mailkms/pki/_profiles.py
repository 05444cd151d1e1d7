"""Certificate profiles: what goes into each kind of certificate mailkms makes.

Subscriber profiles follow the CA/B Forum S/MIME Baseline Requirements, mailbox-validated
strict (2.23.140.1.5.1.3); the exact extension sets are the ones recorded as pkilint-clean
in shared/PKILINT-PROFILES.md.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import AuthorityInformationAccessOID, CertificatePoliciesOID, ExtendedKeyUsageOID, NameOID

from mailkms.pki._keys import PublicKey, key_type_of

SMIME_MAILBOX_STRICT = x509.ObjectIdentifier("2.23.140.1.5.1.3")


class CertKind(enum.StrEnum):
    SIGNING = "signing"
    ENCRYPTION = "encryption"
    MAIL_SIGNER = "mail-signer"  # the server's own signing identity for its replies
    TLS_SERVER = "tls-server"
    OCSP_RESPONDER = "ocsp-responder"
    ISSUING_CA = "issuing-ca"
    INFRASTRUCTURE_CA = "infrastructure-ca"  # issues the server's TLS certificate, beside the S/MIME issuing CA
    ROOT_CA = "root-ca"
    ARCHIVE = "archive"


@dataclass(frozen=True)
class PublicURLs:
    """The http links written into certificates; the server answers on exactly these paths."""

    base: str  # e.g. "http://kms.example.org/"

    def _join(self, path: str) -> str:
        return self.base.rstrip("/") + "/" + path

    @property
    def issuing_crl(self) -> str:
        return self._join("crl/issuing.crl")

    def crl_partition(self, partition: int) -> str:
        """The CRL of one partition of the issuing CA's certificates (RFC 5280 §5.2.5 scope)."""
        return self._join(f"crl/issuing/{partition}.crl")

    def issuing_crl_for(self, partition: int | None) -> str:
        """The CDP of a certificate in `partition`; None is the whole-CA CRL of before partitioning."""
        return self.issuing_crl if partition is None else self.crl_partition(partition)

    @property
    def root_crl(self) -> str:
        return self._join("crl/root.crl")

    @property
    def infrastructure_crl(self) -> str:
        """The infrastructure CA's CRL: the CDP of the server's TLS certificate."""
        return self._join("crl/infrastructure.crl")

    @property
    def infrastructure_cert(self) -> str:
        return self._join("ca/infrastructure.crt")

    @property
    def issuing_cert(self) -> str:
        """The issuing CA's first key's certificate (AIA caIssuers of what that key issues)."""
        return self._join("ca/issuing.crt")

    def issuing_cert_of(self, key_id: str) -> str:
        """An issuing CA certificate by key identifier: the AIA of what a key after `ca rekey` issues."""
        return self._join(f"ca/issuing/{key_id}.crt")

    @property
    def root_cert(self) -> str:
        return self._join("ca/root.crt")

    @property
    def ocsp(self) -> str:
        return self._join("ocsp")


_PARTITION_CDP = re.compile(r"/crl/issuing/([0-9]+)\.crl$")


def crl_partition_of(cert: x509.Certificate) -> int | None:
    """The CRL partition a certificate's CDP names (None: the whole-CA CRL, or no CDP)."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return None
    for point in points:
        for name in point.full_name or []:
            found = _PARTITION_CDP.search(str(name.value))
            if isinstance(name, x509.UniformResourceIdentifier) and found:
                return int(found.group(1))
    return None


def _ski(public_key: PublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


@functools.lru_cache(maxsize=16)  # the same few issuers for every certificate (immutable values)
def _aki_from(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


@functools.cache
def _policies() -> x509.CertificatePolicies:
    return x509.CertificatePolicies([x509.PolicyInformation(SMIME_MAILBOX_STRICT, None)])


@functools.lru_cache(maxsize=1024)  # one per CRL partition
def _cdp(url: str) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints([x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)])


@functools.lru_cache(maxsize=16)
def _aia(issuing_cert: str, ocsp: str) -> x509.AuthorityInformationAccess:
    return x509.AuthorityInformationAccess(
        [
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(issuing_cert)
            ),
            x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp)),
        ]
    )


def ca_name(common_name: str, organization: str, country: str | None) -> x509.Name:
    attrs = []
    if country:
        attrs.append(x509.NameAttribute(NameOID.COUNTRY_NAME, country))
    attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


UB_COMMON_NAME = 64  # RFC 5280 ub-common-name; a mailbox may have up to 254 characters


def mailbox_name(mailbox: str) -> x509.Name:
    """Strict MV subject: CN and emailAddress, each byte-identical to the SAN.

    The CN is optional in the strict profile; a mailbox too long for it goes in emailAddress only.
    """
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, mailbox)] if len(mailbox) <= UB_COMMON_NAME else []
    attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, mailbox))
    return x509.Name(attrs)


def _ku(**bits: bool) -> x509.KeyUsage:
    names = (
        "digital_signature content_commitment key_encipherment data_encipherment "
        "key_agreement key_cert_sign crl_sign encipher_only decipher_only"
    ).split()
    values = {n: bits.get(n, False) for n in names}
    return x509.KeyUsage(**values)


Extension = tuple[x509.ExtensionType, bool]


def subscriber_extensions(
    kind: CertKind,
    mailbox: str,
    public_key: PublicKey,
    issuer: x509.Certificate,
    urls: PublicURLs,
    crl_partition: int | None = None,
    ca_issuers: str | None = None,
) -> list[Extension]:
    """Signing, encryption and the server's mail signer: S/MIME BR strict, mailbox-validated.

    The CDP names the certificate's CRL partition, or the issuing CA's CRL when it has none; the AIA
    names `ca_issuers`, the URL of the issuing CA certificate (default: the first key's)."""
    key_type = key_type_of(public_key)
    if kind in (CertKind.SIGNING, CertKind.MAIL_SIGNER):
        key_usage = _ku(digital_signature=True)
    elif kind is CertKind.ENCRYPTION:
        key_usage = _ku(key_encipherment=True) if key_type.is_rsa else _ku(key_agreement=True)
    else:
        raise ValueError(f"{kind} is not a subscriber profile")
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (key_usage, True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False),
        (x509.SubjectAlternativeName([x509.RFC822Name(mailbox)]), False),
        (_policies(), False),
        (_cdp(urls.issuing_crl_for(crl_partition)), False),
        (_aia(ca_issuers or urls.issuing_cert, urls.ocsp), False),
        (_ski(public_key), False),
        (_aki_from(issuer), False),
    ]


def root_extensions(public_key: PublicKey) -> list[Extension]:
    ski = _ski(public_key)
    return [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (_ku(key_cert_sign=True, crl_sign=True, digital_signature=True), True),
        (ski, False),
        (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False),
    ]


def issuing_ca_extensions(public_key: PublicKey, root: x509.Certificate, urls: PublicURLs) -> list[Extension]:
    return [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_ku(digital_signature=True, key_cert_sign=True, crl_sign=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False),
        (_policies(), False),
        *_under_root(public_key, root, urls),
    ]


def infrastructure_ca_extensions(public_key: PublicKey, root: x509.Certificate, urls: PublicURLs) -> list[Extension]:
    """The intermediate for the server's own non-e-mail certificates (TLS): serverAuth, so OpenSSL
    accepts TLS below it, and anyPolicy (an affiliate of the root; no S/MIME or TLS BR policy is
    claimed). pkilint: clean with `lint_pkix_cert` and `lint_cabf_serverauth_cert -d` (a TLS CA)."""
    return [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_ku(digital_signature=True, key_cert_sign=True, crl_sign=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.CertificatePolicies([x509.PolicyInformation(CertificatePoliciesOID.ANY_POLICY, None)]), False),
        *_under_root(public_key, root, urls),
    ]


def _under_root(public_key: PublicKey, root: x509.Certificate, urls: PublicURLs) -> list[Extension]:
    """CDP (the root's CRL), AIA (the root's certificate), SKI and AKI of an intermediate."""
    return [
        (_cdp(urls.root_crl), False),
        (
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.CA_ISSUERS,
                        x509.UniformResourceIdentifier(urls.root_cert),
                    )
                ]
            ),
            False,
        ),
        (_ski(public_key), False),
        (_aki_from(root), False),
    ]


def tls_server_extensions(
    hostnames: Sequence[str], public_key: PublicKey, issuer: x509.Certificate, urls: PublicURLs | None = None
) -> list[Extension]:
    """Issued from the infrastructure CA (or, on installs from before it, the root): an
    emailProtection-only issuing CA makes OpenSSL refuse TLS. With `urls` (the infrastructure CA)
    the CDP names its CRL and AIA caIssuers its certificate, both http."""
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    usage = _ku(digital_signature=True, key_encipherment=key_type_of(public_key).is_rsa)
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (usage, True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.SubjectAlternativeName(names), False),
        *(_published_by_infrastructure(urls) if urls is not None else []),
        (_ski(public_key), False),
        (_aki_from(issuer), False),
    ]


def _published_by_infrastructure(urls: PublicURLs) -> list[Extension]:
    issuers = x509.AccessDescription(
        AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(urls.infrastructure_cert)
    )
    return [(_cdp(urls.infrastructure_crl), False), (x509.AuthorityInformationAccess([issuers]), False)]


def ocsp_responder_extensions(public_key: PublicKey, issuer: x509.Certificate) -> list[Extension]:
    return [
        (_ku(digital_signature=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False),
        (x509.OCSPNoCheck(), False),
        (_ski(public_key), False),
        (_aki_from(issuer), False),
    ]


def archive_extensions(public_key: PublicKey) -> list[Extension]:
    """The archive (recovery) certificate only names a key to envelope to."""
    ski = _ski(public_key)
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_ku(key_encipherment=True), True),
        (ski, False),
    ]
