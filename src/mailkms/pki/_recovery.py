"""M-of-N recovery, the cryptography alone (no I/O, no clock).

- The recovery private key (the archive is enveloped to its certificate) is wrapped with
  AES-128-GCM under a random 16-byte key-encryption key (KEK); the associated data names the
  ceremony, so a wrapped key cannot be passed off as another ceremony's.
- The KEK is split by pycryptodome's Shamir secret sharing (GF(2^128), 16-byte secrets) into N
  shares, any M of which give it back.
- Each share is sealed to its officer's passphrase: scrypt -> 64 bytes; the first 32 are an
  AES-256-GCM key, the last 32 key an HMAC that tells a wrong passphrase apart from an altered
  file. Every header field (ceremony, officer, index, threshold, KDF parameters) is authenticated
  data, so a changed field makes the file fail as "tampered".
- Recovered keys waiting for the user's enrolment are sealed (AES-256-GCM) under a key derived
  (HKDF-SHA256) from the one-time recovery token, which the server stores only hashed.

The Shamir split itself is in `_shamir.py`, which `mailkms.pki` does not import: pycryptodome is
a server dependency, and the client imports `mailkms.pki`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from mailkms.errors import Malformed, RecoveryRefused, ShareTampered, ShareUnreadable, ShareWrongPassphrase
from mailkms.pki._custody import scrypt_params_problem
from mailkms.pki._keys import PrivateKey, PublicKey, private_key_der

KEK_BYTES = 16  # what pycryptodome's Shamir splits
SHARE_FORMAT = "mailkms-recovery-share"
SHARE_VERSION = 1
SCRYPT_N = 2**17  # 128 MiB, about 0.5 s per share on the reference machine
SCRYPT_R = 8
SCRYPT_P = 1
MIN_SCRYPT_N = 2**14  # weaker files are refused
MAX_SCRYPT_N = 2**20  # and absurd ones too (memory exhaustion)
MAX_OFFICERS = 64
MIN_PASSPHRASE = 12
_CHECK_LABEL = b"mailkms recovery share passphrase check v1"
_WRAP_LABEL = b"mailkms recovery key v1|"
_DIGEST_LABEL = b"mailkms recovery share digest v1|"
_HOLD_MAGIC = b"MKH1"
_HOLD_INFO = b"mailkms recovered keys held for enrolment v1"
_CEREMONY_ID = re.compile(r"^[0-9a-f]{32}$")
_OFFICER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@+-]{0,63}$")
_NOTE = (
    "mailkms recovery share: useless alone and without its passphrase. Keep it offline; "
    "give it only to a mailkms recovery together with your passphrase."
)


def new_ceremony_id() -> str:
    return secrets.token_hex(16)


def check_officer_name(name: str) -> str:
    if not _OFFICER.match(name):
        raise Malformed(
            f"officer name {name!r} is not allowed (1-64 letters, digits, space, . _ @ + -; starts with a letter or digit)"
        )
    return name


def check_officer_passphrase(officer: str, passphrase: bytes) -> None:
    if len(passphrase) < MIN_PASSPHRASE:
        raise Malformed(f"the passphrase of officer {officer!r} must have at least {MIN_PASSPHRASE} characters")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: object, length: int | None, what: str) -> bytes:
    if not isinstance(value, str):
        raise ShareUnreadable(f"the share file's {what} is missing")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ShareUnreadable(f"the share file's {what} is not base64") from None
    if length is not None and len(data) != length:
        raise ShareUnreadable(f"the share file's {what} has the wrong length")
    return data


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- shares ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShareHeader:
    """What a share file says about itself in the clear (all of it authenticated)."""

    ceremony_id: str
    officer: str
    index: int
    threshold: int
    officers: int
    created_at: str

    def describe(self) -> str:
        return f"officer {self.officer!r} (share {self.index} of {self.officers}, ceremony {self.ceremony_id[:8]})"


@dataclass(frozen=True)
class SealedShare:
    header: ShareHeader
    _doc: dict[str, Any]  # the parsed file, for the authenticated data

    def _field(self, name: str) -> Any:
        return self._doc.get(name)


def seal_share(header: ShareHeader, share: bytes | bytearray, passphrase: bytes, *, scrypt_n: int = SCRYPT_N) -> bytes:
    """The share file's bytes (JSON): the 16-byte share encrypted to the officer's passphrase."""
    if len(share) != KEK_BYTES:
        raise ValueError("a share has 16 bytes")
    if not MIN_SCRYPT_N <= scrypt_n <= MAX_SCRYPT_N:
        raise ValueError("scrypt cost out of range")
    salt = secrets.token_bytes(16)
    enc_key, check = _derive(passphrase, salt, scrypt_n, SCRYPT_R, SCRYPT_P)
    nonce = secrets.token_bytes(12)
    doc: dict[str, Any] = {
        "format": SHARE_FORMAT,
        "version": SHARE_VERSION,
        "note": _NOTE,
        "ceremony_id": header.ceremony_id,
        "officer": header.officer,
        "index": header.index,
        "threshold": header.threshold,
        "officers": header.officers,
        "created_at": header.created_at,
        "kdf": {"name": "scrypt", "n": scrypt_n, "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(salt)},
        "passphrase_check": _b64(check),
        "cipher": {"name": "AES-256-GCM", "nonce": _b64(nonce)},
    }
    ciphertext = AESGCM(bytes(enc_key)).encrypt(nonce, bytes(share), _canonical(doc))
    wipe(enc_key)
    doc["ciphertext"] = _b64(ciphertext)
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def read_share(data: bytes) -> SealedShare:
    """Parse and check a share file's structure; no passphrase needed, nothing secret learnt."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ShareUnreadable("the file is not a mailkms recovery share (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != SHARE_FORMAT:
        raise ShareUnreadable("the file is not a mailkms recovery share")
    if doc.get("version") != SHARE_VERSION:
        raise ShareUnreadable(f"unknown share file version {doc.get('version')!r}")
    try:
        header = ShareHeader(
            ceremony_id=str(doc["ceremony_id"]),
            officer=str(doc["officer"]),
            index=_int(doc["index"]),
            threshold=_int(doc["threshold"]),
            officers=_int(doc["officers"]),
            created_at=str(doc["created_at"]),
        )
        kdf = doc["kdf"]
        cipher = doc["cipher"]
        if not isinstance(kdf, dict) or not isinstance(cipher, dict):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise ShareUnreadable("the share file lacks a field or has one of the wrong type") from None
    if not _CEREMONY_ID.match(header.ceremony_id) or not _OFFICER.match(header.officer):
        raise ShareUnreadable("the share file names no valid ceremony or officer")
    if not (1 <= header.threshold <= header.officers <= MAX_OFFICERS and 1 <= header.index <= header.officers):
        raise ShareUnreadable("the share file's index or threshold is out of range")
    if kdf.get("name") != "scrypt" or cipher.get("name") != "AES-256-GCM":
        raise ShareUnreadable("the share file uses an unknown key derivation or cipher")
    problem = scrypt_params_problem(kdf, MIN_SCRYPT_N, MAX_SCRYPT_N)
    if problem:
        raise ShareUnreadable(f"the share file's scrypt parameters are {problem}")
    _unb64(kdf.get("salt"), 16, "salt")
    _unb64(cipher.get("nonce"), 12, "nonce")
    _unb64(doc.get("passphrase_check"), 32, "passphrase check")
    _unb64(doc.get("ciphertext"), KEK_BYTES + 16, "ciphertext")
    return SealedShare(header, doc)


