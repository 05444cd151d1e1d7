"""check_csr: lenient parsing (asn1crypto), strict proof of possession, clear refusals, never a traceback."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from asn1crypto import algos as a_algos
from asn1crypto import csr as a_csr
from asn1crypto import keys as a_keys
from asn1crypto import x509 as a_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from mailkms.errors import BadCSR, BadCSRSignature, BadKey, MailkmsError
from mailkms.pki import CertKind, KeyType, PrivateKey, check_csr, same_public_key, signature_hash_for
from tests.testca import MAILBOX, SessionCA, key_of

PEM, DER = serialization.Encoding.PEM, serialization.Encoding.DER


def csr_with(
    key: PrivateKey, names: list[x509.NameAttribute], *, san: list[str] = ()
) -> x509.CertificateSigningRequest:  # type: ignore[assignment]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(m) for m in san]), False)
    return builder.sign(key, signature_hash_for(key))


def plain_csr(key: PrivateKey) -> x509.CertificateSigningRequest:
    return csr_with(key, [x509.NameAttribute(NameOID.EMAIL_ADDRESS, MAILBOX)])


def asn1_csr(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    subject: a_x509.Name,
    *,
    algorithm: dict[str, object],
    sign: Callable[[bytes], bytes],
) -> bytes:
    """A CSR assembled with asn1crypto, as certmonger and other non-Python tools write them."""
    spki = a_keys.PublicKeyInfo.load(
        key.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    info = a_csr.CertificationRequestInfo(
        {"version": "v1", "subject": subject, "subject_pk_info": spki, "attributes": []}
    )
    request = a_csr.CertificationRequest(
        {"certification_request_info": info, "signature_algorithm": algorithm, "signature": sign(info.dump())}
    )
    return bytes(request.dump())


def rsa_pkcs1(key: rsa.RSAPrivateKey, digest: hashes.HashAlgorithm) -> Callable[[bytes], bytes]:
    return lambda tbs: key.sign(tbs, padding.PKCS1v15(), digest)


def certmonger_name() -> a_x509.Name:
    """certmonger encodes a CN holding '@' as PrintableString, which forbids '@'."""
    return a_x509.Name.build({"common_name": MAILBOX}, use_printable=True)


# --- accepted ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key_type", [KeyType.RSA2048, KeyType.RSA3072, KeyType.P256, KeyType.P384])
@pytest.mark.parametrize("encoding", [PEM, DER], ids=["pem", "der"])
def test_well_formed_requests_are_accepted(key_type: KeyType, encoding: serialization.Encoding) -> None:
    key = key_of(key_type)
    checked = check_csr(plain_csr(key).public_bytes(encoding))
    assert same_public_key(checked.public_key, key.public_key())  # type: ignore[arg-type]
    assert checked.claimed_emails == (MAILBOX,)


def test_pem_with_crlf_and_surrounding_blank_lines_is_accepted() -> None:
    pem = plain_csr(key_of(KeyType.P256)).public_bytes(PEM)
    checked = check_csr(b"\r\n\n" + pem.replace(b"\n", b"\r\n") + b"\n\n")
    assert same_public_key(checked.public_key, key_of(KeyType.P256).public_key())  # type: ignore[arg-type]


def test_der_is_kept_as_received() -> None:
    csr = plain_csr(key_of(KeyType.P256))
    der = csr.public_bytes(DER)
    assert check_csr(der).der == der
    assert check_csr(csr.public_bytes(PEM)).der == der


def test_certmonger_printable_string_cn_with_at_sign_is_accepted() -> None:
    key = key_of(KeyType.RSA2048)
    assert isinstance(key, rsa.RSAPrivateKey)
    der = asn1_csr(key, certmonger_name(), algorithm={"algorithm": "sha256_rsa"}, sign=rsa_pkcs1(key, hashes.SHA256()))
    with pytest.raises(ValueError):  # why the lenient parser is needed: cryptography refuses it
        x509.load_der_x509_csr(der).subject  # noqa: B018
    checked = check_csr(der)
    assert same_public_key(checked.public_key, key.public_key())
    assert checked.claimed_emails == ()


def test_ecdsa_request_assembled_elsewhere_is_accepted() -> None:
    key = key_of(KeyType.P384)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = asn1_csr(
        key,
        certmonger_name(),
        algorithm={"algorithm": "sha384_ecdsa"},
        sign=lambda tbs: key.sign(tbs, ec.ECDSA(hashes.SHA384())),
    )
    assert same_public_key(check_csr(der).public_key, key.public_key())


# --- proof of possession ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key_type", [KeyType.RSA2048, KeyType.P256])
@pytest.mark.parametrize("offset", [-1, -8, -20], ids=["last", "8th-from-end", "20th-from-end"])
def test_a_flipped_signature_byte_is_a_bad_signature(key_type: KeyType, offset: int) -> None:
    der = bytearray(plain_csr(key_of(key_type)).public_bytes(DER))
    der[offset] ^= 0x01
    with pytest.raises(BadCSRSignature):
        check_csr(bytes(der))


@pytest.mark.parametrize("key_type", [KeyType.RSA2048, KeyType.P256])
def test_an_altered_subject_is_a_bad_signature(key_type: KeyType) -> None:
    der = plain_csr(key_of(key_type)).public_bytes(DER)
    altered = der.replace(b"alice", b"mally")
    assert altered != der
    with pytest.raises(BadCSRSignature):
        check_csr(altered)


def test_a_request_signed_by_another_key_is_a_bad_signature() -> None:
    """Public key of one pair, signature of another: no proof of possession."""
    owner = key_of(KeyType.RSA2048)
    thief = key_of(KeyType.RSA2048, tag=1)
    assert isinstance(owner, rsa.RSAPrivateKey) and isinstance(thief, rsa.RSAPrivateKey)
    der = asn1_csr(
        owner, certmonger_name(), algorithm={"algorithm": "sha256_rsa"}, sign=rsa_pkcs1(thief, hashes.SHA256())
    )
    with pytest.raises(BadCSRSignature):
        check_csr(der)


# --- malformed: BadCSR with a message, never a traceback ---------------------------------------------------
def _der() -> bytes:
    return plain_csr(key_of(KeyType.RSA2048)).public_bytes(DER)


def _pem() -> bytes:
    return plain_csr(key_of(KeyType.RSA2048)).public_bytes(PEM)


def _cert_der() -> bytes:
    from tests.testca import ca_of

    return ca_of(KeyType.RSA3072).root.public_bytes(DER)


MALFORMED: list[tuple[str, Callable[[], bytes]]] = [
    ("empty", lambda: b""),
    ("whitespace", lambda: b"  \r\n\t "),
    ("text", lambda: b"hello, this is not a request"),
    ("one-byte", lambda: b"\x30"),
    ("indefinite-length", lambda: b"\x30\x80\x00\x00"),
    ("truncated-der", lambda: _der()[:100]),
    ("der-minus-one-byte", lambda: _der()[:-1]),
    ("der-with-trailing-junk", lambda: _der() + b"\x00"),
    ("truncated-pem", lambda: _pem()[:200]),
    ("pem-without-end", lambda: _pem().replace(b"-----END CERTIFICATE REQUEST-----", b"")),
    ("pem-with-bad-base64", lambda: _pem().replace(b"MII", b"M!I", 1)),
    ("a-certificate-der", _cert_der),
    ("a-certificate-pem", lambda: b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
    ("zeros", lambda: bytes(512)),
    # rsaEncryption (1.2.840.113549.1.1.1) turned into an OID no library knows
    (
        "unknown-key-algorithm",
        lambda: _der().replace(bytes.fromhex("2a864886f70d010101"), bytes.fromhex("2a864886f70d01017f"), 1),
    ),
]


@pytest.mark.parametrize("make", [m for _, m in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_malformed_input_is_a_bad_csr(make: Callable[[], bytes]) -> None:
    with pytest.raises(BadCSR) as caught:
        check_csr(make())
    assert type(caught.value) is BadCSR
    assert caught.value.detail


def test_every_truncation_is_refused_cleanly() -> None:
    der = _der()
    for length in range(len(der)):
        with pytest.raises(BadCSR):
            check_csr(der[:length])


def test_every_single_byte_corruption_is_refused_cleanly() -> None:
    """Each byte inverted in turn: a BadCSR (or BadKey when the key itself becomes odd), never a
    traceback. Leniency may accept a change outside the signed part (e.g. the outer algorithm's
    NULL parameters), but then the key is still the requester's."""
    der = _der()
    signed = a_csr.CertificationRequest.load(der)["certification_request_info"].dump()
    signed_start = der.index(signed)
    signed_range = range(signed_start, signed_start + len(signed))
    key = key_of(KeyType.RSA2048).public_key()
    for position in range(len(der)):
        corrupted = bytearray(der)
        corrupted[position] ^= 0xFF
        try:
            checked = check_csr(bytes(corrupted))
        except (BadCSR, BadKey):
            continue
        assert position not in signed_range, f"a change at byte {position} of the signed part was accepted"
        assert same_public_key(checked.public_key, key)  # type: ignore[arg-type]


