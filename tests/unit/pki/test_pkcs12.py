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


# --- a file names its own iteration counts: capped before any is run ----------------------------------------
def _small_file(history: list[Identity]) -> bytes:
    entry = KeyEntry(history[0].signing_key, history[0].signing, "s")
    return build_pkcs12([entry], [], "right", iterations=1000, mac_iterations=1000)


def test_a_mac_iteration_count_over_the_cap_is_refused_before_it_runs(history: list[Identity]) -> None:
    import time

    from mailkms.pki._pkcs12 import MAX_READ_ITERATIONS

    pfx = asn1_pkcs12.Pfx.load(_small_file(history))
    mac = pfx["mac_data"]
    crafted = asn1_pkcs12.Pfx(
        {
            "version": "v3",
            "auth_safe": pfx["auth_safe"],
            "mac_data": {"mac": mac["mac"], "mac_salt": mac["mac_salt"], "iterations": MAX_READ_ITERATIONS + 1},
        }
    ).dump()
    started = time.monotonic()
    with pytest.raises(BadMessage, match="at most 10,000,000"):
        read_pkcs12(crafted, "right")
    assert time.monotonic() - started < 2  # 10 million rounds of the PKCS#12 KDF would take seconds
    # at the cap itself it is only a wrong MAC (the count is accepted): shown on a cheap count
    ok = asn1_pkcs12.Pfx(
        {"version": "v3", "auth_safe": pfx["auth_safe"], "mac_data": {**mac.native, "iterations": 999}}
    ).dump()
    with pytest.raises(WrongPassphrase):
        read_pkcs12(ok, "right")


def test_a_pbes2_iteration_count_over_the_cap_is_refused(history: list[Identity]) -> None:
    from asn1crypto import algos as asn1_algos
    from asn1crypto import cms as asn1_cms

    pfx = asn1_pkcs12.Pfx.load(_small_file(history))
    infos = list(asn1_pkcs12.AuthenticatedSafe.load(pfx["auth_safe"]["content"].native))
    algorithm = asn1_algos.EncryptionAlgorithm(
        {
            "algorithm": "pbes2",
            "parameters": {
                "key_derivation_func": {
                    "algorithm": "pbkdf2",
                    "parameters": {
                        "salt": asn1_algos.Pbkdf2Salt(name="specified", value=b"\0" * 16),
                        "iteration_count": 50_000_000,
                        "key_length": 32,
                        "prf": {"algorithm": "sha256", "parameters": None},
                    },
                },
                "encryption_scheme": {"algorithm": "aes256_cbc", "parameters": b"\0" * 16},
            },
        }
    )
    certs = asn1_cms.ContentInfo(
        {
            "content_type": "encrypted_data",
            "content": asn1_cms.EncryptedData(
                {
                    "version": "v0",
                    "encrypted_content_info": {
                        "content_type": "data",
                        "content_encryption_algorithm": algorithm,
                        "encrypted_content": b"\0" * 32,
                    },
                }
            ),
        }
    )
    auth_safe = asn1_pkcs12.AuthenticatedSafe([certs, *infos[1:]]).dump()
    crafted = asn1_pkcs12.Pfx({"version": "v3", "auth_safe": {"content_type": "data", "content": auth_safe}}).dump()
    with pytest.raises(BadMessage, match="50,000,000 key-derivation iterations"):
        read_pkcs12(crafted, "right")
