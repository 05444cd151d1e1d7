"""The pure CRL and OCSP core under both CA families, judged by pkilint and openssl."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from mailkms.errors import BadRevocationReason, Malformed
from mailkms.pki import (
    BR_MAX_ARL_VALIDITY,
    CertKind,
    CertState,
    CertStatus,
    KeyType,
    RevokedEntry,
    SoftSigner,
    build_crl,
    crl_number,
    issuer_hashes,
    parse_reason,
    parse_request,
    reason_name,
    sign_response,
)
from mailkms.pki._crl import SUBSCRIBER_REASONS
from tests.judges import pem, pkilint
from tests.testca import START, SessionCA, ca_of, key_of

CA_TYPES = [KeyType.RSA3072, KeyType.P384]
WEEK = dt.timedelta(days=7)


def _signer(ca: SessionCA) -> SoftSigner:
    return SoftSigner(ca.issuing, ca.issuing_key)


def _responder(ca: SessionCA, at: dt.datetime = START) -> SoftSigner:
    key = key_of(KeyType.P256, 7)
    cert = ca.issuer.issue(ca.issuer.prepare_ocsp_responder(key.public_key(), at))
    return SoftSigner(cert, key)


def _crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("key_type", CA_TYPES)
def test_crl_with_every_allowed_reason_is_lint_clean_and_signed(key_type: KeyType) -> None:
    ca = ca_of(key_type)
    entries = [RevokedEntry(1000 + i, START, flag) for i, flag in enumerate(SUBSCRIBER_REASONS.values())]
    entries.append(RevokedEntry(999, START, None))
    crl = build_crl(_signer(ca), entries, number=42, this_update=START, next_update=START + WEEK)
    assert crl.is_signature_valid(ca.issuing.public_key())  # type: ignore[arg-type]
    assert crl_number(crl) == 42 and len(crl) == len(entries)
    assert crl.issuer == ca.issuing.subject
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    if key_type is KeyType.P384:
        assert isinstance(crl.signature_hash_algorithm, hashes.SHA384)  # BR 7.1.3.2.2
    no_reason = crl.get_revoked_certificate_by_serial_number(999)
    assert no_reason is not None and len(no_reason.extensions) == 0
    verdict = pkilint("lint_crl", ["-t", "CRL", "-p", "BR", "-s", "WARNING"], _crl_pem(crl))
    assert verdict.exit_code == 0, verdict


@pytest.mark.parametrize("key_type", CA_TYPES)
def test_empty_root_arl_is_lint_clean(key_type: KeyType) -> None:
    ca = ca_of(key_type)
    arl = build_crl(
        ca.root_signer,
        [],
        number=1,
        this_update=START,
        next_update=START + dt.timedelta(days=90),
        max_validity=BR_MAX_ARL_VALIDITY,
    )
    verdict = pkilint("lint_crl", ["-t", "ARL", "-p", "BR", "-s", "WARNING"], _crl_pem(arl))
    assert verdict.exit_code == 0, verdict


def test_crl_validity_is_bounded_by_the_br() -> None:
    signer = _signer(ca_of(KeyType.RSA3072))
    build_crl(signer, [], number=1, this_update=START, next_update=START + dt.timedelta(days=10))  # the limit itself
    for bad_next in (START + dt.timedelta(days=10, seconds=1), START, START - WEEK):
        with pytest.raises(Malformed):
            build_crl(signer, [], number=1, this_update=START, next_update=bad_next)
    for bad_number in (-1, 1 << 159):
        with pytest.raises(Malformed):
            build_crl(signer, [], number=bad_number, this_update=START, next_update=START + WEEK)


@pytest.mark.parametrize(
    ("text", "flag"),
    [
        ("keyCompromise", x509.ReasonFlags.key_compromise),
        ("key-compromise", x509.ReasonFlags.key_compromise),
        ("KEY_COMPROMISE", x509.ReasonFlags.key_compromise),
        ("affiliationChanged", x509.ReasonFlags.affiliation_changed),
        ("superseded", x509.ReasonFlags.superseded),
        ("cessation-of-operation", x509.ReasonFlags.cessation_of_operation),
        ("privilegeWithdrawn", x509.ReasonFlags.privilege_withdrawn),
        (None, None),
        ("none", None),
    ],
)
def test_reasons_parse(text: str | None, flag: x509.ReasonFlags | None) -> None:
    assert parse_reason(text) is flag
    if flag is not None:
        assert parse_reason(reason_name(flag)) is flag


@pytest.mark.parametrize(
    "text", ["unspecified", "certificateHold", "removeFromCRL", "cACompromise", "aACompromise", "x"]
)
def test_reasons_the_br_forbid_are_refused(text: str) -> None:
    with pytest.raises(BadRevocationReason) as caught:
        parse_reason(text)
    assert "keyCompromise" in caught.value.detail  # the message names what is allowed


def test_reason_name_refuses_flags_outside_the_br() -> None:
    with pytest.raises(BadRevocationReason):
        reason_name(x509.ReasonFlags.certificate_hold)


def _request(cert: x509.Certificate, issuer: x509.Certificate, algorithm: hashes.HashAlgorithm) -> bytes:
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm).build()
    return req.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("key_type", CA_TYPES)
@pytest.mark.parametrize("algorithm", [hashes.SHA1(), hashes.SHA256()], ids=["sha1", "sha256"])
@pytest.mark.parametrize(
    "state",
    [
        CertState(CertStatus.GOOD),
        CertState(CertStatus.REVOKED, START, x509.ReasonFlags.key_compromise),
        CertState(CertStatus.REVOKED, START, None),
        CertState(CertStatus.UNKNOWN),
    ],
    ids=["good", "revoked", "revoked-no-reason", "unknown"],
)
def test_ocsp_responses_verify_with_openssl_and_lint_clean(
    key_type: KeyType, algorithm: hashes.HashAlgorithm, state: CertState, tmp_path: Path
) -> None:
    # openssl checks the status times against the wall clock whatever -attime says, so this
    # one test signs at the real now (the leaf, from START for 18 months, is valid then).
    now = dt.datetime.now(dt.UTC)
    ca = ca_of(key_type)
    responder = _responder(ca, now)
    leaf = ca.issue(CertKind.SIGNING, key_of(KeyType.P256))
    request = _request(leaf, ca.issuing, algorithm)
    query = parse_request(request)
    der = sign_response(responder, query, state, now=now, validity=WEEK)
    response = ocsp.load_der_ocsp_response(der)
    assert response.certificate_status.name == state.status.name
    assert response.hash_algorithm.name == algorithm.name
    assert response.serial_number == leaf.serial_number
    assert response.this_update_utc == now.replace(microsecond=0) - dt.timedelta(minutes=1)
    assert response.next_update_utc == response.this_update_utc + WEEK
    assert response.certificates == [responder.certificate]
    if state.status is CertStatus.REVOKED:
        assert response.revocation_time_utc == START
        assert response.revocation_reason is state.reason
    assert pkilint("lint_ocsp_response", ["-s", "WARNING"], der).exit_code == 0

    (tmp_path / "resp.der").write_bytes(der)
    (tmp_path / "sub.pem").write_bytes(pem(ca.issuing))
    (tmp_path / "root.pem").write_bytes(pem(ca.root))
    (tmp_path / "leaf.pem").write_bytes(pem(leaf))
    cmd = ["openssl", "ocsp", "-respin", str(tmp_path / "resp.der"), "-issuer", str(tmp_path / "sub.pem")]
    cmd += ["-CAfile", str(tmp_path / "root.pem"), "-no_nonce", "-attime", str(int(now.timestamp()))]
    if isinstance(algorithm, hashes.SHA1):  # openssl matches a SHA-256 CertID only with -sha256
        cmd += ["-cert", str(tmp_path / "leaf.pem")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    out = done.stdout + done.stderr
    assert "Response verify OK" in out, out
    if isinstance(algorithm, hashes.SHA1):
        assert f"leaf.pem: {state.status.value}" in out, out


@pytest.mark.parametrize("key_type", CA_TYPES)
def test_responder_certificate_is_a_delegated_ocsp_signer(key_type: KeyType) -> None:
    ca = ca_of(key_type)
    cert = _responder(ca).certificate
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING]
    assert cert.extensions.get_extension_for_class(x509.OCSPNoCheck).critical is False
    assert cert.issuer == ca.issuing.subject
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    verdict = pkilint("lint_cabf_serverauth_cert", ["-t", "OCSP-RESPONDER", "-s", "WARNING"], cert)
    assert verdict.exit_code == 0, verdict


def test_issuer_hashes_match_what_clients_send() -> None:
    ca = ca_of(KeyType.RSA3072)
    responder = _responder(ca)
    leaf = ca.issue(CertKind.ENCRYPTION, key_of(KeyType.RSA2048))
    hashes_by_name = issuer_hashes(ca.issuing, responder.certificate)
    for algorithm in (hashes.SHA1(), hashes.SHA256(), hashes.SHA384(), hashes.SHA512()):
        query = parse_request(_request(leaf, ca.issuing, algorithm))
        assert hashes_by_name[query.hash_name] == (query.issuer_name_hash, query.issuer_key_hash)
    other = ca_of(KeyType.RSA3072, tag="other")
    foreign = parse_request(_request(other.issue(CertKind.SIGNING, key_of(KeyType.P256)), other.issuing, hashes.SHA1()))
    assert hashes_by_name["sha1"] != (foreign.issuer_name_hash, foreign.issuer_key_hash)


@pytest.mark.parametrize("data", [b"", b"\x30\x00", b"not der at all", b"\x30\x82\xff\xff"])
def test_malformed_ocsp_requests_are_refused(data: bytes) -> None:
    with pytest.raises(Malformed):
        parse_request(data)


def test_requests_for_two_certificates_are_refused() -> None:
    ca = ca_of(KeyType.RSA3072)
    one = ca.issue(CertKind.SIGNING, key_of(KeyType.P256))
    request = ocsp.load_der_ocsp_request(_request(one, ca.issuing, hashes.SHA1()))
    # Two CertIDs, assembled from the one request's DER with asn1crypto (a well-kept codec).
    from asn1crypto import ocsp as asn1_ocsp

    parsed = asn1_ocsp.OCSPRequest.load(request.public_bytes(serialization.Encoding.DER))
    single = parsed["tbs_request"]["request_list"][0]
    parsed["tbs_request"]["request_list"] = [single, single]
    with pytest.raises(Malformed):
        parse_request(parsed.dump(force=True))


@pytest.mark.parametrize("validity", [dt.timedelta(hours=7, minutes=59), dt.timedelta(days=10)])
def test_ocsp_validity_outside_the_br_window_is_refused(validity: dt.timedelta) -> None:
    ca = ca_of(KeyType.RSA3072)
    leaf = ca.issue(CertKind.SIGNING, key_of(KeyType.P256))
    query = parse_request(_request(leaf, ca.issuing, hashes.SHA1()))
    with pytest.raises(Malformed):
        sign_response(_responder(ca), query, CertState(CertStatus.GOOD), now=START, validity=validity)
