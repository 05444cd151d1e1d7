"""Administrators managed from the console, in process on SQLite and PostgreSQL: only superusers
(403 for auditor, operator and officer at the server), CSRF on every form, the initial password
shown once and good for a log-in, role changes, disable/enable, lock-out reset, audited with names;
an administrator deletes one of their own passkeys after typing their password again; with
`mailkms admin require-passkey` a password and TOTP code no longer log in."""

from __future__ import annotations

import datetime as dt
import re

import pyotp
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from mailkms.api import create_app
from mailkms.cli._main import app as cli_app
from mailkms.errors import AccountLocked, LoginFailed, PasskeyRequired
from mailkms.services import Principal, Role
from mailkms.store import Administrator, WebAuthnCredential
from tests.integration.test_admin_api import PASSWORD, _admin, _login, _secret


def _audited(services, action: str) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return [(r.actor, r.subject) for r in services.audit_records(action=action, limit=100)]


def test_only_superusers_manage_admins(services, clock) -> None:
    _, sue = _admin(services, "sue", Role.SUPERUSER)
    for name, role in (("audrey", Role.AUDITOR), ("olga", Role.OPERATOR), ("otto", Role.OFFICER)):
        _, totp = _admin(services, name, role)
        other = TestClient(create_app(services), base_url="https://testserver")
        csrf = _login(other, name, totp, clock.now())
        assert "/admin/admins" not in other.get("/admin/users").text
        assert other.get("/admin/admins").status_code == 403
        assert other.post("/admin/admins", data={"name": "eve", "role": "superuser", "csrf": csrf}).status_code == 403
        assert other.post("/admin/admins/sue/state", data={"act": "disable", "csrf": csrf}).status_code == 403
        assert other.post("/admin/admins/sue/role", data={"role": "auditor", "csrf": csrf}).status_code == 403
    assert [a.name for a in services.admins.list()] == ["audrey", "olga", "otto", "sue"]
    assert not services.admins.show("sue").disabled and services.admins.show("sue").role is Role.SUPERUSER

    su = TestClient(create_app(services), base_url="https://testserver")
    csrf = _login(su, "sue", sue, clock.now())
    assert su.post("/admin/admins", data={"name": "nina", "role": "operator"}).status_code == 403  # no CSRF
    assert su.post("/admin/admins", data={"name": "nina", "role": "king", "csrf": csrf}).status_code == 400
    assert su.post("/admin/admins", data={"name": "Nina!", "role": "operator", "csrf": csrf}).status_code == 400
    added = su.post("/admin/admins", data={"name": "nina", "role": "operator", "csrf": csrf})
    assert added.status_code == 201
    password = re.search(r'id="password"[^>]*>([^<]+)<', added.text)
    otpauth = re.search(r'id="otpauth"[^>]*>([^<]+)<', added.text)
    assert password and otpauth
    assert password.group(1) not in su.get("/admin/admins").text  # shown once
    nina = pyotp.TOTP(_secret(otpauth.group(1).replace("&amp;", "&")))
    assert services.admins.login("nina", password.group(1), nina.at(clock.now())).principal.role is Role.OPERATOR
    assert su.post("/admin/admins", data={"name": "nina", "role": "auditor", "csrf": csrf}).status_code == 409

    assert su.post("/admin/admins/nina/role", data={"role": "auditor", "csrf": csrf}).status_code == 200
    assert services.admins.show("nina").role is Role.AUDITOR
    assert su.post("/admin/admins/sue/role", data={"role": "auditor", "csrf": csrf}).status_code == 403  # not oneself
    assert su.post("/admin/admins/sue/state", data={"act": "disable", "csrf": csrf}).status_code == 403
    assert su.post("/admin/admins/ghost/state", data={"act": "disable", "csrf": csrf}).status_code == 404
    assert su.post("/admin/admins/nina/state", data={"act": "explode", "csrf": csrf}).status_code == 400
    su.post("/admin/admins/nina/state", data={"act": "disable", "csrf": csrf})
    assert services.admins.show("nina").disabled
    clock.advance(dt.timedelta(seconds=30))
    with pytest.raises(LoginFailed):
        services.admins.login("nina", password.group(1), nina.at(clock.now()))
    su.post("/admin/admins/nina/state", data={"act": "enable", "csrf": csrf})
    for _ in range(services.settings.admin.max_failed_logins):
        with pytest.raises(LoginFailed):
            services.admins.login("nina", "wrong password!", "000000")
    with pytest.raises(AccountLocked):
        services.admins.login("nina", password.group(1), nina.at(clock.now()))
    assert "Unlock nina" in su.get("/admin/admins").text
    su.post("/admin/admins/nina/state", data={"act": "unlock", "csrf": csrf})
    assert services.admins.login("nina", password.group(1), nina.at(clock.now())).principal.role is Role.AUDITOR

    for action in ("admin.added", "admin.role.changed", "admin.disabled", "admin.enabled", "admin.unlocked"):
        assert ("admin:sue", "nina") in _audited(services, action), action
    assert services.verify_audit().ok


