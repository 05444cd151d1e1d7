"""`mailkms-client logon` with a mail it cannot read: the mail is refused, the log-on goes on."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailkms.client import _cli
from mailkms.client._core import PROMPT
from tests.testca import START
from tests.unit.client import delivery_kit as kit_
from tests.unit.client.delivery_kit import Kit, make_kit

DUE = START + dt.timedelta(days=366)  # the kit's reminder point is START + 365 days


@pytest.fixture
def kit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Kit:
    """An enrolled key store (the real reply installed), the CLI on the kit's client and clock."""
    kit = make_kit(tmp_path / "home")
    kit.add_mail(kit.deliver())
    assert len(kit.client.sync().installed) == 1
    monkeypatch.setattr(_cli, "_client", lambda confirm=False: kit.client)
    monkeypatch.setattr(_cli, "SystemClock", lambda: kit.clock)
    return kit


def _logon(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(_cli.app, ["logon", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_logon_with_a_jamming_mail_still_asks_the_question_when_due(kit: Kit) -> None:
    kit.add_mail(kit_.jamming_mail(kit))
    kit.clock.set(DUE)
    code, out, err = _logon("--answer", "no")
    assert code == 0, (out, err)
    assert "Refused and left in the mailbox" in err and "could not be read" not in err
    assert PROMPT + "\n" in out
    assert "No update request was sent" in out
    # the next log-on does not report the mail again, and still asks
    code, out, err = _logon("--answer", "no")
    assert code == 0 and "Refused" not in err and PROMPT + "\n" in out


def test_logon_before_the_reminder_point_goes_on_after_a_refusal(kit: Kit) -> None:
    kit.add_mail(kit_.jamming_mail(kit))
    code, out, err = _logon()
    assert code == 0, (out, err)
    assert "Refused and left in the mailbox" in err
    assert "You are logged on to advanced security." in out and PROMPT not in out


def test_sync_alone_still_exits_7_when_it_only_refused(kit: Kit) -> None:
    kit.add_mail(kit_.jamming_mail(kit))
    result = CliRunner().invoke(_cli.app, ["sync"])
    assert result.exit_code == 7 and "Refused and left in the mailbox" in result.stderr
