"""Enrolment tokens, the pure half: 160 random bits, URL-safe, stored only as a SHA-256."""

from __future__ import annotations

import base64
import hashlib
import re

from mailkms.services import new_token, token_hash


def test_tokens_carry_160_random_bits() -> None:
    token = new_token()
    assert re.fullmatch(r"[A-Za-z0-9_-]{27}", token)
    assert len(base64.urlsafe_b64decode(token + "=")) == 20


def test_tokens_do_not_repeat() -> None:
    tokens = {new_token() for _ in range(2000)}
    assert len(tokens) == 2000


def test_every_bit_of_a_token_varies() -> None:
    """A counter or a clock in the token would pin some bits; 200 draws leave none pinned."""
    values = [int.from_bytes(base64.urlsafe_b64decode(new_token() + "="), "big") for _ in range(200)]
    for bit in range(160):
        assert {(v >> bit) & 1 for v in values} == {0, 1}, f"bit {bit} never changes"


def test_the_hash_is_sha256_of_the_token() -> None:
    token = new_token()
    assert token_hash(token) == hashlib.sha256(token.encode()).hexdigest()
    assert token not in token_hash(token)


def test_surrounding_whitespace_from_copy_and_paste_is_ignored() -> None:
    token = new_token()
    assert token_hash(f"  {token}\n") == token_hash(token)


def test_different_tokens_have_different_hashes() -> None:
    assert token_hash(new_token()) != token_hash(new_token())
