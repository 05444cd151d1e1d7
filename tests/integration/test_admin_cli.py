"""`mailkms admin ...` in process on the real store: the password shown once or read from a file
descriptor, TOTP and API tokens shown once and usable, the documented exit codes."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pyotp
import pytest
from typer.testing import CliRunner

from mailkms.cli._main import app
from mailkms.errors import AdminAuthRequired, LoginFailed
from mailkms.services import Principal, Role


def _json(result) -> dict:  # type: ignore[no-untyped-def]
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_admin_commands(services, cli_env, tmp_path: Path, clock) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    added = _json(runner.invoke(app, ["admin", "add", "olga", "--role", "operator", "--totp", "--json"]))
    assert added["role"] == "operator" and len(added["password"]) >= 20
    secret = pyotp.parse_uri(added["otpauth_uri"]).secret
    session = services.admins.login("olga", added["password"], pyotp.TOTP(secret).at(clock.now()))
    assert session.principal == Principal("olga", Role.OPERATOR)

    password_file = tmp_path / "pw"
    password_file.write_text("a password from a file\n")
    fd = os.open(password_file, os.O_RDONLY)
    try:
        given = _json(
            runner.invoke(app, ["admin", "add", "aldo", "--role", "AUDITOR", "--password-fd", str(fd), "--json"])
        )
    finally:
        os.close(fd)
    assert "password" not in given and given["role"] == "auditor"
    token = _json(runner.invoke(app, ["admin", "token", "aldo", "--json"]))["token"]
    assert services.admins.authenticate_token(token) == Principal("aldo", Role.AUDITOR)

    listed = runner.invoke(app, ["admin", "list", "--json"])
    assert [(a["name"], a["role"], a["totp"]) for a in json.loads(listed.output)] == [
        ("aldo", "auditor", False),
        ("olga", "operator", True),
    ]
    assert runner.invoke(app, ["admin", "add", "olga", "--role", "auditor"]).exit_code == 5
    new = _json(runner.invoke(app, ["admin", "password", "olga", "--json"]))["password"]
    assert new != added["password"] and len(new) >= 20
    clock.advance(dt.timedelta(seconds=60))
    with pytest.raises(LoginFailed):  # the old one no longer opens
        services.admins.login("olga", added["password"], pyotp.TOTP(secret).at(clock.now()))
    assert services.admins.login("olga", new, pyotp.TOTP(secret).at(clock.now())).principal.name == "olga"
    with pytest.raises(AdminAuthRequired):  # the session from before the change has ended
        services.admins.session(session.cookie)
    assert runner.invoke(app, ["admin", "add", "bert", "--role", "king"]).exit_code == 2
    assert runner.invoke(app, ["admin", "disable", "nobody"]).exit_code == 4
    assert _json(runner.invoke(app, ["admin", "disable", "aldo", "--json"])) == {"name": "aldo", "disabled": True}
    listed = json.loads(runner.invoke(app, ["admin", "list", "--json"]).output)
    assert [a["disabled"] for a in listed] == [True, False]
    assert all(added["password"] not in r.details for r in services.audit_records(limit=500))
