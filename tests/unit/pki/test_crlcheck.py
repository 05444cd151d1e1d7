"""Revocation from a CRL: signed by the issuer, current, listing the serial or not."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mailkms.pki import RevocationResult, RevocationStatus, check_crl, crl_urls, revoked_signature_problem
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


def _revoked_with(pki: SmimePKI, cert: x509.Certificate, at: dt.datetime, *extensions: x509.ExtensionType):  # type: ignore[no-untyped-def]
    entry = x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(at)
    for extension in extensions:
        entry = entry.add_extension(extension, critical=False)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.issuing.subject)
        .last_update(at)
        .next_update(at + dt.timedelta(days=7))
        .add_revoked_certificate(entry.build())
        .sign(pki.issuer._signer.private_key, hashes.SHA256())
    )
    return check_crl(crl, cert, pki.issuing, at)


def test_a_compromised_key_counts_whatever_signing_time_is_claimed(pki: SmimePKI) -> None:
    cert = pki.identity("erin@example.org").signing
    at = NOW - dt.timedelta(days=1)
    before, after = at - dt.timedelta(hours=1), at + dt.timedelta(hours=1)
    lost = at - dt.timedelta(days=3)
    result = _revoked_with(
        pki, cert, at, x509.CRLReason(x509.ReasonFlags.key_compromise), x509.InvalidityDate(lost.replace(tzinfo=None))
    )
    assert result.reason is x509.ReasonFlags.key_compromise and result.invalid_since == lost
    assert "(key compromise)" in result.detail
    for claimed in (before, after, None, cert.not_valid_before_utc):
        problem = revoked_signature_problem(result, claimed)
        assert problem is not None and "compromised" in problem and "whatever signing time" in problem
    # no reason given: nothing says the key stayed sound, judged the same way
    bare = _revoked_with(pki, cert, at)
    assert bare.reason is None and "no reason given" in (revoked_signature_problem(bare, before) or "")


@pytest.mark.parametrize(
    "reason",
    [
        x509.ReasonFlags.superseded,
        x509.ReasonFlags.affiliation_changed,
        x509.ReasonFlags.cessation_of_operation,
        x509.ReasonFlags.privilege_withdrawn,
    ],
)
def test_other_reasons_keep_signatures_made_before_the_revocation(pki: SmimePKI, reason: x509.ReasonFlags) -> None:
    cert = pki.identity("frank@example.org").signing
    at = NOW - dt.timedelta(days=1)
    result = _revoked_with(pki, cert, at, x509.CRLReason(reason))
    assert result.status is RevocationStatus.REVOKED and result.reason is reason
    assert revoked_signature_problem(result, at - dt.timedelta(seconds=1)) is None
    assert "before the message says" in (revoked_signature_problem(result, at) or "")
    assert "does not say when" in (revoked_signature_problem(result, None) or "")
    good = check_crl(make_crl(pki, [], NOW), cert, pki.issuing, NOW)
    assert revoked_signature_problem(good, None) is None
    undated = RevocationResult(RevocationStatus.REVOKED, "revoked (says another checker)", None, "", reason)
    assert "revoked (says another checker)" in (revoked_signature_problem(undated, at - dt.timedelta(days=9)) or "")
