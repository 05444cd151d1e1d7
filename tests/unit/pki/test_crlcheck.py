"""Revocation from a CRL: signed by the issuer, current, listing the serial or not."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mailkms.pki import RevocationStatus, check_crl, crl_urls
from tests.smime_support import NOW, SmimePKI


@pytest.fixture(scope="module")
def pki(smime_pki: SmimePKI) -> SmimePKI:
    return smime_pki


def make_crl(
    pki: SmimePKI, revoked: list[int], this_update: dt.datetime, signer=None
) -> x509.CertificateRevocationList:  # type: ignore[no-untyped-def]
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.issuing.subject)
        .last_update(this_update)
        .next_update(this_update + dt.timedelta(days=7))
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this_update).build()
        )
    return builder.sign(signer or pki.issuer._signer.private_key, hashes.SHA256())


def test_good_revoked_stale_and_forged(pki: SmimePKI) -> None:
    ident = pki.identity("dave@example.org")
    cert = ident.signing
    assert crl_urls(cert) == ["http://kms.example.org/crl/issuing.crl"]
    good = check_crl(make_crl(pki, [], NOW), cert, pki.issuing, NOW)
    assert good.status is RevocationStatus.GOOD
    revoked = check_crl(make_crl(pki, [cert.serial_number], NOW), cert, pki.issuing, NOW)
    assert revoked.status is RevocationStatus.REVOKED and revoked.revoked_at == NOW
    stale = check_crl(make_crl(pki, [], NOW - dt.timedelta(days=30)), cert, pki.issuing, NOW)
    assert stale.status is RevocationStatus.UNKNOWN and "out of date" in stale.detail
    forged = check_crl(make_crl(pki, [], NOW, signer=ident.signing_key), cert, pki.issuing, NOW)
    assert forged.status is RevocationStatus.UNKNOWN and "not signed" in forged.detail
