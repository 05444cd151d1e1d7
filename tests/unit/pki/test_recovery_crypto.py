"""The recovery crypto alone: Shamir via pycryptodome, sealed share files, the wrapped recovery key,
the hold of recovered keys. Each refusal is its own error, and none of them opens anything."""

from __future__ import annotations

import base64
import itertools
import json

import pytest

from mailkms.errors import Malformed, RecoveryRefused, ShareTampered, ShareUnreadable, ShareWrongPassphrase
from mailkms.pki import (
    KEK_BYTES,
    KeyType,
    ShareHeader,
    check_officer_name,
    generate_key,
    new_ceremony_id,
    new_kek,
    open_held_keys,
    open_share,
    read_share,
    same_public_key,
    seal_held_keys,
    seal_share,
    share_digest,
    unwrap_recovery_key,
    wipe,
    wrap_recovery_key,
)
from mailkms.pki._recovery import MIN_SCRYPT_N, SCRYPT_N
from mailkms.pki._shamir import combine_kek, split_kek

FAST = MIN_SCRYPT_N  # the lowest cost a share file may have; the default is tested once below
PASS = b"correct horse battery staple"


def _header(**changes: object) -> ShareHeader:
    fields: dict[str, object] = {
        "ceremony_id": "ab" * 16,
        "officer": "Alice Officer",
        "index": 2,
        "threshold": 2,
        "officers": 3,
        "created_at": "2026-01-15T09:30:00+00:00",
    }
    fields.update(changes)
    return ShareHeader(**fields)  # type: ignore[arg-type]


def _sealed(share: bytes = b"S" * 16, **kw: object) -> bytes:
    return seal_share(_header(), share, PASS, scrypt_n=FAST, **kw)  # type: ignore[arg-type]


# --- Shamir through pycryptodome ------------------------------------------------------------------
@pytest.mark.parametrize(("m", "n"), [(1, 1), (1, 3), (2, 2), (2, 3), (3, 5), (5, 5)])
def test_every_m_subset_rebuilds_the_kek(m: int, n: int) -> None:
    kek = new_kek()
    shares = split_kek(kek, m, n)
    assert [i for i, _ in shares] == list(range(1, n + 1))
    assert all(len(s) == KEK_BYTES for _, s in shares)
    for size in range(m, n + 1):
        for subset in itertools.combinations(shares, size):
            assert combine_kek(list(subset)) == kek


def test_fewer_than_m_shares_give_a_wrong_kek_that_opens_nothing() -> None:
    kek = new_kek()
    key = generate_key(KeyType.RSA2048)
    ceremony = new_ceremony_id()
    wrapped = wrap_recovery_key(key, kek, ceremony)
    shares = split_kek(kek, 3, 5)
    for subset in itertools.combinations(shares, 2):
        wrong = combine_kek(list(subset))
        assert wrong != kek
        with pytest.raises(RecoveryRefused):
            unwrap_recovery_key(wrapped, wrong, ceremony)
    assert same_public_key(
        unwrap_recovery_key(wrapped, combine_kek(shares[2:]), ceremony).public_key(), key.public_key()
    )


def test_wrapped_key_is_bound_to_its_ceremony() -> None:
    kek = new_kek()
    wrapped = wrap_recovery_key(generate_key(KeyType.RSA2048), kek, "aa" * 16)
    with pytest.raises(RecoveryRefused):
        unwrap_recovery_key(wrapped, kek, "bb" * 16)


def test_wipe_overwrites_and_split_checks_its_arguments() -> None:
    secret = bytearray(b"k" * 16)
    wipe(secret)
    assert secret == bytearray(16)
    with pytest.raises(ValueError):
        split_kek(b"short", 1, 1)
    with pytest.raises(ValueError):
        split_kek(new_kek(), 3, 2)


# --- share files ----------------------------------------------------------------------------------
def test_share_file_round_trip_and_default_cost() -> None:
    data = seal_share(_header(), b"0123456789abcdef", PASS)
    doc = json.loads(data)
    assert doc["kdf"]["n"] == SCRYPT_N == 2**17
    assert b"0123456789abcdef" not in data and base64.b64encode(b"0123456789abcdef") not in data
    sealed = read_share(data)
    assert sealed.header == _header()
    assert open_share(sealed, PASS) == b"0123456789abcdef"


