"""Admin commands for scale: `mailkms reminders sweep|summary`, `mailkms user import`, `mailkms pool status|fill`."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mailkms.cli._exit import exit_on_error
from mailkms.cli._remote import local_services
from mailkms.errors import MailkmsError, Malformed
from mailkms.services import UserState, UserView, names_by_mailbox, parse_users_csv

err_console = Console(stderr=True)
_DURATION = re.compile(r"^\s*(\d+)\s*([dhw])\s*$")


def parse_duration(text: str) -> dt.timedelta:
    """'30d', '12h', '2w'."""
    match = _DURATION.match(text.lower())
    if not match:
        raise Malformed(f"{text!r} is not a duration like 30d, 12h or 2w")
    n, unit = int(match.group(1)), match.group(2)
    return {"d": dt.timedelta(days=n), "h": dt.timedelta(hours=n), "w": dt.timedelta(weeks=n)}[unit]


def expiring(views: list[UserView], within: dt.timedelta, now: dt.datetime) -> list[UserView]:
    """Users whose current certificates are still valid and expire within `within`."""
    live = (UserState.ACTIVE, UserState.DUE)
    return [v for v in views if v.state in live and v.expires_at is not None and now <= v.expires_at <= now + within]


@contextmanager
def progress_bar(description: str) -> Iterator[Progress]:
    """A rich progress bar on a terminal (stderr), silent otherwise (scripts, logs)."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=not err_console.is_terminal,
        transient=False,
    ) as progress:
        yield progress


IMPORT_BATCH = 500  # users per transaction in `user import`
IMPORT_PROGRESS_EVERY = 10_000  # without a terminal, a progress line on stderr this often


_services = local_services


def _open_secret_file(path: Path) -> int:
    """A new file only the owner can read; never overwrites (tokens must not leak into an old file)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise Malformed(f"{path} exists; tokens are only written to a new file") from None


def read_users_csv(path: Path) -> list[tuple[str, str, str | None]]:
    """email,name[,group] per line; a header line starting with 'email' is skipped; '#' lines are comments."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return parse_users_csv(fh, str(path))


def register(app: typer.Typer) -> None:
    reminders_app = typer.Typer(help="Reminder mails from the server.", no_args_is_help=True)
    pool_app = typer.Typer(help="The pool of pre-generated encryption keys.", no_args_is_help=True)
    app.add_typer(reminders_app, name="reminders")
    app.add_typer(pool_app, name="pool")
    user_app = next(g.typer_instance for g in app.registered_groups if g.name == "user" and g.typer_instance)
    assert user_app is not None
    admin = f"admin:{os.environ.get('USER', 'unknown')}"

    @reminders_app.command("sweep")
    def reminders_sweep(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Mail every user who reached the reminder point or the last notice, once per generation."""
        from mailkms.mail import reminder_sweep

        with exit_on_error(as_json):
            services = _services()
            with progress_bar("reminders") as progress:
                task = progress.add_task("reminders", total=None)

                def step(done: int, total: int) -> None:
                    progress.update(task, completed=done, total=total)

                report = reminder_sweep(services).sweep(step)
            data = report.to_dict()
            text = (
                f"{report.due_sent} reminders and {report.final_sent} last notices queued"
                f" ({report.already_claimed} already sent by another node)"
                + ("; summary sent to administrators" if report.summary_sent else "")
            )
            print(json.dumps(data, indent=2) if as_json else text)

    @reminders_app.command("summary")
    def reminders_summary(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Mail the administrators ([reminders] admins) today's summary, unless a node already did."""
        from mailkms.mail import reminder_sweep

        with exit_on_error(as_json):
            services = _services()
            if not services.settings.reminders.admins:
                raise Malformed("no administrators configured: set [reminders] admins in mailkms.toml")
            sent = reminder_sweep(services).send_summary()
            print(json.dumps({"sent": sent}) if as_json else ("summary queued" if sent else "already sent today"))

    @user_app.command("import")
    def user_import(
        csv_path: Annotated[Path, typer.Argument(help="CSV: email,name[,group] per line")],
        tokens_out: Annotated[
            Path, typer.Option("--tokens-out", help="NEW file (mode 0600) for the one-time tokens: email,token,expires")
        ],
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Register many users at once. Tokens go only to --tokens-out (0600, never overwritten), not the screen."""
        with exit_on_error(as_json):
            rows = read_users_csv(csv_path)
            services = _services()
            ttl = services.settings.policy.token_ttl_days
            failures: list[dict[str, str]] = []
            added = 0
            fd = _open_secret_file(tokens_out)
            with os.fdopen(fd, "w", newline="") as out, progress_bar("import") as progress:
                writer = csv.writer(out)
                writer.writerow(["email", "name", "token", "expires_at"])
                task = progress.add_task("users", total=len(rows))
                for start in range(0, len(rows), IMPORT_BATCH):
                    batch = rows[start : start + IMPORT_BATCH]
                    names = names_by_mailbox(batch)
                    # Tokens are written only after their batch is committed: the file never names a user
                    # that is not in the store.
                    expires = services.clock.now() + dt.timedelta(days=ttl)
                    for email, outcome in services.users.add_many(batch, admin):
                        if isinstance(outcome, MailkmsError):
                            failures.append({"email": email, "error": outcome.code, "detail": outcome.detail})
                        else:
                            writer.writerow(
                                [email, names.get(email, ""), outcome, expires.isoformat(timespec="seconds")]
                            )
                            added += 1
                    out.flush()
                    progress.advance(task, len(batch))
                    done = start + len(batch)
                    if not err_console.is_terminal and (done % IMPORT_PROGRESS_EVERY < len(batch) or done == len(rows)):
                        print(f"import: {done:,}/{len(rows):,} users", file=sys.stderr, flush=True)
            data = {"added": added, "failed": failures, "tokens_file": str(tokens_out)}
            if as_json:
                print(json.dumps(data, indent=2))
            else:
                print(f"{added} users added; their one-time tokens are in {tokens_out} (mode 0600, valid {ttl} days)")
                for f in failures:
                    print(f"  not added: {f['email']}: {f['detail']}", file=sys.stderr)
            if failures:
                raise typer.Exit(2)

    @pool_app.command("status")
    def pool_status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """How many pre-generated encryption keys are ready."""
        with exit_on_error(as_json):
            services = _services()
            ready = services.key_pool.size() if services.key_pool else 0
            target = services.settings.pool.size
            print(json.dumps({"ready": ready, "size": target}) if as_json else f"{ready} of {target} keys ready")

    @pool_app.command("fill")
    def pool_fill(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Fill the pool up to [pool] size now (the server also does this in the background)."""
        with exit_on_error(as_json):
            services = _services()
            if services.key_pool is None:
                raise Malformed("the key pool is off ([pool] size = 0)")
            pool = services.key_pool
            with progress_bar("keys") as progress:
                task = progress.add_task("keys", total=max(0, services.settings.pool.size - pool.size()))
                added = 0
                while True:
                    n = pool.refill_once()
                    if n == 0:
                        break
                    added += n
                    progress.advance(task, n)
            print(json.dumps({"added": added, "ready": pool.size()}) if as_json else f"{added} keys added")
