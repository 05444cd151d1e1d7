"""The other share-guarded approvals in a real headless Chromium, each officer in their own browser
context, on one deployment shared by both tests (a 2-of-3 recovery split, Alice's key archived):

- exporting the archive: officer Olga starts the export to an RSA certificate and approves with her
  share, officer Quinn approves with his; the export is downloaded from the page and every
  envelope opens with `openssl cms -decrypt` to the PKCS#8 key of Alice's archived certificate;
- replacing the officers: Olga and Quinn approve a new 2-of-2 split to Otto and Pia; each new
  officer collects their share once from the page under a passphrase of their own; `mailkms
  recover` works with the two new shares and refuses the old ones.

axe-core (0 serious) on the approval pages; screenshots saved like the other console tests."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyotp
import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import Deployment, enrolled, init_deployment, openssl
from tests.e2e.test_console_approvals import _approve, officers_ceremony
from tests.e2e.test_console_browser import UNLABELLED, _admin, _login, _screenshots, _serious
from tests.e2e.test_console_browser import browser as browser  # the module's Chromium fixture

pytestmark = pytest.mark.e2e

ALICE = "alice@example.org"
OLD = {"Olga": "olga's long passphrase", "Piet": "piet's long passphrase", "Quinn": "quinn's long passphrase"}
NEW = {"otto": "otto's own new passphrase", "pia": "pia's own new passphrase"}


@dataclass
class Setup:
    dep: Deployment
    work: Path
    logins: dict[str, tuple[str, pyotp.TOTP]]
    shares: dict[str, Path]  # the old officers' share files
    archived_pem: str  # Alice's archived encryption certificate
    used: dict[str, int]  # the TOTP time step of each one's last log-in

    def login(self, context, name: str):  # type: ignore[no-untyped-def]
        """A page of `context` logged in as `name`; a TOTP code is good once (the server keeps the
        last time step used), so a second log-in waits for a step after the first one ended in."""
        password, totp = self.logins[name]
        while totp.timecode(dt.datetime.now(dt.UTC)) <= self.used.get(name, -1):
            time.sleep(1)
        page = context.new_page()
        _login(page, self.dep, name, password, totp)
        self.used[name] = totp.timecode(dt.datetime.now(dt.UTC))
        return page


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("approvals-browser")
    dep = init_deployment(work / "data")
    logins = {name: _admin(dep, name, "officer") for name in ("olga", "quinn", "otto", "pia")}
    dep.start()
    try:
        alice = enrolled(dep, work, ALICE)
        state = json.loads((alice.home / "state.json").read_text())
        (archived_pem,) = state["encryption_history"].values()
        shares = dict(zip(OLD, officers_ceremony(dep, work, OLD), strict=True))
        yield Setup(dep, work, logins, shares, archived_pem, {})
    finally:
        dep.stop()


def _recover(s: Setup, shares: list[Path], passphrases: list[str]):  # type: ignore[no-untyped-def]
    """`mailkms recover` of Alice's archived key with these share files (not checked)."""
    pass_file = s.work / f"pass-{time.monotonic_ns()}"
    pass_file.write_text("".join(p + "\n" for p in passphrases))
    shared = [arg for share in shares for arg in ("--share", str(share))]
    return s.dep.admin("recover", ALICE, *shared, "--share-passphrase-file", str(pass_file), "--json", check=False)


