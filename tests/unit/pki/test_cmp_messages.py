"""CMP message handling in the PKI core: requests made by `openssl cmp` itself (written with
-reqout while no server listens), parsed, their MAC / signature / POP checked, and the answers
built here read back (their protection verified as a client would)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from mailkms.errors import BadCMPMessage, BadCMPProtection, BadPOP
from mailkms.pki import CertKind, KeyType
from mailkms.pki._cmp import FailInfo as CMPFailInfo
from mailkms.pki._cmp import Protection as CMPProtection
from mailkms.pki._cmp import Reply as CMPReply
from mailkms.pki._cmp import Signer as CMPSigner
from mailkms.pki._cmp import Status as CMPStatus
from mailkms.pki._cmp import cert_requests, revocation_requests
from mailkms.pki._cmp import error_without_request as cmp_error_without_request
from mailkms.pki._cmp import parse_request as parse_cmp_request
from mailkms.pki._cmp import verify_mac as verify_cmp_mac
from mailkms.pki._cmp import verify_signature as verify_cmp_signature
from tests.cmp_support import openssl_request
from tests.testca import START, ca_of, key_of

MAILBOX = "alice@example.org"
NOW = START + dt.timedelta(days=1)


def _pem(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    key = key_of(KeyType.P256, 7)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return _pem(tmp_path, "new.key", pem)


def _ir(tmp: Path, key_file: Path, secret: str = "TOKEN-123", subject: str = f"/CN={MAILBOX}") -> bytes:
    return openssl_request(
        tmp,
        "-cmd",
        "ir",
        "-ref",
        MAILBOX,
        "-secret",
        f"pass:{secret}",
        "-newkey",
        str(key_file),
        "-subject",
        subject,
        "-recipient",
        "/CN=mailkms",
        "-certout",
        str(tmp / "out.pem"),
    )


def _signer() -> CMPSigner:
    ca = ca_of(KeyType.P256)
    return CMPSigner(ca.issuing, ca.issuing_key, (ca.root,))


def test_openssl_ir_parses_and_its_mac_verifies_only_with_the_token(tmp_path: Path, key_file: Path) -> None:
    request = parse_cmp_request(_ir(tmp_path, key_file))
    assert request.body == "ir" and request.protection is CMPProtection.MAC
    assert request.reference == MAILBOX and len(request.transaction_id) == 16
    verify_cmp_mac(request, b"TOKEN-123")
    with pytest.raises(BadCMPProtection):
        verify_cmp_mac(request, b"TOKEN-124")
    (wanted,) = cert_requests(request)
    assert wanted.mailboxes == (MAILBOX,)
    assert wanted.public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key_of(KeyType.P256, 7).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_a_changed_byte_breaks_the_mac_and_garbage_is_malformed(tmp_path: Path, key_file: Path) -> None:
    data = bytearray(_ir(tmp_path, key_file))
    index = data.find(MAILBOX.encode(), 40)  # the subject inside the template, under the MAC
    data[index] ^= 0x01
    request = parse_cmp_request(bytes(data))
    with pytest.raises(BadCMPProtection):
        verify_cmp_mac(request, b"TOKEN-123")
    for junk in (b"", b"\x30\x03\x02\x01\x05", os.urandom(200), bytes(data[:-5])):
        with pytest.raises(BadCMPMessage):
            parse_cmp_request(junk)


def test_a_pop_made_by_another_key_is_refused(tmp_path: Path, key_file: Path) -> None:
    from pyasn1.codec.der import decoder, encoder
    from pyasn1.type import univ
    from pyasn1_alt_modules import rfc9480

    message, _ = decoder.decode(_ir(tmp_path, key_file), asn1Spec=rfc9480.PKIMessage())
    popo = message["body"]["ir"][0]["popo"]["signature"]
    signature = bytearray(popo["signature"].asOctets())
    signature[-3] ^= 0xFF
    popo["signature"] = popo["signature"].clone(univ.BitString.fromOctetString(bytes(signature)))
    with pytest.raises(BadPOP):
        cert_requests(parse_cmp_request(encoder.encode(message)))


def test_mac_answer_verifies_with_the_same_secret_and_carries_the_certificate(tmp_path: Path, key_file: Path) -> None:
    ca = ca_of(KeyType.P256)
    request = parse_cmp_request(_ir(tmp_path, key_file))
    cert = ca.issue(CertKind.SIGNING, key_of(KeyType.P256, 7))
    reply = CMPReply(request, _signer(), NOW, b"TOKEN-123")
    answer = parse_cmp_request(reply.certificate(0, cert, (ca.issuing, ca.root), (ca.root,)))
    ca_pubs = answer.message["body"]["ip"]["caPubs"]
    from pyasn1.codec.der import encoder as der

    assert len(ca_pubs) == 1 and bytes(der.encode(ca_pubs[0])) == ca.root.public_bytes(serialization.Encoding.DER)
    assert answer.body == "ip" and answer.protection is CMPProtection.MAC
    assert answer.transaction_id == request.transaction_id
    assert answer.recip_nonce == request.sender_nonce and answer.sender_nonce == reply.nonce
    verify_cmp_mac(answer, b"TOKEN-123")
    with pytest.raises(BadCMPProtection):
        verify_cmp_mac(answer, b"TOKEN-999")
    # the answer's salt is its own: the same secret, a different key
    assert (
        answer.message["header"]["protectionAlg"]["parameters"]
        != request.message["header"]["protectionAlg"]["parameters"]
    )
    issued = answer.message["body"]["ip"]["response"][0]["certifiedKeyPair"]["certOrEncCert"]["certificate"]
    from pyasn1.codec.der import encoder

    assert bytes(encoder.encode(issued))[-64:] == cert.public_bytes(serialization.Encoding.DER)[-64:]


def test_signed_error_answer_names_the_failure(tmp_path: Path, key_file: Path) -> None:
    request = parse_cmp_request(_ir(tmp_path, key_file))
    text = "the MAC does not verify (urn:mailkms:problem:bad-cmp-protection)"
    data = CMPReply(request, _signer(), NOW).error(CMPStatus(2, text, CMPFailInfo.BAD_MESSAGE_CHECK))
    answer = parse_cmp_request(data)
    assert answer.body == "error" and answer.protection is CMPProtection.SIGNATURE
    assert verify_cmp_signature(answer) == ca_of(KeyType.P256).issuing
    info = answer.message["body"]["error"]["pKIStatusInfo"]
    assert int(info["status"]) == 2 and str(info["statusString"][0]) == text
    assert list(info["failInfo"]) == [0, 1]  # bit 1: badMessageCheck
    unparsed = parse_cmp_request(
        cmp_error_without_request(_signer(), NOW, CMPStatus(2, "x", CMPFailInfo.BAD_DATA_FORMAT))
    )
    assert unparsed.body == "error"
    verify_cmp_signature(unparsed)


def test_openssl_kur_and_rr_are_signed_by_the_holder(tmp_path: Path, key_file: Path) -> None:
    ca = ca_of(KeyType.P256)
    old_key = key_of(KeyType.P256, 8)
    old = ca.issue(CertKind.SIGNING, old_key)
    cert_file = _pem(tmp_path, "old.pem", old.public_bytes(serialization.Encoding.PEM))
    old_key_file = _pem(
        tmp_path,
        "old.key",
        old_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    srv = _pem(tmp_path, "srv.pem", ca.issuing.public_bytes(serialization.Encoding.PEM))
    kur = parse_cmp_request(
        openssl_request(
            tmp_path,
            "-cmd",
            "kur",
            "-cert",
            str(cert_file),
            "-key",
            str(old_key_file),
            "-newkey",
            str(key_file),
            "-srvcert",
            str(srv),
            "-certout",
            str(tmp_path / "new.pem"),
        )
    )
    assert kur.body == "kur" and kur.protection is CMPProtection.SIGNATURE
    assert verify_cmp_signature(kur) == old
    (wanted,) = cert_requests(kur)
    assert wanted.public_key.public_numbers() == key_of(KeyType.P256, 7).public_key().public_numbers()  # type: ignore[union-attr]
    rr = parse_cmp_request(
        openssl_request(
            tmp_path,
            "-cmd",
            "rr",
            "-oldcert",
            str(cert_file),
            "-cert",
            str(cert_file),
            "-key",
            str(old_key_file),
            "-srvcert",
            str(srv),
            "-revreason",
            "1",
        )
    )
    (revoke,) = revocation_requests(rr)
    assert revoke.serial == old.serial_number and revoke.reason_code == 1
    assert revoke.issuer == ca.issuing.subject.public_bytes()
    verify_cmp_signature(rr)
    # a signature by another key than the certificate's is refused
    rr.extra_certs[0] = ca.issue(CertKind.SIGNING, key_of(KeyType.P256, 9))
    with pytest.raises(BadCMPProtection):
        verify_cmp_signature(rr)


def test_pbmac1_protection_is_checked_as_rfc_9481_computes_it(tmp_path: Path, key_file: Path) -> None:
    """OpenSSL 3.0 sends PasswordBasedMac only: a PBMAC1 request is made here, its MAC computed
    with hashlib (PBKDF2-HMAC-SHA256, then HMAC-SHA256 over the ProtectedPart)."""
    import hashlib
    import hmac

    from pyasn1.codec.der import decoder, encoder
    from pyasn1.type import univ
    from pyasn1_alt_modules import rfc8018, rfc9480

    message, _ = decoder.decode(_ir(tmp_path, key_file), asn1Spec=rfc9480.PKIMessage())
    salt = os.urandom(16)
    pbkdf2 = rfc8018.PBKDF2_params()
    pbkdf2["salt"]["specified"] = salt
    pbkdf2["iterationCount"] = 1000
    pbkdf2["keyLength"] = 32
    pbkdf2["prf"]["algorithm"] = rfc8018.id_hmacWithSHA256
    pbkdf2["prf"]["parameters"] = encoder.encode(univ.Null(""))
    params = rfc8018.PBMAC1_params()
    params["keyDerivationFunc"]["algorithm"] = rfc8018.id_PBKDF2
    params["keyDerivationFunc"]["parameters"] = encoder.encode(pbkdf2)
    params["messageAuthScheme"]["algorithm"] = rfc8018.id_hmacWithSHA256
    algorithm = message["header"]["protectionAlg"]
    algorithm["algorithm"] = rfc8018.id_PBMAC1
    algorithm["parameters"] = encoder.encode(params)
    part = rfc9480.ProtectedPart()
    part["header"], part["body"] = message["header"], message["body"]
    key = hashlib.pbkdf2_hmac("sha256", b"TOKEN-123", salt, 1000, 32)
    tag = hmac.new(key, encoder.encode(part), "sha256").digest()
    message["protection"] = message["protection"].clone(univ.BitString.fromOctetString(tag))
    request = parse_cmp_request(encoder.encode(message))
    assert request.protection is CMPProtection.MAC
    verify_cmp_mac(request, b"TOKEN-123")
    with pytest.raises(BadCMPProtection):
        verify_cmp_mac(request, b"TOKEN-124")
    # the answer is PBMAC1 too, with a salt of its own
    answer = parse_cmp_request(CMPReply(request, _signer(), NOW, b"TOKEN-123").confirmed())
    assert answer.message["header"]["protectionAlg"]["algorithm"] == rfc8018.id_PBMAC1
    verify_cmp_mac(answer, b"TOKEN-123")
