"""`mailkms outbox`: what mail waits and why; `mailkms outbox retry`: try again now."""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mailkms.cli._exit import exit_on_error
from mailkms.cli._remote import local_services
from mailkms.errors import Malformed
from mailkms.services import OutboxEntry, OutboxListing


def _console() -> Console:
    """The terminal's width; a wide fixed one into a pipe or file, so that rows do not fold."""
    console = Console()
    return console if console.is_terminal else Console(width=220)


_services = local_services


def _when(value: dt.datetime | None, now: dt.datetime) -> str:
    if value is None:
        return "-"
    seconds = (value - now).total_seconds()
    rel = f"in {seconds:.0f} s" if seconds > 0 else ("due" if seconds > -1 else f"due for {-seconds:.0f} s")
    return f"{value:%Y-%m-%d %H:%M:%S} ({rel})"


def _summary(listing: OutboxListing, now: dt.datetime) -> str:
    if not listing.waiting:
        return "the outbox is empty: every mail has been handed to the relay"
    age = (now - listing.oldest_queued_at).total_seconds() if listing.oldest_queued_at else 0.0
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(listing.by_kind.items()))
    return f"{listing.waiting} mail(s) waiting, the oldest queued {age:.0f} s ago; last failure: {kinds}"


def _row(e: OutboxEntry, now: dt.datetime) -> list[str]:
    what = e.purpose + (f"\n{e.subject}" if e.subject else "")
    if e.sent_at is not None:
        status = f"sent {e.sent_at:%Y-%m-%d %H:%M:%S}"
    else:
        status = f"next {_when(e.next_attempt_at, now)}"
    claimed = e.claimed_by or "-"
    if e.claimed_by and e.sent_at is None:
        held = e.claimed_until is not None and e.claimed_until >= now
        claimed += f" (sending, lease until {e.claimed_until:%H:%M:%S})" if held else " (last)"
    error = f"{e.last_error_kind}: {e.last_error}" if e.last_error_kind else (e.last_error or "-")
    return [
        str(e.id),
        e.recipient,
        e.message_id,
        what,
        f"{e.created_at:%Y-%m-%d %H:%M:%S}",
        str(e.attempts),
        status,
        error,
        claimed,
    ]


def register(app: typer.Typer) -> None:
    outbox_app = typer.Typer(
        help="Mail waiting to go out: what, since when, and why it has not gone yet.",
        invoke_without_command=True,
    )
    app.add_typer(outbox_app, name="outbox")
    admin = f"admin:{os.environ.get('USER', 'unknown')}"

    @outbox_app.callback()
    def outbox(
        ctx: typer.Context,
        show_all: Annotated[bool, typer.Option("--all", help="also the most recently sent mails")] = False,
        limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many of each")] = 100,
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    ) -> None:
        """List the mails waiting in the outbox (oldest first) with the last error of each.

        Kinds of error: connect, timeout, disconnected (the relay is down or unreachable);
        tls-verify, tls, starttls-missing (TLS with the relay); auth, auth-unsupported (the
        login); sender-refused, recipient-refused, message-refused (5xx: the relay refuses this
        mail, retried at the longest interval until an administrator acts); temporary (4xx);
        smtp, other. Nothing is ever dropped.
        """
        if ctx.invoked_subcommand is not None:
            return
        with exit_on_error(as_json):
            services = _services()
            listing = services.outbox.list(include_sent=show_all, limit=limit)
            now = services.clock.now()
            if as_json:
                print(json.dumps(listing.to_dict(), indent=2))
                return
            print(_summary(listing, now))
            if not listing.entries:
                return
            table = Table(
                "id", "recipient", "Message-ID", "what", "queued (UTC)", "tries", "state", "last error", "claimed by"
            )
            for entry in listing.entries:
                table.add_row(*_row(entry, now))
            _console().print(table)
            shown = sum(1 for e in listing.entries if e.sent_at is None)
            if listing.waiting > shown:
                print(f"({listing.waiting - shown} more waiting; --limit to see them)")

    @outbox_app.command("retry")
    def retry(
        ids: Annotated[list[int] | None, typer.Argument(help="outbox ids (see `mailkms outbox`)")] = None,
        every: Annotated[bool, typer.Option("--all", help="every waiting mail")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    ) -> None:
        """Try waiting mails again now instead of at their next attempt (after fixing the relay).

        The running server picks them up within [outbox] poll_seconds."""
        with exit_on_error(as_json):
            if bool(ids) == every:
                raise Malformed("name the outbox ids to retry, or --all")
            count = _services().outbox.retry(ids or (), every=every, actor=admin)
            print(json.dumps({"retried": count}) if as_json else f"{count} mail(s) due now")
