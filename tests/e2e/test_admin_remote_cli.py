"""`mailkms --server URL --token T ...` against a real `mailkms serve`: the admin commands through
the admin API over HTTPS (the root CA given by --ca-file), refusals with the local exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import Deployment, init_deployment

pytestmark = pytest.mark.e2e


def test_remote_admin_cli(tmp_path: Path) -> None:
    dep: Deployment = init_deployment(tmp_path / "data")
    dep.admin("admin", "add", "olga", "--role", "operator")
    dep.admin("admin", "add", "aldo", "--role", "auditor")
    dep.admin("admin", "add", "sue", "--role", "superuser")
    op = json.loads(dep.admin("admin", "token", "olga", "--json").out)["token"]
    au = json.loads(dep.admin("admin", "token", "aldo", "--json").out)["token"]
    su = json.loads(dep.admin("admin", "token", "sue", "--json").out)["token"]
    root = tmp_path / "root.pem"
    root.write_text(dep.admin("ca", "chain").out.split("-----END CERTIFICATE-----")[1] + "-----END CERTIFICATE-----\n")
    dep.start()
    elsewhere = Deployment(tmp_path / "nowhere")  # no data folder: nothing may be read locally

    def far(token: str, *args: str, ca: bool = True):  # type: ignore[no-untyped-def]
        extra = ["--ca-file", str(root)] if ca else []
        return elsewhere.admin("--server", dep.url, "--token", token, *extra, *args, check=False)

    try:
        added = far(op, "user", "add", "bob@example.org", "--name", "Bob", "--json")
        assert added.code == 0, added.err + added.out
        assert json.loads(added.out)["email"] == "bob@example.org" and len(json.loads(added.out)["token"]) >= 20
        listed = json.loads(far(au, "user", "list", "--json").out)
        assert [(u["email"], u["state"]) for u in listed] == [("bob@example.org", "REGISTERED")]

        refused = far(au, "user", "add", "carol@example.org", "--json")
        assert refused.code == 6 and json.loads(refused.out)["error"] == "role-forbidden"
        assert far("mka_wrong", "user", "list").code == 3
        assert far(op, "user", "show", "nobody@example.org").code == 4
        assert far(op, "user", "add", "bob@example.org").code == 5
        assert far(op, "admin", "list").code == 6  # administrators: superusers only, decided by the server
        assert far(op, "admin", "token", "olga").code == 2  # API tokens: on the server's machine only

        # administrators through the admin API (superuser)
        new = far(su, "admin", "add", "otto", "--role", "operator", "--json")
        assert new.code == 0, new.err + new.out
        created = json.loads(new.out)
        assert len(created["password"]) >= 20 and created["otpauth_uri"].startswith("otpauth://totp/")
        assert far(su, "admin", "role", "otto", "officer").code == 0
        assert far(su, "admin", "disable", "otto").code == 0
        names = {a["name"]: a for a in json.loads(far(su, "admin", "list", "--json").out)}
        assert names["otto"]["role"] == "officer" and names["otto"]["disabled"] is True
        assert far(su, "admin", "enable", "otto").code == 0 and far(su, "admin", "unlock", "otto").code == 0
        assert far(su, "admin", "require-passkey", "otto").code == 2  # otto has no passkey yet
        assert far(su, "admin", "disable", "sue").code == 6  # not on one's own account
        local = {a["name"]: a for a in json.loads(dep.admin("admin", "list", "--json").out)}
        assert local["otto"]["role"] == "officer" and local["otto"]["disabled"] is False
        untrusted = far(op, "user", "list", ca=False)  # the server's CA is not in the system store
        assert untrusted.code == 10, untrusted.err

        revoked = far(op, "revoke", "bob@example.org", "--reason", "superseded", "--json")
        assert revoked.code == 0, revoked.err
        assert json.loads(far(au, "user", "show", "bob@example.org", "--json").out)["state"] == "REVOKED"
        for who in ("carol@example.org", "dan@example.org"):
            assert far(op, "user", "add", who).code == 0
        both = far(op, "revoke", "carol@example.org", "dan@example.org", "--json")  # POST /revocations
        assert both.code == 0, both.err + both.out
        assert sorted(r["email"] for r in json.loads(both.out)["revoked"]) == ["carol@example.org", "dan@example.org"]
        assert far(op, "revoke", "carol@example.org", "--break-glass").code == 2  # server's machine only
        again = far(op, "user", "reenroll", "bob@example.org", "--json")
        assert again.code == 0 and json.loads(again.out)["token"] != json.loads(added.out)["token"]
        verified = far(au, "audit", "verify", "--json")
        assert verified.code == 0 and json.loads(verified.out)["ok"] is True
        records = dep.admin("audit", "verify", "--json").json()
        assert isinstance(records, dict) and records["ok"]
        audit = dep.log()
        assert op not in audit and au not in audit and su not in audit  # tokens never reach the log
        assert created["password"] not in audit
    finally:
        dep.stop()
    assert not (tmp_path / "nowhere").exists()
