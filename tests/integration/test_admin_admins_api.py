"""Administrators on the JSON admin API, in process (ASGI) on SQLite and PostgreSQL: a superuser
lists, adds (initial password and TOTP URI returned once, and they log in), changes roles,
disables/enables, unlocks and sets require-passkey; every act is audited with the caller's name;
any other role gets 403 on every route; nobody changes their own role or disables themselves;
the routes are in the OpenAPI document."""

from __future__ import annotations

import datetime as dt

import pyotp
import pytest
from fastapi.testclient import TestClient

from mailkms.api import create_app
from mailkms.errors import AccountLocked, AdminAuthRequired, LoginFailed
from mailkms.services import Principal, Role
from tests.integration.test_admin_api import PASSWORD, _admin


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _actions(services, action: str) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    return [r.to_dict() for r in services.audit_records(action=action, limit=50)]


def test_a_superuser_manages_administrators_over_the_api(services, clock) -> None:  # type: ignore[no-untyped-def]
    su, _ = _admin(services, "sue", Role.SUPERUSER)
    client = TestClient(create_app(services), base_url="https://testserver")
    h = _bearer(su)

    added = client.post("/api/v1/admin/admins", json={"name": "olga", "role": "operator"}, headers=h)
    assert added.status_code == 201, added.text
    body = added.json()
    assert body["role"] == "operator" and body["totp"] is True and len(body["password"]) >= 20
    secret = pyotp.parse_uri(body["otpauth_uri"]).secret
    session = services.admins.login("olga", body["password"], pyotp.TOTP(secret).at(clock.now()))
    assert session.principal == Principal("olga", Role.OPERATOR)
    given = client.post(
        "/api/v1/admin/admins", json={"name": "aldo", "role": "auditor", "password": PASSWORD}, headers=h
    )
    assert given.status_code == 201 and given.json()["password"] is None  # a given password is not echoed
    assert client.post("/api/v1/admin/admins", json={"name": "olga", "role": "auditor"}, headers=h).status_code == 409
    bad_role = client.post("/api/v1/admin/admins", json={"name": "zed", "role": "god"}, headers=h)
    assert bad_role.status_code == 400

    listed = client.get("/api/v1/admin/admins", headers=h).json()
    assert [(a["name"], a["role"]) for a in listed] == [("aldo", "auditor"), ("olga", "operator"), ("sue", "superuser")]

    role = client.put("/api/v1/admin/admins/olga/role", json={"role": "officer"}, headers=h)
    assert role.status_code == 200 and role.json()["role"] == "officer"
    with pytest.raises(AdminAuthRequired):  # the role change ended olga's console session
        services.admins.session(session.cookie)
    assert client.put("/api/v1/admin/admins/sue/role", json={"role": "auditor"}, headers=h).status_code == 403

    assert client.post("/api/v1/admin/admins/olga/disable", headers=h).json()["disabled"] is True
    clock.advance(dt.timedelta(seconds=60))
    with pytest.raises(LoginFailed):
        services.admins.login("olga", body["password"], pyotp.TOTP(secret).at(clock.now()))
    assert client.post("/api/v1/admin/admins/olga/enable", headers=h).json()["disabled"] is False
    assert client.post("/api/v1/admin/admins/sue/disable", headers=h).status_code == 403
    assert client.post("/api/v1/admin/admins/olga/explode", headers=h).status_code == 400

    clock.advance(dt.timedelta(seconds=60))
    for _ in range(services.settings.admin.max_failed_logins):
        with pytest.raises(LoginFailed):
            services.admins.login("olga", "wrong password!", pyotp.TOTP(secret).at(clock.now()))
    with pytest.raises(AccountLocked):
        services.admins.login("olga", body["password"], pyotp.TOTP(secret).at(clock.now()))
    assert client.get("/api/v1/admin/admins/olga", headers=h).json()["locked_until"] is not None
    unlocked = client.post("/api/v1/admin/admins/olga/unlock", headers=h)
    assert unlocked.status_code == 200 and unlocked.json()["locked_until"] is None
    clock.advance(dt.timedelta(seconds=60))
    services.admins.login("olga", body["password"], pyotp.TOTP(secret).at(clock.now()))

    no_passkey = client.put("/api/v1/admin/admins/olga/passkey-required", json={"required": True}, headers=h)
    assert no_passkey.status_code == 400 and "passkey" in no_passkey.json()["detail"]
    off = client.put("/api/v1/admin/admins/olga/passkey-required", json={"required": False}, headers=h)
    assert off.status_code == 200 and off.json()["passkey_required"] is False
    # a bearer token may not lift (or set) its own owner's passkey rule: another superuser or the CLI
    assert (
        client.put("/api/v1/admin/admins/sue/passkey-required", json={"required": False}, headers=h).status_code == 403
    )
    assert client.get("/api/v1/admin/admins/nobody", headers=h).status_code == 404

    for action, subject in [
        ("admin.added", "olga"),
        ("admin.role.changed", "olga"),
        ("admin.disabled", "olga"),
        ("admin.enabled", "olga"),
        ("admin.unlocked", "olga"),
        ("admin.passkey.required", "olga"),
    ]:
        records = _actions(services, action)
        assert any(r["actor"] == "admin:sue" and r["subject"] == subject for r in records), (action, records)


@pytest.mark.parametrize("role", [Role.AUDITOR, Role.OPERATOR, Role.OFFICER])
def test_only_a_superuser_may(services, role) -> None:  # type: ignore[no-untyped-def]
    token, _ = _admin(services, "olga", role)
    _admin(services, "aldo", Role.AUDITOR)
    client = TestClient(create_app(services), base_url="https://testserver")
    h = _bearer(token)
    calls = [
        ("GET", "/api/v1/admin/admins", None),
        ("GET", "/api/v1/admin/admins/aldo", None),
        ("POST", "/api/v1/admin/admins", {"name": "mal", "role": "superuser"}),
        ("PUT", "/api/v1/admin/admins/aldo/role", {"role": "superuser"}),
        ("POST", "/api/v1/admin/admins/aldo/disable", None),
        ("POST", "/api/v1/admin/admins/aldo/unlock", None),
        ("PUT", "/api/v1/admin/admins/aldo/passkey-required", {"required": False}),
    ]
    for method, url, body in calls:
        answer = client.request(method, url, json=body, headers=h)
        assert answer.status_code == 403, (method, url, answer.text)
    assert client.get("/api/v1/admin/admins").status_code == 401  # no token at all
    assert [a.name for a in services.admins.list()] == ["aldo", "olga"]  # nothing was added
    assert services.admins.show("aldo").role is Role.AUDITOR


def test_the_routes_are_in_the_openapi(services) -> None:  # type: ignore[no-untyped-def]
    spec = TestClient(create_app(services), base_url="https://testserver").get("/openapi.json").json()
    paths = spec["paths"]
    assert {"get", "post"} <= set(paths["/api/v1/admin/admins"])
    assert "put" in paths["/api/v1/admin/admins/{name}/role"]
    assert "post" in paths["/api/v1/admin/admins/{name}/{act}"]
    assert "put" in paths["/api/v1/admin/admins/{name}/passkey-required"]
    assert "otpauth_uri" in spec["components"]["schemas"]["AdminAccountAdded"]["properties"]
