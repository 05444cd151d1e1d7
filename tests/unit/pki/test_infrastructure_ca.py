"""The infrastructure CA (issue 15 §2): an intermediate of its own for the server's TLS certificate,
so the root signs only intermediates and its CRL. Judged by pkilint (pkix and the TLS BR linter as
the stand-in for CA certificates, PKILINT-PROFILES §0) and by `openssl verify -purpose sslserver`."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailkms.errors import BadKey, Malformed
from mailkms.pki import (
    CertKind,
    KeyType,
    SoftSigner,
    ca_name,
    certify_ca,
    make_infrastructure_ca,
    make_tls_server,
)
from tests.judges import lint_pkix, lint_serverauth, openssl_verify
from tests.testca import COUNTRY, ORGANIZATION, START, URLS, SessionCA, key_of

VERIFY_AT = START + dt.timedelta(days=1)


def _infrastructure(ca: SessionCA) -> tuple[x509.Certificate, SoftSigner]:
    key = key_of(ca.key_type, tag=31)
    cert = make_infrastructure_ca(ca.root_signer, key, ORGANIZATION, COUNTRY, URLS, START)
    return cert, SoftSigner(cert, key)


def test_infrastructure_ca_passes_pkilint_as_a_tls_sub_ca(ca: SessionCA) -> None:
    cert, _ = _infrastructure(ca)
    for verdict in (lint_pkix(cert), lint_serverauth(cert, "-d")):
        assert verdict.exit_code == 0, str(verdict)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    cert.verify_directly_issued_by(ca.root)
    assert cert.not_valid_after_utc <= ca.root.not_valid_after_utc


def test_tls_certificate_from_the_infrastructure_ca_verifies_to_the_root(ca: SessionCA) -> None:
    infra, signer = _infrastructure(ca)
    tls = make_tls_server(signer, key_of(KeyType.P256).public_key(), ["kms.example.org"], START)
    verdict = lint_pkix(tls)
    assert verdict.exit_code == 0, str(verdict)
    assert tls.issuer == infra.subject
    ok = openssl_verify(tls, ca.root, [infra], purpose="sslserver", at=VERIFY_AT)
    assert ok.exit_code == 0, str(ok)
    # Without the intermediate there is no path: the root did not sign the TLS certificate.
    assert openssl_verify(tls, ca.root, purpose="sslserver", at=VERIFY_AT).exit_code != 0


def test_the_s_mime_issuing_ca_cannot_stand_in_for_it(rsa_ca: SessionCA) -> None:
    """Why a second intermediate: OpenSSL checks an intermediate's EKU (PKI-FACTS)."""
    tls = make_tls_server(
        SoftSigner(rsa_ca.issuing, rsa_ca.issuing_key), key_of(KeyType.P256).public_key(), ["kms.example.org"], START
    )
    verdict = openssl_verify(tls, rsa_ca.root, [rsa_ca.issuing], purpose="sslserver", at=VERIFY_AT)
    assert verdict.exit_code != 0 and "unsuitable certificate purpose" in verdict.output


@pytest.mark.parametrize(
    "name",
    [
        x509.Name(
            [x509.NameAttribute(NameOID.EMAIL_ADDRESS, "ca@example.org"), x509.NameAttribute(NameOID.COMMON_NAME, "x")]
        ),
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no common name")]),
    ],
    ids=["email-attribute", "no-cn"],
)
def test_certify_ca_refuses_names_a_ca_may_not_have(rsa_ca: SessionCA, name: x509.Name) -> None:
    with pytest.raises(Malformed):
        certify_ca(rsa_ca.root_signer, CertKind.ISSUING_CA, key_of(KeyType.RSA3072).public_key(), name, URLS, START)


def test_certify_ca_refuses_other_kinds_and_keys(rsa_ca: SessionCA) -> None:
    name = ca_name("x CA", ORGANIZATION, None)
    with pytest.raises(Malformed):
        certify_ca(rsa_ca.root_signer, CertKind.TLS_SERVER, key_of(KeyType.P256).public_key(), name, URLS, START)
    from cryptography.hazmat.primitives.asymmetric import ec

    p521 = ec.generate_private_key(ec.SECP521R1()).public_key()
    with pytest.raises(BadKey):
        certify_ca(rsa_ca.root_signer, CertKind.ISSUING_CA, p521, name, URLS, START)
