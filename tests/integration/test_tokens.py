"""Enrolment tokens on a real store (SQLite and PostgreSQL): hash only, one use, expiry, one mailbox,
replaced by a newer one; each refusal its own error, audited, and the token left unspent."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select, text

from mailkms.errors import TokenExpired, TokenInvalid, TokenReplaced, TokenUsed, TokenWrongMailbox
from mailkms.pki import KeyType
from mailkms.services import Services, token_hash
from mailkms.services._tokens import redeem_token
from mailkms.store import AuditRecord, Certificate, Token, User
from tests.conftest import START, make_csr
from tests.testca import key_of

ALICE = "alice@example.org"
BOB = "bob@example.org"
ONE_SECOND = dt.timedelta(seconds=1)


def transport() -> str:
    """The client's transport certificate, from a key made once per session."""
    from mailkms.client._core import _transport_certificate

    cert = _transport_certificate(key_of(KeyType.RSA2048, tag=20), "t@example.org", START)
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def enrol(services: Services, mailbox: str, token: str) -> int:
    csr, _ = make_csr(mailbox, key_of(KeyType.P256, tag=20))
    return services.enrolment.enrol(mailbox, token, csr, transport()).generation


def refusals(services: Services) -> list[str]:
    """Enrolment refusals as the audit chain holds them once the counts are written: a token
    refusal comes before any proof, so it is a count (with the mailbox only when the caller held
    a real token of it), never a record per request."""
    services.refusals.flush()
    with services.db.transaction() as session:
        rows = session.execute(
            select(AuditRecord).where(AuditRecord.action.in_(["enrolment.refused", "refusals.counted"]))
        ).scalars()
        found = []
        for r in rows:
            d = json.loads(r.details)
            count = f" x{d['count']}" if r.action == "refusals.counted" else ""
            found.append(f"{r.action} {d.get('refused', '')}{d['reason']}{count} {r.subject}")
        return found


def redeem(services: Services, mailbox: str, token: str) -> None:
    """The token rule alone, in a transaction of its own (rolled back on refusal)."""
    with services.db.transaction() as session:
        user = session.execute(select(User).where(User.email == mailbox)).scalar_one_or_none()
        redeem_token(session, user, token, services.clock.now())


# --- storage -------------------------------------------------------------------------------------------
def test_only_the_hash_is_stored(services: Services) -> None:
    token = services.users.add(ALICE, "Alice", None, "admin:test")
    with services.db.engine.connect() as conn:
        for table in ("tokens", "users", "audit_log", "audit_head"):
            for row in conn.execute(text(f"SELECT * FROM {table}")):
                assert all(token not in str(value) for value in row), table
    with services.db.transaction() as session:
        row = session.execute(select(Token)).scalar_one()
        assert row.token_hash == token_hash(token)
        assert row.expires_at == services.clock.now() + dt.timedelta(days=7)


# --- the rules, one error each -------------------------------------------------------------------------------
def test_a_token_works_once(services: Services) -> None:
    token = services.users.add(ALICE, "Alice", None, "admin:test")
    assert enrol(services, ALICE, token) == 1
    with pytest.raises(TokenUsed):
        enrol(services, ALICE, token)
    assert refusals(services) == [f"refusals.counted enrolment.refusedtoken-used x1 {ALICE}"]


@pytest.mark.parametrize(("offset", "accepted"), [(-ONE_SECOND, True), (dt.timedelta(0), True), (ONE_SECOND, False)])
def test_expiry_to_the_second(services: Services, offset: dt.timedelta, accepted: bool) -> None:
    token = services.users.add(ALICE, "Alice", None, "admin:test")
    services.clock.advance(dt.timedelta(days=7) + offset)  # type: ignore[attr-defined]
    if accepted:
        redeem(services, ALICE, token)
    else:
        with pytest.raises(TokenExpired, match="expired at"):
            redeem(services, ALICE, token)


