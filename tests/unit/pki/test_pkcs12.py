"""PKCS#12 with a whole key history: the KDF against `cryptography`'s own files, round trips, refusals."""

from __future__ import annotations

import datetime as dt

import pytest
from asn1crypto import pkcs12 as asn1_pkcs12
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from mailkms.errors import BadMessage, WrongPassphrase
from mailkms.pki import KeyEntry, build_pkcs12, read_pkcs12
from mailkms.pki._pkcs12 import local_key_id, pkcs12_kdf
from tests.smime_support import NOW, Identity, SmimePKI


@pytest.fixture(scope="module")
def pki(smime_pki: SmimePKI) -> SmimePKI:
    return smime_pki


@pytest.fixture(scope="module")
def history(pki: SmimePKI) -> list[Identity]:
    return [pki.identity("alice@example.org", start=NOW - dt.timedelta(days=d)) for d in (1, 400, 800)]


@pytest.mark.parametrize("mac_hash", [hashes.SHA256(), hashes.SHA1()], ids=["sha256", "sha1"])
def test_mac_key_derivation_matches_files_written_by_cryptography(history: list[Identity], mac_hash) -> None:  # type: ignore[no-untyped-def]
    ident = history[0]
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(3000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(mac_hash)
        .build(b"p\xc3\xa4ssword")
    )
    data = pkcs12.serialize_key_and_certificates(b"x", ident.signing_key, ident.signing, None, encryption)
    pfx = asn1_pkcs12.Pfx.load(data)
    mac = pfx["mac_data"]
    import hmac

    name = mac["mac"]["digest_algorithm"]["algorithm"].native
    key = pkcs12_kdf("pässword", mac["mac_salt"].native, mac["iterations"].native, mac_hash.digest_size, name)
    assert hmac.new(key, pfx["auth_safe"]["content"].native, name).digest() == mac["mac"]["digest"].native
    # and our reader reads their file
    bundle = read_pkcs12(data, "pässword")
    assert bundle.entries[0].certificate == ident.signing


def test_every_key_comes_back_with_its_certificate_and_name(pki: SmimePKI, history: list[Identity]) -> None:
    entries = [KeyEntry(history[0].signing_key, history[0].signing, "alice signing")]
    entries += [KeyEntry(i.encryption_key, i.encryption, f"alice encryption {n}") for n, i in enumerate(history)]
    data = build_pkcs12(entries, [pki.issuing, pki.root], "export pw", iterations=1000, mac_iterations=1000)
    bundle = read_pkcs12(data, "export pw")
    assert [e.friendly_name for e in bundle.entries] == [e.friendly_name for e in entries]
    for got, want in zip(bundle.entries, entries, strict=True):
        assert got.certificate == want.certificate
        assert got.key.private_numbers() == want.key.private_numbers()  # type: ignore[union-attr]
    assert set(bundle.chain) == {pki.issuing, pki.root}
    # each key bag and its certificate bag share a localKeyId
    assert local_key_id(history[0].signing) != local_key_id(history[0].encryption)


def test_wrong_password_or_altered_file_is_refused(history: list[Identity]) -> None:
    data = build_pkcs12(
        [KeyEntry(history[0].signing_key, history[0].signing, "s")], [], "right", iterations=1000, mac_iterations=1000
    )
    with pytest.raises(WrongPassphrase):
        read_pkcs12(data, "wrong")
    altered = bytearray(data)
    altered[len(altered) // 2] ^= 1
    with pytest.raises((WrongPassphrase, BadMessage)):
        read_pkcs12(bytes(altered), "right")
    with pytest.raises(BadMessage):
        read_pkcs12(b"not a pkcs12 file", "right")
    with pytest.raises(BadMessage):
        build_pkcs12([KeyEntry(history[0].signing_key, history[0].signing, "s")], [], "")
