"""Every kind of certificate mailkms makes, under an RSA-3072 and a P-384 CA, judged by pkilint and
openssl, and checked against the extension sets of shared/PKILINT-PROFILES.md."""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, ExtensionOID, NameOID

from mailkms.pki import CertKind, KeyType, Validity, make_tls_server, subscriber_validity
from tests.judges import Verdict, lint_pkix, lint_serverauth, lint_smime, openssl_verify, pkilint
from tests.testca import MAIL_FROM, MAILBOX, START, URLS, SessionCA, key_of

SMIME_MAILBOX_STRICT = x509.ObjectIdentifier("2.23.140.1.5.1.3")
VERIFY_AT = START + dt.timedelta(days=1)
KU_FLAGS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)


@dataclass(frozen=True)
class Case:
    id: str
    kind: CertKind
    key_type: KeyType
    mailbox: str
    key_usage: frozenset[str]
    purpose: str  # openssl verify -purpose


SUBSCRIBERS = [
    Case("signing-rsa2048", CertKind.SIGNING, KeyType.RSA2048, MAILBOX, frozenset({"digital_signature"}), "smimesign"),
    Case("signing-p256", CertKind.SIGNING, KeyType.P256, MAILBOX, frozenset({"digital_signature"}), "smimesign"),
    Case("signing-p384", CertKind.SIGNING, KeyType.P384, MAILBOX, frozenset({"digital_signature"}), "smimesign"),
    Case(
        "encryption-rsa2048",
        CertKind.ENCRYPTION,
        KeyType.RSA2048,
        MAILBOX,
        frozenset({"key_encipherment"}),
        "smimeencrypt",
    ),
    # keyAgreement only: pkilint-clean, but OpenSSL's smimeencrypt purpose wants keyEncipherment,
    # so openssl judges the chain only ("any")
    Case("encryption-p256", CertKind.ENCRYPTION, KeyType.P256, MAILBOX, frozenset({"key_agreement"}), "any"),
    Case(
        "mail-signer-rsa2048",
        CertKind.MAIL_SIGNER,
        KeyType.RSA2048,
        MAIL_FROM,
        frozenset({"digital_signature"}),
        "smimesign",
    ),
]


@functools.cache
def _issued(ca: SessionCA, case: Case) -> x509.Certificate:
    return ca.issue(case.kind, key_of(case.key_type), case.mailbox)


@pytest.fixture(params=SUBSCRIBERS, ids=[c.id for c in SUBSCRIBERS])
def case(request: pytest.FixtureRequest) -> Case:
    value: Case = request.param
    return value


@pytest.fixture
def subscriber(ca: SessionCA, case: Case) -> x509.Certificate:
    return _issued(ca, case)


def extensions(cert: x509.Certificate) -> dict[x509.ObjectIdentifier, x509.Extension[x509.ExtensionType]]:
    return {ext.oid: ext for ext in cert.extensions}


def ku_bits(cert: x509.Certificate) -> frozenset[str]:
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    return frozenset(flag for flag in KU_FLAGS if getattr(ku, flag))


