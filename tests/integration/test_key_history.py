"""A key store with a history of encryption keys: export to one PKCS#12 that openssl and NSS import
with every key, decrypt old mail, and verification with a pluggable revocation check."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from mailkms.client import Client
from mailkms.client._http import Api
from mailkms.client._mail import CRLChecker, SecureMail, import_pkcs12
from mailkms.clock import FakeClock
from mailkms.errors import ClientStateError, UntrustedCertificate
from mailkms.pki import KeyEntry, build_pkcs12, ca_key_id, encrypt_message, fingerprint_sha256, sign_detached
from tests.smime_support import MESSAGE, NOW, Identity, SmimePKI, make_pki, require_nss, run

PASS = b"key-store-passphrase"
EXPORT_PW = "export-password-made-at-run-time"


@pytest.fixture(scope="module")
def pki(smime_pki: SmimePKI) -> SmimePKI:
    return smime_pki


@pytest.fixture(scope="module")
def generations(pki: SmimePKI) -> list[Identity]:
    """Three generations of alice's pairs: now, about 13 and 26 months ago (the old ones expired)."""
    return [pki.identity("alice@example.org", start=NOW - dt.timedelta(days=d)) for d in (1, 400, 800)]


def _store(tmp_path: Path, pki: SmimePKI, generations: list[Identity]) -> tuple[SecureMail, FakeClock]:
    entries = [KeyEntry(generations[0].signing_key, generations[0].signing, "signing")]
    entries += [KeyEntry(g.encryption_key, g.encryption, f"enc {n}") for n, g in enumerate(generations)]
    data = build_pkcs12(entries, [pki.issuing, pki.root], "pw-for-moving", iterations=1000, mac_iterations=1000)
    clock = FakeClock(NOW)
    import_pkcs12(tmp_path / "home", data, "pw-for-moving", PASS, clock, fingerprint=fingerprint_sha256(pki.root))
    return SecureMail(Client(tmp_path / "home", clock, lambda: PASS), clock), clock


def test_old_mail_opens_with_old_keys(tmp_path: Path, pki: SmimePKI, generations: list[Identity]) -> None:
    mail, _ = _store(tmp_path, pki, generations)
    for gen in generations:
        plain, cert = mail.decrypt(encrypt_message(MESSAGE, [gen.encryption]))
        assert cert == gen.encryption and b"attached in spirit" in plain


def test_export_holds_every_key_and_openssl_and_nss_import_them(
    tmp_path: Path, pki: SmimePKI, generations: list[Identity]
) -> None:
    mail, _ = _store(tmp_path, pki, generations)
    data, names = mail.export(EXPORT_PW)
    months = [g.encryption.not_valid_before_utc.strftime("%Y-%m") for g in generations]
    assert names == [
        f"alice@example.org signing {months[0]}",
        f"alice@example.org encryption {months[0]}",
        f"alice@example.org encryption {months[1]} (old)",
        f"alice@example.org encryption {months[2]} (old)",
    ]
    p12 = tmp_path / "keys.p12"
    p12.write_bytes(data)
    info = run(["openssl", "pkcs12", "-info", "-in", str(p12), "-passin", f"pass:{EXPORT_PW}", "-noout"])
    text = (info.stdout + info.stderr).decode()
    assert text.count("Shrouded Keybag: PBES2, PBKDF2, AES-256-CBC, Iteration 600000, PRF hmacWithSHA256") == 4
    assert "MAC: sha256, Iteration 600000" in text
    certs = run(["openssl", "pkcs12", "-in", str(p12), "-passin", f"pass:{EXPORT_PW}", "-nokeys", "-cacerts"]).stdout
    assert certs.count(b"BEGIN CERTIFICATE") == 2  # the chain: issuing and root
    require_nss()
    db = tmp_path / "nssdb"
    db.mkdir()
    run(["certutil", "-N", "-d", f"sql:{db}", "--empty-password"])
    run(["pk12util", "-i", str(p12), "-d", f"sql:{db}", "-W", EXPORT_PW])
    listed = run(["certutil", "-K", "-d", f"sql:{db}"]).stdout.decode()
    for name in names:
        assert name in listed
    chain = run(["certutil", "-L", "-d", f"sql:{db}"]).stdout.decode()
    assert "S/MIME Root CA" in chain and "S/MIME Issuing CA" in chain


def test_import_refuses_a_foreign_root_and_an_existing_store(
    tmp_path: Path, pki: SmimePKI, generations: list[Identity]
) -> None:
    entries = [KeyEntry(generations[0].signing_key, generations[0].signing, "s")]
    entries += [KeyEntry(generations[0].encryption_key, generations[0].encryption, "e")]
    data = build_pkcs12(entries, [pki.issuing, pki.root], "pw", iterations=1000, mac_iterations=1000)
    with pytest.raises(UntrustedCertificate):
        import_pkcs12(tmp_path / "a", data, "pw", PASS, FakeClock(NOW), fingerprint="00" * 32)
    import_pkcs12(tmp_path / "b", data, "pw", PASS, FakeClock(NOW))
    with pytest.raises(ClientStateError):
        import_pkcs12(tmp_path / "b", data, "pw", PASS, FakeClock(NOW))