# --- refused kinds of request ------------------------------------------------------------------------------
def test_rsa_pss_is_refused_clearly() -> None:
    key = key_of(KeyType.RSA2048)
    assert isinstance(key, rsa.RSAPrivateKey)
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
    der = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256(), rsa_padding=pss)
        .public_bytes(DER)
    )
    with pytest.raises(BadCSR, match="RSASSA-PSS"):
        check_csr(der)


def test_rsa_pss_with_sha1_parameters_is_refused_as_pss() -> None:
    key = key_of(KeyType.RSA2048)
    assert isinstance(key, rsa.RSAPrivateKey)
    params = a_algos.RSASSAPSSParams(
        {
            "hash_algorithm": {"algorithm": "sha1"},
            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha1"}},
            "salt_length": 20,
        }
    )
    der = asn1_csr(
        key,
        certmonger_name(),
        algorithm={"algorithm": "rsassa_pss", "parameters": params},
        sign=lambda tbs: key.sign(tbs, padding.PSS(padding.MGF1(hashes.SHA1()), 20), hashes.SHA1()),
    )
    with pytest.raises(BadCSR, match="RSASSA-PSS"):
        check_csr(der)


def test_sha1_signatures_are_refused() -> None:
    key = key_of(KeyType.RSA2048)
    assert isinstance(key, rsa.RSAPrivateKey)
    der = asn1_csr(key, certmonger_name(), algorithm={"algorithm": "sha1_rsa"}, sign=rsa_pkcs1(key, hashes.SHA1()))
    with pytest.raises(BadCSR, match="sha1"):
        check_csr(der)


