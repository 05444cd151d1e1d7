"""EST use cases on a real store (SQLite and PostgreSQL) and a fake clock: how EST maps onto the
pair, the key hand-over, and the renewal rules shared with the update request."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import AttributeOID, NameOID
from sqlalchemy import func, select

from mailkms.errors import (
    BadCSR,
    BadNonce,
    EncryptedKeyUnsupported,
    MailkmsError,
    NoKeyToCollect,
    NonceRequired,
    NotCurrentCertificate,
    NotDue,
    ReenrolmentRequired,
    ReplayedNonce,
    Revoked,
    StaleNonce,
    StaleRequest,
    TokenInvalid,
    TokenUsed,
    TokenWrongMailbox,
    UnknownIssuer,
)
from mailkms.pki import (
    KeyType,
    PrivateKey,
    generate_key,
    load_private_key_der,
    mailboxes_of,
    open_with_secret,
    same_public_key,
    signature_hash_for,
)
from mailkms.services import HANDOVER_WINDOW, token_hash
from mailkms.store import ArchivedKey, Certificate, KeyHandover, OutboxMessage, User
from tests.conftest import make_csr

ALICE = "alice@example.org"
MONTH = dt.timedelta(days=31)


def der_csr(mailbox: str, key: PrivateKey | None = None) -> tuple[bytes, PrivateKey]:
    pem, key = make_csr(mailbox, key)
    return x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER), key


def count(services, model) -> int:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


def enrol(services, mailbox: str = ALICE) -> tuple[str, PrivateKey, x509.Certificate]:  # type: ignore[no-untyped-def]
    token = services.users.add(mailbox, "", None, "admin:test")
    csr, key = der_csr(mailbox)
    return token, key, services.est.simpleenroll(mailbox, token, csr)


# --- enrolment and the key hand-over -----------------------------------------------------------
def test_simpleenroll_issues_the_pair_and_serverkeygen_hands_over_the_archived_key(services, clock) -> None:
    token = services.users.add(ALICE, "Alice", None, "admin:test")
    csr, key = der_csr(ALICE)
    signing = services.est.simpleenroll("Alice@Example.org", token, csr)
    assert same_public_key(signing.public_key(), key.public_key())  # type: ignore[arg-type]
    assert mailboxes_of(signing) == [ALICE]
    view = services.users.show(ALICE)
    assert view.state.value == "ACTIVE" and view.generation == 1
    assert {c.kind for c in view.certificates} == {"signing", "encryption"}
    assert count(services, OutboxMessage) == 0  # no transport key: no delivery mail
    enc_serial = next(c.serial for c in view.certificates if c.kind == "encryption")
    with services.db.transaction() as session:
        assert session.execute(select(ArchivedKey).where(ArchivedKey.certificate_serial == enc_serial)).scalar_one()
        handover = session.execute(select(KeyHandover)).scalar_one()
        sealed, context = handover.sealed, f"mailkms-est|{ALICE}|{enc_serial}".encode()
    with pytest.raises(ValueError):  # what the server stores of the token does not open it
        open_with_secret(token_hash(token), sealed, context)

    got = services.est.serverkeygen(ALICE, token, der_csr(ALICE)[0])
    assert format(got.certificate.serial_number, "x") == enc_serial
    assert got.certificate.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    private = load_private_key_der(got.private_key_der)
    assert same_public_key(private.public_key(), got.certificate.public_key())  # type: ignore[arg-type]

    clock.advance(HANDOVER_WINDOW - dt.timedelta(seconds=1))  # a lost reply: the same key again
    again = services.est.serverkeygen(ALICE, token, der_csr(ALICE)[0])
    assert again.private_key_der == got.private_key_der
    clock.advance(dt.timedelta(seconds=2))
    with pytest.raises(NoKeyToCollect):
        services.est.serverkeygen(ALICE, token, der_csr(ALICE)[0])
    assert services.verify_audit().ok


def test_serverkeygen_before_simpleenroll_is_refused_and_spends_nothing(services) -> None:
    token = services.users.add(ALICE, "", None, "admin:test")
    with pytest.raises(NoKeyToCollect, match="simpleenroll"):
        services.est.serverkeygen(ALICE, token, der_csr(ALICE)[0])
    services.est.simpleenroll(ALICE, token, der_csr(ALICE)[0])  # the token still works


def test_serverkeygen_refuses_other_credentials(services) -> None:
    token, _, _ = enrol(services)
    bob_token = services.users.add("bob@example.org", "", None, "admin:test")
    with pytest.raises(TokenWrongMailbox):
        services.est.serverkeygen(ALICE, bob_token, der_csr(ALICE)[0])
    with pytest.raises(TokenInvalid):
        services.est.serverkeygen(ALICE, token + "x", der_csr(ALICE)[0])
    with pytest.raises(TokenInvalid):
        services.est.serverkeygen("not a mailbox", token, der_csr(ALICE)[0])


def test_serverkeygen_refuses_to_encrypt_the_key_to_a_named_key(services) -> None:
    token, _, _ = enrol(services)
    key = generate_key(KeyType.RSA2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.EMAIL_ADDRESS, ALICE)]))
        .add_attribute(x509.ObjectIdentifier("1.2.840.113549.1.9.16.2.54"), b"ski")
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(EncryptedKeyUnsupported):
        services.est.serverkeygen(ALICE, token, csr.public_bytes(serialization.Encoding.DER))


def test_a_request_naming_another_mailbox_is_refused_and_the_token_kept(services) -> None:
    token = services.users.add(ALICE, "", None, "admin:test")
    with pytest.raises(BadCSR, match=r"bob@example\.org"):
        services.est.simpleenroll(ALICE, token, der_csr("bob@example.org")[0])
    services.est.simpleenroll(ALICE, token, der_csr(ALICE)[0])
    with pytest.raises(TokenUsed):
        services.est.simpleenroll(ALICE, token, der_csr(ALICE)[0])
    assert count(services, KeyHandover) == 1


def test_after_revoke_the_waiting_key_is_gone_and_serverkeygen_refused_with_403(services) -> None:
    token, _, _ = enrol(services)
    other, _, _ = enrol(services, "bob@example.org")  # another user's hand-over is left alone
    services.revocation.revoke_users([ALICE], "keyCompromise", "admin:test")
    with services.db.transaction() as session:
        left = session.execute(select(User.email).join(KeyHandover, KeyHandover.user_id == User.id)).scalars().all()
    assert left == ["bob@example.org"]  # the sealed key of alice is deleted at once
    with pytest.raises(Revoked) as refused:
        services.est.serverkeygen(ALICE, token, der_csr(ALICE)[0])
    assert refused.value.http_status == 403
    assert services.est.serverkeygen("bob@example.org", other, der_csr("bob@example.org")[0]).private_key_der
    assert services.verify_audit().ok


def test_revoking_the_encryption_certificate_deletes_its_waiting_key(services) -> None:
    token, _, _ = enrol(services)
    enc = next(c.serial for c in services.users.show(ALICE).certificates if c.kind == "encryption")
    services.revocation.revoke_serial(enc, "keyCompromise", "admin:test")
    assert count(services, KeyHandover) == 0
    with pytest.raises(MailkmsError) as refused:
        services.est.serverkeygen(ALICE, token, der_csr(ALICE)[0])
    assert refused.value.http_status == 403


def test_sealed_keys_are_deleted_when_their_hour_ends(services, clock) -> None:
    enrol(services)
    enrol(services, "bob@example.org")
    assert services.est.purge() == 0 and count(services, KeyHandover) == 2
    clock.advance(HANDOVER_WINDOW + dt.timedelta(seconds=1))
    assert services.est.purge() == 2  # by the housekeeping that serve runs
    assert count(services, KeyHandover) == 0

    carol, _, _ = enrol(services, "carol@example.org")
    clock.advance(HANDOVER_WINDOW + dt.timedelta(seconds=1))
    with pytest.raises(NoKeyToCollect):  # or on the next access, though the refusal rolls back
        services.est.serverkeygen("carol@example.org", carol, der_csr("carol@example.org")[0])
    assert count(services, KeyHandover) == 0


# --- re-enrolment: the renewal rules ---------------------------------------------------------------
def reenrol_csr(key: PrivateKey, nonce: str | None = None, mailbox: str = ALICE) -> bytes:
    """A bare renewal request; with `nonce`, that nonce as its challengePassword (without, rekey's inner CSR)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, mailbox)])
    )
    if nonce is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, nonce.encode())
    return builder.sign(key, signature_hash_for(key)).public_bytes(serialization.Encoding.DER)