def ski_digest(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def expected_hash(ca: SessionCA) -> type[hashes.HashAlgorithm]:
    # S/MIME BR 7.1.3.2: a P-384 CA signs with ECDSA-SHA384 (pkilint does not check the pairing)
    return hashes.SHA384 if ca.key_type is KeyType.P384 else hashes.SHA256


def assert_aki_is_keyid_of(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert not aki.critical
    assert aki.value.key_identifier == ski_digest(issuer)
    assert aki.value.authority_cert_issuer is None
    assert aki.value.authority_cert_serial_number is None


def assert_serial_ok(cert: x509.Certificate) -> None:
    # BR 7.1: at least 64 random bits; RFC 5280: positive, at most 20 octets (159 bits + sign)
    assert cert.serial_number > 0
    assert 64 <= cert.serial_number.bit_length() <= 159


# --- subscribers: judged by pkilint and openssl ----------------------------------------------------
def test_subscriber_is_pkilint_clean(subscriber: x509.Certificate) -> None:
    verdict = lint_smime(subscriber)
    assert verdict.exit_code == 0, str(verdict)


def test_subscriber_chain_verifies_in_openssl(ca: SessionCA, case: Case, subscriber: x509.Certificate) -> None:
    verdict = openssl_verify(subscriber, ca.root, [ca.issuing], purpose=case.purpose, at=VERIFY_AT)
    assert verdict.exit_code == 0, str(verdict)
    assert verdict.output.endswith(": OK")


def test_openssl_refuses_the_wrong_purpose(rsa_ca: SessionCA) -> None:
    """The judge has teeth: a keyEncipherment-only certificate is no signing certificate."""
    cert = _issued(rsa_ca, SUBSCRIBERS[3])
    verdict = openssl_verify(cert, rsa_ca.root, [rsa_ca.issuing], purpose="smimesign", at=VERIFY_AT)
    assert verdict.exit_code != 0
    assert "unsuitable certificate purpose" in verdict.output


# --- subscribers: the BR strict mailbox-validated extension set ----------------------------------------
SUBSCRIBER_EXTENSIONS = {
    ExtensionOID.BASIC_CONSTRAINTS: True,
    ExtensionOID.KEY_USAGE: True,
    ExtensionOID.EXTENDED_KEY_USAGE: False,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME: False,
    ExtensionOID.CERTIFICATE_POLICIES: False,
    ExtensionOID.CRL_DISTRIBUTION_POINTS: False,
    ExtensionOID.AUTHORITY_INFORMATION_ACCESS: False,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER: False,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER: False,
}


def test_subscriber_has_exactly_the_strict_extension_set(subscriber: x509.Certificate) -> None:
    found = {oid: ext.critical for oid, ext in extensions(subscriber).items()}
    assert found == SUBSCRIBER_EXTENSIONS


def test_subscriber_key_usage(case: Case, subscriber: x509.Certificate) -> None:
    assert ku_bits(subscriber) == case.key_usage


def test_subscriber_is_not_a_ca(subscriber: x509.Certificate) -> None:
    bc = subscriber.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is False
    assert bc.path_length is None


def test_subscriber_eku_is_email_protection_only(subscriber: x509.Certificate) -> None:
    eku = subscriber.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.EMAIL_PROTECTION]


def test_subscriber_names_are_the_mailbox_only(case: Case, subscriber: x509.Certificate) -> None:
    san = subscriber.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.RFC822Name(case.mailbox)]
    assert [(a.oid, a.value) for a in subscriber.subject] == [
        (NameOID.COMMON_NAME, case.mailbox),
        (NameOID.EMAIL_ADDRESS, case.mailbox),
    ]


def test_subscriber_policy_is_mailbox_validated_strict(subscriber: x509.Certificate) -> None:
    policies = subscriber.extensions.get_extension_for_class(x509.CertificatePolicies).value
    assert [(p.policy_identifier, p.policy_qualifiers) for p in policies] == [(SMIME_MAILBOX_STRICT, None)]


def test_subscriber_revocation_links_are_http_under_the_public_url(subscriber: x509.Certificate) -> None:
    cdp = subscriber.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [[n.value for n in dp.full_name or []] for dp in cdp] == [[URLS.issuing_crl]]
    aia = subscriber.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [(d.access_method, d.access_location.value) for d in aia] == [
        (AuthorityInformationAccessOID.CA_ISSUERS, URLS.issuing_cert),
        (AuthorityInformationAccessOID.OCSP, URLS.ocsp),
    ]
    for url in (URLS.issuing_crl, URLS.issuing_cert, URLS.ocsp):
        assert url.startswith("http://kms.example.org/")


def test_subscriber_key_identifiers(ca: SessionCA, subscriber: x509.Certificate) -> None:
    assert ski_digest(subscriber) == x509.SubjectKeyIdentifier.from_public_key(subscriber.public_key()).digest
    assert_aki_is_keyid_of(subscriber, ca.issuing)


def test_subscriber_is_signed_by_the_issuing_ca_with_the_paired_hash(
    ca: SessionCA, subscriber: x509.Certificate
) -> None:
    subscriber.verify_directly_issued_by(ca.issuing)
    assert subscriber.issuer == ca.issuing.subject
    assert isinstance(subscriber.signature_hash_algorithm, expected_hash(ca))


def test_subscriber_serial(subscriber: x509.Certificate) -> None:
    assert_serial_ok(subscriber)


def test_subscriber_validity_is_written_to_the_second(subscriber: x509.Certificate) -> None:
    expected = subscriber_validity(START, 18)
    assert subscriber.not_valid_before_utc == expected.not_before
    assert subscriber.not_valid_after_utc == expected.not_after


def test_a_capped_lifetime_is_pkilint_clean(rsa_ca: SessionCA) -> None:
    """28 months is capped at 824 days inclusive: no error and not even the 'at maximum' warning."""
    validity = subscriber_validity(START, 28)
    assert validity.not_after - validity.not_before == dt.timedelta(days=824, seconds=-1)
    cert = rsa_ca.issue(CertKind.SIGNING, key_of(KeyType.P256), validity=validity)
    verdict = lint_smime(cert)
    assert verdict.exit_code == 0, str(verdict)


