"""Administrators, the JSON admin API and the console, in process (ASGI) on SQLite and PostgreSQL:
argon2id passwords, TOTP (computed here as an authenticator app would), lock-out, roles refused
at the server, CSRF, cookies and headers."""

from __future__ import annotations

import datetime as dt
import re
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from mailkms.api import create_app
from mailkms.errors import AccountLocked, AdminAuthRequired, ConfigError, LoginFailed, RoleForbidden
from mailkms.services import Permission, Principal, Role
from mailkms.store import Administrator, AdminToken

PASSWORD = "correct horse battery staple"


def _secret(uri: str) -> str:
    return parse_qs(urlsplit(uri).query)["secret"][0]


def _admin(services, name: str, role: Role) -> tuple[str, pyotp.TOTP]:  # type: ignore[no-untyped-def]
    services.admins.add(name, role, PASSWORD, "admin:test")
    totp = pyotp.TOTP(_secret(services.admins.enrol_totp(name, "admin:test")))
    return services.admins.new_api_token(name, "admin:test"), totp


def test_roles_are_decided_by_the_server() -> None:
    auditor, operator = Principal("a", Role.AUDITOR), Principal("o", Role.OPERATOR)
    assert auditor.may(Permission.READ) and not auditor.may(Permission.USERS)
    with pytest.raises(RoleForbidden):
        auditor.require(Permission.USERS)
    operator.require(Permission.USERS)
    assert not operator.may(Permission.ADMINS) and Principal("s", Role.SUPERUSER).may(Permission.ADMINS)


def test_password_totp_lockout_and_secrets_at_rest(services, clock) -> None:
    token, totp = _admin(services, "alice", Role.OPERATOR)
    with services.db.read_only() as session:
        row = session.execute(select(Administrator).where(Administrator.name == "alice")).scalar_one()
        stored_hash = session.execute(select(AdminToken.token_hash)).scalar_one()
    assert row.password_hash.startswith("$argon2id$") and PASSWORD not in row.password_hash
    assert row.totp_sealed is not None and totp.secret.encode() not in row.totp_sealed
    assert token not in stored_hash and len(stored_hash) == 64
    assert services.admins.authenticate_token(token) == Principal("alice", Role.OPERATOR)

    code = totp.at(clock.now())
    with pytest.raises(LoginFailed):
        services.admins.login("alice", "wrong password!", code)
    with pytest.raises(LoginFailed):
        services.admins.login("alice", PASSWORD, "000000" if code != "000000" else "111111")
    session = services.admins.login("alice", PASSWORD, code)
    assert session.principal.name == "alice" and len(session.cookie) >= 40
    assert services.admins.session(session.cookie).csrf == session.csrf
    with pytest.raises(LoginFailed):  # the same code is good once
        services.admins.login("alice", PASSWORD, code)

    clock.advance(dt.timedelta(seconds=60))
    for _ in range(services.settings.admin.max_failed_logins - 1):  # the replayed code was the first failure
        with pytest.raises(LoginFailed):
            services.admins.login("alice", "wrong password!", totp.at(clock.now()))
    with pytest.raises(AccountLocked):  # even with the right password and code
        services.admins.login("alice", PASSWORD, totp.at(clock.now()))
    clock.advance(dt.timedelta(minutes=services.settings.admin.lockout_minutes, seconds=31))
    assert services.admins.login("alice", PASSWORD, totp.at(clock.now())).principal.role is Role.OPERATOR

    clock.advance(dt.timedelta(minutes=services.settings.admin.session_minutes, seconds=1))
    with pytest.raises(AdminAuthRequired):  # sessions are short
        services.admins.session(session.cookie)
    services.admins.disable("alice", "admin:test")
    with pytest.raises(AdminAuthRequired):
        services.admins.authenticate_token(token)
    with pytest.raises(LoginFailed):
        services.admins.login("alice", PASSWORD, totp.at(clock.now() + dt.timedelta(seconds=30)))
    # a sealed TOTP secret is bound to its administrator: copied onto another row it does not open
    _, bob_totp = _admin(services, "bob", Role.AUDITOR)
    with services.db.transaction() as db_session:
        rows = {a.name: a for a in db_session.execute(select(Administrator)).scalars()}
        rows["bob"].totp_sealed = rows["alice"].totp_sealed
    with pytest.raises(ConfigError):
        services.admins.login("bob", PASSWORD, bob_totp.at(clock.now()))
    actions = [r.action for r in services.audit_records(subject="alice", limit=100)]
    assert {"admin.added", "admin.totp.enrolled", "admin.login", "admin.login.failed", "admin.disabled"} <= set(actions)
    assert services.verify_audit().ok


