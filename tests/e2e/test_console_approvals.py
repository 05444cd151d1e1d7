"""Two-officer recovery in the console, in two separate Chromium contexts: officer Olga starts the
recovery of Alice's archived key and approves it with her share file and passphrase (1 of 2: not
released; a wrong passphrase is refused at upload); officer Quinn, in his own session, approves
with his; only then the page shows the recovery token. Alice enrols on a new machine with it, and
mail that openssl encrypted to her old certificate opens there: the released key is the archived one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import ClientHome, Deployment, enrolled, init_deployment, openssl
from tests.e2e.test_console_browser import CHROMIUM, _admin, _login
from tests.smime_support import require_tools

pytestmark = pytest.mark.e2e

ALICE = "alice@example.org"
OFFICERS = {"Olga": "olga's long passphrase", "Piet": "piet's long passphrase", "Quinn": "quinn's long passphrase"}


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    require_tools("chromium", package="chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def officers_ceremony(dep: Deployment, work: Path, officers: dict[str, str]) -> list[Path]:
    """`mailkms recovery init` from the bootstrap share: a 2-of-N split to `officers` (name:
    passphrase); their share files, in that order, under work/shares."""
    recovery = dep.data / "recovery"
    (work / "officers.pass").write_text("".join(p + "\n" for p in officers.values()))
    names = [arg for name in officers for arg in ("--officer", name)]
    ceremony = json.loads(
        dep.admin(
            "recovery", "init", "--officers", str(len(officers)), "--threshold", "2", *names,
            "--passphrase-file", str(work / "officers.pass"),
            "--share", str(next(recovery.glob("share-*-bootstrap.json"))),
            "--share-passphrase-file", str(recovery / "bootstrap-passphrase"),
            "--out-dir", str(work / "shares"), "--json",
        ).out
    )  # fmt: skip
    return [Path(p) for p in ceremony["share_files"]]


def _approve(page, share: Path, passphrase: str) -> None:  # type: ignore[no-untyped-def]
    page.get_by_label("Your share file").set_input_files(str(share))
    page.get_by_label("Share passphrase").fill(passphrase)
    page.get_by_role("button", name="Approve").click()


def test_two_officer_recovery_in_two_browser_contexts(chromium, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dep = init_deployment(tmp_path / "data")
    olga_pw, olga_totp = _admin(dep, "olga", "officer")
    quinn_pw, quinn_totp = _admin(dep, "quinn", "officer")
    dep.start()
    try:
        alice = enrolled(dep, tmp_path, ALICE)
        old_state = json.loads((alice.home / "state.json").read_text())
        (old_serial,) = old_state["encryption_history"]
        olga_share, _, quinn_share = officers_ceremony(dep, tmp_path, OFFICERS)

        first = chromium.new_context(ignore_https_errors=True)
        page = first.new_page()
        _login(page, dep, "olga", olga_pw, olga_totp)
        page.goto(f"{dep.url}/admin/approvals")
        page.get_by_label("Mailbox to recover").fill(ALICE)
        page.get_by_role("button", name="Start recovery").click()
        expect(page.get_by_role("heading", name=f"Recovery of {ALICE}")).to_be_visible()
        request_url = page.url
        _approve(page, olga_share, "not olga's passphrase")
        expect(page.get_by_role("alert")).to_be_visible()
        expect(page.locator("#approvals")).to_contain_text("0 of 2")
        _approve(page, olga_share, OFFICERS["Olga"])
        expect(page.locator("#approvals")).to_contain_text("1 of 2 (olga)")
        assert page.locator("#token").count() == 0  # one approval releases nothing
        page.screenshot(path=str(tmp_path / "approval-1of2.png"), full_page=True)

        second = chromium.new_context(ignore_https_errors=True)
        page2 = second.new_page()
        _login(page2, dep, "quinn", quinn_pw, quinn_totp)
        page2.goto(request_url)
        _approve(page2, quinn_share, OFFICERS["Quinn"])
        expect(page2.locator("#approvals")).to_contain_text("2 of 2 (olga, quinn)")
        token = page2.locator("#token").inner_text().strip()
        page2.screenshot(path=str(tmp_path / "approval-released.png"), full_page=True)
        page.reload()
        expect(page.locator("#state")).to_contain_text("Released by quinn")
        page2.goto(f"{dep.url}/admin/audit?action=approval")
        expect(page2.locator("main")).to_contain_text("approval.released")
        first.close()
        second.close()

        fresh = ClientHome(tmp_path / "new-laptop", ALICE)
        before = len(dep.mails(ALICE))
        res = fresh.enroll(dep, token)
        assert res.code == 0, res.err
        dep.wait_for_mails(ALICE, before + 1)
        assert fresh.run("sync").code == 0
        history = json.loads(fresh.run("status", "--json").out)["encryption_key_history"]
        assert old_serial in history

        cert = tmp_path / "old.pem"
        cert.write_text(old_state["encryption_history"][old_serial])
        (tmp_path / "plain.txt").write_text("for the archived key\n")
        done = openssl(
            "cms", "-encrypt", "-aes256", "-in", str(tmp_path / "plain.txt"),
            "-out", str(tmp_path / "mail.eml"), "-recip", str(cert),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        opened = fresh.run("decrypt", str(tmp_path / "mail.eml"))
        assert opened.code == 0 and "for the archived key" in opened.out, opened.err
        assert json.loads(dep.admin("audit", "verify", "--json").out)["ok"]
    finally:
        dep.stop()