def _crl(pki: SmimePKI, revoked: list[int]) -> bytes:

    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.issuing.subject)
        .last_update(NOW - dt.timedelta(hours=1))
        .next_update(NOW + dt.timedelta(days=7))
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - dt.timedelta(hours=1)).build()
        )
    return builder.sign(pki.issuer._signer.private_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_verify_says_who_signed_and_checks_revocation_through_the_cdp(
    tmp_path: Path, pki: SmimePKI, generations: list[Identity]
) -> None:
    mail, clock = _store(tmp_path, pki, generations)
    signer = pki.identity("alice@example.org")
    signed = sign_detached(MESSAGE, signer.signing, signer.signing_key, [pki.issuing])
    clock.set(dt.datetime.now(dt.UTC))  # `cryptography` writes the wall-clock signingTime
    fetched: list[str] = []

    def serve(crl: bytes):  # type: ignore[no-untyped-def]
        def fetch(url: str) -> bytes:
            fetched.append(url)
            return crl

        return fetch

    good = SecureMail(mail._client, clock, CRLChecker(serve(_crl(pki, [])))).verify(signed)
    assert good.trusted and good.revocation.status.value == "good"
    assert fetched == ["http://kms.example.org/crl/issuing.crl"]
    assert "TRUSTED" in "\n".join(good.lines()) and "Signed by alice@example.org" in good.lines()[0]
    revoked = SecureMail(mail._client, clock, CRLChecker(serve(_crl(pki, [signer.signing.serial_number])))).verify(
        signed
    )
    assert not revoked.trusted and "revoked" in " ".join(revoked.problems)

    def unreachable(url: str) -> bytes:
        raise OSError("no route")

    unknown = SecureMail(mail._client, clock, CRLChecker(unreachable)).verify(signed)
    assert unknown.trusted and "revocation not checked" in unknown.revocation.detail
    # a signature made while the certificate was valid stays valid after it expired (signing time)
    clock.advance(dt.timedelta(days=600))
    later = SecureMail(mail._client, clock, CRLChecker(unreachable)).verify(signed)
    assert later.trusted
    # an outsider's certificate is not trusted, with a reason in words
    stranger_pki = make_pki(tmp_path / "stranger")
    stranger = stranger_pki.identity("alice@example.org")
    forged = SecureMail(mail._client, clock, CRLChecker(unreachable)).verify(
        sign_detached(MESSAGE, stranger.signing, stranger.signing_key, [stranger_pki.issuing])
    )
    assert not forged.trusted and "not issued by your organisation's CA" in " ".join(forged.problems)


def test_an_unknown_issuing_ca_is_fetched_by_key_id_and_kept_only_if_the_root_signed_it(
    tmp_path: Path, pki: SmimePKI, generations: list[Identity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that has never seen the signer's issuing CA (enrolled before `mailkms ca rekey`, no
    delivery since) and a mail that carries the signer's certificate alone: the client asks its
    server for /ca/issuing/<AKI>.crt. What the server hands back counts only if the pinned root
    signed it; a CA of another root leaves the signature untrusted and is not kept."""
    mail, clock = _store(tmp_path, pki, generations)
    clock.set(dt.datetime.now(dt.UTC))
    state = mail.store.load()
    state.server = "https://kms.example.org"
    state.ca_chain_pem = [state.ca_chain_pem[-1]]  # the root only
    mail.store.save(state)
    signer = pki.identity("alice@example.org")
    signed = sign_detached(MESSAGE, signer.signing, signer.signing_key, [])  # no chain in the mail
    stranger_pki = make_pki(tmp_path / "stranger")
    asked: list[str] = []
    served = {"ca": stranger_pki.issuing}

    def issuing_ca(self, key_id: str) -> bytes:  # type: ignore[no-untyped-def]
        asked.append(key_id)
        return served["ca"].public_bytes(serialization.Encoding.DER)

    monkeypatch.setattr(Api, "issuing_ca", issuing_ca)
    offline = SecureMail(mail._client, clock, CRLChecker(lambda url: _crl(pki, [])))
    forged = offline.verify(signed)
    assert not forged.trusted and "not issued by your organisation's CA" in " ".join(forged.problems)
    assert asked == [ca_key_id(pki.issuing)]  # the key id the signer's AKI names
    assert len(mail.store.load().ca_chain_pem) == 1  # the stranger's CA was not kept
    served["ca"] = pki.issuing
    good = offline.verify(signed)
    assert good.trusted, good.problems
    assert x509.load_pem_x509_certificate(mail.store.load().ca_chain_pem[0].encode()) == pki.issuing
    assert mail.store.load().ca_chain_pem[-1] == state.ca_chain_pem[-1]  # the root stays last
    again = offline.verify(signed)
    assert again.trusted and len(asked) == 2  # known now: not fetched again
