"""Passkeys in the console, in real headless Chromium with its CDP virtual authenticator
(WebAuthn.enable / addVirtualAuthenticator): an operator logs in with password + TOTP, registers a
passkey, logs out and logs in with password + passkey; an authenticator holding a different key
under the same credential id is refused by the server, and so is the right key replayed with a
counter that did not increase. The pages that run the console's script allow script-src 'self'
only; the other pages stay script-free."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from playwright.sync_api import expect

from tests.e2e.conftest import Deployment, init_deployment
from tests.e2e.test_console_browser import CHROMIUM, _admin, _login
from tests.smime_support import require_tools

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    require_tools("chromium", package="chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def _authenticator(page):  # type: ignore[no-untyped-def]
    cdp = page.context.new_cdp_session(page)
    cdp.send("WebAuthn.enable", {"enableUI": False})
    added = cdp.send(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "transport": "usb",
                "hasResidentKey": False,
                "hasUserVerification": True,
                "isUserVerified": True,
                "automaticPresenceSimulation": True,
            }
        },
    )
    return cdp, added["authenticatorId"]


def _passkey_login(page, dep: Deployment, name: str, password: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{dep.url}/admin/login/passkey")
    page.get_by_label("Name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in with passkey").click()


def _counter(page, dep: Deployment) -> int:  # type: ignore[no-untyped-def]
    page.goto(f"{dep.url}/admin/passkeys")
    return int(page.locator("tbody tr td").nth(3).inner_text())


def test_passkey_register_and_log_in(chromium, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dep = init_deployment(tmp_path / "data")
    password, totp = _admin(dep, "olga", "operator")
    dep.start()
    try:
        context = chromium.new_context(ignore_https_errors=True)
        page = context.new_page()
        cdp, auth_id = _authenticator(page)
        _login(page, dep, "olga", password, totp)

        # The script-free policy stays on ordinary pages; the passkey page allows our own script only.
        users = page.request.get(f"{dep.url}/admin/users")
        assert "script-src" not in users.headers["content-security-policy"]
        page.goto(f"{dep.url}/admin/passkeys")
        answer = page.request.get(f"{dep.url}/admin/passkeys")
        assert "script-src 'self';" in answer.headers["content-security-policy"]
        assert "<script>" not in answer.text()  # no inline script

        page.get_by_label("Label for the new passkey").fill("virtual key")
        page.get_by_role("button", name="Register a passkey").click()
        expect(page.get_by_role("cell", name="virtual key")).to_be_visible()
        page.screenshot(path=str(tmp_path / "passkeys.png"), full_page=True)
        (held,) = cdp.send("WebAuthn.getCredentials", {"authenticatorId": auth_id})["credentials"]
        assert held["rpId"] == "localhost"
        registered_count = _counter(page, dep)

        page.get_by_role("button", name="Log out").click()
        page.wait_for_url(f"{dep.url}/admin/login")
        _passkey_login(page, dep, "olga", password)
        page.wait_for_url(f"{dep.url}/admin/users")
        expect(page.get_by_role("heading", name="Users")).to_be_visible()
        after = _counter(page, dep)
        assert after > registered_count  # the counter the server stored moved on
        context.close()

        # Wrong password: refused before any passkey is asked for.
        other = chromium.new_context(ignore_https_errors=True)
        page2 = other.new_page()
        cdp2, auth2 = _authenticator(page2)
        _passkey_login(page2, dep, "olga", password + "x")
        expect(page2.get_by_role("alert")).to_contain_text("Log-in failed")
        assert page2.url.endswith("/admin/login/passkey")

        # The same credential id, another key: the server's signature check refuses it.
        forged = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        cred = {
            "credentialId": held["credentialId"],
            "isResidentCredential": False,
            "rpId": "localhost",
            "privateKey": base64.b64encode(forged).decode(),
            "signCount": after + 10,
        }
        cdp2.send("WebAuthn.addCredential", {"authenticatorId": auth2, "credential": cred})
        _passkey_login(page2, dep, "olga", password)
        expect(page2.get_by_role("alert")).to_contain_text("Log-in failed")
        assert not any(c["name"] == "mailkms_admin" for c in other.cookies())

        # The right key with a counter that did not increase (a cloned authenticator): refused.
        cdp2.send("WebAuthn.clearCredentials", {"authenticatorId": auth2})
        cloned = {**cred, "privateKey": held["privateKey"], "signCount": 0}
        cdp2.send("WebAuthn.addCredential", {"authenticatorId": auth2, "credential": cloned})
        page2.reload()
        _passkey_login(page2, dep, "olga", password)
        expect(page2.get_by_role("alert")).to_contain_text("Log-in failed")
        assert not any(c["name"] == "mailkms_admin" for c in other.cookies())

        # The same clone, once its counter is past the stored one, is let in: the check is the counter.
        cdp2.send("WebAuthn.clearCredentials", {"authenticatorId": auth2})
        cdp2.send(
            "WebAuthn.addCredential", {"authenticatorId": auth2, "credential": {**cloned, "signCount": after + 5}}
        )
        page2.reload()
        _passkey_login(page2, dep, "olga", password)
        page2.wait_for_url(f"{dep.url}/admin/users")
        page2.goto(f"{dep.url}/admin/audit?action=admin.passkey.registered")
        expect(page2.locator("main")).to_contain_text("admin:olga")
        page2.goto(f"{dep.url}/admin/audit?action=admin.login.failed")
        expect(page2.locator("main")).to_contain_text("passkey")
        other.close()
    finally:
        dep.stop()