def open_share(sealed: SealedShare, passphrase: bytes) -> bytearray:
    """The 16-byte share. ShareWrongPassphrase or ShareTampered, each naming the officer."""
    doc = dict(sealed._doc)
    kdf = doc["kdf"]
    salt = _unb64(kdf["salt"], 16, "salt")
    enc_key, check = _derive(passphrase, salt, kdf["n"], kdf["r"], kdf["p"])
    try:
        if not hmac.compare_digest(check, _unb64(doc["passphrase_check"], 32, "passphrase check")):
            raise ShareWrongPassphrase(
                f"the passphrase given for {sealed.header.describe()} does not open it"
                " (or the file's key-derivation fields were altered)"
            )
        ciphertext = _unb64(doc.pop("ciphertext"), KEK_BYTES + 16, "ciphertext")
        nonce = _unb64(doc["cipher"]["nonce"], 12, "nonce")
        try:
            return bytearray(AESGCM(bytes(enc_key)).decrypt(nonce, ciphertext, _canonical(doc)))
        except InvalidTag:
            raise ShareTampered(
                f"the share file of {sealed.header.describe()} was altered after it was written"
            ) from None
    finally:
        wipe(enc_key)


def _derive(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> tuple[bytearray, bytes]:
    derived = bytearray(Scrypt(salt=salt, length=64, n=n, r=r, p=p).derive(passphrase))
    check = hmac.new(bytes(derived[32:]), _CHECK_LABEL, hashlib.sha256).digest()
    enc_key = derived[:32]
    wipe(derived)
    return enc_key, check


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError
    return value


def wipe(buffer: bytearray) -> None:
    """Overwrite a secret held in a bytearray (bytes made inside the libraries cannot be wiped)."""
    for i in range(len(buffer)):
        buffer[i] = 0


def share_digest(ceremony_id: str, index: int, share: bytes | bytearray) -> str:
    """A commitment to a share (the server keeps it to tell which officer's share is wrong).

    The share has 128 random bits, so its hash reveals nothing usable."""
    return hashlib.sha256(_DIGEST_LABEL + f"{ceremony_id}|{index}|".encode() + bytes(share)).hexdigest()


# --- the KEK and Shamir ------------------------------------------------------------------------------
def new_kek() -> bytearray:
    return bytearray(secrets.token_bytes(KEK_BYTES))


def wrap_recovery_key(key: PrivateKey, kek: bytes | bytearray, ceremony_id: str) -> bytes:
    """nonce || AES-128-GCM(KEK, PKCS#8 DER), the ceremony id as associated data."""
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(bytes(kek)).encrypt(nonce, private_key_der(key), _WRAP_LABEL + ceremony_id.encode())


def unwrap_recovery_key(blob: bytes, kek: bytes | bytearray, ceremony_id: str) -> PrivateKey:
    try:
        der = AESGCM(bytes(kek)).decrypt(blob[:12], blob[12:], _WRAP_LABEL + ceremony_id.encode())
    except InvalidTag:
        raise RecoveryRefused("the shares given do not open this ceremony's recovery key") from None
    # The AES-GCM tag authenticates a key we made ourselves: the costly RSA checks (~0.4 s) add nothing.
    key = serialization.load_der_private_key(der, None, unsafe_skip_rsa_key_validation=True)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise RecoveryRefused("the recovery key has an unsupported type")
    return key


def public_half(pkcs8_der: bytes) -> PublicKey:
    """The public key inside a PKCS#8 private key, without the RSA consistency checks (which cost
    ~0.1 s per key and would dominate a whole-archive export); for comparing with a certificate."""
    key = serialization.load_der_private_key(pkcs8_der, None, unsafe_skip_rsa_key_validation=True)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError("unsupported private key type")
    return key.public_key()


# --- recovered keys held until the user enrols ------------------------------------------------------------
def _hold_key(token: str, salt: bytes) -> bytes:
    # The token has 160 random bits: a fast KDF is enough, as for its stored SHA-256 hash.
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_HOLD_INFO).derive(token.strip().encode())


def seal_held_keys(keys: Sequence[tuple[str, bytes]], token: str, context: bytes) -> bytes:
    """keys: (certificate serial, PKCS#8 DER). Sealed under the token; `context` binds user and token."""
    plain = json.dumps({"keys": [{"serial": s, "pkcs8": _b64(der)} for s, der in keys]}).encode()
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(12)
    return _HOLD_MAGIC + salt + nonce + AESGCM(_hold_key(token, salt)).encrypt(nonce, plain, context)


def open_held_keys(blob: bytes, token: str, context: bytes) -> list[tuple[str, bytes]]:
    if not blob.startswith(_HOLD_MAGIC) or len(blob) < 4 + 16 + 12 + 16:
        raise ValueError("not a sealed hold of recovered keys")
    salt, nonce, ciphertext = blob[4:20], blob[20:32], blob[32:]
    try:
        plain = AESGCM(_hold_key(token, salt)).decrypt(nonce, ciphertext, context)
    except InvalidTag:
        raise ValueError("the token does not open the held keys") from None
    return [(str(k["serial"]), base64.b64decode(k["pkcs8"])) for k in json.loads(plain)["keys"]]