def test_archive_export_approved_in_two_browser_contexts(browser, setup: Setup) -> None:  # type: ignore[no-untyped-def]
    s, shots, a11y = setup, _screenshots(setup.work / "export"), []
    key, cert = s.work / "recipient.key", s.work / "recipient.pem"
    made = openssl(
        "req", "-x509", "-newkey", "rsa:3072", "-nodes", "-keyout", str(key), "-out", str(cert),
        "-subj", "/CN=Archive export recipient", "-days", "30",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr

    first = browser.new_context(ignore_https_errors=True, accept_downloads=True)
    page = s.login(first, "olga")
    page.goto(f"{s.dep.url}/admin/approvals")
    assert page.evaluate(UNLABELLED) == []
    page.screenshot(path=str(shots / "approvals.png"), full_page=True)
    a11y += _serious(page, "approvals")
    page.get_by_label("Export the archive to this certificate (PEM, RSA)").set_input_files(str(cert))
    page.get_by_role("button", name="Start archive export").click()
    expect(page.get_by_role("heading", name="Export of the whole archive")).to_be_visible()
    expect(page.locator("main")).to_contain_text("Archive export recipient")
    request_url = page.url
    _approve(page, s.shares["Olga"], OLD["Olga"])
    expect(page.locator("#approvals")).to_contain_text("1 of 2 (olga)")
    assert page.get_by_role("link", name="download the export").count() == 0  # one share releases nothing
    page.screenshot(path=str(shots / "export-1of2.png"), full_page=True)
    a11y += _serious(page, "export 1 of 2")

    second = browser.new_context(ignore_https_errors=True, accept_downloads=True)
    page2 = s.login(second, "quinn")
    page2.goto(request_url)
    _approve(page2, s.shares["Quinn"], OLD["Quinn"])
    expect(page2.locator("#approvals")).to_contain_text("2 of 2 (olga, quinn)")
    expect(page2.locator("#outcome")).to_contain_text("1 key exported")
    page2.screenshot(path=str(shots / "export-released.png"), full_page=True)
    a11y += _serious(page2, "export released")
    page.reload()  # the first officer's session sees the release too, and may download it
    expect(page.locator("#state")).to_contain_text("Released by quinn")
    with page.expect_download() as download:
        page.get_by_role("link", name="download the export").click()
    document = json.loads(Path(download.value.path()).read_text())
    first.close()
    second.close()

    assert document["format"] == "mailkms-archive-export"
    (entry,) = document["keys"]
    assert entry["mailbox"] == ALICE
    (s.work / "envelope.der").write_bytes(base64.b64decode(entry["envelope"]))
    opened = openssl(
        "cms", "-decrypt", "-binary", "-inform", "DER", "-in", str(s.work / "envelope.der"),
        "-recip", str(cert), "-inkey", str(key), "-out", str(s.work / "released.p8"),
    )  # fmt: skip
    assert opened.returncode == 0, opened.stderr
    # the released PKCS#8 key is the private half of Alice's archived certificate
    public = openssl("pkey", "-inform", "DER", "-in", str(s.work / "released.p8"), "-pubout")
    assert public.returncode == 0, public.stderr
    (s.work / "archived.pem").write_text(s.archived_pem)
    expected = openssl("x509", "-in", str(s.work / "archived.pem"), "-pubkey", "-noout")
    assert public.stdout and public.stdout == expected.stdout
    wrong = openssl(  # and only the recipient's key opens it
        "cms", "-decrypt", "-binary", "-inform", "DER", "-in", str(s.work / "envelope.der"),
        "-recip", str(cert), "-inkey", str(s.work / "released.p8"), "-keyform", "DER",
    )  # fmt: skip
    assert wrong.returncode != 0
    assert a11y == [], "axe-core: serious findings\n" + "\n".join(a11y)
    print(f"screenshots: {shots}")


def test_replacing_officers_approved_and_collected_in_browser_contexts(browser, setup: Setup) -> None:  # type: ignore[no-untyped-def]
    s, shots, a11y = setup, _screenshots(setup.work / "replace"), []
    first = browser.new_context(ignore_https_errors=True)
    page = s.login(first, "olga")
    page.goto(f"{s.dep.url}/admin/approvals")
    page.get_by_label("New officers (administrators' names, comma separated)").fill("otto, pia")
    page.get_by_label("New threshold (shares needed)").fill("2")
    page.get_by_role("button", name="Start replacing officers").click()
    expect(page.get_by_role("heading", name="New recovery officers: otto, pia")).to_be_visible()
    request_url = page.url
    _approve(page, s.shares["Olga"], OLD["Olga"])
    expect(page.locator("#approvals")).to_contain_text("1 of 2 (olga)")
    page.screenshot(path=str(shots / "replace-1of2.png"), full_page=True)
    a11y += _serious(page, "replace 1 of 2")

    second = browser.new_context(ignore_https_errors=True)
    page2 = s.login(second, "quinn")
    page2.goto(request_url)
    _approve(page2, s.shares["Quinn"], OLD["Quinn"])
    expect(page2.locator("#outcome")).to_contain_text("shares still to collect: otto, pia")
    assert page2.get_by_role("button", name="Download my new share (once)").count() == 0  # not quinn's
    first.close()
    second.close()

    new_shares = []
    for name, passphrase in NEW.items():
        context = browser.new_context(ignore_https_errors=True, accept_downloads=True)
        mine = s.login(context, name)
        mine.goto(request_url)
        assert mine.evaluate(UNLABELLED) == []
        mine.get_by_label("Passphrase for your new share").fill(passphrase)
        mine.get_by_label("The same passphrase again").fill(passphrase)
        mine.screenshot(path=str(shots / f"collect-{name}.png"), full_page=True)
        a11y += _serious(mine, f"collect {name}")
        with mine.expect_download() as download:
            mine.get_by_role("button", name="Download my new share (once)").click()
        share = s.work / f"new-share-{name}.json"
        share.write_bytes(Path(download.value.path()).read_bytes())
        new_shares.append(share)
        mine.goto(request_url)  # once: the form is gone, and the server refuses a second collection
        expect(mine.locator("#outcome")).not_to_contain_text(name)
        assert mine.get_by_role("button", name="Download my new share (once)").count() == 0
        csrf = mine.locator("input[name=csrf]").first.get_attribute("value")
        again = mine.request.post(
            f"{request_url}/share", form={"csrf": csrf, "passphrase": passphrase, "again": passphrase}
        )
        assert again.status == 409
        context.close()
    expect_none = json.loads(s.dep.admin("recovery", "status", "--json").out)
    assert expect_none["threshold"] == 2, expect_none

    old = _recover(s, [s.shares["Olga"], s.shares["Quinn"]], [OLD["Olga"], OLD["Quinn"]])
    assert old.code != 0, old.out
    new = _recover(s, new_shares, list(NEW.values()))
    assert new.code == 0, new.err + new.out
    assert len(json.loads(new.out)["key_serials"]) == 1
    assert json.loads(s.dep.admin("audit", "verify", "--json").out)["ok"]
    assert a11y == [], "axe-core: serious findings\n" + "\n".join(a11y)
    print(f"screenshots: {shots}")
