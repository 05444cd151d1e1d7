"""The HTTP API in process (ASGI), on SQLite and PostgreSQL: problem documents and the signed requests."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from fastapi.testclient import TestClient

from mailkms.api import create_app
from mailkms.pki import sign_request
from tests.conftest import make_csr, transport_pem

BASE = "http://testserver"


def _enrol(client: TestClient, services, mailbox: str):  # type: ignore[no-untyped-def]
    token = services.users.add(mailbox, "", None, "admin:test")
    csr, key = make_csr(mailbox)
    pem, _, _ = transport_pem(mailbox)
    resp = client.post(
        "/api/v1/enrolments",
        json={"mailbox": mailbox, "token": token, "csr": csr.decode(), "transport_certificate": pem},
    )
    assert resp.status_code == 202, resp.text
    serial = next(c.serial for c in services.users.show(mailbox).certificates if c.kind == "signing")
    from sqlalchemy import select

    from mailkms.store import Certificate

    with services.db.transaction() as session:
        der = session.execute(select(Certificate.der).where(Certificate.serial == serial)).scalar_one()
    return key, x509.load_der_x509_certificate(der), token, resp.json()


def _signed(client: TestClient, key, cert, path: str, payload: dict) -> dict:  # type: ignore[no-untyped-def]
    nonce = client.head("/api/v1/nonce").headers["Replay-Nonce"]
    return sign_request(key, [cert], nonce, BASE + path, payload)


def test_enrolment_renewal_status_and_problems(services, clock) -> None:
    client = TestClient(create_app(services))
    key, cert, token, accepted = _enrol(client, services, "alice@example.org")
    assert accepted["mail_from"] == "mailkms@kms.example.org" and accepted["generation"] == 1

    again = client.post(
        "/api/v1/enrolments",
        json={
            "mailbox": "alice@example.org",
            "token": token,
            "csr": make_csr("alice@example.org")[0].decode(),
            "transport_certificate": transport_pem()[0],
        },
    )
    assert again.status_code == 401
    assert again.headers["content-type"] == "application/problem+json"
    assert again.json()["type"] == "urn:mailkms:problem:token-used"

    status = client.post(
        "/api/v1/status", json=_signed(client, key, cert, "/api/v1/status", {"mailbox": "alice@example.org"})
    )
    assert status.status_code == 200 and status.json()["state"] == "ACTIVE"

    early = client.post(
        "/api/v1/renewals",
        json=_signed(
            client,
            key,
            cert,
            "/api/v1/renewals",
            {"mailbox": "alice@example.org", "csr": make_csr("alice@example.org")[0].decode()},
        ),
    )
    assert early.status_code == 403 and early.json()["type"] == "urn:mailkms:problem:not-due"

    clock.advance(dt.timedelta(days=380))
    body = _signed(
        client,
        key,
        cert,
        "/api/v1/renewals",
        {"mailbox": "alice@example.org", "csr": make_csr("alice@example.org")[0].decode()},
    )
    ok = client.post("/api/v1/renewals", json=body, headers={"Content-Type": "application/jose+json"})
    assert ok.status_code == 202, ok.text
    replay = client.post("/api/v1/renewals", json=body)
    assert replay.status_code == 401 and replay.json()["type"] == "urn:mailkms:problem:nonce-reused"

    clock.advance(dt.timedelta(days=200))  # past the old certificate's end
    expired = client.post(
        "/api/v1/status", json=_signed(client, key, cert, "/api/v1/status", {"mailbox": "alice@example.org"})
    )
    assert expired.status_code == 200 and expired.json()["state"] == "ACTIVE", "status follows the user's current pair"

    bad = client.post("/api/v1/renewals", json={"protected": "x", "payload": "y", "signature": "z"})
    assert bad.status_code == 400 and bad.json()["type"] == "urn:mailkms:problem:bad-jws"
    missing = client.post("/api/v1/renewals", json={"nothing": 1})
    assert missing.status_code == 400 and missing.json()["type"] == "urn:mailkms:problem:malformed"


def test_group_policy_sets_lifetime_and_reminder(data_dir, db_url, clock) -> None:
    from mailkms.config import load_settings
    from mailkms.services import Services
    from tests.conftest import CA_PASSPHRASE, PUBLIC_URL

    settings = load_settings(
        data_dir,
        database_url=db_url,
        ca_passphrase=CA_PASSPHRASE,
        server={"public_url": PUBLIC_URL},
        policy={"groups": {"contractors": {"lifetime_months": 6, "reminder_months": 4}}},
    )
    services = Services.build(settings, clock)
    try:
        token = services.users.add("carol@example.org", "", "contractors", "admin:test")
        csr, _ = make_csr("carol@example.org")
        services.enrolment.enrol("carol@example.org", token, csr, transport_pem()[0])
        view = services.users.show("carol@example.org")
        start = clock.now().replace(microsecond=0)
        assert (
            view.expires_at
            == dt.datetime(2026, 7, 15, 9, 29, 59, tzinfo=dt.UTC)
            == start.replace(month=7) - dt.timedelta(seconds=1)
        )
        assert view.reminder_at == start.replace(month=5)
        clock.set(view.reminder_at - dt.timedelta(seconds=1))
        assert services.users.show("carol@example.org").state.value == "ACTIVE"
        clock.advance(dt.timedelta(seconds=1))
        assert services.users.show("carol@example.org").state.value == "DUE"
    finally:
        services.close()