def test_wrong_passphrase_is_told_apart_from_tampering() -> None:
    sealed = read_share(_sealed())
    with pytest.raises(ShareWrongPassphrase, match="Alice Officer"):
        open_share(sealed, b"not the passphrase at all")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ceremony_id", "cd" * 16),
        ("officer", "Mallory"),
        ("index", 3),
        ("threshold", 1),
        ("officers", 4),
        ("created_at", "2030-01-01T00:00:00+00:00"),
        ("note", "harmless?"),
    ],
)
def test_any_changed_header_field_is_tampering(field: str, value: object) -> None:
    doc = json.loads(_sealed())
    doc[field] = value
    with pytest.raises(ShareTampered, match="altered"):
        open_share(read_share(json.dumps(doc).encode()), PASS)


def test_changed_ciphertext_is_tampering() -> None:
    doc = json.loads(_sealed())
    raw = bytearray(base64.b64decode(doc["ciphertext"]))
    raw[3] ^= 0x01
    doc["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(ShareTampered):
        open_share(read_share(json.dumps(doc).encode()), PASS)


def test_changed_key_derivation_fields_read_as_wrong_passphrase() -> None:
    doc = json.loads(_sealed())
    doc["kdf"]["salt"] = base64.b64encode(b"\x00" * 16).decode()
    with pytest.raises(ShareWrongPassphrase, match="altered"):
        open_share(read_share(json.dumps(doc).encode()), PASS)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: b"not json at all",
        lambda d: json.dumps({**d, "format": "something-else"}).encode(),
        lambda d: json.dumps({**d, "version": 2}).encode(),
        lambda d: json.dumps({k: v for k, v in d.items() if k != "officer"}).encode(),
        lambda d: json.dumps({**d, "index": "2"}).encode(),
        lambda d: json.dumps({**d, "index": 9}).encode(),
        lambda d: json.dumps({**d, "threshold": 0}).encode(),
        lambda d: json.dumps({**d, "ceremony_id": "../../etc"}).encode(),
        lambda d: json.dumps({**d, "kdf": {**d["kdf"], "n": 2**21}}).encode(),  # memory exhaustion
        lambda d: json.dumps({**d, "kdf": {**d["kdf"], "n": 2**10}}).encode(),  # too cheap
        lambda d: json.dumps({**d, "kdf": {**d["kdf"], "n": 3 * 2**14}}).encode(),
        lambda d: json.dumps({**d, "ciphertext": "%%%"}).encode(),
        lambda d: json.dumps({**d, "ciphertext": base64.b64encode(b"x" * 40).decode()}).encode(),
    ],
)
def test_unreadable_files_are_refused_before_any_key_derivation(mangle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ShareUnreadable):
        read_share(mangle(json.loads(_sealed())))


def test_officer_names_are_checked() -> None:
    assert check_officer_name("Dr. Jane Doe-Smith") == "Dr. Jane Doe-Smith"
    for bad in ("", " leading", "a/b", "x" * 65, "semi;colon"):
        with pytest.raises(Malformed):
            check_officer_name(bad)


def test_share_digest_binds_ceremony_and_index() -> None:
    share = b"s" * 16
    one = share_digest("aa" * 16, 1, share)
    assert one == share_digest("aa" * 16, 1, bytearray(share))
    assert one != share_digest("aa" * 16, 2, share)
    assert one != share_digest("bb" * 16, 1, share)


# --- keys held for the user's enrolment -------------------------------------------------------------
def test_held_keys_open_only_with_their_token_and_context() -> None:
    keys = [("1a2b", b"pkcs8 one"), ("3c4d", b"pkcs8 two")]
    blob = seal_held_keys(keys, "the-token", b"user=1|token=7")
    assert b"pkcs8" not in blob
    assert open_held_keys(blob, " the-token\n", b"user=1|token=7") == keys
    with pytest.raises(ValueError):
        open_held_keys(blob, "another-token", b"user=1|token=7")
    with pytest.raises(ValueError):
        open_held_keys(blob, "the-token", b"user=2|token=7")
