"""The directory on a real store (SQLite and PostgreSQL): served while ACTIVE or DUE, never otherwise."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from fastapi.testclient import TestClient
from sqlalchemy import select

from mailkms.api import create_app
from mailkms.pki import load_certs_only, mailboxes_of
from mailkms.store import User
from tests.conftest import make_csr, transport_pem

CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"


def _enrol(services, mailbox: str) -> None:  # type: ignore[no-untyped-def]
    token = services.users.add(mailbox, "", None, "admin:test")
    csr, _ = make_csr(mailbox)
    pem, _, _ = transport_pem(mailbox)
    services.enrolment.enrol(mailbox, token, csr, pem)


def _encryption_serial(services, mailbox: str) -> str:  # type: ignore[no-untyped-def]
    view = services.users.show(mailbox)
    return next(c.serial for c in view.certificates if c.kind == "encryption" and c.generation == view.generation)


def test_active_user_is_served_as_certs_only_and_pem(services) -> None:  # type: ignore[no-untyped-def]
    _enrol(services, "alice@example.org")
    http = TestClient(create_app(services))
    resp = http.get("/api/v1/directory/Alice@Example.org")
    assert resp.status_code == 200 and resp.headers["content-type"] == CERTS_ONLY
    leaf, issuing = load_certs_only(resp.content)
    assert mailboxes_of(leaf) == ["alice@example.org"]
    assert format(leaf.serial_number, "x") == _encryption_serial(services, "alice@example.org")
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    assert issuing == services.ca.issuing.certificate
    for pem_resp in (
        http.get("/api/v1/directory/alice@example.org", params={"format": "pem"}),
        http.get("/api/v1/directory/alice@example.org", headers={"Accept": "application/pem-certificate-chain"}),
    ):
        assert pem_resp.headers["content-type"] == "application/pem-certificate-chain"
        assert x509.load_pem_x509_certificates(pem_resp.content) == [leaf, issuing]


def test_revoked_expired_unenrolled_and_unknown_users_are_not_served(services, clock) -> None:  # type: ignore[no-untyped-def]
    _enrol(services, "rita@example.org")
    _enrol(services, "ed@example.org")
    services.users.add("nora@example.org", "", None, "admin:test")  # token only
    with services.db.transaction() as session:
        user = session.execute(select(User).where(User.email == "rita@example.org")).scalar_one()
        user.status = "revoked"
    http = TestClient(create_app(services))
    for mailbox in ("rita@example.org", "nora@example.org", "nobody@example.org"):
        resp = http.get(f"/api/v1/directory/{mailbox}")
        assert resp.status_code == 404, mailbox
        assert resp.headers["content-type"] == "application/problem+json"
        assert resp.json()["type"].endswith(":not-in-directory")
    assert http.get("/api/v1/directory/ed@example.org").status_code == 200
    clock.advance(dt.timedelta(days=31 * 18 + 1))  # past notAfter: EXPIRED
    assert http.get("/api/v1/directory/ed@example.org").status_code == 404
    assert http.get("/api/v1/directory/not-an-address").status_code == 400


def test_the_directory_is_in_the_openapi_document(services) -> None:  # type: ignore[no-untyped-def]
    spec = TestClient(create_app(services)).get("/openapi.json").json()
    op = spec["paths"]["/api/v1/directory/{email}"]["get"]
    assert set(op["responses"]["200"]["content"]) == {"application/pkcs7-mime", "application/pem-certificate-chain"}
    assert "404" in op["responses"] and "format" in {p["name"] for p in op["parameters"]}
