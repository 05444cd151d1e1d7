"""After a real renewal (server and client run 400 days ahead under faketime): old mail still opens,
the export holds the old encryption key beside the new one, and the directory serves the new one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import ClientHome, Deployment
from tests.e2e.kms_server import smime_client, smime_deployment
from tests.smime_support import MESSAGE, require_nss, run

pytestmark = pytest.mark.e2e
ALICE, BOB = "alice@example.org", "bob@example.org"
LATER = 400  # days: past the 12-month reminder, before the 18-month expiry
EXPORT_PW = "export-password-made-at-run-time"


@pytest.fixture(scope="module")
def renewed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, dict[str, ClientHome], bytes]]:
    folder = tmp_path_factory.mktemp("smime-renewal")
    with smime_deployment(folder, (ALICE, BOB)) as (dep, homes):
        old_mail = smime_client(homes[BOB].home, "encrypt", "--to", ALICE, data=MESSAGE)
        assert old_mail.returncode == 0, old_mail.stderr
        dep.stop()
        dep.start(offset_days=LATER)
        asked = homes[ALICE].run("logon", "--answer", "yes", offset_days=LATER)
        assert asked.code == 0 and "update request was sent" in asked.out, asked.err
        dep.wait_for_mails(ALICE, 2)
        synced = homes[ALICE].run("sync", offset_days=LATER)
        assert "Installed" in synced.out, synced.out + synced.err
        yield dep, homes, old_mail.stdout


def test_old_mail_opens_after_renewal_and_new_mail_uses_the_new_key(renewed) -> None:  # type: ignore[no-untyped-def]
    _, homes, old_mail = renewed
    alice, bob = homes[ALICE].home, homes[BOB].home
    data = json.loads(smime_client(alice, "status", "--json", offset_days=LATER).stdout)
    assert data["generation"] == 2 and len(data["encryption_key_history"]) == 2
    opened = smime_client(alice, "decrypt", data=old_mail, offset_days=LATER)
    assert opened.returncode == 0 and b"attached in spirit" in opened.stdout
    assert data["encryption"]["serial"].encode() not in opened.stderr  # an earlier key opened it
    new_mail = smime_client(bob, "encrypt", "--to", ALICE, "--refresh", data=MESSAGE, offset_days=LATER)
    assert new_mail.returncode == 0, new_mail.stderr
    again = smime_client(alice, "decrypt", data=new_mail.stdout, offset_days=LATER)
    assert again.returncode == 0 and f"key {data['encryption']['serial']}".encode() in again.stderr


def test_export_after_renewal_holds_every_encryption_key(renewed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, homes, _ = renewed
    p12 = tmp_path / "alice.p12"
    done = smime_client(
        homes[ALICE].home, "export", "--out", str(p12), env={"MAILKMS_EXPORT_PASSWORD": EXPORT_PW}, offset_days=LATER
    )
    assert done.returncode == 0, done.stderr
    names = [line.strip() for line in done.stdout.decode().splitlines()[1:]]
    assert len(names) == 3 and names[0].startswith(f"{ALICE} signing ")
    assert sum(1 for n in names if n.endswith("(old)")) == 1
    info = run(["openssl", "pkcs12", "-info", "-in", str(p12), "-passin", f"pass:{EXPORT_PW}", "-noout"])
    assert (info.stdout + info.stderr).count(b"Shrouded Keybag: PBES2") == 3
    require_nss()
    db = tmp_path / "nssdb"
    db.mkdir()
    run(["certutil", "-N", "-d", f"sql:{db}", "--empty-password"])
    run(["pk12util", "-i", str(p12), "-d", f"sql:{db}", "-W", EXPORT_PW])
    listed = run(["certutil", "-K", "-d", f"sql:{db}"]).stdout.decode()
    assert all(name in listed for name in names)
