"""`enroll --install-into`: the mail program's key stores follow every generation without a user step.
A real server, enrolment and a renewal 400 days on (faketime); NSS's own tools judge the database."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from tests.e2e.conftest import ClientHome, Deployment
from tests.e2e.kms_server import smime_client
from tests.smime_support import MESSAGE, require_gpgsm, require_nss, run

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.usefixtures("_mail_program_tools"),
]


@pytest.fixture
def _mail_program_tools() -> None:
    require_nss()
    require_gpgsm()


ALICE = "alice@example.org"
LATER = 400  # days: past the 12-month reminder, before the 18-month expiry
NSS_PW = "nss-password-made-at-run-time"
GPGSM_PW = "gpgsm-passphrase-made-at-run-time"


def nss_certs(db: Path) -> list[x509.Certificate]:
    out = run(["certutil", "-L", "-d", f"sql:{db}", "-n", ALICE, "-a"]).stdout
    return x509.load_pem_x509_certificates(out)


def nss_key_count(db: Path, pwfile: Path) -> int:
    out = run(["certutil", "-K", "-d", f"sql:{db}", "-f", str(pwfile)]).stdout.decode()
    return sum(1 for line in out.splitlines() if line.startswith("<"))


def test_sync_installs_each_new_generation_into_the_recorded_stores(tmp_path: Path, gnupg_home: Path) -> None:
    db = tmp_path / "thunderbird-profile"
    pwfile = tmp_path / "nss-pw.txt"
    pwfile.write_text(NSS_PW + "\n")
    home = tmp_path / "alice"
    dep = Deployment(tmp_path / "data")
    dep.admin("init", "--hostname", "localhost", "--public-url", f"http://localhost:{dep.http_port}/")
    dep.start()
    try:
        token = dep.add_user(ALICE)
        enrolled = ClientHome(home, ALICE).enroll(
            dep, token, "--install-into", f"nss:{db}", "--install-into", f"gpgsm:{gnupg_home}"
        )
        assert enrolled.code == 0, enrolled.err
        targets = json.loads((home / "state.json").read_text())["install_targets"]
        assert targets == [f"nss:{db.resolve()}", f"gpgsm:{gnupg_home.resolve()}"]
        dep.wait_for_mails(ALICE, 1)
        # the first sync: NSS gets the keys; gpgsm's passphrase is not in the environment, so the
        # user is told once, and the sync still succeeds (the keys are safe in mailkms's store)
        first = smime_client(home, "sync", env={"MAILKMS_NSS_PASSWORD": NSS_PW})
        err = first.stderr.decode()
        assert first.returncode == 0, err
        assert b"Installed: installed generation 1" in first.stdout
        assert f"nss:{db.resolve()}: 2 key(s) installed, 0 already there." in err
        assert err.count("was not updated") == 1 and "MAILKMS_GPGSM_PASSPHRASE" in err
        assert nss_key_count(db, pwfile) == 2
        gen1 = json.loads((home / "state.json").read_text())["generations"][0]
        # a year on: renewal answered Yes; the next sync installs generation 2 into both stores
        dep.stop()
        dep.start(offset_days=LATER)
        asked = smime_client(home, "logon", "--answer", "yes", offset_days=LATER)
        assert asked.returncode == 0, asked.stderr
        dep.wait_for_mails(ALICE, 2)
        env = {"MAILKMS_NSS_PASSWORD": NSS_PW, "MAILKMS_GPGSM_PASSPHRASE": GPGSM_PW}
        # libfaketime with an unfaked monotonic clock makes Python's sleep in subprocess.wait(timeout)
        # fail with EINVAL; the client runs the NSS and gpgsm tools with a timeout
        env["FAKETIME_DONT_FAKE_MONOTONIC"] = "0"
        second = smime_client(home, "sync", env=env, offset_days=LATER)
        err = second.stderr.decode()
        assert second.returncode == 0, err
        assert b"installed generation 2" in second.stdout
        assert f"nss:{db.resolve()}: 2 key(s) installed, 1 already there." in err, err
        assert f"gpgsm:{gnupg_home.resolve()}: 3 key(s) installed, 0 already there." in err
        assert "was not updated" not in err
    finally:
        dep.stop()
    state = json.loads((home / "state.json").read_text())
    gen2 = state["generations"][1]
    held = {format(c.serial_number, "x") for c in nss_certs(db)}
    assert {
        gen1["signing_serial"],
        gen1["encryption_serial"],
        gen2["signing_serial"],
        gen2["encryption_serial"],
    } <= held
    assert nss_key_count(db, pwfile) == 4
    # NSS opens mail to the old and to the new encryption certificate
    for serial in (gen1["encryption_serial"], gen2["encryption_serial"]):
        recipient = tmp_path / f"{serial}.pem"
        recipient.write_text(state["encryption_history"][serial])
        (tmp_path / "msg.eml").write_bytes(MESSAGE)
        enveloped, opened = tmp_path / f"to-{serial}.p7m", tmp_path / f"opened-{serial}.eml"
        encrypt = ["openssl", "cms", "-encrypt", "-aes256", "-binary", "-in", str(tmp_path / "msg.eml")]
        run([*encrypt, "-outform", "DER", "-out", str(enveloped), str(recipient)])
        run(["cmsutil", "-D", "-d", f"sql:{db}", "-f", str(pwfile), "-i", str(enveloped), "-o", str(opened)])
        assert opened.read_bytes() == MESSAGE
    listed = subprocess.run(
        ["gpgsm", "--homedir", str(gnupg_home), "--with-colons", "--list-secret-keys"], capture_output=True, check=True
    ).stdout.decode()
    assert listed.count("\ncrs:") + listed.startswith("crs:") == 3  # generation 2's signing key, both encryption keys