def renew_csr(services, key: PrivateKey, mailbox: str = ALICE) -> bytes:  # type: ignore[no-untyped-def]
    """What an EST client sends: a fresh nonce from the server in the challengePassword."""
    return reenrol_csr(key, services.nonces.new(), mailbox)


def test_simplereenroll_renews_when_due_once_and_repeats_answer_the_same(services, clock) -> None:
    _, key, first = enrol(services)
    clock.advance(6 * MONTH)
    with pytest.raises(NotDue):
        services.est.simplereenroll(renew_csr(services, key))
    with pytest.raises(NotCurrentCertificate):  # proof by another key
        services.est.simplereenroll(renew_csr(services, generate_key(KeyType.RSA2048)))
    clock.advance(6 * MONTH)  # past the 12-month reminder point
    renewed = services.est.simplereenroll(renew_csr(services, key))
    assert renewed.serial_number != first.serial_number
    assert same_public_key(renewed.public_key(), key.public_key())  # type: ignore[arg-type]
    assert services.users.show(ALICE).generation == 2
    with services.db.transaction() as session:  # the encryption pair goes by mail, as for every renewal
        assert session.execute(select(OutboxMessage.purpose)).scalars().all() == ["delivery:renewal"]
    repeat = services.est.simplereenroll(renew_csr(services, key))  # a lost reply: asked again, a new nonce
    assert repeat.serial_number == renewed.serial_number
    assert services.users.show(ALICE).generation == 2
    assert services.verify_audit().ok


