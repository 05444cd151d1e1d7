"""S/MIME writing and reading, pure: round trips, canonical form, exact part bytes, refusals."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from mailkms.errors import BadMessage, BadSignature, NotARecipient, NotSigned
from mailkms.pki import (
    KeyType,
    SMimeKind,
    decrypt_message,
    encrypt_message,
    read_smime,
    sign_detached,
    sign_opaque_message,
    verify_message,
)
from mailkms.pki._smime import canonical, mime_entity, multipart_parts, split_message
from tests.smime_support import MESSAGE, Identity, SmimePKI


@pytest.fixture(scope="module")
def pki(smime_pki: SmimePKI) -> SmimePKI:
    return smime_pki


@pytest.fixture(scope="module")
def alice(pki: SmimePKI) -> Identity:
    return pki.identity("alice@example.org")


@pytest.fixture(scope="module")
def bob(pki: SmimePKI) -> Identity:
    return pki.identity("bob@example.org")


def test_detached_signature_keeps_outer_fields_outside_and_verifies(pki: SmimePKI, alice: Identity) -> None:
    signed = sign_detached(MESSAGE, alice.signing, alice.signing_key, [pki.issuing])
    head, body = signed.split(b"\r\n\r\n", 1)
    assert b"Subject: quarterly figures" in head and b"micalg=sha-256" in head
    assert b"Subject:" not in body  # the signed entity holds only Content-* fields and the body
    verified = verify_message(signed)
    assert verified.kind is SMimeKind.SIGNED_DETACHED
    assert verified.signed.signer == alice.signing
    assert verified.signed.signing_time is not None
    assert b"Subject: quarterly figures\r\n" in verified.message
    assert verified.message.endswith(b"the figures are attached in spirit.\r\n-- \r\nAlice\r\n")


def test_a_signed_message_stored_with_lf_line_ends_still_verifies(alice: Identity) -> None:
    signed = sign_detached(MESSAGE, alice.signing, alice.signing_key)
    assert verify_message(signed.replace(b"\r\n", b"\n")).signed.signer == alice.signing


@pytest.mark.parametrize(("key_type", "micalg"), [(KeyType.P256, b"sha-256"), (KeyType.P384, b"sha-384")])
def test_micalg_names_the_digest_the_key_signs_with(pki: SmimePKI, key_type: KeyType, micalg: bytes) -> None:
    ident = pki.identity(f"ec-{key_type.value}@example.org", signing_type=key_type)
    signed = sign_detached(MESSAGE, ident.signing, ident.signing_key)
    assert b"micalg=" + micalg + b";" in signed
    assert verify_message(signed).signed.signer == ident.signing


def test_opaque_signature_round_trip(alice: Identity) -> None:
    signed = sign_opaque_message(MESSAGE, alice.signing, alice.signing_key)
    assert b"smime-type=signed-data" in signed
    verified = verify_message(signed)
    assert verified.kind is SMimeKind.SIGNED_OPAQUE and b"attached in spirit" in verified.message


def test_eight_bit_bodies_are_made_seven_bit_before_a_detached_signature(alice: Identity) -> None:
    raw = b"From: a@example.org\nContent-Type: text/plain; charset=utf-8\n\nGr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\n"
    signed = sign_detached(raw, alice.signing, alice.signing_key)
    assert all(b < 0x80 for b in signed)
    verified = verify_message(signed)
    assert b"Content-Transfer-Encoding" in verified.message


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.replace(b"attached in spirit", b"attached in letter"),
        lambda m: m.replace(
            b"Content-Type: text/plain; charset=us-ascii", b"Content-Type: text/html; charset=us-ascii"
        ),
    ],
    ids=["body", "content-header"],
)
def test_any_change_to_the_signed_part_is_caught(alice: Identity, change) -> None:  # type: ignore[no-untyped-def]
    signed = sign_detached(MESSAGE, alice.signing, alice.signing_key)
    with pytest.raises(BadSignature):
        verify_message(change(signed))


def test_outer_fields_are_not_covered_by_the_signature(alice: Identity) -> None:
    """As in every mail program: the Subject is outside the signature (RFC 8551 §3.1)."""
    signed = sign_detached(MESSAGE, alice.signing, alice.signing_key)
    changed = verify_message(signed.replace(b"quarterly figures", b"yearly figures"))
    assert b"Subject: yearly figures" in changed.message


def test_truncated_and_unsigned_messages_are_refused(alice: Identity) -> None:
    signed = sign_detached(MESSAGE, alice.signing, alice.signing_key)
    with pytest.raises(BadMessage, match="truncated"):
        verify_message(signed[: len(signed) - 200])
    with pytest.raises(NotSigned):
        verify_message(MESSAGE)


def test_multipart_parts_are_byte_exact() -> None:
    body = b"preamble\r\n--b1  \r\nfirst\r\n--b1x is not a delimiter\r\n\r\n--b1\r\nsecond\r\n--b1--\r\nepilogue\r\n"
    assert multipart_parts(body, "b1") == [b"first\r\n--b1x is not a delimiter\r\n", b"second"]
    with pytest.raises(BadMessage):
        multipart_parts(b"--b1\r\nfirst\r\n", "b1")


def test_split_keeps_folded_fields_whole() -> None:
    split = split_message(b"Subject: a\n  folded\nContent-Type: text/plain;\n charset=utf-8\n\nbody\n")
    assert split.outer == (b"Subject: a\r\n  folded",)
    assert split.content == (b"Content-Type: text/plain;\r\n charset=utf-8",)
    assert split.body == b"body\r\n"
    assert mime_entity(b"Subject: x\n\nplain\n", seven_bit=True).startswith(
        b"Content-Type: text/plain; charset=us-ascii"
    )


def test_encrypted_to_each_recipient_and_no_one_else(pki: SmimePKI, alice: Identity, bob: Identity) -> None:
    carol = pki.identity("carol@example.org")
    encrypted = encrypt_message(MESSAGE, [bob.encryption, alice.encryption])
    head = encrypted.split(b"\r\n\r\n", 1)[0]
    assert b"smime-type=enveloped-data" in head and b"Subject: quarterly figures" in head
    assert read_smime(encrypted).kind is SMimeKind.ENVELOPED
    for ident in (alice, bob):
        opened = decrypt_message(
            encrypted, [(carol.encryption, carol.encryption_key), (ident.encryption, ident.encryption_key)]
        )
        assert opened.recipient == ident.encryption
        assert opened.message.endswith(b"-- \r\nAlice\r\n") and b"To: Bob <bob@example.org>" in opened.message
    with pytest.raises(NotARecipient):
        decrypt_message(encrypted, [(carol.encryption, carol.encryption_key)])


def test_damaged_ciphertext_is_refused_not_garbled(alice: Identity) -> None:
    encrypted = encrypt_message(MESSAGE, [alice.encryption])
    split = split_message(encrypted)
    der = bytearray(base64.b64decode(split.body))
    der[-5] ^= 0xFF  # inside the last cipher block: the padding breaks
    damaged = encrypted.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" + base64.encodebytes(bytes(der))
    with pytest.raises(BadMessage):
        decrypt_message(damaged, [(alice.encryption, alice.encryption_key)])
    with pytest.raises(BadMessage):
        decrypt_message(encrypted[: len(encrypted) // 2], [(alice.encryption, alice.encryption_key)])


def test_canonical_form() -> None:
    assert canonical(b"a\nb\r\nc\n") == b"a\r\nb\r\nc\r\n"


def test_the_pki_folder_has_what_the_judges_need(pki: SmimePKI) -> None:
    assert Path(pki.root_pem).exists() and Path(pki.issuing_pem).exists()
