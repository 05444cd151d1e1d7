"""`mailkms revoke` on the server's machine goes through the same bulk_revoke approval as the console
and the admin API: more users than [admin] bulk_revoke_approval_threshold at once revoke nothing
and start a request that other administrators approve; `--break-glass` revokes at once and leaves a
loud trace (revoke.break_glass in the audit chain, an ERROR in the log). The revoked certificate is
read back from the published CRL with openssl."""

from __future__ import annotations

import json
import logging
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailkms.cli._main import app
from mailkms.config import load_settings
from mailkms.services import Principal, Role, Services
from tests.conftest import CA_PASSPHRASE, PUBLIC_URL
from tests.integration.test_recovery import enrol

GATED = [f"g{i}@example.org" for i in range(4)]
GLASS = [f"b{i}@example.org" for i in range(4)]
FEW = ["f0@example.org", "f1@example.org"]


@pytest.fixture
def gated(data_dir, db_url, clock, monkeypatch):  # type: ignore[no-untyped-def]
    """Services and the CLI's environment, where more than 3 users at once need 2 approvals."""
    admin = {"bulk_revoke_approval_threshold": 3, "bulk_revoke_approvals": 2}
    settings = load_settings(
        data_dir,
        database_url=db_url,
        ca_passphrase=CA_PASSPHRASE,
        server={"hostname": "localhost", "public_url": PUBLIC_URL},
        admin=admin,
    )
    for name, value in {
        "MAILKMS_DATA": str(settings.data_dir),
        "MAILKMS_DATABASE_URL": settings.effective_database_url,
        "MAILKMS_CA_PASSPHRASE": CA_PASSPHRASE,
        "MAILKMS_SERVER__HOSTNAME": "localhost",
        "MAILKMS_ADMIN__BULK_REVOKE_APPROVAL_THRESHOLD": "3",
        "MAILKMS_ADMIN__BULK_REVOKE_APPROVALS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    svc = Services.build(settings, clock)
    yield svc
    svc.close()


def _states(services: Services, mailboxes: list[str]) -> Counter[str]:
    return Counter(services.users.show(m).state.value for m in mailboxes)


def _revoke(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(app, ["revoke", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])


def _crl_serials(tmp_path: Path) -> str:
    der = CliRunner().invoke(app, ["crl", "export"]).stdout_bytes
    (tmp_path / "crl.der").write_bytes(der)
    done = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", str(tmp_path / "crl.der"), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.upper()


def test_many_users_wait_for_approvals(gated) -> None:  # type: ignore[no-untyped-def]
    for mailbox in GATED + FEW:
        gated.users.add(mailbox, "", None, "admin:test")

    few = _revoke(*FEW)  # up to the threshold: at once, as before
    assert [r["subject"] for r in few["revoked"]] == FEW and _states(gated, FEW) == {"REVOKED": 2}
    assert not gated.approvals.list()

    asked = _revoke(*GATED, "--reason", "superseded")
    approval = asked["approval"]
    assert asked["revoked"] == [] and approval["kind"] == "bulk_revoke" and approval["threshold"] == 2
    assert _states(gated, GATED) == {"REGISTERED": 4}  # nothing revoked yet

    rid = int(approval["id"])
    gated.approvals.approve_plain(Principal("olga", Role.OPERATOR), rid)
    assert _states(gated, GATED) == {"REGISTERED": 4}
    gated.approvals.approve_plain(Principal("oscar", Role.OPERATOR), rid)
    assert _states(gated, GATED) == {"REVOKED": 4}
    started = [r.to_dict() for r in gated.audit_records(action="approval.started", limit=10)]
    assert len(started) == 1 and str(started[0]["actor"]).startswith("admin:")
    assert not gated.audit_records(action="revoke.break_glass", limit=10)


def test_break_glass_revokes_at_once_and_is_audited_loudly(gated, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    enrol(gated, GLASS[0])
    serial = gated.users.show(GLASS[0]).to_dict()
    for mailbox in GLASS[1:]:
        gated.users.add(mailbox, "", None, "admin:test")

    with caplog.at_level(logging.ERROR, logger="mailkms.revoke"):
        done = _revoke(*GLASS, "--break-glass", "--reason", "keyCompromise")
    assert sorted(r["subject"] for r in done["revoked"]) == sorted(GLASS)
    assert _states(gated, GLASS) == {"REVOKED": 4} and not gated.approvals.list()
    assert "BREAK GLASS" in caplog.text and "4 users" in caplog.text
    (record,) = [r.to_dict() for r in gated.audit_records(action="revoke.break_glass", limit=10)]
    assert record["details"]["users"] == GLASS and record["details"]["reason"] == "keyCompromise"

    serials = [s for r in done["revoked"] for s in r["serials"]]
    assert len(serials) == 2, serial  # the enrolled user's signing and encryption certificates
    listed = _crl_serials(tmp_path)
    for s in serials:
        assert s.upper().lstrip("0") in listed.replace(":", "")


def test_break_glass_with_an_unknown_user_is_refused_before_it_is_recorded(gated) -> None:  # type: ignore[no-untyped-def]
    for mailbox in GLASS:
        gated.users.add(mailbox, "", None, "admin:test")
    result = CliRunner().invoke(app, ["revoke", *GLASS, "nobody@example.org", "--break-glass", "--json"])
    assert result.exit_code != 0 and "nobody@example.org" in result.output
    assert not gated.audit_records(action="revoke.break_glass", limit=10)
    assert _states(gated, GLASS) == {"REGISTERED": 4}


def test_break_glass_is_refused_with_server() -> None:
    result = CliRunner().invoke(
        app, ["--server", "https://kms.invalid:8443", "--token", "t", "revoke", *GLASS, "--break-glass", "--json"]
    )
    assert result.exit_code != 0 and "--break-glass" in result.output
