"""Key custody helpers: a secret sealed under a slow KDF, a passphrase strength estimate, and the
signed checkpoints of the audit chain. Pure: every time and key is passed in.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import itertools
import json
import math
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from mailkms.errors import Malformed

# --- a secret sealed to a passphrase under scrypt ----------------------------------------------------
SEALED_FORMAT = "mailkms-sealed-secret"
SEAL_SCRYPT_N = 2**17  # 128 MiB; about 0.5-1.3 s per opening (the recovery shares use the same)
SEAL_SCRYPT_R = 8
SEAL_SCRYPT_P = 1
MIN_SEAL_SCRYPT_N = 2**14  # weaker envelopes are refused when read
MAX_SEAL_SCRYPT_N = 2**20


class SealedSecretError(ValueError):
    """The envelope does not open: wrong passphrase, another context, or altered."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: object, length: int | None) -> bytes:
    if not isinstance(value, str):
        raise SealedSecretError("a field of the sealed secret is missing")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SealedSecretError("a field of the sealed secret is not base64") from None
    if length is not None and len(data) != length:
        raise SealedSecretError("a field of the sealed secret has the wrong length")
    return data


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal_secret(secret: bytes, passphrase: bytes, context: str, *, scrypt_n: int = SEAL_SCRYPT_N) -> bytes:
    """JSON: `secret` encrypted (AES-256-GCM) under scrypt(passphrase). No check value besides the
    AEAD tag itself, so each guess costs a full scrypt. `context` is bound as authenticated data."""
    if not MIN_SEAL_SCRYPT_N <= scrypt_n <= MAX_SEAL_SCRYPT_N or scrypt_n & (scrypt_n - 1):
        raise ValueError("scrypt cost out of range")
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(12)
    doc: dict[str, Any] = {
        "format": SEALED_FORMAT,
        "version": 1,
        "context": context,
        "kdf": {"name": "scrypt", "n": scrypt_n, "r": SEAL_SCRYPT_R, "p": SEAL_SCRYPT_P, "salt": _b64(salt)},
        "cipher": {"name": "AES-256-GCM", "nonce": _b64(nonce)},
    }
    key = Scrypt(salt=salt, length=32, n=scrypt_n, r=SEAL_SCRYPT_R, p=SEAL_SCRYPT_P).derive(passphrase)
    doc["ciphertext"] = _b64(AESGCM(key).encrypt(nonce, secret, _canonical(doc)))
    return _canonical(doc)


def sealed_secret_kdf(data: bytes) -> dict[str, object]:
    """The KDF parameters of an envelope (what it costs to try a passphrase on it)."""
    doc = _parse_sealed(data)
    return dict(doc["kdf"])


def scrypt_params_problem(kdf: dict[str, Any], min_n: int, max_n: int) -> str | None:
    """None when n (a power of two in [min_n, max_n]), r (1-16) and p (1-4) are sane: a file names
    its own cost, and neither a cheap nor a memory-exhausting one is run."""
    n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
    if not (isinstance(n, int) and isinstance(r, int) and isinstance(p, int)):
        return "not numbers"
    if not (min_n <= n <= max_n and n & (n - 1) == 0 and 1 <= r <= 16 and 1 <= p <= 4):
        return "out of range"
    return None


