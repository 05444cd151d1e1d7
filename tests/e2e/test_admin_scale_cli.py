"""`mailkms user import`, `user list --expiring-within`, `reminders sweep` as real processes."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest

from tests.conftest import CA_PASSPHRASE
from tests.e2e._nodes import run_mailkms

pytestmark = pytest.mark.e2e


def test_import_writes_tokens_only_to_a_new_private_file(data_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MAILKMS_DATA": str(data_dir), "MAILKMS_CA_PASSPHRASE": CA_PASSPHRASE}
    users = tmp_path / "users.csv"
    users.write_text(
        "email,name,group\n"
        "Ann@Example.org,Ann A,\n"
        'bob@example.org,"Bob, B"\n'
        "# a comment\n"
        "not-an-address,Broken\n"
        "carol@example.org,Carol\n"
    )
    out = tmp_path / "tokens.csv"
    done = run_mailkms(["user", "import", str(users), "--tokens-out", str(out), "--json"], env)
    assert done.returncode == 2, done.stderr  # one bad row: reported, the others are added
    report = json.loads(done.stdout)
    assert report["added"] == 3 and [f["email"] for f in report["failed"]] == ["not-an-address"]
    assert "import: 4/4 users" in done.stderr  # progress without a terminal: plain lines, never a token
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    rows = list(csv.DictReader(out.open()))
    assert [r["email"] for r in rows] == ["ann@example.org", "bob@example.org", "carol@example.org"]
    assert rows[1]["name"] == "Bob, B" and all(len(r["token"]) >= 27 for r in rows)
    assert all(r["token"] not in done.stdout + done.stderr for r in rows)  # never on the screen
    # Never overwrites a tokens file.
    again = run_mailkms(["user", "import", str(users), "--tokens-out", str(out)], env)
    assert again.returncode == 2 and "exists" in again.stderr
    listed = json.loads(run_mailkms(["user", "list", "--json"], env).stdout)
    assert {u["email"] for u in listed} == {"ann@example.org", "bob@example.org", "carol@example.org"}
    # Registered users have no certificates yet: none expire within 30 days; the sweep has nothing to send.
    soon = run_mailkms(["user", "list", "--expiring-within", "30d", "--json"], env)
    assert soon.returncode == 0 and json.loads(soon.stdout) == []
    bad = run_mailkms(["user", "list", "--expiring-within", "soon"], env)
    assert bad.returncode == 2
    sweep = run_mailkms(["reminders", "sweep", "--json"], env)
    assert sweep.returncode == 0, sweep.stderr
    assert json.loads(sweep.stdout)["due_sent"] == 0
