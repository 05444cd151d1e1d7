"""CMS (RFC 5652) building with `cryptography`, reading with asn1crypto + `cryptography` primitives."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from asn1crypto import cms as asn1_cms
from asn1crypto import core as asn1_core
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from mailkms.errors import BadMessage, BadSignature
from mailkms.pki._keys import PrivateKey, public_key_of, signature_hash_for
from mailkms.pki._unreadable import UNREADABLE, unreadable

_DIGESTS: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def sign_opaque(content: bytes, signer: x509.Certificate, key: PrivateKey, chain: Sequence[x509.Certificate]) -> bytes:
    """SignedData with the content inside (opaque), signer and chain certificates included, DER."""
    builder = pkcs7.PKCS7SignatureBuilder().set_data(content).add_signer(signer, key, signature_hash_for(key))
    for cert in chain:
        builder = builder.add_certificate(cert)
    return builder.sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])


def certs_only(certs: Sequence[x509.Certificate]) -> bytes:
    return pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER)


def load_certs_only(der: bytes) -> list[x509.Certificate]:
    try:
        return pkcs7.load_der_pkcs7_certificates(der)
    except UNREADABLE as exc:  # UnsupportedAlgorithm: a PKCS#7 of another content type
        raise BadMessage(f"not a certs-only PKCS#7 ({exc.__class__.__name__})") from None


def envelope(data: bytes, recipients: Sequence[x509.Certificate]) -> bytes:
    """EnvelopedData, AES-256-CBC, RSA key transport: what every mail program reads."""
    builder = (
        pkcs7.PKCS7EnvelopeBuilder()
        .set_data(data)
        .set_content_encryption_algorithm(
            pkcs7.algorithms.AES256  # type: ignore[attr-defined]
        )
    )
    for cert in recipients:
        builder = builder.add_recipient(cert)
    return builder.encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])


def decrypt(der: bytes, cert: x509.Certificate, key: PrivateKey) -> bytes:
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BadMessage("only RSA key transport is supported")
    try:
        return pkcs7.pkcs7_decrypt_der(der, cert, key, [])
    except UNREADABLE as exc:  # UnsupportedAlgorithm: a content or key encryption it does not know
        raise BadMessage(f"cannot decrypt ({exc.__class__.__name__})") from None


@dataclass(frozen=True)
class VerifiedSignedData:
    content: bytes
    signer: x509.Certificate
    certificates: tuple[x509.Certificate, ...]
    signing_time: dt.datetime | None


def verify_signed_data(der: bytes, detached_content: bytes | None = None) -> VerifiedSignedData:
    """Check the CMS signature itself (not the chain): digest, signed attributes, signature.

    Returns the content and the signer's certificate; the caller decides whether to trust it.
    """
    try:
        info = asn1_cms.ContentInfo.load(der, strict=False)
        if info["content_type"].native != "signed_data":
            raise BadMessage("not a CMS SignedData")
        signed = info["content"]
        encap = signed["encap_content_info"]
        content = detached_content if detached_content is not None else encap["content"].native
        if content is None:
            raise BadMessage("the signed message carries no content")
        if not isinstance(content, bytes):
            content = encap["content"].contents
        certs: list[x509.Certificate] = []
        for choice in signed["certificates"] or []:
            if choice.name == "certificate":
                certs.append(x509.load_der_x509_certificate(choice.chosen.dump()))
        infos = signed["signer_infos"]
        if len(infos) != 1:
            raise BadMessage(f"expected one signer, found {len(infos)}")
        signer_info = infos[0]
        signer = _find_signer(signer_info["sid"], certs)
        digest_name = signer_info["digest_algorithm"]["algorithm"].native
        if digest_name not in _DIGESTS:
            raise BadMessage(f"digest {digest_name} is not accepted")
        digest = _DIGESTS[digest_name]()
        signed_attrs = signer_info["signed_attrs"]
        signing_time = None
        if not isinstance(signed_attrs, asn1_core.Void) and len(signed_attrs):
            # only the attributes checked here are parsed: others (e.g. Microsoft's encryption key
            # preference that NSS adds) need not be understood to verify the signature
            attrs = {a["type"].native: a for a in signed_attrs}
            attrs = {k: attrs[k]["values"][0] for k in ("message_digest", "content_type", "signing_time") if k in attrs}
            wanted = hashlib.new(digest_name, content).digest()
            if "message_digest" not in attrs or attrs["message_digest"].native != wanted:
                raise BadSignature("the message was changed after it was signed (digest mismatch)")
            if "content_type" in attrs and attrs["content_type"].native != encap["content_type"].native:
                raise BadSignature("the signed content type does not match")
            if "signing_time" in attrs:
                signing_time = attrs["signing_time"].native
            to_verify = signed_attrs.untag().dump(force=True)
        else:
            to_verify = content
        signature = signer_info["signature"].native
        algo = signer_info["signature_algorithm"].signature_algo
    except UNREADABLE as exc:
        raise BadMessage(unreadable("the CMS structure", exc)) from None
    public = public_key_of(signer)  # BadKey for a key of another algorithm, known or not
    try:
        if isinstance(public, rsa.RSAPublicKey):
            if algo == "rsassa_pss":
                raise BadMessage("RSASSA-PSS signatures are not supported")
            public.verify(signature, to_verify, padding.PKCS1v15(), digest)
        else:
            public.verify(signature, to_verify, ec.ECDSA(digest))
    except InvalidSignature:
        raise BadSignature("the signature does not verify: the message was forged or altered") from None
    return VerifiedSignedData(bytes(content), signer, tuple(certs), signing_time)


_NO_SKI: tuple[type[Exception], ...] = (x509.ExtensionNotFound, *UNREADABLE)


def _find_signer(sid: asn1_cms.SignerIdentifier, certs: list[x509.Certificate]) -> x509.Certificate:
    if sid.name == "issuer_and_serial_number":
        serial = sid.chosen["serial_number"].native
        issuer_der = sid.chosen["issuer"].dump()
        for cert in certs:
            if cert.serial_number == serial and cert.issuer.public_bytes() == issuer_der:
                return cert
        for cert in certs:  # issuer encodings may differ byte-wise; the serial is 159 random bits
            if cert.serial_number == serial:
                return cert
    else:
        ski = sid.chosen.native
        for cert in certs:
            try:
                ext = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            except _NO_SKI:
                continue  # a certificate whose extensions cannot be read is nobody's
            if ext.value.digest == ski:
                return cert
    raise BadMessage("the signer's certificate is not in the message")
