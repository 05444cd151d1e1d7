"""Renewal through the services on real stores (SQLite and PostgreSQL) with a fake clock."""

from __future__ import annotations

import datetime as dt
import json
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select

from mailkms.errors import (
    BadCSRSignature,
    BadNonce,
    BadSignature,
    MailkmsError,
    NotCurrentCertificate,
    NotDue,
    NotOwner,
    ReenrolmentRequired,
    ReplayedNonce,
    StaleNonce,
    UnknownIssuer,
    URLMismatch,
)
from mailkms.pki import KeyType, generate_key, open_delivery, sign_request
from mailkms.store import AuditRecord, IssuanceRequest, OutboxMessage
from tests.conftest import make_csr, transport_pem

URL = "https://localhost:8443/api/v1/renewals"
RESYNC_URL = "https://localhost:8443/api/v1/resync"


class Enrolled:
    def __init__(self, services, mailbox: str) -> None:  # type: ignore[no-untyped-def]
        self.mailbox = mailbox
        token = services.users.add(mailbox, "", None, "admin:test")
        csr, self.signing_key = make_csr(mailbox)
        pem, _, _ = transport_pem(mailbox)
        services.enrolment.enrol(mailbox, token, csr, pem)
        with services.db.transaction() as session:
            from mailkms.services._users import current_signing
            from mailkms.store import User

            user = session.execute(select(User).where(User.email == mailbox)).scalar_one()
            self.cert = x509.load_der_x509_certificate(current_signing(session, user).der)


def _request(
    services,
    who: Enrolled,
    *,
    url: str = URL,
    nonce: str | None = None,
    payload: dict | None = None,
    key=None,
    cert=None,
):  # type: ignore[no-untyped-def]
    csr, _ = make_csr(who.mailbox)
    body = payload if payload is not None else {"mailbox": who.mailbox, "csr": csr.decode()}
    return sign_request(key or who.signing_key, [cert or who.cert], nonce or services.nonces.new(), url, body)


def _pairs(services) -> int:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        return int(session.execute(select(func.count()).select_from(IssuanceRequest)).scalar_one())


def _refusals(services, reason: str, kind: str | None = None) -> int:  # type: ignore[no-untyped-def]
    """Renewal refusals with this code in the audit chain: records of their own (the signer was a
    known user) plus counts of anonymous ones, once written. `kind` keeps one of the two."""
    services.refusals.flush()
    total = 0
    with services.db.transaction() as session:
        rows = session.execute(
            select(AuditRecord).where(AuditRecord.action.in_(["renewal.refused", "refusals.counted"]))
        ).scalars()
        for r in rows:
            d = json.loads(r.details)
            if d["reason"] != reason:
                continue
            if r.action == "renewal.refused" and kind in (None, "own"):
                total += 1
            elif r.action == "refusals.counted" and d["refused"] == "renewal.refused" and kind in (None, "counted"):
                total += int(d["count"])
    return total


def test_renewal_issues_new_pair_from_the_renewal_time(services, clock) -> None:
    alice = Enrolled(services, "alice@example.org")
    clock.advance(dt.timedelta(days=380))
    accepted = services.renewal.renew(_request(services, alice), URL)
    assert accepted.generation == 2 and not accepted.already_issued
    with services.db.transaction() as session:
        mail = session.execute(select(OutboxMessage).order_by(OutboxMessage.id.desc())).scalars().first()
        assert mail is not None and mail.purpose == "delivery:renewal"
        content = open_delivery(mail.body)
    signing = next(c for c in content.certificates if format(c.serial_number, "x") == content.manifest.signing_serial)
    from dateutil.relativedelta import relativedelta

    now = clock.now().replace(microsecond=0)
    assert signing.not_valid_before_utc == now
    assert signing.not_valid_after_utc == now + relativedelta(months=18) - dt.timedelta(seconds=1)
    assert services.users.show("alice@example.org").state.value == "ACTIVE"


def test_not_due_before_the_reminder_point(services, clock) -> None:
    alice = Enrolled(services, "alice@example.org")
    clock.advance(dt.timedelta(days=300))
    with pytest.raises(NotDue):
        services.renewal.renew(_request(services, alice), URL)


def test_expiry_plus_one_second_requires_reenrolment(services, clock) -> None:
    alice = Enrolled(services, "alice@example.org")
    clock.set(alice.cert.not_valid_after_utc)
    body = _request(services, alice)
    clock.advance(dt.timedelta(seconds=1))
    with pytest.raises(ReenrolmentRequired):
        services.renewal.renew(body, URL)
    assert _pairs(services) == 1
    assert _refusals(services, "reenrolment-required") == 1