def test_a_captured_bare_renewal_request_replayed_is_refused(services, clock) -> None:
    """Issue 12 §10: the request's own signature proves the key but not freshness; the server's nonce
    in its challengePassword does, spent once. Replayed at once: nonce-reused; a year later, when the
    renewed pair is due again and would otherwise be renewed without the user: nonce-stale."""
    _, key, _ = enrol(services)
    clock.advance(12 * MONTH)
    spent = services.nonces.spent()
    with pytest.raises(NonceRequired, match="challengePassword"):  # the old bare form: no nonce
        services.est.simplereenroll(reenrol_csr(key))
    with pytest.raises(BadNonce, match="unknown"):  # a nonce this server never made
        services.est.simplereenroll(reenrol_csr(key, "A" * 55))
    other = reenrol_csr(generate_key(KeyType.RSA2048), services.nonces.new())
    with pytest.raises(NotCurrentCertificate):  # no proof: the nonce is not spent either
        services.est.simplereenroll(other)
    assert services.nonces.spent() == spent  # refusals before the proof write nothing

    captured = renew_csr(services, key)
    renewed = services.est.simplereenroll(captured)  # the first request works
    assert services.users.show(ALICE).generation == 2
    assert services.nonces.spent() == spent + 1
    with pytest.raises(ReplayedNonce, match="replayed"):
        services.est.simplereenroll(captured)
    clock.advance(12 * MONTH)  # generation 2 is due now: the replay would renew it without Alice
    with pytest.raises(StaleNonce):
        services.est.simplereenroll(captured)
    assert services.users.show(ALICE).generation == 2
    with services.db.transaction() as session:
        assert session.execute(select(OutboxMessage.purpose)).scalars().all() == ["delivery:renewal"]
    again = services.est.simplereenroll(renew_csr(services, key))  # Alice herself, with a fresh nonce
    assert again.serial_number != renewed.serial_number
    assert services.users.show(ALICE).generation == 3
    assert services.verify_audit().ok


