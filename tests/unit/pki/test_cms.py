"""CMS: opaque signatures checked by our reader and by `openssl cms`, envelopes both ways, certs-only."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from asn1crypto import cms as a_cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.serialization import pkcs7

from mailkms.errors import BadMessage, BadSignature
from mailkms.pki import (
    CertKind,
    KeyType,
    PrivateKey,
    certs_only,
    decrypt,
    envelope,
    load_certs_only,
    sign_opaque,
    signature_hash_for,
    verify_signed_data,
)
from tests.judges import pem
from tests.testca import START, SessionCA, key_of

CONTENT = b"Content-Type: text/plain\r\n\r\nThe signed words of the server.\r\n"
Signer = tuple[x509.Certificate, PrivateKey]


def encapsulated_offset(der: bytes) -> int:
    """Where the signed content starts inside a SignedData."""
    content = a_cms.ContentInfo.load(der)["content"]["encap_content_info"]["content"].native
    return der.index(content)


def flipped(data: bytes, position: int) -> bytes:
    changed = bytearray(data)
    changed[position] ^= 0x01
    return bytes(changed)


@pytest.fixture(params=[KeyType.RSA2048, KeyType.P256, KeyType.P384], ids=["rsa2048", "p256", "p384"])
def signer(request: pytest.FixtureRequest, rsa_ca: SessionCA) -> Signer:
    key = key_of(request.param, tag=3)
    return rsa_ca.issue(CertKind.SIGNING, key), key


# --- signatures ------------------------------------------------------------------------------------------
def test_opaque_signature_round_trip(signer: Signer, rsa_ca: SessionCA) -> None:
    cert, key = signer
    der = sign_opaque(CONTENT, cert, key, [rsa_ca.issuing])
    verified = verify_signed_data(der)
    assert verified.content == CONTENT
    assert verified.signer == cert
    assert set(verified.certificates) == {cert, rsa_ca.issuing}
    assert isinstance(verified.signing_time, dt.datetime)


def test_openssl_verifies_our_signature_and_gets_the_content(signer: Signer, rsa_ca: SessionCA, tmp_path: Path) -> None:
    cert, key = signer
    (tmp_path / "signed.der").write_bytes(sign_opaque(CONTENT, cert, key, [rsa_ca.issuing]))
    (tmp_path / "root.pem").write_bytes(pem(rsa_ca.root))
    done = subprocess.run(
        [
            *("openssl", "cms", "-verify", "-inform", "DER", "-in", str(tmp_path / "signed.der"), "-binary"),
            *("-CAfile", str(tmp_path / "root.pem"), "-purpose", "smimesign"),
            *("-attime", str(int((START + dt.timedelta(days=1)).timestamp()))),
        ],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == CONTENT


def test_signature_without_signed_attributes(rsa_ca: SessionCA) -> None:
    key = key_of(KeyType.P256, tag=3)
    cert = rsa_ca.issue(CertKind.SIGNING, key)
    der = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(CONTENT)
        .add_signer(cert, key, hashes.SHA256())  # type: ignore[arg-type]
        .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.NoAttributes])
    )
    verified = verify_signed_data(der)
    assert (verified.content, verified.signing_time) == (CONTENT, None)
    with pytest.raises(BadSignature):
        verify_signed_data(flipped(der, encapsulated_offset(der) + 3))


@pytest.mark.parametrize("where", [0, 10, len(CONTENT) - 1], ids=["first", "tenth", "last"])
def test_a_byte_flipped_in_the_content_is_caught(signer: Signer, where: int) -> None:
    cert, key = signer
    der = sign_opaque(CONTENT, cert, key, [])
    with pytest.raises(BadSignature, match="changed after it was signed"):
        verify_signed_data(flipped(der, encapsulated_offset(der) + where))


def test_a_byte_flipped_in_the_signature_is_caught(signer: Signer) -> None:
    cert, key = signer
    der = sign_opaque(CONTENT, cert, key, [])
    with pytest.raises(BadSignature, match="does not verify"):
        verify_signed_data(flipped(der, len(der) - 2))


def test_a_changed_signing_time_is_caught(signer: Signer) -> None:
    cert, key = signer
    der = sign_opaque(CONTENT, cert, key, [])
    info = a_cms.ContentInfo.load(der)["content"]["signer_infos"][0]["signed_attrs"]
    signing_time = next(a for a in info if a["type"].native == "signing_time")["values"][0].dump()
    position = der.index(signing_time) + len(signing_time) - 2  # a digit of the seconds
    with pytest.raises(BadSignature):
        verify_signed_data(flipped(der, position))


def test_detached_content_is_checked_against_the_signature(signer: Signer) -> None:
    cert, key = signer
    der = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(CONTENT)
        .add_signer(cert, key, signature_hash_for(key))  # type: ignore[arg-type]
        .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.DetachedSignature])
    )
    assert verify_signed_data(der, CONTENT).content == CONTENT
    with pytest.raises(BadSignature):
        verify_signed_data(der, CONTENT + b"!")
    with pytest.raises(BadMessage, match="no content"):
        verify_signed_data(der)


def test_two_signers_are_refused(rsa_ca: SessionCA) -> None:
    first, second = key_of(KeyType.P256, tag=3), key_of(KeyType.P256, tag=4)
    der = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(CONTENT)
        .add_signer(rsa_ca.issue(CertKind.SIGNING, first), first, hashes.SHA256())  # type: ignore[arg-type]
        .add_signer(rsa_ca.issue(CertKind.SIGNING, second), second, hashes.SHA256())  # type: ignore[arg-type]
        .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
    )
    with pytest.raises(BadMessage, match="one signer"):
        verify_signed_data(der)


def test_a_signer_certificate_left_out_is_refused(signer: Signer) -> None:
    cert, key = signer
    der = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(CONTENT)
        .add_signer(cert, key, hashes.SHA256())  # type: ignore[arg-type]
        .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.NoCerts])
    )
    with pytest.raises(BadMessage, match="signer's certificate is not in the message"):
        verify_signed_data(der)


def test_rsa_pss_signatures_are_refused(rsa_ca: SessionCA) -> None:
    key = key_of(KeyType.RSA2048, tag=3)
    der = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(CONTENT)
        .add_signer(
            rsa_ca.issue(CertKind.SIGNING, key),
            key,  # type: ignore[arg-type]
            hashes.SHA256(),
            rsa_padding=padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
        )
        .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
    )
    with pytest.raises(BadMessage, match="RSASSA-PSS"):
        verify_signed_data(der)


def test_every_truncation_is_a_bad_message(rsa_ca: SessionCA) -> None:
    key = key_of(KeyType.P256, tag=3)
    der = sign_opaque(CONTENT, rsa_ca.issue(CertKind.SIGNING, key), key, [])
    for length in range(0, len(der), 7):
        with pytest.raises(BadMessage):
            verify_signed_data(der[:length])


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x30\x03\x06\x01\x00"], ids=["empty", "text", "tiny"])
def test_garbage_is_a_bad_message(data: bytes) -> None:
    with pytest.raises(BadMessage):
        verify_signed_data(data)


def test_an_envelope_is_not_a_signature(transport: Signer) -> None:
    cert, _ = transport
    with pytest.raises(BadMessage, match="not a CMS SignedData"):
        verify_signed_data(envelope(CONTENT, [cert]))


# --- envelopes ----------------------------------------------------------------------------------------------
def test_envelope_round_trip(transport: Signer) -> None:
    cert, key = transport
    assert decrypt(envelope(CONTENT, [cert]), cert, key) == CONTENT


def test_envelope_opens_in_openssl(transport: Signer, tmp_path: Path) -> None:
    cert, key = transport
    (tmp_path / "env.der").write_bytes(envelope(CONTENT, [cert]))
    (tmp_path / "cert.pem").write_bytes(pem(cert))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    done = subprocess.run(
        [
            *("openssl", "cms", "-decrypt", "-inform", "DER", "-in", str(tmp_path / "env.der"), "-binary"),
            *("-recip", str(tmp_path / "cert.pem"), "-inkey", str(tmp_path / "key.pem")),
        ],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == CONTENT


def test_openssl_envelope_opens_with_decrypt(transport: Signer, tmp_path: Path) -> None:
    cert, key = transport
    (tmp_path / "plain").write_bytes(CONTENT)
    (tmp_path / "cert.pem").write_bytes(pem(cert))
    done = subprocess.run(
        [
            *("openssl", "cms", "-encrypt", "-aes-256-cbc", "-binary", "-outform", "DER"),
            *("-in", str(tmp_path / "plain"), str(tmp_path / "cert.pem")),
        ],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert decrypt(done.stdout, cert, key) == CONTENT


def test_decrypt_with_the_wrong_key_is_a_bad_message(transport: Signer, rsa_ca: SessionCA) -> None:
    cert, _ = transport
    other_key = key_of(KeyType.RSA2048, tag=8)
    other = rsa_ca.issue(CertKind.ENCRYPTION, other_key)
    with pytest.raises(BadMessage):
        decrypt(envelope(CONTENT, [cert]), other, other_key)


def test_decrypt_with_an_ec_key_is_refused(transport: Signer) -> None:
    cert, _ = transport
    with pytest.raises(BadMessage, match="RSA"):
        decrypt(envelope(CONTENT, [cert]), cert, key_of(KeyType.P256))


def test_decrypt_garbage_is_a_bad_message(transport: Signer) -> None:
    cert, key = transport
    with pytest.raises(BadMessage):
        decrypt(b"\x30\x00", cert, key)


# --- certs-only ---------------------------------------------------------------------------------------------
def test_certs_only_round_trip(rsa_ca: SessionCA) -> None:
    certs = [rsa_ca.issuing, rsa_ca.root]
    loaded = load_certs_only(certs_only(certs))
    assert len(loaded) == 2
    assert set(loaded) == set(certs)  # a SET OF: DER sorts it


@pytest.mark.parametrize("data", [b"", b"junk", b"\x30\x00"], ids=["empty", "junk", "empty-sequence"])
def test_certs_only_garbage_is_a_bad_message(data: bytes) -> None:
    with pytest.raises(BadMessage):
        load_certs_only(data)