def test_an_expired_token_is_refused_at_enrolment_and_audited(services: Services) -> None:
    token = services.users.add(ALICE, "Alice", None, "admin:test")
    services.clock.advance(dt.timedelta(days=8))  # type: ignore[attr-defined]
    with pytest.raises(TokenExpired):
        enrol(services, ALICE, token)
    assert refusals(services) == [f"refusals.counted enrolment.refusedtoken-expired x1 {ALICE}"]
    assert services.users.show(ALICE).generation == 0


@pytest.mark.parametrize("claimed", [BOB, "carol@example.org"], ids=["another-user", "unknown-mailbox"])
def test_a_token_is_bound_to_its_mailbox(services: Services, claimed: str) -> None:
    alice_token = services.users.add(ALICE, "Alice", None, "admin:test")
    services.users.add(BOB, "Bob", None, "admin:test")
    with pytest.raises(TokenWrongMailbox):
        enrol(services, claimed, alice_token)
    assert refusals(services) == ["refusals.counted enrolment.refusedtoken-wrong-mailbox x1 -"]
    assert enrol(services, ALICE, alice_token) == 1  # the refusal did not spend it


def test_a_newer_token_replaces_the_older_one(services: Services) -> None:
    first = services.users.add(ALICE, "Alice", None, "admin:test")
    second = services.users.reenroll(ALICE, "admin:test")
    with pytest.raises(TokenReplaced) as caught:
        enrol(services, ALICE, first)
    assert caught.value.code == "token-replaced"
    assert enrol(services, ALICE, second) == 1


def test_an_unknown_token_is_invalid(services: Services) -> None:
    services.users.add(ALICE, "Alice", None, "admin:test")
    with pytest.raises(TokenInvalid) as caught:
        enrol(services, ALICE, "not-a-token-anyone-was-given")
    assert type(caught.value) is TokenInvalid
    assert refusals(services) == ["refusals.counted enrolment.refusedtoken-invalid x1 -"]


def test_the_refusals_are_distinct_errors() -> None:
    kinds = [TokenInvalid, TokenUsed, TokenExpired, TokenWrongMailbox, TokenReplaced]
    assert len({k.code for k in kinds}) == len(kinds)


def test_reenrolment_after_use_gives_a_working_token(services: Services) -> None:
    token = services.users.add(ALICE, "Alice", None, "admin:test")
    assert enrol(services, ALICE, token) == 1
    again = services.users.reenroll(ALICE, "admin:test")
    assert enrol(services, ALICE, again) == 2
    with pytest.raises(TokenUsed):
        enrol(services, ALICE, again)
    assert services.verify_audit().ok


# --- the request's names are never certified ------------------------------------------------------------------
def test_the_csr_subject_is_never_copied(services: Services) -> None:
    token = services.users.add(ALICE, "Alice", None, "admin:test")
    csr, _ = make_csr("mallory@evil.example", key_of(KeyType.P256, tag=20), cn="Mallory")
    services.enrolment.enrol(ALICE, token, csr, transport())
    with services.db.transaction() as session:
        ders = [c.der for c in session.execute(select(Certificate)).scalars()]
    assert len(ders) == 2
    for der in ders:
        cert = x509.load_der_x509_certificate(der)
        assert {a.value for a in cert.subject} == {ALICE}
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.RFC822Name
        ) == [ALICE]
        assert b"mallory" not in der and b"Mallory" not in der


@pytest.mark.parametrize("address", ["mailkms@kms.example.org", " MailKMS@KMS.example.org "])
def test_the_servers_own_mail_identity_cannot_be_registered(services: Services, address: str) -> None:
    from mailkms.errors import ReservedMailbox

    assert services.settings.server.effective_mail_from == "mailkms@kms.example.org"
    with pytest.raises(ReservedMailbox, match="server's own mail identity") as refused:
        services.users.add(address, "", None, "admin:test")
    assert refused.value.exit_code == 6
    with services.db.transaction() as session:
        assert session.execute(select(User)).first() is None
    services.users.add("mailkms2@kms.example.org", "", None, "admin:test")  # a neighbour is fine
