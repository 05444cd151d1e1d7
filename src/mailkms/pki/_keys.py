"""Key types, generation and encrypted-at-rest serialisation."""

from __future__ import annotations

import enum
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Protocol

from asn1crypto import algos as asn1_algos
from asn1crypto import keys as asn1_keys
from asn1crypto import pem as asn1_pem
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from mailkms.errors import BadKey, Malformed
from mailkms.pki._unreadable import UNREADABLE, unreadable

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class KeyType(enum.StrEnum):
    RSA2048 = "rsa2048"
    RSA3072 = "rsa3072"
    RSA4096 = "rsa4096"
    P256 = "p256"
    P384 = "p384"

    @property
    def is_rsa(self) -> bool:
        return self.value.startswith("rsa")


_CURVES: dict[KeyType, ec.EllipticCurve] = {
    KeyType.P256: ec.SECP256R1(),
    KeyType.P384: ec.SECP384R1(),
}
_RSA_BITS = {KeyType.RSA2048: 2048, KeyType.RSA3072: 3072, KeyType.RSA4096: 4096}


def generate_key(kind: KeyType) -> PrivateKey:
    if kind.is_rsa:
        return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS[kind])
    return ec.generate_private_key(_CURVES[kind])


def key_type_of(key: PublicKey | PrivateKey) -> KeyType:
    """The KeyType of a key, or BadKey if mailkms does not accept it."""
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        for kind, bits in _RSA_BITS.items():
            if key.key_size == bits:
                return kind
        raise BadKey(f"RSA keys must be 2048, 3072 or 4096 bits, not {key.key_size}")
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        for kind, curve in _CURVES.items():
            if key.curve.name == curve.name:
                return kind
        raise BadKey(f"elliptic curve {key.curve.name} is not allowed (P-256 or P-384)")
    raise BadKey("only RSA and ECDSA (P-256, P-384) keys are accepted")


SignatureHash = hashes.SHA256 | hashes.SHA384


def signature_hash_for(key: PublicKey | PrivateKey) -> SignatureHash:
    """S/MIME BR 7.1.3.2: P-384 signs with SHA-384, everything else SHA-256."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return hashes.SHA384()
    return hashes.SHA256()


PBKDF2_ITERATIONS = 600_000  # OWASP 2023 for PBKDF2-HMAC-SHA256; cryptography's default PKCS#8 uses 2,048


def pbes2_encrypt(data: bytes, passphrase: bytes, iterations: int = PBKDF2_ITERATIONS) -> tuple[Any, bytes]:
    """PBES2 (RFC 8018): PBKDF2-HMAC-SHA256 + AES-256-CBC. Returns the asn1crypto
    EncryptionAlgorithm and the ciphertext (for PKCS#8 here and PKCS#12 bags)."""
    salt = os.urandom(16)
    iv = os.urandom(16)
    kek = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=iterations).derive(passphrase)
    padder = sym_padding.PKCS7(128).padder()
    plain = padder.update(data) + padder.finalize()
    encryptor = Cipher(algorithms.AES(kek), modes.CBC(iv)).encryptor()
    encrypted = encryptor.update(plain) + encryptor.finalize()
    algorithm = asn1_algos.EncryptionAlgorithm(
        {
            "algorithm": "pbes2",
            "parameters": {
                "key_derivation_func": {
                    "algorithm": "pbkdf2",
                    "parameters": {
                        "salt": asn1_algos.Pbkdf2Salt(name="specified", value=salt),
                        "iteration_count": iterations,
                        "key_length": 32,
                        "prf": {"algorithm": "sha256", "parameters": None},
                    },
                },
                "encryption_scheme": {"algorithm": "aes256_cbc", "parameters": iv},
            },
        }
    )
    return algorithm, encrypted


def encrypt_private_key(key: PrivateKey, passphrase: bytes, iterations: int = PBKDF2_ITERATIONS) -> bytes:
    """PKCS#8 EncryptedPrivateKeyInfo, PBES2: PBKDF2-HMAC-SHA256 + AES-256-CBC, PEM.

    Assembled with asn1crypto's structures and cryptography's primitives because cryptography
    offers no iteration count for PKCS#8; `openssl pkey -passin` and cryptography read it.
    """
    algorithm, encrypted = pbes2_encrypt(private_key_der(key), passphrase, iterations)
    info = asn1_keys.EncryptedPrivateKeyInfo({"encryption_algorithm": algorithm, "encrypted_data": encrypted})
    return bytes(asn1_pem.armor("ENCRYPTED PRIVATE KEY", info.dump()))


def load_private_key(pem: bytes, passphrase: bytes | None) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, passphrase)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise BadKey("unsupported private key type")
    return key


def private_key_der(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 DER: only ever passed straight into an envelope."""
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key_der(der: bytes) -> PrivateKey:
    """An unencrypted PKCS#8 key as it came out of an envelope; BadKey when it cannot be read."""
    try:
        key = serialization.load_der_private_key(der, None)
    except UNREADABLE as exc:
        raise BadKey(unreadable("the private key", exc)) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise BadKey("unsupported private key type")
    return key


def public_key_of(cert: x509.Certificate) -> PublicKey:
    """The certificate's RSA or EC key; BadKey for any other algorithm, known or not."""
    try:
        key = cert.public_key()
    except UNREADABLE as exc:
        raise BadKey(unreadable("the certificate's public key", exc)) from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise BadKey("unsupported public key type")
    return key


def same_public_key(a: CertificatePublicKeyTypes, b: CertificatePublicKeyTypes) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(serialization.Encoding.DER, fmt) == b.public_bytes(serialization.Encoding.DER, fmt)


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """Colon-separated upper-case hex, as `openssl x509 -fingerprint -sha256` prints it."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def normalise_fingerprint(text: str) -> str:
    """Accepts `AB:CD..`, `abcd..`, `SHA256:AB..` and openssl's `sha256 Fingerprint=AB..`."""
    value = text.strip().upper().rsplit("=", 1)[-1].removeprefix("SHA256:").removeprefix("SHA-256:")
    hexchars = "".join(value.replace(":", "").split())
    if len(hexchars) != 64 or any(c not in "0123456789ABCDEF" for c in hexchars):
        raise Malformed("a SHA-256 fingerprint has 64 hexadecimal digits (as `mailkms ca fingerprint` prints it)")
    return ":".join(hexchars[i : i + 2] for i in range(0, 64, 2))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CASigner(Protocol):
    """Who signs: a certificate and a key that stays behind this interface (file now, HSM later)."""

    @property
    def certificate(self) -> x509.Certificate: ...

    @property
    def private_key(self) -> PrivateKey: ...


@dataclass(frozen=True)
class SoftSigner:
    """A CA key held in memory, loaded once per process from an encrypted PKCS#8 file."""

    certificate: x509.Certificate
    private_key: PrivateKey
