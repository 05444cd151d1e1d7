"""`mailkms recovery ...` and `mailkms recover EMAIL`: the M-of-N quorum of recovery officers.

Passphrases of NEW officers (recovery init): `--passphrase-file F` (one per line, in officer
order), else MAILKMS_OFFICER_PASSPHRASE_<i> (i = 1..N), else asked twice on the terminal.
Shares of the CURRENT quorum: `--share FILE` (repeat), each with its passphrase from
`--share-passphrase-file F` (one per line, in --share order), else MAILKMS_SHARE_PASSPHRASE_<k>
(k = 1.. in --share order), else asked on the terminal; with no --share on a terminal, the
share files' paths are asked for too.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509

from mailkms.cli._exit import exit_on_error
from mailkms.cli._remote import local_services
from mailkms.errors import MailkmsError, Malformed
from mailkms.pki import read_share
from mailkms.services import NewOfficer, ShareInput

JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
SharesOpt = Annotated[
    list[Path] | None,
    typer.Option("--share", help="a current officer's share file (repeat, one per officer)"),
]
SharePassOpt = Annotated[
    Path | None,
    typer.Option(
        "--share-passphrase-file",
        help="passphrases of the --share files, one per line in the same order (else MAILKMS_SHARE_PASSPHRASE_<k>)",
    ),
]


def _actor() -> str:
    return f"admin:{os.environ.get('USER', 'unknown')}"


_services = local_services


def _emit(data: object, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if as_json else text)


def _tty() -> bool:
    return sys.stdin.isatty()


def _lines(path: Path, count: int, what: str) -> list[bytes]:
    try:
        lines = [line for line in path.read_text().splitlines() if line]
    except OSError as exc:
        raise Malformed(f"cannot read {path}: {exc.strerror}") from None
    if len(lines) < count:
        raise Malformed(f"{path} holds {len(lines)} passphrase(s); {count} {what} need one each")
    return [line.encode() for line in lines[:count]]


def officer_passphrases(names: list[str], passphrase_file: Path | None) -> list[bytes]:
    if passphrase_file is not None:
        return _lines(passphrase_file, len(names), "officers")
    out: list[bytes] = []
    for i, name in enumerate(names, start=1):
        value = os.environ.get(f"MAILKMS_OFFICER_PASSPHRASE_{i}")
        if value:
            out.append(value.encode())
            continue
        if not _tty():
            raise Malformed(
                f"no passphrase for officer {i} ({name}): use --passphrase-file, "
                f"MAILKMS_OFFICER_PASSPHRASE_{i} or a terminal"
            )
        first = getpass.getpass(f"Officer {name}: choose your passphrase (at least 12 characters): ")
        if getpass.getpass(f"Officer {name}: repeat it: ") != first:
            raise Malformed(f"the two passphrases of officer {name} differ")
        out.append(first.encode())
    return out


def quorum_inputs(shares: list[Path] | None, passphrase_file: Path | None, threshold: int) -> list[ShareInput]:
    """The current officers' shares with their passphrases, from options, environment or prompts."""
    paths = list(shares or [])
    if not paths:
        if not _tty():
            raise Malformed(f"give the share files of {threshold} current officer(s) with --share FILE")
        for k in range(1, threshold + 1):
            paths.append(Path(input(f"Share file {k} of {threshold}: ").strip()))
    data: list[bytes] = []
    for path in paths:
        try:
            data.append(path.read_bytes())
        except OSError as exc:
            raise Malformed(f"cannot read the share file {path}: {exc.strerror}") from None
    if passphrase_file is not None:
        passphrases = _lines(passphrase_file, len(paths), "share files")
    else:
        passphrases = []
        for k, (path, raw) in enumerate(zip(paths, data, strict=True), start=1):
            value = os.environ.get(f"MAILKMS_SHARE_PASSPHRASE_{k}")
            if value:
                passphrases.append(value.encode())
            elif _tty():
                passphrases.append(getpass.getpass(f"Passphrase of {_who(raw, path)}: ").encode())
            else:
                raise Malformed(
                    f"no passphrase for the share file {path}: use --share-passphrase-file, "
                    f"MAILKMS_SHARE_PASSPHRASE_{k} or a terminal"
                )
    return [ShareInput(raw, pw) for raw, pw in zip(data, passphrases, strict=True)]


def _who(raw: bytes, path: Path) -> str:
    try:
        return read_share(raw).header.describe()
    except MailkmsError:
        return str(path)


