"""Signed requests (ACME-style flattened JWS): round trips, tampering, missing members, algorithms."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from joserfc import jws

from mailkms.errors import BadJWS, BadSignature
from mailkms.pki import CertKind, KeyType, PrivateKey, sign_request, verify_request
from mailkms.pki._jws import _REGISTRY, _jwk
from tests.testca import SessionCA, key_of

NONCE = "nonce-123"
URL = "https://kms.example.org:8443/api/v1/renewal"
PAYLOAD = {"csr": "-----BEGIN CERTIFICATE REQUEST-----...", "mailbox": "alice@example.org"}
ALGORITHMS = {KeyType.RSA2048: "RS256", KeyType.P256: "ES256", KeyType.P384: "ES384"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def header_of(body: dict[str, str]) -> dict[str, object]:
    value = body["protected"]
    decoded: dict[str, object] = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    return decoded


def with_header(body: dict[str, str], **changes: object) -> dict[str, str]:
    """The same signature over a different protected header (None removes a member)."""
    header = {k: v for k, v in {**header_of(body), **changes}.items() if v is not None}
    return {**body, "protected": b64url(json.dumps(header).encode())}


def x5c_entry(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def signed_raw(key: PrivateKey, header: dict[str, object], payload: bytes) -> dict[str, str]:
    """A correctly signed JWS around any payload bytes (sign_request only ever writes JSON objects)."""
    result = jws.serialize_json({"protected": header}, payload, _jwk(key), registry=_REGISTRY)
    return {k: str(v) for k, v in dict(result).items()}  # type: ignore[call-overload]


@pytest.fixture(params=list(ALGORITHMS), ids=[k.value for k in ALGORITHMS])
def key_type(request: pytest.FixtureRequest) -> KeyType:
    value: KeyType = request.param
    return value


@pytest.fixture
def signer(key_type: KeyType, rsa_ca: SessionCA) -> tuple[PrivateKey, list[x509.Certificate]]:
    key = key_of(key_type)
    return key, [rsa_ca.issue(CertKind.SIGNING, key), rsa_ca.issuing, rsa_ca.root]


@pytest.fixture
def body(signer: tuple[PrivateKey, list[x509.Certificate]]) -> dict[str, str]:
    key, chain = signer
    return sign_request(key, chain, NONCE, URL, PAYLOAD)


# --- round trip ---------------------------------------------------------------------------------------
def test_round_trip(key_type: KeyType, signer: tuple[PrivateKey, list[x509.Certificate]], body: dict[str, str]) -> None:
    _, chain = signer
    verified = verify_request(body)
    assert verified.nonce == NONCE
    assert verified.url == URL
    assert verified.payload == PAYLOAD
    assert verified.certificate == chain[0]
    assert verified.chain == tuple(chain)
    assert header_of(body)["alg"] == ALGORITHMS[key_type]


def test_a_whole_chain_fits_in_the_protected_header(body: dict[str, str]) -> None:
    """Regression: joserfc's default 512-byte header cap refused every request carrying an x5c."""
    assert len(body["protected"]) > 2048
    assert verify_request(body).nonce == NONCE


def test_the_leaf_alone_is_enough(signer: tuple[PrivateKey, list[x509.Certificate]]) -> None:
    key, chain = signer
    verified = verify_request(sign_request(key, chain[:1], NONCE, URL, {}))
    assert verified.chain == (chain[0],)
    assert verified.payload == {}


def test_an_unprotected_header_changes_nothing(body: dict[str, str]) -> None:
    verified = verify_request({**body, "header": {"nonce": "other", "url": "https://evil.example/"}})  # type: ignore[dict-item]
    assert (verified.nonce, verified.url) == (NONCE, URL)


# --- tampering: the signature no longer verifies --------------------------------------------------------------
def test_tampered_payload(body: dict[str, str]) -> None:
    with pytest.raises(BadSignature):
        verify_request({**body, "payload": b64url(json.dumps({**PAYLOAD, "mailbox": "bob@example.org"}).encode())})


