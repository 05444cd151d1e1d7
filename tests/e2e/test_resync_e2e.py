"""`mailkms-client resync` end to end (issue 12): a renewal's reply is lost on the way, the server
sends the same reply again, issues nothing, and `sync` installs it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from mailkms.pki import open_delivery
from tests.e2e.conftest import Deployment, Result, enrolled

ALICE = "alice@example.org"
DUE = 380  # days: past the 12-month reminder point, before expiry


def _certificates(dep: Deployment) -> list[tuple[str, str, int]]:
    """The users' certificates (the server's own TLS and signing certificates renew on their own)."""
    with sqlite3.connect(dep.data / "mailkms.db") as db:
        return sorted(db.execute("select serial, kind, generation from certificates where user_id is not null"))


def _status(result: Result) -> dict[str, object]:
    data = json.loads(result.out)
    assert isinstance(data, dict)
    return data


def test_a_lost_renewal_reply_comes_again_and_installs(deployment: Deployment, tmp_path: Path) -> None:
    dep = deployment
    dep.start()
    alice = enrolled(dep, tmp_path, ALICE)
    dep.stop()
    dep.start(offset_days=DUE)

    before = set(dep.mails(ALICE))
    res = alice.run("renew", offset_days=DUE)
    assert res.code == 0, res.out + res.err
    (lost_path,) = set(dep.wait_for_mails(ALICE, len(before) + 1)) - before
    lost = open_delivery(lost_path.read_bytes())
    assert lost.manifest.kind == "renewal" and lost.manifest.generation == 2
    lost_path.unlink()  # the reply never reaches alice
    issued = _certificates(dep)
    pairs = sorted((kind, gen) for _, kind, gen in issued)
    assert pairs == [("encryption", 1), ("encryption", 2), ("signing", 1), ("signing", 2)]

    res = alice.run("sync", offset_days=DUE)
    assert res.code == 0 and "No new certificates" in res.out, res.out + res.err
    assert _status(alice.run("status", "--json", offset_days=DUE))["generation"] == 1

    res = alice.run("resync", offset_days=DUE)
    assert res.code == 0, res.out + res.err
    assert f"The server sends request {lost.manifest.request_id} again" in res.out
    (again_path,) = set(dep.wait_for_mails(ALICE, len(before) + 1)) - before
    again = open_delivery(again_path.read_bytes())
    assert again.manifest == lost.manifest  # the same reply: same request, generation and serials
    assert sorted(c.serial_number for c in again.certificates) == sorted(c.serial_number for c in lost.certificates)
    assert _certificates(dep) == issued  # nothing new issued

    res = alice.run("sync", offset_days=DUE)
    assert res.code == 0, res.out + res.err
    assert "installed generation 2 (renewal)" in res.out
    status = _status(alice.run("status", "--json", offset_days=DUE))
    assert status["generation"] == 2 and status["state"] == "ACTIVE"
    assert status["signing"]["serial"] == lost.manifest.signing_serial  # type: ignore[index]
