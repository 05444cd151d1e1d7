"""verify_email_chain: leaf <- issuing CA <- pinned root, valid at the moment asked, fit for e-mail."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509

from mailkms.errors import BadSignature, UnknownIssuer
from mailkms.pki import (
    CertKind,
    KeyType,
    has_email_protection,
    issued_by,
    mailboxes_of,
    make_tls_server,
    subscriber_validity,
    verify_email_chain,
)
from tests.testca import START, SessionCA, ca_of, key_of

ONE_SECOND = dt.timedelta(seconds=1)


@pytest.fixture(scope="module")
def leaf(rsa_ca: SessionCA) -> x509.Certificate:
    return rsa_ca.issue(CertKind.SIGNING, key_of(KeyType.P256))


def test_a_good_chain_returns_the_issuing_ca(ca: SessionCA) -> None:
    cert = ca.issue(CertKind.SIGNING, key_of(KeyType.P256))
    assert verify_email_chain(cert, [ca.issuing, ca.root], ca.root, START) is ca.issuing


def test_candidates_in_any_order_and_with_strangers(leaf: x509.Certificate, rsa_ca: SessionCA) -> None:
    strangers = [ca_of(KeyType.P256, "other").issuing, ca_of(KeyType.P256, "other").root, leaf]
    assert verify_email_chain(leaf, [*strangers, rsa_ca.root, rsa_ca.issuing], rsa_ca.root, START) is rsa_ca.issuing


def test_no_issuing_ca_among_the_candidates(leaf: x509.Certificate, rsa_ca: SessionCA) -> None:
    with pytest.raises(UnknownIssuer):
        verify_email_chain(leaf, [rsa_ca.root], rsa_ca.root, START)
    with pytest.raises(UnknownIssuer):
        verify_email_chain(leaf, [], rsa_ca.root, START)


def test_a_leaf_signed_by_the_root_itself_does_not_count(rsa_ca: SessionCA) -> None:
    """The hierarchy is fixed: root -> issuing -> leaf. A root-issued certificate (like the TLS
    certificate) is no e-mail identity."""
    tls = make_tls_server(rsa_ca.root_signer, key_of(KeyType.P256).public_key(), ["kms.example.org"], START)
    with pytest.raises(UnknownIssuer):
        verify_email_chain(tls, [rsa_ca.root], rsa_ca.root, START)


def test_a_leaf_of_another_family_does_not_chain(rsa_ca: SessionCA) -> None:
    p384 = ca_of(KeyType.P384)
    cert = p384.issue(CertKind.SIGNING, key_of(KeyType.P256))
    with pytest.raises(UnknownIssuer):
        verify_email_chain(cert, [p384.issuing, rsa_ca.issuing], rsa_ca.root, START)


def test_same_names_other_keys_do_not_chain(rsa_ca: SessionCA) -> None:
    impostor = ca_of(KeyType.P256, "impostor")
    assert impostor.root.subject == rsa_ca.root.subject
    cert = impostor.issue(CertKind.SIGNING, key_of(KeyType.P256))
    with pytest.raises(UnknownIssuer):
        verify_email_chain(cert, [impostor.issuing, rsa_ca.issuing], rsa_ca.root, START)
    # ... nor does the impostor's issuing CA under the real root
    with pytest.raises(UnknownIssuer):
        verify_email_chain(cert, [impostor.issuing], rsa_ca.root, START)


@pytest.mark.parametrize(
    ("offset", "ok"),
    [(-ONE_SECOND, False), (dt.timedelta(0), True), (dt.timedelta(days=200), True)],
    ids=["before-notBefore", "at-notBefore", "inside"],
)
def test_validity_start(leaf: x509.Certificate, rsa_ca: SessionCA, offset: dt.timedelta, ok: bool) -> None:
    at = leaf.not_valid_before_utc + offset
    if ok:
        assert verify_email_chain(leaf, [rsa_ca.issuing], rsa_ca.root, at) is rsa_ca.issuing
    else:
        with pytest.raises(BadSignature, match="not valid at"):
            verify_email_chain(leaf, [rsa_ca.issuing], rsa_ca.root, at)


@pytest.mark.parametrize(("offset", "ok"), [(-ONE_SECOND, True), (dt.timedelta(0), True), (ONE_SECOND, False)])
def test_validity_end_is_inclusive(leaf: x509.Certificate, rsa_ca: SessionCA, offset: dt.timedelta, ok: bool) -> None:
    at = leaf.not_valid_after_utc + offset
    assert leaf.not_valid_after_utc == subscriber_validity(START, 18).not_after
    if ok:
        assert verify_email_chain(leaf, [rsa_ca.issuing], rsa_ca.root, at) is rsa_ca.issuing
    else:
        with pytest.raises(BadSignature, match="was not valid at"):
            verify_email_chain(leaf, [rsa_ca.issuing], rsa_ca.root, at)


def test_a_certificate_not_for_email_is_refused(rsa_ca: SessionCA) -> None:
    issuer = rsa_ca.issuer
    responder = issuer.issue(issuer.prepare_ocsp_responder(key_of(KeyType.P256).public_key(), START))
    assert not has_email_protection(responder)
    with pytest.raises(BadSignature, match="e-mail protection"):
        verify_email_chain(responder, [rsa_ca.issuing], rsa_ca.root, START)


def test_issued_by(leaf: x509.Certificate, rsa_ca: SessionCA) -> None:
    assert issued_by(leaf, rsa_ca.issuing)
    assert issued_by(rsa_ca.issuing, rsa_ca.root)
    assert issued_by(rsa_ca.root, rsa_ca.root)
    assert not issued_by(leaf, rsa_ca.root)
    assert not issued_by(leaf, ca_of(KeyType.P256, "impostor").issuing)  # same name, other key
    assert not issued_by(rsa_ca.issuing, ca_of(KeyType.P384).root)  # other name


def test_mailboxes_of(rsa_ca: SessionCA) -> None:
    cert = rsa_ca.issue(CertKind.SIGNING, key_of(KeyType.P256), "Alice.Example@Example.ORG")
    assert mailboxes_of(cert) == ["alice.example@example.org"]
    assert mailboxes_of(rsa_ca.root) == []
    assert has_email_protection(cert)
    assert not has_email_protection(rsa_ca.root)