def test_pkilint_has_teeth_at_825_days(rsa_ca: SessionCA) -> None:
    """The judge fails what it should, and the cached in-process judge agrees with the console script."""
    too_long = Validity(START, START + dt.timedelta(days=825))
    cert = rsa_ca.issue(CertKind.SIGNING, key_of(KeyType.P256), validity=too_long)
    verdict = lint_smime(cert)
    assert verdict.exit_code == 1
    assert "cabf.smime.certificate_validity_period_exceeds_825_days" in verdict.output
    assert verdict == pkilint("lint_cabf_smime_cert", ["-d", "-s", "WARNING"], cert)
    clean = _issued(rsa_ca, SUBSCRIBERS[0])
    assert lint_smime(clean) == pkilint("lint_cabf_smime_cert", ["-d", "-s", "WARNING"], clean) == Verdict(0, "")


# --- CA certificates ------------------------------------------------------------------------------------
def test_root_is_pkilint_clean(ca: SessionCA) -> None:
    pkix = lint_pkix(ca.root)
    assert pkix.exit_code == 0, str(pkix)
    tls_root = lint_serverauth(ca.root, "-t", "ROOT-CA")
    assert tls_root.exit_code == 0, str(tls_root)


def test_root_profile(ca: SessionCA) -> None:
    root = ca.root
    assert {oid: ext.critical for oid, ext in extensions(root).items()} == {
        ExtensionOID.BASIC_CONSTRAINTS: True,
        ExtensionOID.KEY_USAGE: True,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER: False,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER: False,
    }
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert (bc.ca, bc.path_length) == (True, None)
    assert ku_bits(root) == {"key_cert_sign", "crl_sign", "digital_signature"}
    assert_aki_is_keyid_of(root, root)
    assert root.subject == root.issuer
    assert [a.oid for a in root.subject] == [NameOID.COUNTRY_NAME, NameOID.ORGANIZATION_NAME, NameOID.COMMON_NAME]
    root.verify_directly_issued_by(root)
    assert isinstance(root.signature_hash_algorithm, expected_hash(ca))
    assert_serial_ok(root)
    # TLS BR root maximum: 9132 days inclusive
    assert root.not_valid_after_utc - root.not_valid_before_utc == dt.timedelta(days=9132, seconds=-1)


def test_issuing_ca_is_pkilint_clean(ca: SessionCA) -> None:
    pkix = lint_pkix(ca.issuing)
    assert pkix.exit_code == 0, str(pkix)
    detected = lint_serverauth(ca.issuing, "-d")
    assert detected.exit_code == 0, str(detected)


def test_issuing_ca_profile(ca: SessionCA) -> None:
    issuing = ca.issuing
    assert {oid: ext.critical for oid, ext in extensions(issuing).items()} == {
        ExtensionOID.BASIC_CONSTRAINTS: True,
        ExtensionOID.KEY_USAGE: True,
        ExtensionOID.EXTENDED_KEY_USAGE: False,
        ExtensionOID.CERTIFICATE_POLICIES: False,
        ExtensionOID.CRL_DISTRIBUTION_POINTS: False,
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS: False,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER: False,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER: False,
    }
    bc = issuing.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert (bc.ca, bc.path_length) == (True, 0)
    assert ku_bits(issuing) == {"digital_signature", "key_cert_sign", "crl_sign"}
    eku = issuing.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.EMAIL_PROTECTION]  # never OCSPSigning in a CA
    policies = issuing.extensions.get_extension_for_class(x509.CertificatePolicies).value
    assert [p.policy_identifier for p in policies] == [SMIME_MAILBOX_STRICT]
    cdp = issuing.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [[n.value for n in dp.full_name or []] for dp in cdp] == [[URLS.root_crl]]
    aia = issuing.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [(d.access_method, d.access_location.value) for d in aia] == [
        (AuthorityInformationAccessOID.CA_ISSUERS, URLS.root_cert)
    ]
    assert_aki_is_keyid_of(issuing, ca.root)
    issuing.verify_directly_issued_by(ca.root)
    assert isinstance(issuing.signature_hash_algorithm, expected_hash(ca))
    assert_serial_ok(issuing)
    assert issuing.not_valid_after_utc <= ca.root.not_valid_after_utc


