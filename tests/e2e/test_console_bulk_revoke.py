"""A bulk revoke approved by a second operator, in two separate Chromium contexts: operator Olga
asks to revoke Alice (enrolled) and Bob (above [admin] bulk_revoke_approval_threshold = 1, so it
waits; she has no approve button; `openssl ocsp` still answers good); operator Oscar, in his own
session, approves; then `openssl ocsp` answers revoked. A superuser adds an administrator at
/admin/admins (the initial password shown once). axe-core: 0 serious findings on the new pages;
screenshots saved like tests/e2e/test_console_browser.py does."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import enrolled, init_deployment
from tests.e2e.test_console_browser import UNLABELLED, _admin, _login, _ocsp, _screenshots, _serious
from tests.e2e.test_console_browser import browser as browser  # the module's Chromium fixture

pytestmark = pytest.mark.e2e

ALICE, BOB = "alice@example.org", "bob@example.org"


def test_bulk_revoke_approved_in_a_second_browser_context(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shots = _screenshots(tmp_path)
    started = time.monotonic()
    a11y: list[str] = []
    dep = init_deployment(tmp_path / "data")
    olga_pw, olga_totp = _admin(dep, "olga", "operator")
    oscar_pw, oscar_totp = _admin(dep, "oscar", "operator")
    sue_pw, sue_totp = _admin(dep, "sue", "superuser")
    dep.start(extra_env={"MAILKMS_ADMIN__BULK_REVOKE_APPROVAL_THRESHOLD": "1"})
    try:
        alice = enrolled(dep, tmp_path, ALICE)
        signing = tmp_path / "alice-signing.pem"
        signing.write_text(alice.run("cert", "signing").out)
        dep.add_user(BOB)
        print(f"[{time.monotonic() - started:5.1f} s] enrolled")

        first = browser.new_context(ignore_https_errors=True)
        page = first.new_page()
        _login(page, dep, "olga", olga_pw, olga_totp)
        page.goto(f"{dep.url}/admin/approvals")
        assert page.evaluate(UNLABELLED) == []
        a11y += _serious(page, "approvals")
        page.get_by_label("Mailboxes to revoke, one a line").fill(f"{ALICE}\n{BOB}\n")
        page.get_by_label("Reason (S/MIME BR)").select_option("keyCompromise")
        page.get_by_label("Yes, ask to revoke all of them").check()
        page.screenshot(path=str(shots / "bulk-revoke-form.png"), full_page=True)
        page.get_by_role("button", name="Ask for bulk revoke").click()
        expect(page.get_by_role("heading", name="Bulk revoke of 2 users")).to_be_visible()
        expect(page.locator("#approvals")).to_contain_text("0 of 1")
        assert page.get_by_role("button", name="Approve: revoke these 2 users").count() == 0  # not the asker's
        request_url = page.url
        page.screenshot(path=str(shots / "bulk-revoke-waiting.png"), full_page=True)
        a11y += _serious(page, "bulk revoke waiting")
        assert "good" in _ocsp(dep, tmp_path, signing, status="good")  # asked, not approved: not revoked

        second = browser.new_context(ignore_https_errors=True)
        page2 = second.new_page()
        _login(page2, dep, "oscar", oscar_pw, oscar_totp)
        page2.goto(request_url)
        page2.get_by_role("button", name="Approve: revoke these 2 users").click()
        expect(page2.locator("#outcome")).to_contain_text("2 users revoked")
        expect(page2.locator("#approvals")).to_contain_text("1 of 1 (oscar)")
        page2.screenshot(path=str(shots / "bulk-revoke-released.png"), full_page=True)
        a11y += _serious(page2, "bulk revoke released")
        assert "revoked" in _ocsp(dep, tmp_path, signing)
        print(f"[{time.monotonic() - started:5.1f} s] approved, OCSP says revoked")
        page.reload()
        expect(page.locator("#state")).to_contain_text("Released by oscar")
        page2.goto(f"{dep.url}/admin/audit?action=approval")
        expect(page2.locator("main")).to_contain_text("approval.released")
        first.close()
        second.close()

        third = browser.new_context(ignore_https_errors=True)
        page3 = third.new_page()
        _login(page3, dep, "sue", sue_pw, sue_totp)
        page3.get_by_role("link", name="Administrators").click()
        assert page3.evaluate(UNLABELLED) == []
        page3.screenshot(path=str(shots / "admins.png"), full_page=True)
        a11y += _serious(page3, "admins")
        page3.get_by_label("Name of the new administrator").fill("nina")
        page3.get_by_label("Role", exact=True).select_option("auditor")
        page3.get_by_role("button", name="Add administrator").click()
        expect(page3.get_by_role("heading", name="nina (auditor) is added")).to_be_visible()
        assert len(page3.locator("#password").inner_text().strip()) >= 12
        page3.screenshot(path=str(shots / "admin-added.png"), full_page=True)
        a11y += _serious(page3, "admin added")
        page3.goto(f"{dep.url}/admin/approvals")  # a superuser sees every form: recovery, export, officers
        expect(page3.get_by_role("button", name="Start replacing officers")).to_be_visible()
        assert page3.evaluate(UNLABELLED) == []
        page3.screenshot(path=str(shots / "approvals-superuser.png"), full_page=True)
        a11y += _serious(page3, "approvals (superuser)")
        third.close()
        assert '"role": "auditor"' in dep.admin("admin", "list", "--json").out
        assert a11y == [], "axe-core: serious findings\n" + "\n".join(a11y)
    finally:
        dep.stop()
    print(f"screenshots: {shots} ({time.monotonic() - started:.0f} s)")
