"""After a real renewal (the whole system run 400 days ahead under faketime): old mail still opens,
the export holds the old encryption key beside the new one, and the directory serves the new one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.kms_server import Kms, launch, start_kms
from tests.smime_support import MESSAGE, nss_tools, run

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not shutil.which("faketime"), reason="faketime missing: run scripts/system-deps.sh"),
]
ALICE, BOB = "alice@example.org", "bob@example.org"
LATER = ("faketime", "-f", "+400d")  # past the 12-month reminder, before the 18-month expiry
EXPORT_PW = "export-password-made-at-run-time"


@pytest.fixture(scope="module")
def renewed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kms, bytes, Path]]:
    folder = tmp_path_factory.mktemp("smime-renewal")
    kms = start_kms(folder)
    try:
        for mailbox in (ALICE, BOB):
            kms.enrol(mailbox, folder / mailbox.split("@")[0])
        old_mail = kms.client(kms.homes[BOB], "encrypt", "--to", ALICE, data=MESSAGE)
        assert old_mail.returncode == 0, old_mail.stderr
        kms.stop()
        launch(kms, folder, LATER)
        asked = kms.client(kms.homes[ALICE], "logon", "--answer", "yes")
        assert asked.returncode == 0 and b"update request was sent" in asked.stdout, asked.stderr
        kms.wait_installed(kms.homes[ALICE], kms.data / "mailboxes" / ALICE)
        yield kms, old_mail.stdout, folder
    finally:
        kms.stop()


def test_old_mail_opens_after_renewal_and_new_mail_uses_the_new_key(renewed: tuple[Kms, bytes, Path]) -> None:
    kms, old_mail, _ = renewed
    status = kms.client(kms.homes[ALICE], "status", "--json")
    data = json.loads(status.stdout)
    assert data["generation"] == 2 and len(data["encryption_key_history"]) == 2
    opened = kms.client(kms.homes[ALICE], "decrypt", data=old_mail)
    assert opened.returncode == 0 and b"attached in spirit" in opened.stdout
    old_serial = opened.stderr.split(b"key ")[1].split(b".")[0].decode()
    assert old_serial != data["encryption"]["serial"]  # the old key opened the old mail
    new_mail = kms.client(kms.homes[BOB], "encrypt", "--to", ALICE, "--refresh", data=MESSAGE)
    assert new_mail.returncode == 0, new_mail.stderr
    again = kms.client(kms.homes[ALICE], "decrypt", data=new_mail.stdout)
    assert again.returncode == 0 and f"key {data['encryption']['serial']}".encode() in again.stderr


def test_export_after_renewal_holds_every_encryption_key(renewed: tuple[Kms, bytes, Path], tmp_path: Path) -> None:
    kms, _, _ = renewed
    p12 = tmp_path / "alice.p12"
    done = kms.client(kms.homes[ALICE], "export", "--out", str(p12), env={"MAILKMS_EXPORT_PASSWORD": EXPORT_PW})
    assert done.returncode == 0, done.stderr
    names = [line.strip() for line in done.stdout.decode().splitlines()[1:]]
    assert len(names) == 3 and names[0].startswith(f"{ALICE} signing ")
    assert sum(1 for n in names if n.endswith("(old)")) == 1
    info = run(["openssl", "pkcs12", "-info", "-in", str(p12), "-passin", f"pass:{EXPORT_PW}", "-noout"])
    assert (info.stdout + info.stderr).count(b"Shrouded Keybag: PBES2") == 3
    if not nss_tools():
        pytest.skip("NSS tools missing")
    db = tmp_path / "nssdb"
    db.mkdir()
    run(["certutil", "-N", "-d", f"sql:{db}", "--empty-password"])
    run(["pk12util", "-i", str(p12), "-d", f"sql:{db}", "-W", EXPORT_PW])
    listed = run(["certutil", "-K", "-d", f"sql:{db}"]).stdout.decode()
    assert all(name in listed for name in names)