# --- the server's own certificates ------------------------------------------------------------------------
def test_tls_server_certificate(ca: SessionCA) -> None:
    """Issued by the root (an emailProtection-only issuing CA would make OpenSSL refuse TLS)."""
    cert = make_tls_server(ca.root_signer, key_of(KeyType.P256).public_key(), ["kms.example.org"], START)
    verdict = lint_pkix(cert)
    assert verdict.exit_code == 0, str(verdict)
    tls = openssl_verify(cert, ca.root, purpose="sslserver", at=VERIFY_AT)
    assert tls.exit_code == 0, str(tls)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ku_bits(cert) == {"digital_signature"}
    assert_aki_is_keyid_of(cert, ca.root)
    assert isinstance(cert.signature_hash_algorithm, expected_hash(ca))
    assert_serial_ok(cert)


def test_tls_server_certificate_names_localhost_addresses(rsa_ca: SessionCA) -> None:
    cert = make_tls_server(
        rsa_ca.root_signer, key_of(KeyType.RSA2048).public_key(), ["localhost", "127.0.0.1", "::1"], START
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert ku_bits(cert) == {"digital_signature", "key_encipherment"}  # RSA key transport in TLS 1.2
    verdict = openssl_verify(cert, rsa_ca.root, purpose="sslserver", at=VERIFY_AT)
    assert verdict.exit_code == 0, str(verdict)


def test_ocsp_responder_certificate(ca: SessionCA) -> None:
    issuer = ca.issuer
    cert = issuer.issue(issuer.prepare_ocsp_responder(key_of(KeyType.P256).public_key(), START))
    pkix = lint_pkix(cert)
    assert pkix.exit_code == 0, str(pkix)
    responder = lint_serverauth(cert, "-t", "OCSP-RESPONDER")
    assert responder.exit_code == 0, str(responder)
    verdict = openssl_verify(cert, ca.root, [ca.issuing], purpose="ocsphelper", at=VERIFY_AT)
    assert verdict.exit_code == 0, str(verdict)
    assert {oid: ext.critical for oid, ext in extensions(cert).items()} == {
        ExtensionOID.KEY_USAGE: True,
        ExtensionOID.EXTENDED_KEY_USAGE: False,
        ExtensionOID.OCSP_NO_CHECK: False,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER: False,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER: False,
    }
    assert ku_bits(cert) == {"digital_signature"}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    assert_aki_is_keyid_of(cert, ca.issuing)
    cert.verify_directly_issued_by(ca.issuing)
    assert isinstance(cert.signature_hash_algorithm, expected_hash(ca))
    assert_serial_ok(cert)
    # short-lived, and valid from a little before `now` (clock skew)
    assert cert.not_valid_before_utc < START < cert.not_valid_after_utc


def test_ocsp_responder_is_named_after_its_ca(rsa_ca: SessionCA) -> None:
    issuer = rsa_ca.issuer
    cert = issuer.issue(issuer.prepare_ocsp_responder(key_of(KeyType.P256).public_key(), START))
    ca_attrs = {a.oid: a.value for a in rsa_ca.issuing.subject}
    attrs = {a.oid: a.value for a in cert.subject}
    assert attrs[NameOID.COUNTRY_NAME] == ca_attrs[NameOID.COUNTRY_NAME]
    assert attrs[NameOID.ORGANIZATION_NAME] == ca_attrs[NameOID.ORGANIZATION_NAME]
    assert attrs[NameOID.COMMON_NAME] != ca_attrs[NameOID.COMMON_NAME]


LONG_MAILBOXES = [
    ("l" * 52 + "@example.org", True),  # 64 characters: still a CN
    ("l" * 53 + "@example.org", False),  # 65
    ("l" * 64 + "@" + "d" * 63 + "." + "d" * 63 + "." + "d" * 49 + ".example.org", False),  # 254, the most
]


@pytest.mark.parametrize(("mailbox", "with_cn"), LONG_MAILBOXES, ids=[str(len(m)) for m, _ in LONG_MAILBOXES])
def test_a_mailbox_too_long_for_a_common_name_goes_in_email_address_only(
    rsa_ca: SessionCA, mailbox: str, with_cn: bool
) -> None:
    """RFC 5280 caps CN at 64 characters, a mailbox may have 254: the strict profile's CN is optional.
    Regression: issuing raised ValueError for a mailbox longer than 64 characters."""
    cert = rsa_ca.issue(CertKind.SIGNING, key_of(KeyType.P256), mailbox)
    expected = [(NameOID.COMMON_NAME, mailbox)] if with_cn else []
    assert [(a.oid, a.value) for a in cert.subject] == [*expected, (NameOID.EMAIL_ADDRESS, mailbox)]
    verdict = lint_smime(cert)
    assert verdict.exit_code == 0, str(verdict)