@pytest.mark.parametrize(
    "attack",
    ["replayed", "stale", "unknown-nonce", "forged", "other-ca", "other-user", "url", "bad-csr", "old-cert"],
)
def test_each_attack_refused_with_its_own_type(services, clock, attack: str) -> None:
    alice = Enrolled(services, "alice@example.org")
    bob = Enrolled(services, "bob@example.org")
    clock.advance(dt.timedelta(days=380))
    expected: type[MailkmsError]
    if attack == "replayed":
        body = _request(services, alice)
        services.renewal.renew(body, URL)
        expected, args = ReplayedNonce, (body, URL)
    elif attack == "stale":
        nonce = services.nonces.new()
        clock.advance(dt.timedelta(hours=1))
        expected, args = StaleNonce, (_request(services, alice, nonce=nonce), URL)
    elif attack == "unknown-nonce":
        expected, args = BadNonce, (_request(services, alice, nonce="made-up"), URL)
    elif attack == "forged":
        expected, args = BadSignature, (_request(services, alice, key=generate_key(KeyType.RSA2048)), URL)
    elif attack == "other-ca":
        # a certificate for alice from a CA of the attacker's making
        from mailkms.pki import PublicURLs, SoftSigner, make_issuing_ca, make_root
        from mailkms.pki._issuer import Issuer
        from mailkms.pki._profiles import CertKind
        from mailkms.pki._validity import subscriber_validity

        rk = generate_key(KeyType.P256)
        root = make_root(rk, "evil", None, clock.now())
        ik = generate_key(KeyType.P256)
        issuing = make_issuing_ca(
            SoftSigner(root, rk), ik, "evil", None, PublicURLs("http://evil.example/"), clock.now()
        )
        key = generate_key(KeyType.P256)
        issuer = Issuer(SoftSigner(issuing, ik), PublicURLs("http://evil.example/"))
        cert = issuer.issue(
            issuer.prepare_subscriber(
                CertKind.SIGNING,
                "alice@example.org",
                key.public_key(),
                subscriber_validity(clock.now(), 18),
                list(KeyType),
            )
        )
        expected, args = UnknownIssuer, (_request(services, alice, key=key, cert=cert), URL)
    elif attack == "other-user":
        csr, _ = make_csr("bob@example.org")
        body = _request(services, alice, payload={"mailbox": "bob@example.org", "csr": csr.decode()})
        expected, args = NotOwner, (body, URL)
    elif attack == "url":
        expected, args = URLMismatch, (_request(services, alice, url="https://evil.example/api/v1/renewals"), URL)
    elif attack == "bad-csr":
        csr, _ = make_csr("alice@example.org")
        der = bytearray(x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER))
        der[-1] ^= 0x01  # the last byte of the signature
        broken = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
        body = _request(services, alice, payload={"mailbox": "alice@example.org", "csr": broken.decode()})
        expected, args = (BadCSRSignature, (body, URL))
    else:  # a certificate two generations old
        services.renewal.renew(_request(services, alice), URL)
        clock.advance(dt.timedelta(days=400))
        with services.db.transaction() as session:
            from mailkms.services._users import current_signing
            from mailkms.store import User

            user = session.execute(select(User).where(User.email == "alice@example.org")).scalar_one()
            user.generation += 1  # pretend a further renewal happened
            del current_signing
        expected, args = NotCurrentCertificate, (_request(services, alice), URL)
    before = _pairs(services)
    with pytest.raises(expected) as info:
        services.renewal.renew(*args)
    assert info.value.code == expected.code
    assert _pairs(services) == before, "nothing issued on a refusal"
    # A refusal after the signer proved to be a known user is a record of its own; before, a count.
    kind = "own" if attack in ("other-user", "bad-csr", "old-cert") else "counted"
    assert _refusals(services, expected.code, kind) == 1, "the refusal is audited, once"
    assert _refusals(services, expected.code) == 1
    del bob


def test_concurrent_requests_and_retries_issue_one_pair(services, clock) -> None:
    alice = Enrolled(services, "alice@example.org")
    clock.advance(dt.timedelta(days=380))
    bodies = [_request(services, alice) for _ in range(4)]
    results: list[object] = []

    def go(body: dict) -> None:  # type: ignore[type-arg]
        try:
            results.append(services.renewal.renew(body, URL))
        except MailkmsError as exc:
            results.append(exc)

    threads = [threading.Thread(target=go, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = {getattr(r, "request_id", None) for r in results}
    assert len(ids) == 1 and None not in ids, results
    assert _pairs(services) == 2  # enrolment + exactly one renewal
    with services.db.transaction() as session:
        renewals = session.execute(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.purpose == "delivery:renewal")
        ).scalar_one()
    assert renewals == 1


def test_resync_sends_the_latest_reply_again_and_issues_nothing(services, clock) -> None:
    alice = Enrolled(services, "alice@example.org")
    clock.advance(dt.timedelta(days=380))
    first = services.renewal.renew(_request(services, alice), URL)
    again = services.renewal.resync(
        _request(services, alice, url=RESYNC_URL, payload={"mailbox": alice.mailbox}), RESYNC_URL
    )
    assert again.request_id == first.request_id
    assert _pairs(services) == 2
    with services.db.transaction() as session:
        purposes = session.execute(select(OutboxMessage.purpose)).scalars().all()
    assert purposes.count("delivery:resync") == 1
