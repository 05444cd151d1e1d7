"""`mailkms-client` options for where deliveries arrive (`--maildir` or `--imap`), and
`mailkms-client mailbox set|show`."""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer

from mailkms.client._core import Client
from mailkms.client._mailbox import DEFAULT_DONE_FOLDER, ImapSettings, describe, parse_imap_url
from mailkms.errors import Malformed

PASSWORD_ENV = "MAILKMS_IMAP_PASSWORD"

MaildirOption = Annotated[
    Path | None, typer.Option(help="your mailbox as a local Maildir, where the certificates arrive")
]
ImapOption = Annotated[
    str | None,
    typer.Option(
        "--imap",
        help="your mailbox on an IMAP server: imaps://USER@HOST[:993]/INBOX (TLS) or imap://USER@HOST[:143]/INBOX"
        f" (STARTTLS required); USER may be URL-encoded (alice%40example.org); password from ${PASSWORD_ENV}"
        " or a prompt, kept encrypted with your key-store passphrase",
    ),
]
ImapCAOption = Annotated[
    Path | None, typer.Option("--imap-ca-file", help="trust this CA (PEM) for the IMAP server instead of the system's")
]
ImapPinOption = Annotated[
    str | None,
    typer.Option("--imap-pin", help="pin the IMAP server's certificate: sha256:HEX (checked instead of the chain)"),
]
ImapFolderOption = Annotated[
    str, typer.Option("--imap-folder", help="folder installed deliveries are moved into (created if missing)")
]


def imap_password(user: str, host: str) -> str:
    value = os.environ.get(PASSWORD_ENV)
    if value:
        return value
    if not sys.stdin.isatty():
        raise Malformed(f"no IMAP password: set {PASSWORD_ENV} or run in a terminal")
    value = getpass.getpass(f"IMAP password of {user} at {host}: ")
    if not value:
        raise Malformed("the IMAP password is empty")
    return value


def inbox_from_options(
    maildir: Path | None, imap: str | None, ca_file: Path | None, pin: str | None, folder: str
) -> Path | ImapSettings:
    """Exactly one of --maildir and --imap; the IMAP options only with --imap."""
    if (maildir is None) == (imap is None):
        raise Malformed("give exactly one of --maildir DIR and --imap URL: where your certificates arrive")
    if maildir is not None:
        if ca_file or pin or folder != DEFAULT_DONE_FOLDER:
            raise Malformed("--imap-ca-file, --imap-pin and --imap-folder go with --imap")
        return maildir.expanduser().resolve()
    assert imap is not None
    if ca_file and pin:
        raise Malformed("give --imap-ca-file or --imap-pin, not both")
    url = parse_imap_url(imap)
    ca_pem = ""
    if ca_file is not None:
        try:
            ca_pem = ca_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise Malformed(f"cannot read {ca_file}: {exc}") from None
        if "-----BEGIN CERTIFICATE-----" not in ca_pem:
            raise Malformed(f"{ca_file} holds no PEM certificate")
    return ImapSettings(url, imap_password(url.user, url.host), folder, ca_pem, pin or "")


def register(
    app: typer.Typer,
    make_client: Callable[[bool], Client],
    user_errors: Callable[[], AbstractContextManager[None]],
) -> None:
    mailbox_app = typer.Typer(
        help="Where your certificates arrive: a Maildir or an IMAP account.", no_args_is_help=True
    )
    app.add_typer(mailbox_app, name="mailbox")

    @mailbox_app.command("set")
    def set_(
        maildir: MaildirOption = None,
        imap: ImapOption = None,
        imap_ca_file: ImapCAOption = None,
        imap_pin: ImapPinOption = None,
        imap_folder: ImapFolderOption = DEFAULT_DONE_FOLDER,
    ) -> None:
        """Read deliveries from another mailbox from now on; with --imap, also to store a new password."""
        with user_errors():
            client = make_client(False)
            client.set_mailbox(inbox_from_options(maildir, imap, imap_ca_file, imap_pin, imap_folder))
            typer.echo(f"Deliveries are now read from {describe(client.state())}.")

    @mailbox_app.command("show")
    def show() -> None:
        """Where deliveries are read from (never the password)."""
        with user_errors():
            typer.echo(describe(make_client(False).state()))

    del set_, show
