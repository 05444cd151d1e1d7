"""Key custody helpers: the slow-KDF envelope, the passphrase strength floor, audit checkpoints."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from mailkms.errors import Malformed
from mailkms.pki import (
    CheckpointInvalid,
    SealedSecretError,
    check_admin_passphrase,
    open_secret,
    passphrase_bits,
    seal_secret,
    sealed_secret_kdf,
    sign_checkpoint,
    verify_checkpoint,
)

CHEAP_N = 2**14  # the smallest cost an envelope may have: keeps these tests fast


def test_a_sealed_secret_opens_only_with_its_passphrase_and_context() -> None:
    sealed = seal_secret(b"k" * 32, b"right passphrase", "ctx", scrypt_n=CHEAP_N)
    assert open_secret(sealed, b"right passphrase", "ctx") == b"k" * 32
    assert b"k" * 8 not in sealed
    with pytest.raises(SealedSecretError):
        open_secret(sealed, b"wrong passphrase", "ctx")
    with pytest.raises(SealedSecretError):
        open_secret(sealed, b"right passphrase", "another")
    doc = json.loads(sealed)
    assert "check" not in json.dumps(doc)  # nothing but the AEAD tag tests a guess
    doc["kdf"]["n"] = 2**15  # a cheaper or different cost is refused or fails
    with pytest.raises(SealedSecretError):
        open_secret(json.dumps(doc).encode(), b"right passphrase", "ctx")
    doc["kdf"]["n"] = 2**10
    with pytest.raises(SealedSecretError, match="out of range"):
        open_secret(json.dumps(doc).encode(), b"right passphrase", "ctx")


def test_the_default_cost_is_scrypt_two_to_the_seventeen() -> None:
    kdf = sealed_secret_kdf(seal_secret(b"x", b"p", "c"))
    assert (kdf["name"], kdf["n"], kdf["r"], kdf["p"]) == ("scrypt", 2**17, 8, 1)
    with pytest.raises(ValueError):
        seal_secret(b"x", b"p", "c", scrypt_n=2**12)


@pytest.mark.parametrize(
    "passphrase",
    [
        "short-one",  # under 16 characters
        "aaaaaaaaaaaaaaaaaaaa",  # one character
        "abcdefghijklmnopqrstu",  # a run
        "abab" * 6,  # a repeat
        "1234567890123456789",  # digits in a run
    ],
)
def test_weak_admin_passphrases_are_refused(passphrase: str) -> None:
    with pytest.raises(Malformed):
        check_admin_passphrase("MAILKMS_RECOVERY_PASSPHRASE", passphrase)


@pytest.mark.parametrize("passphrase", ["correct horse battery staple", "rec-5f0c1e9a7b2d4c6e8f", "Tr0ub4dor&3-xyzzy!"])
def test_reasonable_admin_passphrases_pass(passphrase: str) -> None:
    check_admin_passphrase("MAILKMS_RECOVERY_PASSPHRASE", passphrase)
    assert passphrase_bits(passphrase) >= 64


def test_a_checkpoint_verifies_and_any_change_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    at = dt.datetime(2026, 1, 15, 9, 30, tzinfo=dt.UTC)
    line = sign_checkpoint(key, 42, "a" * 64, at)
    cp = verify_checkpoint(line, key.public_key())
    assert (cp.seq, cp.head, cp.at) == (42, "a" * 64, at)
    for field, value in (("seq", 41), ("head", "b" * 64), ("at", "2026-01-15T09:30:01.000000Z")):
        doc = json.loads(line)
        doc[field] = value
        with pytest.raises(CheckpointInvalid, match="signature"):
            verify_checkpoint(json.dumps(doc), key.public_key())
    with pytest.raises(CheckpointInvalid, match="another key"):
        verify_checkpoint(line, ec.generate_private_key(ec.SECP256R1()).public_key())