def _fake_passkey(services, name: str, label: str) -> None:  # type: ignore[no-untyped-def]
    """A stored credential row (the browser ceremony itself: tests/e2e/test_console_passkeys.py)."""
    with services.db.transaction() as session:
        admin = session.execute(select(Administrator).where(Administrator.name == name)).scalar_one()
        session.add(
            WebAuthnCredential(
                admin_id=admin.id,
                credential_id=label.encode(),
                public_key=b"cose",
                sign_count=0,
                label=label,
                created_at=services.clock.now(),
            )
        )


def test_passkey_delete_and_require_passkey(services, clock, cli_env) -> None:
    _, pat = _admin(services, "pat", Role.OPERATOR)
    runner = CliRunner()
    refused = runner.invoke(cli_app, ["admin", "require-passkey", "pat"])
    assert refused.exit_code != 0 and "no passkey" in refused.output
    _fake_passkey(services, "pat", "key-a")
    _fake_passkey(services, "pat", "key-b")
    done = runner.invoke(cli_app, ["admin", "require-passkey", "pat", "--json"])
    assert done.exit_code == 0, done.output
    assert services.admins.show("pat").passkey_required
    with pytest.raises(PasskeyRequired):  # the right password and code: TOTP is not enough now
        services.admins.login("pat", PASSWORD, pat.at(clock.now()))
    with pytest.raises(LoginFailed):  # a wrong password is still just "wrong"
        services.admins.login("pat", "wrong password!", pat.at(clock.now()))

    assert runner.invoke(cli_app, ["admin", "require-passkey", "pat", "--off"]).exit_code == 0
    client = TestClient(create_app(services), base_url="https://testserver")
    clock.advance(dt.timedelta(seconds=30))
    csrf = _login(client, "pat", pat, clock.now())
    runner.invoke(cli_app, ["admin", "require-passkey", "pat"])
    keys = services.passkeys.list("pat")
    page = client.get("/admin/passkeys").text
    assert f'action="/admin/passkeys/{keys[0].id}/delete"' in page
    url = f"/admin/passkeys/{keys[0].id}/delete"
    assert client.post(url, data={"password": PASSWORD}).status_code == 403  # no CSRF
    assert client.post(url, data={"password": "wrong password!", "csrf": csrf}).status_code == 401
    assert client.post(url, data={"csrf": csrf}).status_code == 400
    assert client.post(url, data={"password": PASSWORD, "csrf": csrf}, follow_redirects=False).status_code == 303
    assert [k.label for k in services.passkeys.list("pat")] == ["key-b"]
    last = f"/admin/passkeys/{keys[1].id}/delete"
    assert client.post(last, data={"password": PASSWORD, "csrf": csrf}).status_code == 409  # the last one, required
    _admin(services, "quinn", Role.OPERATOR)
    _fake_passkey(services, "quinn", "key-q")
    (quinns,) = services.passkeys.list("quinn")
    assert (
        client.post(f"/admin/passkeys/{quinns.id}/delete", data={"password": PASSWORD, "csrf": csrf}).status_code == 404
    )
    assert ("admin:pat", "pat") in _audited(services, "admin.passkey.deleted")
    assert len(_audited(services, "admin.passkey.required")) == 3
    assert Principal("pat", Role.OPERATOR).actor == "admin:pat"
