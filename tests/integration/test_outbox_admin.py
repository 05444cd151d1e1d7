"""`mailkms outbox` and `mailkms outbox retry` on a real store (SQLite and PostgreSQL): the
service (OutboxQueue) and the command line (exit codes, --json)."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from typer.testing import CliRunner

from mailkms.cli._main import app
from mailkms.clock import SystemClock
from mailkms.errors import Conflict, NotFound
from mailkms.mail import OutboxWorker
from tests.outbox_support import queue_mails


class Refusing:
    """A relay that refuses the login of one run and takes everything after `fixed`."""

    def __init__(self) -> None:
        self.fixed = False
        self.sent: list[str] = []

    def send(self, sender: str, recipient: str, body: bytes) -> None:
        import smtplib

        if not self.fixed:
            raise smtplib.SMTPAuthenticationError(535, b"5.7.8 Error: authentication failed")
        self.sent.append(recipient)


def _queue(services, n: int) -> None:  # type: ignore[no-untyped-def]
    queue_mails(
        services,
        [(f"<admin{i}@x>", f"u{i}@example.org") for i in range(n)],
        subject="=?utf-8?q?Zertifikate_f=C3=BCr_Sie?=",
        purpose="delivery:enrolment",
    )


def test_listing_and_retry(services, clock) -> None:  # type: ignore[no-untyped-def]
    _queue(services, 3)
    relay = Refusing()
    worker = OutboxWorker(services.db, relay, clock, services.audit, worker_id="node-a", retry_base=60, retry_max=600)
    assert worker.run_once() == 0
    listing = services.outbox.list()
    assert listing.waiting == 3 and listing.by_kind == {"auth": 3}
    first = listing.entries[0]
    assert (first.recipient, first.message_id, first.purpose) == ("u0@example.org", "<admin0@x>", "delivery:enrolment")
    assert first.subject == "Zertifikate für Sie"  # decoded from the message's header
    assert first.attempts == 1 and first.last_error_kind == "auth" and "535" in (first.last_error or "")
    assert first.next_attempt_at == clock.now() + dt.timedelta(seconds=60) and first.claimed_by == "node-a"
    assert first.to_dict()["state"] == "waiting"

    with pytest.raises(NotFound):
        services.outbox.retry([first.id, 999])
    relay.fixed = True
    assert services.outbox.retry([first.id], actor="admin:test") == 1
    assert worker.run_once() == 1 and relay.sent == ["u0@example.org"]
    with pytest.raises(Conflict):
        services.outbox.retry([first.id])
    assert services.outbox.retry(kinds=["connect"]) == 0
    assert services.outbox.retry(kinds=["auth"]) == 2
    assert services.outbox.retry(every=True) == 0  # already due: nothing to move
    assert worker.run_once() == 2
    everything = services.outbox.list(include_sent=True)
    assert everything.waiting == 0 and [e.state for e in everything.entries] == ["sent"] * 3
    assert all(e.last_error_kind is None and e.next_attempt_at is None for e in everything.entries)
    assert services.verify_audit().ok


def test_the_command_line(services, cli_env) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    empty = runner.invoke(app, ["outbox"])
    assert empty.exit_code == 0 and "the outbox is empty" in empty.output
    _queue(services, 2)
    # the command reads the system clock: the failure is scheduled from it
    OutboxWorker(services.db, Refusing(), SystemClock(), services.audit, retry_base=3600).run_once()
    listed = runner.invoke(app, ["outbox", "--json"])
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.output)
    assert data["waiting"] == 2 and data["by_kind"] == {"auth": 2}
    assert [m["last_error_kind"] for m in data["messages"]] == ["auth", "auth"]
    text = runner.invoke(app, ["outbox"]).output
    assert "2 mail(s) waiting" in text and "auth 2" in text and "u1@example.org" in text
    assert runner.invoke(app, ["outbox", "retry"]).exit_code == 2  # neither ids nor --all
    assert runner.invoke(app, ["outbox", "retry", "1", "--all"]).exit_code == 2
    unknown = runner.invoke(app, ["outbox", "retry", "999", "--json"])
    assert unknown.exit_code == 4 and json.loads(unknown.output)["error"] == "not-found"
    retried = runner.invoke(app, ["outbox", "retry", "--all", "--json"])
    assert retried.exit_code == 0 and json.loads(retried.output) == {"retried": 2}
