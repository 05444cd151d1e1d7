"""The delivery mail: built by the server, opened by the client; every forgery and breakage refused."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import email.policy
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
from asn1crypto import cms as a_cms
from cryptography import x509

from mailkms.errors import BadMessage, BadSignature, UnknownIssuer
from mailkms.pki import (
    DELIVERY_HEADER,
    CertKind,
    KeyType,
    Manifest,
    PrivateKey,
    build_delivery,
    decrypt,
    is_delivery,
    open_delivery,
    parse_message,
    private_key_der,
    sign_opaque,
    verify_email_chain,
)
from tests.testca import MAIL_FROM, MAILBOX, START, SessionCA, ca_of, key_of

Pair = tuple[x509.Certificate, PrivateKey]
AT = START + dt.timedelta(hours=1)


def hexserial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


@dataclasses.dataclass(frozen=True)
class Issued:
    signing: x509.Certificate
    encryption: x509.Certificate
    encryption_key: PrivateKey
    manifest: Manifest


@pytest.fixture(scope="module")
def issued(rsa_ca: SessionCA) -> Issued:
    enc_key = key_of(KeyType.RSA2048, tag=9)
    signing = rsa_ca.issue(CertKind.SIGNING, key_of(KeyType.P256, tag=9))
    encryption = rsa_ca.issue(CertKind.ENCRYPTION, enc_key)
    manifest = Manifest(
        kind="enrolment",
        mailbox=MAILBOX,
        request_id="req-1",
        generation=1,
        signing_serial=hexserial(signing),
        encryption_serial=hexserial(encryption),
        key_serials=(hexserial(encryption),),
        issued_at=START.isoformat(),
        reminder_at=(START + dt.timedelta(days=365)).isoformat(),
    )
    return Issued(signing, encryption, enc_key, manifest)


def deliver(
    issued: Issued,
    ca: SessionCA,
    signer: Pair,
    transport: Pair,
    manifest: Manifest | None = None,
) -> bytes:
    return build_delivery(
        manifest or issued.manifest,
        [issued.signing, issued.encryption, ca.issuing, ca.root],
        [(hexserial(issued.encryption), private_key_der(issued.encryption_key), transport[0])],
        sender=MAIL_FROM,
        signer_cert=signer[0],
        signer_key=signer[1],
        signer_chain=[ca.issuing, ca.root],
        message_id="<req-1@kms.example.org>",
        date=START,
    )


@pytest.fixture(scope="module")
def raw(issued: Issued, rsa_ca: SessionCA, mail_signer: Pair, transport: Pair) -> bytes:
    return deliver(issued, rsa_ca, mail_signer, transport)


def split(raw: bytes) -> tuple[bytes, bytes]:
    """The outer headers, and the SignedData DER from the base64 body."""
    headers, _, body = raw.partition(b"\r\n\r\n")
    return headers, base64.b64decode(body)


def rebuilt(headers: bytes, der: bytes) -> bytes:
    return headers + b"\r\n\r\n" + base64.encodebytes(der).replace(b"\n", b"\r\n")


# --- the good path ----------------------------------------------------------------------------------------
def test_round_trip(raw: bytes, issued: Issued, mail_signer: Pair, rsa_ca: SessionCA, transport: Pair) -> None:
    content = open_delivery(raw)
    assert content.manifest == issued.manifest
    assert set(content.certificates) == {issued.signing, issued.encryption, rsa_ca.issuing, rsa_ca.root}
    assert content.signer == mail_signer[0]
    assert verify_email_chain(content.signer, content.signed_certificates, rsa_ca.root, AT) == rsa_ca.issuing
    [key] = content.keys
    assert key.serial == hexserial(issued.encryption)
    assert decrypt(key.der, transport[0], transport[1]) == private_key_der(issued.encryption_key)


def test_headers(raw: bytes, issued: Issued) -> None:
    message = parse_message(raw)
    assert is_delivery(message)
    assert message["From"] == MAIL_FROM
    assert message["To"] == MAILBOX
    assert message["Message-ID"] == "<req-1@kms.example.org>"
    assert message[DELIVERY_HEADER] == "enrolment; request=req-1"
    assert message.get_content_type() == "application/pkcs7-mime"
    assert message.get_param("smime-type") == "signed-data"
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")  # SMTP line endings only


@pytest.mark.parametrize(("kind", "subject"), [("renewal", "renewed"), ("recovery", "recovered")])
def test_each_kind_has_its_own_subject(
    issued: Issued, rsa_ca: SessionCA, mail_signer: Pair, transport: Pair, kind: str, subject: str
) -> None:
    manifest = dataclasses.replace(issued.manifest, kind=kind)
    message = parse_message(deliver(issued, rsa_ca, mail_signer, transport, manifest))
    assert subject in str(message["Subject"])
    assert open_delivery(message.as_bytes()).manifest.kind == kind


# --- tampering ---------------------------------------------------------------------------------------------
def _content_span(der: bytes) -> tuple[int, int]:
    content = a_cms.ContentInfo.load(der)["content"]["encap_content_info"]["content"].native
    return der.index(content), len(content)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75, 0.999])
def test_a_byte_flipped_inside_the_signed_content_is_refused(raw: bytes, fraction: float) -> None:
    headers, der = split(raw)
    start, length = _content_span(der)
    forged = bytearray(der)
    forged[start + int(length * fraction)] ^= 0x01
    with pytest.raises(BadSignature):
        open_delivery(rebuilt(headers, bytes(forged)))


def test_a_byte_flipped_in_the_signature_is_refused(raw: bytes) -> None:
    headers, der = split(raw)
    forged = bytearray(der)
    forged[-1] ^= 0x01
    with pytest.raises(BadSignature):
        open_delivery(rebuilt(headers, bytes(forged)))


def test_changed_outer_headers_do_not_change_what_is_signed(raw: bytes, issued: Issued) -> None:
    """Only the signed manifest counts: a forged To: header does not redirect the delivery."""
    forged = raw.replace(b"To: alice@example.org", b"To: mallory@example.org")
    assert open_delivery(forged).manifest.mailbox == MAILBOX


# --- not a delivery at all ------------------------------------------------------------------------------------
def _unsigned_inner(raw: bytes) -> bytes:
    """The very same MIME tree the server signs, sent without the signature around it."""
    _, der = split(raw)
    inner = a_cms.ContentInfo.load(der)["content"]["encap_content_info"]["content"].native
    return b"From: mailkms@kms.example.org\r\nTo: alice@example.org\r\n" + inner


UNSIGNED = {
    "plain-text": lambda raw: b"From: a@example.org\r\nTo: alice@example.org\r\nSubject: hi\r\n\r\nhello\r\n",
    "empty": lambda raw: b"",
    "unsigned-delivery-parts": _unsigned_inner,
}


@pytest.mark.parametrize("name", list(UNSIGNED))
def test_unsigned_mail_is_a_bad_message(raw: bytes, name: str) -> None:
    with pytest.raises(BadMessage, match="not S/MIME signed"):
        open_delivery(UNSIGNED[name](raw))


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_base64_is_a_bad_message(raw: bytes, keep: float) -> None:
    headers, _, body = raw.partition(b"\r\n\r\n")
    with pytest.raises(BadMessage):
        open_delivery(headers + b"\r\n\r\n" + body[: int(len(body) * keep)])


def test_base64_garbage_is_a_bad_message(raw: bytes) -> None:
    headers, _, _ = raw.partition(b"\r\n\r\n")
    with pytest.raises(BadMessage):
        open_delivery(headers + b"\r\n\r\n!!!! %%%% not base64 ####\r\n")


def test_signed_mail_without_a_manifest_is_a_bad_message(raw: bytes, mail_signer: Pair) -> None:
    inner = MIMEMultipart("mixed")
    inner.attach(MIMEText("Hello, here are no certificates.", "plain", "utf-8"))
    headers, _ = split(raw)
    der = sign_opaque(inner.as_bytes(policy=email.policy.SMTP), mail_signer[0], mail_signer[1], [])
    with pytest.raises(BadMessage, match="no mailkms delivery manifest"):
        open_delivery(rebuilt(headers, der))


def test_an_unknown_manifest_version_is_a_bad_message(
    issued: Issued, rsa_ca: SessionCA, mail_signer: Pair, transport: Pair
) -> None:
    future = dataclasses.replace(issued.manifest, version=2)
    with pytest.raises(BadMessage, match="version 2"):
        open_delivery(deliver(issued, rsa_ca, mail_signer, transport, future))


# --- signed, but by whom? ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tag", ["other", "impostor"], ids=["another-ca", "same-names-other-keys"])
def test_a_delivery_signed_under_another_ca_is_an_unknown_issuer(
    issued: Issued, rsa_ca: SessionCA, transport: Pair, tag: str
) -> None:
    foreign = ca_of(KeyType.P256, tag)
    if tag == "impostor":
        assert foreign.issuing.subject == rsa_ca.issuing.subject
    key = key_of(KeyType.RSA2048, tag=11)
    forger = (foreign.issue(CertKind.MAIL_SIGNER, key, MAIL_FROM), key)
    content = open_delivery(deliver(issued, foreign, forger, transport))  # the signature itself is fine
    with pytest.raises(UnknownIssuer):
        verify_email_chain(content.signer, content.signed_certificates, rsa_ca.root, AT)


def test_a_forger_cannot_borrow_the_real_chain(issued: Issued, rsa_ca: SessionCA, transport: Pair) -> None:
    """The forger's signer travels with the real issuing CA and root: still no path to the pinned root."""
    foreign = ca_of(KeyType.P256, "impostor")
    key = key_of(KeyType.RSA2048, tag=11)
    forger_cert = foreign.issue(CertKind.MAIL_SIGNER, key, MAIL_FROM)
    raw = build_delivery(
        issued.manifest,
        [issued.signing, issued.encryption],
        [],
        sender=MAIL_FROM,
        signer_cert=forger_cert,
        signer_key=key,
        signer_chain=[rsa_ca.issuing, rsa_ca.root],
        message_id="<forged@kms.example.org>",
        date=START,
    )
    content = open_delivery(raw)
    with pytest.raises(UnknownIssuer):
        verify_email_chain(content.signer, content.signed_certificates, rsa_ca.root, AT)
