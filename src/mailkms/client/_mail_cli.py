"""`mailkms-client sign | verify | encrypt | decrypt | export | import`: RFC 5322 in, S/MIME out."""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Annotated

import typer

from mailkms.client._core import Client
from mailkms.client._http import Api
from mailkms.client._mail import CRLChecker, NoRevocationCheck, SecureMail, import_pkcs12
from mailkms.clock import SystemClock
from mailkms.errors import MailkmsError, Malformed
from mailkms.pki import read_pkcs12

MessageArg = Annotated[Path | None, typer.Argument(help="RFC 5322 message file (default: standard input)")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="write here (default: standard output)")]
EXPORT_ENV = "MAILKMS_EXPORT_PASSWORD"
IMPORT_ENV = "MAILKMS_IMPORT_PASSWORD"


def _read(message: Path | None) -> bytes:
    try:
        data = message.read_bytes() if message else sys.stdin.buffer.read()
    except OSError as exc:
        raise Malformed(f"cannot read {message}: {exc.strerror}") from None
    if not data.strip():
        raise Malformed("the input is empty")
    return data


def _write(data: bytes, out: Path | None) -> None:
    if out:
        out.write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


@contextmanager
def _no_traceback() -> Iterator[None]:
    """Damaged input that slipped past the parsers still gets a sentence, not a traceback."""
    try:
        yield
    except (ValueError, TypeError, KeyError, IndexError, UnicodeError) as exc:
        raise Malformed(f"the input cannot be read ({exc.__class__.__name__}): damaged or not S/MIME") from None


def _password(env: tuple[str, ...], prompt: str, confirm: bool) -> str:
    for name in env:
        value = os.environ.get(name)
        if value:
            return value
    if not sys.stdin.isatty():
        raise MailkmsError(f"no password: set {env[0]} or run in a terminal")
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Repeat it: ") != first:
        raise MailkmsError("the passwords differ")
    return first


def write_export(secure: SecureMail, out: Path) -> None:
    """`export --out` and `install --pkcs12`: one PKCS#12 file (mode 0600) with the whole key history."""
    secure.store.load()
    password = _password((EXPORT_ENV,), "Password for the PKCS#12 file: ", confirm=True)
    if len(password) < 8:
        raise Malformed("the export password must have at least 8 characters")
    data, names = secure.export(password)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    typer.echo(f"Wrote {out} with {len(names)} keys and the CA chain:")
    for name in names:
        typer.echo(f"  {name}")


def register(
    app: typer.Typer,
    make_client: Callable[..., Client],
    user_errors: Callable[[], AbstractContextManager[None]],
) -> None:
    def mail(no_revocation: bool = False) -> SecureMail:
        checker = NoRevocationCheck() if no_revocation else CRLChecker()
        return SecureMail(make_client(), SystemClock(), checker)

    @app.command()
    def sign(
        message: MessageArg = None,
        out: OutOpt = None,
        opaque: Annotated[
            bool, typer.Option("--opaque", help="application/pkcs7-mime signed-data instead of multipart/signed")
        ] = False,
    ) -> None:
        """Sign a message with your signing key (multipart/signed, detached, by default)."""
        with user_errors(), _no_traceback():
            _write(mail().sign(_read(message), opaque=opaque), out)

    @app.command()
    def verify(
        message: MessageArg = None,
        out: OutOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the findings as JSON instead")] = False,
        no_revocation: Annotated[bool, typer.Option("--no-revocation", help="do not fetch the CRL")] = False,
    ) -> None:
        """Check a signed message: who signed it, and whether to trust it. Writes the signed content.

        Exit 0 when trusted, 3 when the signature is broken or the signer is not to be trusted,
        2 when the message is not signed or cannot be read.
        """
        with user_errors(), _no_traceback():
            report = mail(no_revocation).verify(_read(message))
            if as_json:
                typer.echo(json.dumps(report.to_dict(), indent=2))
            else:
                _write(report.message, out)
                for line in report.lines():
                    typer.echo(line, err=True)
            if not report.trusted:
                raise typer.Exit(3)

    @app.command()
    def encrypt(
        to: Annotated[list[str], typer.Option("--to", help="recipient address (repeat for several)")],
        message: MessageArg = None,
        out: OutOpt = None,
        sign_too: Annotated[bool, typer.Option("--sign", help="sign first, then encrypt")] = False,
        refresh: Annotated[bool, typer.Option("--refresh", help="ask the directory again, ignore the cache")] = False,
    ) -> None:
        """Encrypt to each recipient's certificate from the directory, and to your own."""
        with user_errors(), _no_traceback():
            data, notes = mail().encrypt(_read(message), to, sign=sign_too, refresh=refresh)
            _write(data, out)
            for note in notes:
                typer.echo(f"note: {note}", err=True)

    @app.command()
    def decrypt(message: MessageArg = None, out: OutOpt = None) -> None:
        """Decrypt with any of your encryption keys, old ones included."""
        with user_errors(), _no_traceback():
            plain, cert = mail().decrypt(_read(message))
            _write(plain, out)
            typer.echo(f"Decrypted with your encryption key {cert.serial_number:x}.", err=True)

    @app.command()
    def export(
        out: Annotated[Path, typer.Option("--out", "-o", help="the PKCS#12 file to write")],
    ) -> None:
        """All your keys (signing, and every encryption key ever), their certificates and the CA
        chain in one PKCS#12 file for your mail program. Password: asked, or MAILKMS_EXPORT_PASSWORD."""
        with user_errors():
            write_export(mail(), out)

    @app.command("import")
    def import_(
        file: Annotated[Path, typer.Argument(help="a PKCS#12 file made by `mailkms-client export`")],
        fingerprint: Annotated[
            str | None, typer.Option(help="SHA-256 fingerprint of the root CA, to check the file's")
        ] = None,
        server: Annotated[str, typer.Option(help="https URL of the Key Management Server (for renewal)")] = "",
        maildir: Annotated[Path | None, typer.Option(help="your Maildir, where renewed certificates arrive")] = None,
    ) -> None:
        """Read a PKCS#12 export into a new key store (moving to a new machine)."""
        with user_errors():
            client = make_client(True)
            home = client.store.home
            try:
                data = file.read_bytes()
            except OSError as exc:
                raise Malformed(f"cannot read {file}: {exc.strerror}") from None
            password = _password((IMPORT_ENV, EXPORT_ENV), "Password of the PKCS#12 file: ", confirm=False)
            mail_from, reminder = "", 12
            if server:
                roots = [c for c in read_pkcs12(data, password).chain if c.issuer == c.subject]
                if roots:
                    info = Api(server, roots[0]).server_info()
                    mail_from, reminder = str(info["mail_from"]), int(info["reminder_months"])
            report = import_pkcs12(
                home,
                data,
                password,
                client.passphrase(),
                SystemClock(),
                fingerprint=fingerprint,
                server=server,
                maildir=str(maildir.resolve()) if maildir else "",
                mail_from=mail_from,
                reminder_months=reminder,
            )
            typer.echo(f"Imported the keys of {report.mailbox} into {home}.")
            typer.echo(f"  signing key {report.signing}; encryption keys: {', '.join(report.encryption)}")
            typer.echo(f"  root CA SHA-256 fingerprint: {report.root_fingerprint}")
            if not fingerprint:
                typer.echo("  Check this fingerprint with your administrator: it is now the CA you trust.")