def test_a_signature_algorithm_that_does_not_fit_the_key_is_refused() -> None:
    key = key_of(KeyType.RSA2048)
    assert isinstance(key, rsa.RSAPrivateKey)
    der = asn1_csr(
        key, certmonger_name(), algorithm={"algorithm": "sha256_ecdsa"}, sign=rsa_pkcs1(key, hashes.SHA256())
    )
    with pytest.raises(BadCSR, match="does not match"):
        check_csr(der)


@pytest.mark.parametrize(
    ("make_key", "error", "message"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), BadKey, "1024"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), BadKey, "secp521r1"),
        (ed25519.Ed25519PrivateKey.generate, BadCSR, "RSA and ECDSA"),
    ],
    ids=["rsa1024", "p521", "ed25519"],
)
def test_keys_mailkms_does_not_certify_are_refused(
    make_key: Callable[[], object], error: type[MailkmsError], message: str
) -> None:
    key = make_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    der = builder.sign(key, algorithm).public_bytes(DER)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        check_csr(der)


# --- the request's names are never certified -------------------------------------------------------------------
def test_subject_and_san_of_the_request_are_never_copied(rsa_ca: SessionCA) -> None:
    key = key_of(KeyType.P256)
    evil = csr_with(
        key,
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "Mallory"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "mallory@evil.example"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil Corp"),
        ],
        san=["mallory@evil.example", "ceo@example.org"],
    )
    checked = check_csr(evil.public_bytes(PEM))
    assert checked.claimed_emails == ("mallory@evil.example",)  # informative only
    issuer = rsa_ca.issuer
    from mailkms.pki import subscriber_validity
    from tests.testca import ALL_KEY_TYPES, START

    cert = issuer.issue(
        issuer.prepare_subscriber(
            CertKind.SIGNING, MAILBOX, checked.public_key, subscriber_validity(START, 18), ALL_KEY_TYPES
        )
    )
    assert {a.value for a in cert.subject} == {MAILBOX}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == [MAILBOX]
    der = cert.public_bytes(DER)
    for word in (b"Mallory", b"mallory", b"evil", b"Evil", b"ceo@"):
        assert word not in der


# --- the fast parse (cryptography) reads what the lenient one (asn1crypto) reads ------------------------------
def _spki(key: object) -> bytes:
    if isinstance(key, bytes):
        return key
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    return key.public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("key_type", [KeyType.RSA2048, KeyType.RSA3072, KeyType.P256, KeyType.P384])
@pytest.mark.parametrize(
    "emails",
    [[MAILBOX], [], [MAILBOX.upper()], [MAILBOX, MAILBOX], [MAILBOX, "other@example.org"]],
    ids=["one", "none", "upper", "twice", "two-different"],
)
def test_fast_parse_agrees_with_the_lenient_parse_or_declines(key_type: KeyType, emails: list[str]) -> None:
    from mailkms.pki._csr import _parse_fast, _parse_lenient

    names = [x509.NameAttribute(NameOID.COMMON_NAME, "someone")]
    names += [x509.NameAttribute(NameOID.EMAIL_ADDRESS, e) for e in emails]
    der = csr_with(key_of(key_type), names).public_bytes(DER)
    fast, lenient = _parse_fast(der), _parse_lenient(der)
    if len(emails) > 1:
        assert fast is None  # out of the ordinary: the lenient parse alone decides, as before
        return
    assert fast is not None
    assert _spki(fast[0]) == _spki(lenient[0])
    assert fast[1:] == lenient[1:]  # algorithm, hash, signature, signed bytes, claimed e-mails


def test_fast_parse_declines_what_cryptography_refuses_and_the_lenient_parse_takes_it() -> None:
    from mailkms.pki._csr import _parse_fast

    key = key_of(KeyType.RSA2048)
    assert isinstance(key, rsa.RSAPrivateKey)
    der = asn1_csr(key, certmonger_name(), algorithm={"algorithm": "sha256_rsa"}, sign=rsa_pkcs1(key, hashes.SHA256()))
    assert _parse_fast(der) is None
    assert same_public_key(check_csr(der).public_key, key.public_key())