def _parse_sealed(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise SealedSecretError("not a sealed secret (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != SEALED_FORMAT or doc.get("version") != 1:
        raise SealedSecretError("not a mailkms sealed secret")
    kdf, cipher = doc.get("kdf"), doc.get("cipher")
    if not isinstance(kdf, dict) or not isinstance(cipher, dict) or kdf.get("name") != "scrypt":
        raise SealedSecretError("the sealed secret uses an unknown key derivation")
    problem = scrypt_params_problem(kdf, MIN_SEAL_SCRYPT_N, MAX_SEAL_SCRYPT_N)
    if problem:
        raise SealedSecretError(f"the sealed secret's scrypt parameters are {problem}")
    if cipher.get("name") != "AES-256-GCM":
        raise SealedSecretError("the sealed secret uses an unknown cipher")
    return doc


def open_secret(data: bytes, passphrase: bytes, context: str) -> bytes:
    """The secret, or SealedSecretError (wrong passphrase, other context, altered)."""
    doc = _parse_sealed(data)
    if doc.get("context") != context:
        raise SealedSecretError("the sealed secret belongs to another context")
    kdf = doc["kdf"]
    salt = _unb64(kdf.get("salt"), 16)
    nonce = _unb64(doc["cipher"].get("nonce"), 12)
    ciphertext = _unb64(doc.pop("ciphertext", None), None)
    key = Scrypt(salt=salt, length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(passphrase)
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, _canonical(doc))
    except InvalidTag:
        raise SealedSecretError("the passphrase does not open the sealed secret (or it was altered)") from None


# --- passphrase strength ---------------------------------------------------------------------------
MIN_ADMIN_PASSPHRASE = 16
MIN_PASSPHRASE_BITS = 64.0


def passphrase_bits(passphrase: str) -> float:
    """A rough, conservative entropy estimate (no dictionary): each character is worth log2 of the
    alphabet its classes span, a character that repeats or continues a run (aaa, abc, 321) 1 bit,
    and a text that repeats a shorter text counts once."""
    text = passphrase
    for size in range(1, len(text) // 2 + 1):
        if len(text) % size == 0 and text[:size] * (len(text) // size) == text:
            text = text[:size]
            break
    if not text:
        return 0.0
    alphabet = 0
    alphabet += 26 if any(c.islower() for c in text) else 0
    alphabet += 26 if any(c.isupper() for c in text) else 0
    alphabet += 10 if any(c.isdigit() for c in text) else 0
    alphabet += 33 if any(not c.isalnum() for c in text) else 0
    per_char = math.log2(max(alphabet, 2))
    bits = per_char
    for prev, char in itertools.pairwise(text):
        bits += 1.0 if abs(ord(char) - ord(prev)) <= 1 else per_char
    return bits


def check_admin_passphrase(what: str, passphrase: str) -> None:
    """At least 16 characters and an estimated 64 bits; Malformed naming `what` otherwise."""
    if len(passphrase) < MIN_ADMIN_PASSPHRASE:
        raise Malformed(f"{what} must have at least {MIN_ADMIN_PASSPHRASE} characters")
    if len(set(passphrase)) < 6 or passphrase_bits(passphrase) < MIN_PASSPHRASE_BITS:
        raise Malformed(
            f"{what} is too easy to guess (estimated {passphrase_bits(passphrase):.0f} bits, at least "
            f"{MIN_PASSPHRASE_BITS:.0f} needed): use a longer, less regular passphrase"
        )


# --- signed checkpoints of the audit chain ------------------------------------------------------------
CHECKPOINT_FORMAT = "mailkms-audit-checkpoint"
_CHECKPOINT_LABEL = b"mailkms audit checkpoint v1\n"


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    head: str
    at: dt.datetime
    key_id: str


def key_id_of(public_key: ec.EllipticCurvePublicKey) -> str:
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()[:32]


def _checkpoint_body(seq: int, head: str, at: dt.datetime, key_id: str) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "seq": seq,
        "head": head,
        "at": at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "key_id": key_id,
    }


def sign_checkpoint(key: ec.EllipticCurvePrivateKey, seq: int, head: str, at: dt.datetime) -> str:
    """One JSON line (no newline): the head (sequence number, hash, time), signed with ECDSA-SHA256."""
    body = _checkpoint_body(seq, head, at, key_id_of(key.public_key()))
    signature = key.sign(_CHECKPOINT_LABEL + _canonical(body), ec.ECDSA(hashes.SHA256()))
    return json.dumps({**body, "sig": _b64(signature)}, sort_keys=True, separators=(",", ":"))


class CheckpointInvalid(ValueError):
    """A checkpoint line that is not well formed or whose signature does not verify."""


def verify_checkpoint(line: str, public_key: ec.EllipticCurvePublicKey) -> Checkpoint:
    try:
        doc = json.loads(line)
    except ValueError:
        raise CheckpointInvalid("not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT or doc.get("version") != 1:
        raise CheckpointInvalid("not a mailkms audit checkpoint")
    seq, head, at, key_id, sig = (doc.get(k) for k in ("seq", "head", "at", "key_id", "sig"))
    if not (isinstance(seq, int) and seq >= 0 and isinstance(head, str) and isinstance(at, str)):
        raise CheckpointInvalid("a field is missing or of the wrong type")
    if not isinstance(key_id, str) or not isinstance(sig, str):
        raise CheckpointInvalid("a field is missing or of the wrong type")
    if key_id != key_id_of(public_key):
        raise CheckpointInvalid(f"signed with another key ({key_id})")
    try:
        when = dt.datetime.strptime(at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
        signature = base64.b64decode(sig, validate=True)
    except (ValueError, binascii.Error):
        raise CheckpointInvalid("a field is malformed") from None
    body = _checkpoint_body(seq, head, when, key_id)
    if _canonical(body) != _canonical({k: v for k, v in doc.items() if k != "sig"}):
        raise CheckpointInvalid("unexpected fields")
    try:
        public_key.verify(signature, _CHECKPOINT_LABEL + _canonical(body), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise CheckpointInvalid("the signature does not verify (forged or altered)") from None
    return Checkpoint(seq, head, when, key_id)