@pytest.mark.parametrize(
    "changes",
    [{"nonce": "nonce-124"}, {"url": "https://kms.example.org:8443/api/v1/resync"}, {"extra": "x"}],
    ids=["nonce", "url", "added-member"],
)
def test_tampered_protected_header(body: dict[str, str], changes: dict[str, object]) -> None:
    # An unknown header member is refused before the signature is even checked.
    expected = BadJWS if "extra" in changes else BadSignature
    with pytest.raises(expected):
        verify_request(with_header(body, **changes))


@pytest.mark.parametrize("position", [0, 10, -3])
def test_tampered_signature(body: dict[str, str], position: int) -> None:
    signature = body["signature"]
    swapped = "B" if signature[position] == "A" else "A"
    index = position % len(signature)
    with pytest.raises(BadSignature):
        verify_request({**body, "signature": signature[:index] + swapped + signature[index + 1 :]})


def test_empty_signature(body: dict[str, str]) -> None:
    with pytest.raises(BadSignature):
        verify_request({**body, "signature": ""})


def test_someone_elses_certificate_in_x5c(body: dict[str, str], key_type: KeyType, rsa_ca: SessionCA) -> None:
    """Same key type, another key: the signature does not verify with the certificate presented."""
    other = rsa_ca.issue(CertKind.SIGNING, key_of(key_type, tag=1))
    with pytest.raises(BadSignature):
        verify_request(with_header(body, x5c=[x5c_entry(other)]))


# --- malformed ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("member", ["x5c", "nonce", "url", "alg"])
def test_missing_header_member(body: dict[str, str], member: str) -> None:
    with pytest.raises(BadJWS, match=member):
        verify_request(with_header(body, **{member: None}))


@pytest.mark.parametrize(
    "changes",
    [{"nonce": 5}, {"url": ["x"]}, {"x5c": "MIIB"}, {"x5c": []}],
    ids=["nonce-int", "url-list", "x5c-string", "x5c-empty"],
)
def test_header_members_of_the_wrong_type(body: dict[str, str], changes: dict[str, object]) -> None:
    with pytest.raises(BadJWS):
        verify_request(with_header(body, **changes))


@pytest.mark.parametrize("entry", ["!!!", "AAAA", 7], ids=["not-base64", "not-der", "not-a-string"])
def test_x5c_entries_that_are_not_certificates(body: dict[str, str], entry: object) -> None:
    with pytest.raises(BadJWS, match="x5c"):
        verify_request(with_header(body, x5c=[entry]))


def test_algorithm_must_fit_the_certificate_key(body: dict[str, str], key_type: KeyType) -> None:
    for claimed in {"RS256", "ES256", "ES384", "PS256", "HS256", "none"} - {ALGORITHMS[key_type]}:
        with pytest.raises(BadJWS, match="does not fit"):
            verify_request(with_header(body, alg=claimed))


@pytest.mark.parametrize(
    "value",
    ["not a jws", [], None, {}, {"protected": "x", "payload": "y"}],
    ids=["string", "list", "none", "empty", "no-signature"],
)
def test_not_a_flattened_jws(value: object) -> None:
    with pytest.raises(BadJWS, match="flattened JWS"):
        verify_request(value)


@pytest.mark.parametrize("protected", ["!!!", b64url(b"not json"), b64url(b"[1, 2]")], ids=["base64", "json", "array"])
def test_protected_header_that_cannot_be_read(body: dict[str, str], protected: str) -> None:
    with pytest.raises(BadJWS, match="protected header"):
        verify_request({**body, "protected": protected})


@pytest.mark.parametrize(("payload", "message"), [(b"not json", "not JSON"), (b"[1, 2]", "not a JSON object")])
def test_signed_payload_that_is_not_a_json_object(
    signer: tuple[PrivateKey, list[x509.Certificate]], key_type: KeyType, payload: bytes, message: str
) -> None:
    key, chain = signer
    header: dict[str, object] = {"alg": ALGORITHMS[key_type], "x5c": [x5c_entry(chain[0])], "nonce": NONCE, "url": URL}
    with pytest.raises(BadJWS, match=message):
        verify_request(signed_raw(key, header, payload))


def test_an_oversized_header_is_refused_before_parsing(body: dict[str, str]) -> None:
    huge = with_header(body, padding="x" * 40_000)
    with pytest.raises(BadJWS, match="too large"):
        verify_request(huge)
