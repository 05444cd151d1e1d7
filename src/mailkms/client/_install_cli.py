"""`mailkms-client install --nss DIR | --gpgsm [--gnupg-home DIR] | --pkcs12 FILE [--remember]`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer

from mailkms.client._core import Client
from mailkms.client._mail import NoRevocationCheck, SecureMail
from mailkms.client._mail_cli import write_export
from mailkms.client._mailstores import (
    GpgsmStore,
    NSSStore,
    Secrets,
    bundle_of,
    default_gnupg_home,
    interactive,
    remember,
)
from mailkms.clock import SystemClock
from mailkms.errors import Malformed


def register(
    app: typer.Typer,
    make_client: Callable[..., Client],
    user_errors: Callable[[], AbstractContextManager[None]],
) -> None:
    @app.command()
    def install(
        nss: Annotated[
            Path | None,
            typer.Option("--nss", help="NSS database folder (Thunderbird or Evolution profile), sql: format"),
        ] = None,
        gpgsm: Annotated[bool, typer.Option("--gpgsm", help="gpgsm (KMail, mutt, Claws)")] = False,
        gnupg_home: Annotated[
            Path | None, typer.Option("--gnupg-home", help="GnuPG home for --gpgsm (default $GNUPGHOME or ~/.gnupg)")
        ] = None,
        pkcs12: Annotated[
            Path | None,
            typer.Option("--pkcs12", help="write a PKCS#12 file (Outlook, Apple Mail): the same as `export --out`"),
        ] = None,
        keep: Annotated[
            bool,
            typer.Option("--remember", help="also install every future generation there at `sync` and `logon`"),
        ] = False,
    ) -> None:
        """Install your signing key, every encryption key you ever held and the CA chain into your mail
        program's key store. Passwords: MAILKMS_NSS_PASSWORD, MAILKMS_GPGSM_PASSPHRASE,
        MAILKMS_EXPORT_PASSWORD, or asked on the terminal. Running it again installs nothing twice."""
        with user_errors():
            if nss is None and not gpgsm and pkcs12 is None:
                raise Malformed("name a key store: --nss DIR, --gpgsm or --pkcs12 FILE")
            if gnupg_home is not None and not gpgsm:
                raise Malformed("--gnupg-home goes with --gpgsm")
            if keep and nss is None and not gpgsm:
                raise Malformed("--remember records --nss and --gpgsm targets (a PKCS#12 file is written once)")
            client = make_client()
            stores: list[NSSStore | GpgsmStore] = []
            if nss is not None:
                stores.append(NSSStore(nss))
            if gpgsm:
                stores.append(GpgsmStore(gnupg_home or default_gnupg_home()))
            if stores:
                state = client.state()
                bundle = bundle_of(client.store, state, client.passphrase)
                secrets = Secrets(interactive=interactive())
                for store in stores:
                    for line in store.install(bundle, secrets).lines():
                        typer.echo(line)
                if keep:
                    targets = remember(client.store, [s.target for s in stores])
                    typer.echo(f"Every new generation will also be installed into: {', '.join(targets)}")
            if pkcs12 is not None:
                write_export(SecureMail(client, SystemClock(), NoRevocationCheck()), pkcs12)
