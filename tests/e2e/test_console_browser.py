"""The web console in a real headless Chromium (Debian's `chromium`, driven by Playwright; no
browser is downloaded): log-in with password + TOTP, add a user and enrol them with
`mailkms-client` using the token the page showed, revoke from the page and see `openssl ocsp`
answer revoked; an auditor sees no revoke button and the server refuses their POST (403); a form
without its CSRF token is refused; every form field is labelled; log-in works by keyboard alone.
Screenshots of the main pages are saved under the test's tmp dir (`screenshots/`)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import ClientHome, Deployment, init_deployment, openssl
from tests.smime_support import require_tools

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ALICE = "alice@example.org"
UNLABELLED = """() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
    .filter(e => !e.labels || e.labels.length === 0).map(e => e.name || e.id)"""


def _admin(dep: Deployment, name: str, role: str) -> tuple[str, pyotp.TOTP]:
    added = json.loads(dep.admin("admin", "add", name, "--role", role, "--totp", "--json").out)
    return added["password"], pyotp.TOTP(parse_qs(urlsplit(added["otpauth_uri"]).query)["secret"][0])


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    require_tools("chromium", package="chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        chromium = p.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _login(page, dep: Deployment, name: str, password: str, totp: pyotp.TOTP, *, keyboard: bool = False) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{dep.url}/admin/users")
    assert page.url.endswith("/admin/login")  # no session: to the log-in form
    assert page.evaluate(UNLABELLED) == []
    if keyboard:  # the name field has the focus; Tab moves on; Enter submits
        page.keyboard.type(name)
        page.keyboard.press("Tab")
        page.keyboard.type(password)
        page.keyboard.press("Tab")
        page.keyboard.type(totp.now())
        page.keyboard.press("Enter")
    else:
        page.get_by_label("Name").fill(name)
        page.get_by_label("Password").fill(password)
        page.get_by_label("One-time code").fill(totp.now())
        page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{dep.url}/admin/users")
    expect(page.get_by_role("heading", name="Users")).to_be_visible()


def _serious(page, what: str) -> list[str]:  # type: ignore[no-untyped-def]
    """axe-core (pinned inside axe-playwright-python) on the page: serious and critical findings."""
    from axe_playwright_python.sync_playwright import Axe

    violations = Axe().run(page).response["violations"]
    return [
        f"{what}: {v['id']} ({v['impact']}): {v['help']}" for v in violations if v["impact"] in ("serious", "critical")
    ]


def _ocsp(dep: Deployment, work: Path, cert: Path, status: str = "revoked") -> str:
    """`openssl ocsp` against the server until it answers `status` for `cert` (15 s at most)."""
    chain = dep.admin("ca", "chain").out
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", chain, re.S)
    issuing, root = work / "issuing.pem", work / "root.pem"
    issuing.write_text(blocks[0] + "\n")
    root.write_text(blocks[1] + "\n")
    url = f"http://127.0.0.1:{dep.http_port}/ocsp"
    args = ["ocsp", "-issuer", str(issuing), "-cert", str(cert), "-url", url, "-CAfile", str(root), "-no_nonce"]
    deadline = time.monotonic() + 15
    while True:
        done = openssl(*args)
        out = done.stdout.decode()
        if "Response verify OK" in done.stderr.decode() and f"{cert}: {status}" in out:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"OCSP did not say {status}: {out}{done.stderr.decode()}\n{dep.log()[-2000:]}")
        time.sleep(0.3)


def _screenshots(tmp_path: Path) -> Path:
    """Under the test's tmp dir, or MAILKMS_TEST_ARTEFACTS/console-screenshots when CI keeps artefacts."""
    kept = os.environ.get("MAILKMS_TEST_ARTEFACTS")
    folder = Path(kept) / "console-screenshots" if kept else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_console_in_chromium(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shots = _screenshots(tmp_path)
    started = time.monotonic()
    a11y: list[str] = []

    def phase(what: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {what}")

    dep = init_deployment(tmp_path / "data")
    phase("init")
    op_password, op_totp = _admin(dep, "olga", "operator")
    au_password, au_totp = _admin(dep, "aldo", "auditor")
    dep.start()
    phase("admins added, server started")
    try:
        operator = browser.new_context(ignore_https_errors=True)
        page = operator.new_page()
        page.goto(f"{dep.url}/admin/login")
        page.screenshot(path=str(shots / "login.png"), full_page=True)
        a11y += _serious(page, "login")
        _login(page, dep, "olga", op_password, op_totp)
        cookie = next(c for c in operator.cookies() if c["name"] == "mailkms_admin")
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"

        page.get_by_role("link", name="Add user").click()
        assert page.evaluate(UNLABELLED) == []
        a11y += _serious(page, "add user")
        page.get_by_label("E-mail address").fill(ALICE)
        page.get_by_label("Display name").fill("Alice Example")
        page.get_by_role("button", name="Add user").click()
        token = page.locator("#token").inner_text().strip()
        page.screenshot(path=str(shots / "token.png"), full_page=True)
        a11y += _serious(page, "token")
        assert re.fullmatch(r"[A-Za-z0-9_-]{20,}", token)

        phase("logged in, user added")
        client = ClientHome(tmp_path / "alice", ALICE)
        enrolled = client.enroll(dep, token)
        assert enrolled.code == 0, enrolled.err
        dep.wait_for_mails(ALICE, 1)
        synced = client.run("sync")
        assert synced.code == 0 and "Installed" in synced.out, synced.out + synced.err
        signing = tmp_path / "alice-signing.pem"
        signing.write_text(client.run("cert", "signing").out)

        phase("enrolled")
        page.goto(f"{dep.url}/admin/users?state=ACTIVE")
        expect(page.get_by_role("link", name=ALICE)).to_be_visible()
        page.screenshot(path=str(shots / "users.png"), full_page=True)
        a11y += _serious(page, "users")
        page.get_by_role("link", name=ALICE).click()
        assert "ACTIVE" in page.locator(".facts").inner_text()
        assert page.locator("table").first.locator("tbody tr").count() == 2  # signing + encryption
        page.screenshot(path=str(shots / "user.png"), full_page=True)
        a11y += _serious(page, "user")

        # a form without its CSRF token is refused by the server
        forged = page.request.post(f"{dep.url}/admin/users", form={"email": "mallory@example.org"})
        assert forged.status == 403
        assert "mallory" not in dep.admin("user", "list", "--json").out

        # the auditor: no revoke button, and the server refuses the form anyway
        auditor = browser.new_context(ignore_https_errors=True)
        au_page = auditor.new_page()
        _login(au_page, dep, "aldo", au_password, au_totp, keyboard=True)
        au_page.goto(f"{dep.url}/admin/users/{ALICE}")
        expect(au_page.get_by_role("heading", name=ALICE)).to_be_visible()
        assert au_page.get_by_role("link", name=re.compile("Revoke")).count() == 0
        assert au_page.get_by_role("link", name="Add user").count() == 0
        au_csrf = au_page.locator("input[name=csrf]").first.get_attribute("value")
        refused = au_page.request.post(
            f"{dep.url}/admin/users/{ALICE}/revoke", form={"csrf": au_csrf, "confirm": "yes", "reason": "keyCompromise"}
        )
        assert refused.status == 403
        assert '"state": "ACTIVE"' in dep.admin("user", "show", ALICE, "--json").out

        phase("auditor refused")
        # the operator revokes from the page, with the confirmation step
        page.get_by_role("link", name=re.compile("Revoke")).click()
        assert page.evaluate(UNLABELLED) == []
        page.get_by_label("Reason").select_option("keyCompromise")
        page.screenshot(path=str(shots / "revoke.png"), full_page=True)
        a11y += _serious(page, "revoke")
        page.get_by_label(f"Yes, revoke {ALICE}").check()
        page.get_by_role("button", name="Revoke").click()
        expect(page.get_by_role("heading", name=f"{ALICE} is revoked")).to_be_visible()
        assert "keyCompromise" in _ocsp(dep, tmp_path, signing) or "Reason" in _ocsp(dep, tmp_path, signing)

        phase("revoked, OCSP says so")
        page.goto(f"{dep.url}/admin/audit?actor=admin:olga")
        text = page.locator("main").inner_text()
        assert "user.added" in text and "user.revoked" in text and "certificate.revoked" in text
        page.screenshot(path=str(shots / "audit.png"), full_page=True)
        a11y += _serious(page, "audit")
        page.goto(f"{dep.url}/admin/outbox?all=true")
        assert ALICE in page.locator("main").inner_text()
        page.screenshot(path=str(shots / "outbox.png"), full_page=True)
        a11y += _serious(page, "outbox")
        page.goto(f"{dep.url}/admin/dashboard")
        expect(page.locator("svg#expiring rect.bar")).to_have_count(78)
        assert page.locator('svg#enrolments rect.bar[data-count="1"]').count() == 1  # alice, today
        page.screenshot(path=str(shots / "dashboard.png"), full_page=True)
        a11y += _serious(page, "dashboard")
        page.goto(f"{dep.url}/admin/audit/verify")
        assert "intact" in page.locator("main").inner_text()
        operator.close()
        auditor.close()
        assert a11y == [], "axe-core: serious findings\n" + "\n".join(a11y)
    finally:
        dep.stop()
    print(f"screenshots: {shots} ({time.monotonic() - started:.0f} s)")


def test_console_csv_import_and_status_pages_in_chromium(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Import a CSV of three users from the page, watch the progress page reload itself (meta refresh,
    no script) to 100 %, download the tokens once, enrol one user with `mailkms-client` using their
    token; axe on the import, progress and status pages; screenshots saved."""
    shots = _screenshots(tmp_path)
    a11y: list[str] = []
    dep = init_deployment(tmp_path / "data")
    op_password, op_totp = _admin(dep, "olga", "operator")
    dep.start()
    try:
        context = browser.new_context(ignore_https_errors=True, accept_downloads=True)
        page = context.new_page()
        _login(page, dep, "olga", op_password, op_totp)
        page.get_by_role("link", name="Import users").click()
        assert page.evaluate(UNLABELLED) == []
        a11y += _serious(page, "import")
        rows = "email,name\nbea@example.org,Bea\ncid@example.org,Cid\nnot-a-mailbox,Nobody\ndee@example.org,Dee\n"
        page.get_by_label("CSV file").set_input_files(
            files=[{"name": "users.csv", "mimeType": "text/csv", "buffer": rows.encode()}]
        )
        page.screenshot(path=str(shots / "import.png"), full_page=True)
        page.get_by_role("button", name="Import").click()
        page.wait_for_url(re.compile(r".*/admin/imports/[A-Za-z0-9_-]+$"))
        expect(page.locator("#percent")).to_have_text("100 %", timeout=30_000)
        assert page.locator("script").count() == 0
        assert "3 added, 1 refused" in page.locator("#counts").inner_text()
        assert "not-a-mailbox" in page.locator("main").inner_text()
        page.screenshot(path=str(shots / "import-done.png"), full_page=True)
        a11y += _serious(page, "import progress")
        with page.expect_download() as download:
            page.get_by_role("button", name=re.compile("Download the 3 tokens")).click()
        tokens = {r["email"]: r["token"] for r in csv.DictReader(io.StringIO(Path(download.value.path()).read_text()))}
        assert sorted(tokens) == ["bea@example.org", "cid@example.org", "dee@example.org"]
        page.reload()
        assert "no longer on the server" in page.locator("main").inner_text()

        client = ClientHome(tmp_path / "bea", "bea@example.org")
        enrolled = client.enroll(dep, tokens["bea@example.org"])
        assert enrolled.code == 0, enrolled.err
        dep.wait_for_mails("bea@example.org", 1)
        assert '"state": "ACTIVE"' in dep.admin("user", "show", "bea@example.org", "--json").out

        for path, name in (
            ("/admin/outbox?all=true", "outbox-retry"),
            ("/admin/keypool", "keypool"),
            ("/admin/reminders", "reminders"),
            ("/admin/revocation", "revocation"),
        ):
            page.goto(f"{dep.url}{path}")
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
            a11y += _serious(page, name)
        assert "issuing" in page.locator("#crls").inner_text()
        context.close()
        assert a11y == [], "axe-core: serious findings\n" + "\n".join(a11y)
    finally:
        dep.stop()
    print(f"screenshots: {shots}")