def register(app: typer.Typer) -> None:
    recovery_app = typer.Typer(
        help="Archive recovery officers (M-of-N quorum), status, archive export.", no_args_is_help=True
    )
    app.add_typer(recovery_app, name="recovery")

    @recovery_app.command("status")
    def status(as_json: JsonOpt = False) -> None:
        """The current recovery ceremony: officers, threshold, how much of the archive it covers."""
        with exit_on_error(as_json):
            view = _services().recovery.status()
            text = (
                f"ceremony {view.id} of {view.created_at:%Y-%m-%d %H:%M} UTC: {view.threshold} of "
                f"{len(view.officers)} officers ({', '.join(view.officers)})\n"
                f"archived keys: {view.archived_keys} ({view.archived_under_current} under this ceremony's key); "
                f"recoveries waiting for enrolment: {view.held_recoveries}"
            )
            if view.is_bootstrap:
                text += "\nthis is the bootstrap ceremony of `mailkms init`: name officers with `mailkms recovery init`"
            _emit(view.to_dict(), as_json, text)

    @recovery_app.command("init")
    def init(
        threshold: Annotated[int, typer.Option("--threshold", help="M: how many officers recover together")],
        officers: Annotated[int | None, typer.Option("--officers", help="N: how many officers")] = None,
        officer: Annotated[
            list[str] | None, typer.Option("--officer", help="officer name (repeat N times; default officer-1..N)")
        ] = None,
        passphrase_file: Annotated[
            Path | None,
            typer.Option(help="new officers' passphrases, one per line in officer order (scripts)"),
        ] = None,
        share: SharesOpt = None,
        share_passphrase_file: SharePassOpt = None,
        out_dir: Annotated[
            Path, typer.Option(help="folder the new share files are written to (never over existing files)")
        ] = Path("mailkms-shares"),
        as_json: JsonOpt = False,
    ) -> None:
        """Appoint N recovery officers, any M of whom can recover: a new recovery key, the whole archive
        re-enveloped to it, one share file per officer. Needs M shares of the CURRENT officers
        (after `mailkms init`: the bootstrap share file and the passphrase printed then)."""
        with exit_on_error(as_json):
            names = list(officer or [])
            count = officers if officers is not None else len(names)
            if not names:
                names = [f"officer-{i}" for i in range(1, count + 1)]
            if count < 1:
                raise Malformed("give --officers N (and, if you like, N times --officer NAME)")
            if len(names) != count:
                raise Malformed(f"--officers {count} but {len(names)} --officer name(s) given")
            services = _services()
            current = services.recovery.status()
            quorum = quorum_inputs(share, share_passphrase_file, current.threshold)
            passphrases = officer_passphrases(names, passphrase_file)
            result = services.recovery.replace_ceremony(
                [NewOfficer(n, p) for n, p in zip(names, passphrases, strict=True)],
                threshold,
                quorum,
                out_dir,
                _actor(),
            )
            files = [str(p) for p in result.share_files]
            text = (
                f"recovery ceremony {result.ceremony_id}: any {result.threshold} of {len(result.officers)} officers\n"
                f"{result.rewrapped} archived key(s) re-enveloped to the new recovery key; "
                f"shares of ceremony {result.previous_id[:8]} no longer work\n"
                "share files (hand each to its officer, keep them offline, then delete them here):\n"
                + "\n".join(f"  {name}: {path}" for name, path in zip(result.officers, files, strict=True))
            )
            if result.threshold == 1 and len(result.officers) > 1:
                print("warning: a threshold of 1 lets any single officer recover every archived key", file=sys.stderr)
            _emit(
                {
                    "ceremony_id": result.ceremony_id,
                    "previous_ceremony_id": result.previous_id,
                    "threshold": result.threshold,
                    "officers": list(result.officers),
                    "share_files": files,
                    "rewrapped": result.rewrapped,
                    "authorised_by": list(result.authorised_by),
                },
                as_json,
                text,
            )

    @recovery_app.command("export-archive")
    def export_archive(
        recipient: Annotated[Path, typer.Option(help="PEM certificate (RSA) the keys are enveloped to")],
        out: Annotated[Path, typer.Option(help="the JSON file to write (0600)")],
        user: Annotated[str | None, typer.Option(help="only this user's keys")] = None,
        share: SharesOpt = None,
        share_passphrase_file: SharePassOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Export the archive (or one user's keys), each key re-enveloped to RECIPIENT. Needs M officers."""
        with exit_on_error(as_json):
            try:
                cert = x509.load_pem_x509_certificate(recipient.read_bytes())
            except (OSError, ValueError):
                raise Malformed(f"{recipient} is not a PEM certificate") from None
            services = _services()
            quorum = quorum_inputs(share, share_passphrase_file, services.recovery.status().threshold)
            result = services.recovery.export_archive(cert, quorum, _actor(), user)
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(result.document)
            _emit(
                {"keys": result.count, "out": str(out), "authorised_by": list(result.authorised_by)},
                as_json,
                f"{result.count} key(s) written to {out}, each enveloped to {recipient}",
            )

    @app.command("recover")
    def recover(
        email: str,
        share: SharesOpt = None,
        share_passphrase_file: SharePassOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Recover a user's archived encryption keys (every generation) with M officers' shares;
        prints a one-time recovery token: the user enrols with it and receives all the keys."""
        with exit_on_error(as_json):
            services = _services()
            count = services.recovery.archived_count(email)
            quorum = quorum_inputs(share, share_passphrase_file, services.recovery.status().threshold)
            result = services.recovery.recover(email, quorum, _actor())
            _emit(
                {
                    "email": result.mailbox,
                    "token": result.token,
                    "expires_at": result.expires_at.isoformat(),
                    "key_serials": list(result.key_serials),
                    "authorised_by": list(result.authorised_by),
                },
                as_json,
                f"{count} archived key(s) of {result.mailbox} recovered, held sealed until the user enrols.\n"
                f"one-time recovery token (valid until {result.expires_at:%Y-%m-%d %H:%M} UTC, shown once):\n"
                f"{result.token}\n"
                f"The user enrols with it (mailkms-client enroll ... --token TOKEN) and receives every key.",
            )