def test_admin_api_roles_paging_and_audit(services, clock) -> None:
    client = TestClient(create_app(services))
    op_token, _ = _admin(services, "olga", Role.OPERATOR)
    au_token, _ = _admin(services, "aldo", Role.AUDITOR)
    op = {"Authorization": f"Bearer {op_token}"}
    au = {"Authorization": f"Bearer {au_token}"}

    missing = client.get("/api/v1/admin/users")
    assert missing.status_code == 401 and missing.headers["content-type"] == "application/problem+json"
    assert client.get("/api/v1/admin/users", headers={"Authorization": "Bearer mka_nope"}).status_code == 401
    assert client.get("/api/v1/admin/whoami", headers=au).json() == {
        "name": "aldo",
        "role": "auditor",
        "permissions": ["read"],
    }

    refused = client.post("/api/v1/admin/users", headers=au, json={"email": "x@example.org"})
    assert refused.status_code == 403
    assert refused.json()["type"] == "urn:mailkms:problem:role-forbidden"
    assert client.get("/api/v1/admin/users", headers=au).json()["total"] == 0  # nothing was added

    for i in range(7):
        added = client.post("/api/v1/admin/users", headers=op, json={"email": f"u{i}@example.org", "name": f"User {i}"})
        assert added.status_code == 201, added.text
        assert re.fullmatch(r"[A-Za-z0-9_-]{20,}", added.json()["token"])
    assert client.post("/api/v1/admin/users", headers=op, json={"email": "u0@example.org"}).status_code == 409

    page = client.get("/api/v1/admin/users", headers=au, params={"limit": 3, "offset": 3}).json()
    assert page["total"] == 7 and [u["email"] for u in page["users"]] == [
        "u3@example.org",
        "u4@example.org",
        "u5@example.org",
    ]
    found = client.get("/api/v1/admin/users", headers=au, params={"q": "user 6"}).json()
    assert [u["email"] for u in found["users"]] == ["u6@example.org"]
    registered = client.get("/api/v1/admin/users", headers=au, params={"state": "registered"}).json()
    assert registered["total"] == 7
    assert client.get("/api/v1/admin/users", headers=au, params={"state": "nonsense"}).status_code == 400

    assert client.post("/api/v1/admin/users/u1@example.org/revoke", headers=au, json={}).status_code == 403
    bad = client.post("/api/v1/admin/users/u1@example.org/revoke", headers=op, json={"reason": "unspecified"})
    assert bad.status_code == 400
    done = client.post("/api/v1/admin/users/u1@example.org/revoke", headers=op, json={"reason": "affiliationChanged"})
    assert done.status_code == 200 and done.json()["reason"] == "affiliationChanged"
    shown = client.get("/api/v1/admin/users/u1@example.org", headers=au).json()
    assert shown["state"] == "REVOKED"
    assert {h["action"] for h in shown["history"]} >= {"user.added", "user.revoked"}
    assert client.post("/api/v1/admin/users/u1@example.org/reenroll", headers=au).status_code == 403
    again = client.post("/api/v1/admin/users/u1@example.org/reenroll", headers=op)
    assert again.status_code == 201 and again.json()["token"] != added.json()["token"]
    assert services.audit_records(actor="admin:olga", action="token.issued", limit=1)[0].subject == "u1@example.org"
    revoked = client.get("/api/v1/admin/users", headers=au, params={"state": "REVOKED"}).json()
    assert [u["email"] for u in revoked["users"]] == ["u1@example.org"]

    audit = client.get("/api/v1/admin/audit", headers=au, params={"actor": "admin:olga", "action": "user."}).json()
    assert {(r["action"], r["subject"]) for r in audit["records"]} >= {
        ("user.added", "u0@example.org"),
        ("user.revoked", "u1@example.org"),
    }
    assert all(r["actor"] == "admin:olga" for r in audit["records"])
    assert client.get("/api/v1/admin/audit/verify", headers=au).json()["ok"] is True
    assert "waiting" in client.get("/api/v1/admin/outbox", headers=au).json()
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/admin/users", "/api/v1/admin/users/{email}/revoke", "/api/v1/admin/audit"} <= set(paths)
    assert not any(p.startswith("/admin/") for p in paths)


