"""The passkey (WebAuthn) JSON calls of the console, in process: CSRF header required, the
password step counted towards the lock-out, options bound to the relying party, a forged or
foreign-origin answer refused. The full ceremony with an authenticator: tests/e2e/test_console_passkeys.py."""

from __future__ import annotations

import json
import re

from fastapi.testclient import TestClient
from sqlalchemy import select

from mailkms.api import create_app
from mailkms.services import Role
from mailkms.store import Administrator, WebAuthnChallenge
from tests.integration.test_admin_api import PASSWORD, _admin, _login


def _data_csrf(client: TestClient, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    assert "script-src 'self'" in page.headers["content-security-policy"] and "<script>" not in page.text
    found = re.search(r'data-csrf="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


def test_passkey_calls_refuse_without_csrf_and_bind_the_challenge(services, clock) -> None:
    _, totp = _admin(services, "olga", Role.OPERATOR)
    op = TestClient(create_app(services), base_url="https://testserver")
    _login(op, "olga", totp, clock.now())
    csrf = _data_csrf(op, "/admin/passkeys")
    assert op.post("/admin/passkeys/options", json={}).status_code == 403
    assert op.post("/admin/passkeys/options", json={}, headers={"X-CSRF-Token": "x" + csrf}).status_code == 403

    options = op.post("/admin/passkeys/options", json={}, headers={"X-CSRF-Token": csrf})
    assert options.status_code == 200, options.text
    body = options.json()
    assert body["rp"]["id"] == services.passkeys.rp_id and body["user"]["name"] == "olga"
    assert "mailkms_webauthn" in options.headers["set-cookie"] and "HttpOnly" in options.headers["set-cookie"]
    with services.db.read_only() as session:
        assert len(session.execute(select(WebAuthnChallenge)).scalars().all()) == 1

    forged = {"id": "AAAA", "rawId": "AAAA", "type": "public-key", "response": {}}
    answer = op.post(
        "/admin/passkeys",
        json={"credential": forged},
        headers={"X-CSRF-Token": csrf, "Origin": f"https://{services.passkeys.rp_id}"},
    )
    assert answer.status_code == 400 and "not accepted" in answer.json()["detail"]
    # The challenge was used up by that attempt: a second answer needs new options.
    again = op.post(
        "/admin/passkeys",
        json={"credential": forged},
        headers={"X-CSRF-Token": csrf, "Origin": f"https://{services.passkeys.rp_id}"},
    )
    assert again.status_code == 400 and "expired" in again.json()["detail"]
    assert services.passkeys.origin_ok(f"https://{services.passkeys.rp_id}:8443")
    assert not services.passkeys.origin_ok("https://evil.example")
    assert not services.passkeys.origin_ok(f"http://{services.passkeys.rp_id}")


def test_passkey_log_in_password_step_counts_towards_lockout(services) -> None:
    _admin(services, "olga", Role.OPERATOR)
    anon = TestClient(create_app(services), base_url="https://testserver")
    csrf = _data_csrf(anon, "/admin/login/passkey")
    assert anon.post("/admin/login/passkey/options", json={"name": "olga", "password": PASSWORD}).status_code == 403
    # The right password but no passkey registered: refused, and counted.
    right = anon.post(
        "/admin/login/passkey/options", json={"name": "olga", "password": PASSWORD}, headers={"X-CSRF-Token": csrf}
    )
    assert right.status_code == 401
    limit = services.settings.admin.max_failed_logins
    for _ in range(limit - 1):
        wrong = anon.post(
            "/admin/login/passkey/options",
            json={"name": "olga", "password": "wrong password!"},
            headers={"X-CSRF-Token": csrf},
        )
        assert wrong.status_code == 401
    with services.db.read_only() as session:
        admin = session.execute(select(Administrator).where(Administrator.name == "olga")).scalar_one()
        assert admin.locked_until is not None
    origin = f"https://{services.passkeys.rp_id}"
    no_origin = anon.post("/admin/login/passkey", json={"credential": {}}, headers={"X-CSRF-Token": csrf})
    assert no_origin.status_code == 400  # a page of another origin, or none, is refused first
    no_ceremony = anon.post(
        "/admin/login/passkey", json={"credential": json.loads("{}")}, headers={"X-CSRF-Token": csrf, "Origin": origin}
    )
    assert no_ceremony.status_code == 401 and "mailkms_admin" not in no_ceremony.headers.get("set-cookie", "")
