"""`mailkms-client`: the user's side. Messages here are the user's text for every refusal."""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from mailkms.client._autostart import (
    Reply,
    ask_by_notification,
    askpass_passphrase,
    has_terminal,
    install_autostart,
    notify,
    remove_autostart,
    single_auto_logon,
)
from mailkms.client._core import PROMPT, Client, LogonState, SyncReport, logon_state
from mailkms.client._install_cli import register as register_install
from mailkms.client._mail_cli import register as register_mail
from mailkms.client._mailbox_cli import (
    ImapCAOption,
    ImapFolderOption,
    ImapOption,
    ImapPinOption,
    MaildirOption,
    inbox_from_options,
)
from mailkms.client._mailbox_cli import register as register_mailbox
from mailkms.client._mailstores import parse_target, remember
from mailkms.client._store import cert_from_pem
from mailkms.clock import SystemClock
from mailkms.errors import MailboxError, MailkmsError, MailStoreError, ServerRefused
from mailkms.pki import KeyType

app = typer.Typer(
    help="mailkms-client: your S/MIME keys and certificates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
cert_app = typer.Typer(help="Print your current certificates.", no_args_is_help=True)
app.add_typer(cert_app, name="cert")

_home: dict[str, Path] = {}

# What the user reads when the server refuses, by problem type.
USER_TEXT = {
    "reenrolment-required": "Your security certificates have expired and cannot be renewed.\n"
    "Ask your administrator to enrol you again.",
    "revoked": "Your security certificates have been revoked.\nAsk your administrator to enrol you again.",
    "token-used": "This enrolment token has already been used. Ask your administrator for a new one.",
    "token-expired": "This enrolment token has expired. Ask your administrator for a new one.",
    "token-wrong-mailbox": "This enrolment token was made for another e-mail address.",
    "token-invalid": "This enrolment token is not valid. Check it, or ask your administrator for a new one.",
    "token-replaced": "This enrolment token was replaced by a newer one. Use the newest token you were given.",
    "not-due": "Your certificates are not yet due for renewal.",
}


@app.callback()
def _main(
    home: Annotated[
        Path | None, typer.Option("--home", envvar="MAILKMS_CLIENT_HOME", help="key store folder (default ~/.mailkms)")
    ] = None,
) -> None:
    _home["path"] = home or Path.home() / ".mailkms"


def _passphrase_source(confirm: bool = False) -> bytes:
    value = os.environ.get("MAILKMS_CLIENT_PASSPHRASE")
    if value:
        return value.encode()
    if not sys.stdin.isatty():
        asked = askpass_passphrase()
        if asked:
            return asked
        raise MailkmsError("no passphrase: set MAILKMS_CLIENT_PASSPHRASE or MAILKMS_ASKPASS, or run in a terminal")
    first = getpass.getpass("Key store passphrase: ")
    if confirm and getpass.getpass("Repeat the passphrase: ") != first:
        raise MailkmsError("the passphrases differ")
    if len(first) < 8:
        raise MailkmsError("the passphrase must have at least 8 characters")
    return first.encode()


def _client(confirm: bool = False) -> Client:
    return Client(_home["path"], SystemClock(), lambda: _passphrase_source(confirm))


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except ServerRefused as exc:
        text = USER_TEXT.get(exc.problem_code, exc.detail)
        typer.echo(f"{text}\n(server: {exc.problem_code or exc.status})", err=True)
        raise typer.Exit(exc.exit_code) from None
    except MailStoreError as exc:
        typer.echo(f"mailkms-client: {exc.detail}\n(Your keys are unchanged in the mailkms key store.)", err=True)
        raise typer.Exit(exc.exit_code) from None
    except MailkmsError as exc:
        typer.echo(f"mailkms-client: {exc.detail}", err=True)
        raise typer.Exit(exc.exit_code) from None


@app.command()
def enroll(
    server: Annotated[str, typer.Option(help="https URL of the Key Management Server")],
    fingerprint: Annotated[str, typer.Option(help="SHA-256 fingerprint of the root CA, from your administrator")],
    email: Annotated[str, typer.Option(help="your e-mail address")],
    token: Annotated[str, typer.Option(help="the one-time enrolment token")],
    maildir: MaildirOption = None,
    imap: ImapOption = None,
    imap_ca_file: ImapCAOption = None,
    imap_pin: ImapPinOption = None,
    imap_folder: ImapFolderOption = "mailkms",
    key_type: Annotated[KeyType, typer.Option(help="signing key: rsa2048 (default) or p256")] = KeyType.RSA2048,
    install_into: Annotated[
        list[str] | None,
        typer.Option(help="nss:DIR, gpgsm or gpgsm:GNUPGHOME: also install each generation there (repeatable)"),
    ] = None,
) -> None:
    """Enrol: make your signing key, send the request; the certificates arrive by e-mail
    (give --maildir or --imap: where they arrive)."""
    with _user_errors():
        targets = [parse_target(spec) for spec in install_into or []]
        inbox = inbox_from_options(maildir, imap, imap_ca_file, imap_pin, imap_folder)
        client = _client(confirm=True)
        result = client.enroll(server, fingerprint, email, token, inbox, key_type)
        if targets:
            typer.echo(f"Your certificates will also be installed into: {', '.join(remember(client.store, targets))}")
        typer.echo(f"Enrolment request {result['request_id']} accepted for {result['mailbox']}.")
        typer.echo("Your certificates will arrive by e-mail; run `mailkms-client sync` to install them.")


@app.command()
def sync() -> None:
    """Read the mailbox, check the server's replies and install them."""
    with _user_errors():
        client = _client()
        client.unlock()  # a mistyped passphrase stops here, before any mail is judged
        report = _sync(client)
        if report.refused and not report.installed:
            raise typer.Exit(7)


def _sync(client: Client) -> SyncReport:
    """Install what arrived and say so; refusals are reported, and the caller decides what they mean
    (`sync` exits 7 when it only refused; `logon` goes on: a mail must never stop the log-on)."""
    report = client.sync()
    for line in report.installed:
        typer.echo(f"Installed: {line}")
    for line in report.refused:
        typer.echo(f"Refused and left in the mailbox: {line}", err=True)
    for line in report.notes:
        typer.echo(line, err=True)
    if not report.installed and not report.refused:
        typer.echo("No new certificates in the mailbox.")
    return report


class Answer(StrEnum):
    yes = "yes"
    no = "no"


@app.command()
def logon(
    answer: Annotated[Answer | None, typer.Option(help="answer the update question without asking (scripts)")] = None,
    auto: Annotated[
        bool,
        typer.Option(
            "--auto",
            help="run by the session's autostart: ask in the terminal if there is one, else by a desktop notification",
        ),
    ] = False,
) -> None:
    """Log on to advanced security: unlock the keys, install new mail, ask when renewal is due."""
    if auto and answer is None and not has_terminal():
        with single_auto_logon(_home["path"]) as first:
            if not first:
                typer.echo("Another log-on check is running; this one leaves it the question.")
                return
            _logon(None, by_notification=True)
        return
    _logon(answer, by_notification=False)


def _ask(answer: Answer | None, by_notification: bool) -> Reply:
    if answer is not None:
        return Reply.YES if answer is Answer.yes else Reply.NO
    if by_notification:
        return ask_by_notification("Security certificates", PROMPT)
    return Reply.YES if typer.confirm("", default=True, prompt_suffix="[Y/n] ") else Reply.NO


def _can_unlock(client: Client) -> bool:
    try:
        client.passphrase()
    except MailkmsError:
        return False
    return True


def _remind_without_keys(client: Client) -> None:
    """No terminal and no way to the passphrase: the question cannot be answered here, so say
    where it can be (the certificates' dates are public; nothing is unlocked or sent)."""
    state = client.state()
    status = logon_state(state.current, SystemClock().now())
    typer.echo("No terminal and no MAILKMS_ASKPASS: the key store stays locked.")
    if status is LogonState.DUE:
        text = PROMPT.split("\n")[0] + "\nOpen a terminal and run `mailkms-client logon` to send the update request."
        typer.echo(text)
        notify("Security certificates", text)
    elif status is LogonState.EXPIRED:
        notify("Security certificates expired", "Ask your administrator to enrol you again.")


def _logon(answer: Answer | None, *, by_notification: bool) -> None:
    with _user_errors():
        client = _client()
        if by_notification and not _can_unlock(client):
            _remind_without_keys(client)
            return
        client.unlock()
        try:
            _sync(client)
        except MailboxError as exc:  # answer from what is installed here; the mail waits for next time
            typer.echo(f"(Your mailbox could not be read: {exc.detail}.)", err=True)
        state = client.state()
        status = logon_state(state.current, SystemClock().now())
        if status is LogonState.NOT_ENROLLED:
            typer.echo("You are not enrolled yet: your certificates have not arrived.")
            raise typer.Exit(8)
        if status is LogonState.EXPIRED:
            assert state.current is not None
            text = (
                f"Your security certificates expired on {state.current.not_after[:19].replace('T', ' ')} UTC.\n"
                "Expired certificates cannot be renewed: ask your administrator to enrol you again."
            )
            typer.echo(text, err=True)
            if by_notification:
                notify("Security certificates expired", text)
            raise typer.Exit(6)
        server_state = client.server_state()
        if server_state == "REVOKED":
            typer.echo(USER_TEXT["revoked"], err=True)
            if by_notification:
                notify("Security certificates revoked", USER_TEXT["revoked"])
            raise typer.Exit(6)
        if server_state is None:
            typer.echo("(The Key Management Server cannot be reached; working offline.)")
        if status is LogonState.ACTIVE:
            typer.echo("You are logged on to advanced security.")
            return
        typer.echo(PROMPT)
        reply = _ask(answer, by_notification)
        if reply is Reply.NOT_SHOWN:
            typer.echo(
                "The question could not be shown (no terminal and no desktop notifications).\n"
                "No update request was sent. Run `mailkms-client logon` in a terminal to answer it."
            )
            return
        if reply is Reply.UNANSWERED:
            typer.echo("The question was closed unanswered. No update request was sent; you will be asked again.")
            return
        if reply is Reply.NO:
            typer.echo("No update request was sent. You will be asked again at your next log-on.")
            return
        result = client.send_update_request()
        typer.echo(f"The certificate update request was sent (request {result['request_id']}).")
        typer.echo("Your new certificates will arrive by e-mail and are installed at your next log-on or sync.")
        if by_notification:
            notify("Certificate update request sent", "Your new certificates will arrive by e-mail.")


@app.command()
def renew() -> None:
    """Send a certificate update request now, without the log-on question (scripts)."""
    with _user_errors():
        result = _client().send_update_request()
        typer.echo(f"The certificate update request was sent (request {result['request_id']}).")
        typer.echo("Your new certificates will arrive by e-mail.")


@app.command()
def resync() -> None:
    """Ask the server to send its latest reply again (lost mail). Nothing new is issued."""
    with _user_errors():
        result = _client().resync()
        typer.echo(f"The server sends request {result['request_id']} again; run `mailkms-client sync` when it arrives.")


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Your certificates, keys and dates."""
    with _user_errors():
        state = _client().state()
        current = state.current
        now = SystemClock().now()
        data = {
            "mailbox": state.mailbox,
            "server": state.server,
            "root_fingerprint": state.root_fingerprint,
            "state": logon_state(current, now).value,
            "generation": current.generation if current else 0,
            "signing": {
                "serial": current.signing_serial,
                "not_before": current.not_before,
                "not_after": current.not_after,
            }
            if current
            else None,
            "encryption": {"serial": current.encryption_serial} if current else None,
            "reminder_at": current.reminder_at if current else None,
            "encryption_key_history": sorted(state.encryption_history),
            "pending": state.pending.__dict__ if state.pending else None,
        }
        if as_json:
            typer.echo(json.dumps(data, indent=2))
            return
        typer.echo(f"{state.mailbox} at {state.server}: {data['state']}")
        if current:
            typer.echo(f"  generation {current.generation}, installed {current.installed_at[:19]}")
            typer.echo(
                f"  signing    {current.signing_serial}  valid {current.not_before[:19]} .. {current.not_after[:19]}"
            )
            typer.echo(f"  encryption {current.encryption_serial}")
            typer.echo(f"  update reminder from {current.reminder_at[:19]}")
        typer.echo(f"  encryption keys held: {len(state.encryption_history)} (old mail stays readable)")
        if state.pending:
            typer.echo(f"  waiting for the {state.pending.kind} reply to request {state.pending.request_id}")


def _print_cert(kind: str) -> None:
    with _user_errors():
        current = _client().state().current
        if current is None:
            typer.echo("no certificates installed yet", err=True)
            raise typer.Exit(8)
        pem = current.signing_pem if kind == "signing" else current.encryption_pem
        cert_from_pem(pem)
        typer.echo(pem.strip())


@cert_app.command("signing")
def cert_signing() -> None:
    """The current signing certificate, PEM."""
    _print_cert("signing")


@cert_app.command("encryption")
def cert_encryption() -> None:
    """The current encryption certificate, PEM."""
    _print_cert("encryption")


@app.command("install-autostart")
def install_autostart_command(
    systemd: Annotated[bool, typer.Option(help="a systemd user service + timer")] = True,
    xdg: Annotated[bool, typer.Option(help="an XDG autostart entry (~/.config/autostart)")] = True,
    remove: Annotated[bool, typer.Option("--remove", help="remove what install-autostart wrote")] = False,
) -> None:
    """Run `mailkms-client logon` at the start of your desktop session, without typing it."""
    with _user_errors():
        if remove:
            for path in remove_autostart():
                typer.echo(f"Removed {path}")
            return
        _client().state()  # an enrolled key store, or a clear error
        done = install_autostart(_home["path"], systemd=systemd, xdg=xdg)
        for path in done.written:
            typer.echo(f"Wrote {path}")
        typer.echo(
            "At the start of each session `mailkms-client logon --auto` runs: the question appears in a terminal\n"
            "if there is one, else as a desktop notification with Yes and No. Without a terminal it unlocks the\n"
            "key store with MAILKMS_ASKPASS (a program that prints the passphrase, e.g. `ssh-askpass`)."
        )
        if done.enable_hint:
            typer.echo(f"To start it in this session: {done.enable_hint}")


register_mail(app, _client, _user_errors)
register_mailbox(app, _client, _user_errors)
register_install(app, _client, _user_errors)


def main() -> None:
    app()
