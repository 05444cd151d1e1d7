"""Keys at rest and fingerprints (what an administrator reads out to users)."""

from __future__ import annotations

import subprocess

import pytest
from cryptography.hazmat.primitives import serialization

from mailkms.errors import Malformed
from mailkms.pki import (
    KeyType,
    encrypt_private_key,
    fingerprint_sha256,
    load_private_key,
    load_private_key_der,
    normalise_fingerprint,
    private_key_der,
    same_public_key,
)
from tests.judges import pem
from tests.testca import SessionCA, key_of

PASSPHRASE = b"correct horse battery staple"


@pytest.mark.parametrize("key_type", [KeyType.RSA2048, KeyType.P256, KeyType.P384])
def test_encrypted_pkcs8_round_trip(key_type: KeyType) -> None:
    key = key_of(key_type)
    stored = encrypt_private_key(key, PASSPHRASE)
    with pytest.raises(TypeError):  # an encrypted PKCS#8 file: nothing is read without the passphrase
        serialization.load_pem_private_key(stored, password=None)
    assert private_key_der(key) not in stored
    loaded = load_private_key(stored, PASSPHRASE)
    assert same_public_key(loaded.public_key(), key.public_key())  # type: ignore[arg-type]


def test_the_wrong_passphrase_does_not_open_the_key() -> None:
    stored = encrypt_private_key(key_of(KeyType.P256), PASSPHRASE)
    with pytest.raises(ValueError):
        load_private_key(stored, b"wrong")


def test_openssl_opens_the_key_with_the_passphrase() -> None:
    stored = encrypt_private_key(key_of(KeyType.P256), PASSPHRASE)
    done = subprocess.run(
        ["openssl", "pkey", "-passin", "stdin", "-pubout"],
        input=PASSPHRASE + b"\n" + stored,
        capture_output=True,
        timeout=60,
    )
    # openssl reads the passphrase from the first line of stdin, then the key
    assert done.returncode == 0, done.stderr.decode()
    assert b"BEGIN PUBLIC KEY" in done.stdout


def test_pkcs8_der_round_trip() -> None:
    key = key_of(KeyType.RSA2048)
    assert same_public_key(load_private_key_der(private_key_der(key)).public_key(), key.public_key())  # type: ignore[arg-type]


def test_fingerprint_is_what_openssl_prints(rsa_ca: SessionCA) -> None:
    done = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256"],
        input=pem(rsa_ca.root),
        capture_output=True,
        timeout=60,
    )
    printed = done.stdout.decode().strip()
    assert printed.split("=", 1)[1] == fingerprint_sha256(rsa_ca.root)
    assert normalise_fingerprint(printed) == fingerprint_sha256(rsa_ca.root)


@pytest.mark.parametrize(
    "form",
    [
        lambda fp: fp,
        lambda fp: fp.lower(),
        lambda fp: fp.replace(":", ""),
        lambda fp: "SHA256:" + fp,
        lambda fp: "sha256 Fingerprint=" + fp,
        lambda fp: "  " + fp.replace(":", " ") + "\n",
    ],
    ids=["colons", "lower", "bare-hex", "sha256-prefix", "openssl", "spaces"],
)
def test_fingerprint_forms_users_paste(rsa_ca: SessionCA, form) -> None:  # type: ignore[no-untyped-def]
    fp = fingerprint_sha256(rsa_ca.root)
    assert normalise_fingerprint(form(fp)) == fp


@pytest.mark.parametrize("text", ["", "AB:CD", "G" * 64, "A" * 63, "A" * 65, "SHA1:" + "A" * 40])
def test_fingerprints_that_are_not_sha256(text: str) -> None:
    with pytest.raises(Malformed, match="64 hexadecimal digits"):
        normalise_fingerprint(text)