def test_simplereenroll_refuses_expired_and_revoked(services, clock) -> None:
    _, key, _ = enrol(services)
    _, bob_key, _ = enrol(services, "bob@example.org")
    with services.db.transaction() as session:
        bob = session.execute(select(User).where(User.email == "bob@example.org")).scalar_one()
        bob.status = "revoked"
        for cert in session.execute(select(Certificate).where(Certificate.user_id == bob.id)).scalars():
            cert.revoked_at = clock.now()
    clock.advance(13 * MONTH)
    with pytest.raises(Revoked):
        services.est.simplereenroll(renew_csr(services, bob_key, "bob@example.org"))
    clock.advance(6 * MONTH)
    with pytest.raises(ReenrolmentRequired):
        services.est.simplereenroll(renew_csr(services, key))


def test_simplereenroll_needs_a_mailbox_in_the_request(services, clock) -> None:
    _, key, _ = enrol(services)
    bare = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_attribute(AttributeOID.CHALLENGE_PASSWORD, services.nonces.new().encode())
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(BadCSR, match="subject"):
        services.est.simplereenroll(bare.public_bytes(serialization.Encoding.DER))


# --- rekey: the new request signed with the current key (openssl cms, at the fake time) -----------
def openssl_sign(tmp: Path, at: dt.datetime, cert: x509.Certificate, key: PrivateKey, content: bytes) -> bytes:
    (tmp / "signer.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "signer.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (tmp / "content.der").write_bytes(content)
    command = ["openssl", "cms", "-sign", "-nodetach", "-binary", "-outform", "DER"]
    command += ["-in", str(tmp / "content.der"), "-signer", str(tmp / "signer.pem"), "-inkey", str(tmp / "signer.key")]
    faked = ["faketime", at.strftime("%Y-%m-%d %H:%M:%S"), *command]
    return subprocess.run(faked, capture_output=True, check=True, env={**os.environ, "TZ": "UTC"}).stdout


def test_rekey_with_a_request_signed_by_the_current_key(services, clock, tmp_path: Path) -> None:
    _, key, first = enrol(services)
    clock.advance(12 * MONTH)
    new_key = generate_key(KeyType.P256)
    new_csr = reenrol_csr(new_key)
    stale = openssl_sign(tmp_path, clock.now() - dt.timedelta(hours=1), first, key, new_csr)
    with pytest.raises(StaleRequest):
        services.est.simplereenroll_signed(stale)
    signed = openssl_sign(tmp_path, clock.now(), first, key, new_csr)
    renewed = services.est.simplereenroll_signed(signed)
    assert same_public_key(renewed.public_key(), new_key.public_key())  # type: ignore[arg-type]
    assert services.est.simplereenroll_signed(signed).serial_number == renewed.serial_number  # a repeat

    outsider_key = generate_key(KeyType.RSA2048)
    outsider = (
        x509.CertificateBuilder()
        .subject_name(first.subject)
        .issuer_name(first.subject)
        .public_key(outsider_key.public_key())
        .serial_number(first.serial_number)
        .not_valid_before(first.not_valid_before_utc)
        .not_valid_after(first.not_valid_after_utc)
        .sign(outsider_key, hashes.SHA256())
    )
    with pytest.raises(UnknownIssuer):
        services.est.simplereenroll_signed(openssl_sign(tmp_path, clock.now(), outsider, outsider_key, new_csr))