def _login(client: TestClient, name: str, totp: pyotp.TOTP, when: dt.datetime) -> str:
    form = client.get("/admin/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf is not None
    done = client.post(
        "/admin/login",
        data={"name": name, "password": PASSWORD, "code": totp.at(when), "csrf": csrf.group(1)},
        follow_redirects=False,
    )
    assert done.status_code == 303, done.text
    cookie = done.headers["set-cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/admin" in cookie
    return _csrf(client, "/admin/users")


def _csrf(client: TestClient, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


def test_console_csrf_roles_and_headers(services, clock) -> None:
    _, op_totp = _admin(services, "olga", Role.OPERATOR)
    _, au_totp = _admin(services, "aldo", Role.AUDITOR)
    services.users.add("bob@example.org", "Bob", None, "admin:test")
    anon = TestClient(create_app(services), base_url="https://testserver")
    assert anon.get("/admin/users", follow_redirects=False).headers["location"] == "/admin/login"
    assert anon.get("/admin/users/bob@example.org", follow_redirects=False).status_code == 303
    assert (
        anon.post("/admin/login", data={"name": "olga", "password": PASSWORD, "code": op_totp.now()}).status_code == 403
    )

    op = TestClient(create_app(services), base_url="https://testserver")
    csrf = _login(op, "olga", op_totp, clock.now())
    page = op.get("/admin/users")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["cache-control"] == "no-store" and "bob@example.org" in page.text
    assert "<script" not in page.text
    no_csrf = op.post("/admin/users", data={"email": "carol@example.org"})
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
    assert op.post("/admin/users", data={"email": "carol@example.org", "csrf": "forged"}).status_code == 403
    added = op.post("/admin/users", data={"email": "carol@example.org", "name": "Carol", "csrf": csrf})
    assert added.status_code == 200 and "carol@example.org is registered" in added.text
    token = re.search(r'<output id="token"[^>]*>([^<]+)</output>', added.text)
    assert token is not None and len(token.group(1)) >= 20
    assert "Revoke" in op.get("/admin/users/bob@example.org").text

    au = TestClient(create_app(services), base_url="https://testserver")
    au_csrf = _login(au, "aldo", au_totp, clock.now())
    detail = au.get("/admin/users/bob@example.org")
    assert detail.status_code == 200 and "/revoke" not in detail.text and "Add user" not in detail.text
    forced = au.post("/admin/users/bob@example.org/revoke", data={"csrf": au_csrf, "confirm": "yes", "reason": ""})
    assert forced.status_code == 403
    assert au.get("/admin/users/bob@example.org/revoke").status_code == 403
    assert services.users.show("bob@example.org").state.value == "REGISTERED"  # untouched

    unconfirmed = op.post("/admin/users/bob@example.org/revoke", data={"csrf": csrf, "reason": "superseded"})
    assert unconfirmed.status_code == 400
    done = op.post("/admin/users/bob@example.org/revoke", data={"csrf": csrf, "confirm": "yes", "reason": "superseded"})
    assert done.status_code == 200 and "bob@example.org is revoked" in done.text
    assert services.users.show("bob@example.org").state.value == "REVOKED"
    audit = au.get("/admin/audit", params={"actor": "admin:olga"})
    assert "user.revoked" in audit.text and "carol@example.org" in audit.text
    assert "intact" in au.get("/admin/audit/verify").text
    assert au.post("/admin/users/bob@example.org/reenroll", data={"csrf": au_csrf}).status_code == 403
    assert op.post("/admin/users/bob@example.org/reenroll", data={}).status_code == 403  # no CSRF token
    fresh = op.post("/admin/users/bob@example.org/reenroll", data={"csrf": csrf})
    assert fresh.status_code == 200 and "A new token for bob@example.org" in fresh.text


def _bars(html: str, chart: str) -> list[int]:
    svg = re.search(rf'<svg class="chart" id="{chart}".*?</svg>', html, re.S)
    assert svg is not None, chart
    return [int(n) for n in re.findall(r'data-count="(\d+)"', svg.group(0))]


def test_dashboard_charts_count_what_the_store_holds(services, clock) -> None:
    from mailkms.errors import BadNonce
    from mailkms.store import Certificate, IssuanceRequest, User

    now = clock.now()
    with services.db.transaction() as session:
        for i, (weeks, status, generation) in enumerate(
            [(0, "enrolled", 1), (0, "enrolled", 1), (10, "enrolled", 1), (10, "revoked", 1), (20, "enrolled", 2)]
        ):
            user = User(
                email=f"d{i}@example.org", display_name="", status=status, generation=generation, created_at=now
            )
            session.add(user)
            session.flush()
            # the row is generation 1: for the last user that is an old pair, not the current one
            not_after = now + dt.timedelta(weeks=weeks, hours=1)
            session.add(
                Certificate(
                    serial=f"{i + 1:032x}",
                    user_id=user.id,
                    kind="signing",
                    generation=1,
                    not_before=now - dt.timedelta(days=30),
                    not_after=not_after,
                    der=b"-",
                )
            )
            for back in (0, 0, 5) if i == 0 else ():
                session.add(
                    IssuanceRequest(
                        id=f"r{back}{len(session.new)}",
                        user_id=user.id,
                        kind="renewal",
                        generation=10 + len(session.new),
                        created_at=now - dt.timedelta(days=back),
                    )
                )
    services.refusals.identified("d0@example.org", "renewal.refused", "d0@example.org", BadNonce())
    for _ in range(3):
        services.refusals.anonymous("enrolment.refused", BadNonce())
    services.refusals.flush()

    _, totp = _admin(services, "aldo", Role.AUDITOR)
    client = TestClient(create_app(services), base_url="https://testserver")
    _login(client, "aldo", totp, now)
    html = client.get("/admin/dashboard").text
    expiring = _bars(html, "expiring")
    assert len(expiring) == 78 and expiring[0] == 2 and expiring[10] == 1 and sum(expiring) == 3
    renewals = _bars(html, "renewals")
    assert len(renewals) == 30 and renewals[-1] == 2 and renewals[-6] == 1 and sum(renewals) == 3
    refusals = _bars(html, "refusals")
    assert refusals[-1] == 4 and sum(refusals) == 4
    assert "Certificates expiring per week" in html and "<script" not in html
