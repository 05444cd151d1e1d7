"""An offline root: `mailkms ca root-ceremony ...` on the machine that holds the root folder, and
`mailkms ca request` / `mailkms ca import` / `mailkms ca move-root` on the server's.

Exit codes as everywhere (cli/_exit.py): 2 malformed input, 4 not found, 5 conflict, 78 configuration.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailkms.cli._exit import exit_on_error
from mailkms.clock import SystemClock
from mailkms.config import CONFIG_FILE, data_dir_from_env, load_settings
from mailkms.errors import ConfigError, Conflict, Malformed
from mailkms.pki import (
    BR_MAX_ARL_VALIDITY,
    CertKind,
    check_admin_passphrase,
    crl_number,
    fingerprint_sha256,
    parse_reason,
)
from mailkms.pki._pkcs11 import parse_key_store_uri
from mailkms.services import (
    OFFLINE_ROOT_CRL_VALIDITY,
    CAPaths,
    Rekeyed,
    RootCeremony,
    RootFolder,
    Services,
    ca_passphrase,
    import_signed,
    migrate_keys_to_token,
    migrate_root_key_to_token,
    public_urls,
    rekey_issuing_ca,
    request_intermediate,
    set_key_store_in_config,
    take_root_offline,
)
from mailkms.store._models import Certificate

ROOT_PASSPHRASE_ENV = "MAILKMS_ROOT_PASSPHRASE"
ADMIN = f"admin:{os.environ.get('USER', 'unknown')}"
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
RootDirOpt = Annotated[
    Path, typer.Option("--root", help="the root folder (removable disk) made by `mailkms init --offline-root`")
]
RootFdOpt = Annotated[
    int | None,
    typer.Option(
        "--root-passphrase-fd", min=0, help=f"read the root passphrase from this fd (also {ROOT_PASSPHRASE_ENV})"
    ),
]
KINDS = {"issuing": CertKind.ISSUING_CA, "infrastructure": CertKind.INFRASTRUCTURE_CA}

ceremony_app = typer.Typer(
    help="At the offline root (another machine, the root folder on removable media): sign an intermediate "
    "or the root CRL. Needs no data folder and no network.",
    no_args_is_help=True,
)


def root_passphrase(fd: int | None, *, new: bool) -> bytes:
    """The root's own passphrase (never the CA passphrase): --root-passphrase-fd, MAILKMS_ROOT_PASSPHRASE,
    or asked on the terminal. A new one must be a strong passphrase."""
    if fd is not None:
        with os.fdopen(fd, closefd=False) as fh:
            value = fh.readline().rstrip("\r\n")
    elif os.environ.get(ROOT_PASSPHRASE_ENV):
        value = os.environ[ROOT_PASSPHRASE_ENV]
    elif sys.stdin.isatty():
        value = typer.prompt("Root passphrase", hide_input=True, confirmation_prompt=new)
    else:
        raise ConfigError(f"give the root passphrase: --root-passphrase-fd N, {ROOT_PASSPHRASE_ENV}, or a terminal")
    if new:
        check_admin_passphrase("the root passphrase", value)
    return value.encode()


def _open_ceremony(root: Path, passphrase_fd: int | None) -> RootCeremony:
    """No passphrase is asked when the root key is in a token (the folder names it)."""
    in_token = RootFolder(root).in_token
    return RootCeremony.open(root, None if in_token else root_passphrase(passphrase_fd, new=False))


def _emit(data: Mapping[str, object], as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if as_json else text)


def _write_new(path: Path, data: bytes) -> None:
    if path.exists():
        raise Conflict(f"{path} exists; name a new file")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@ceremony_app.command("sign-ca")
def sign_ca(
    csr: Annotated[Path, typer.Argument(help="the CSR from `mailkms ca request` (PEM or DER)")],
    out: Annotated[Path, typer.Option("--out", help="write the certificate (PEM) to this new file")],
    root: RootDirOpt,
    days: Annotated[int, typer.Option("--days", min=30, max=3650, help="lifetime, capped at the root's")] = 1825,
    passphrase_fd: RootFdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign an intermediate (the S/MIME issuing CA or the infrastructure CA) from the server's CSR."""
    with exit_on_error(as_json):
        ceremony = _open_ceremony(root, passphrase_fd)
        kind, cert = ceremony.sign_intermediate(csr.read_bytes(), SystemClock().now(), dt.timedelta(days=days))
        _write_new(out, cert.public_bytes(serialization.Encoding.PEM))
        data: dict[str, object] = {
            "kind": kind.value,
            "subject": cert.subject.rfc4514_string(),
            "serial": f"{cert.serial_number:x}",
            "not_after": cert.not_valid_after_utc.isoformat(),
            "sha256": fingerprint_sha256(cert),
            "file": str(out),
        }
        _emit(
            data,
            as_json,
            f"signed {kind.value} {data['subject']} serial {data['serial']}, valid until "
            f"{cert.not_valid_after_utc:%Y-%m-%d}\nwritten to {out}: carry it to the server, `mailkms ca import {out.name}`",
        )


@ceremony_app.command("sign-crl")
def sign_crl(
    out: Annotated[Path, typer.Option("--out", help="write the CRL (DER) to this new file")],
    root: RootDirOpt,
    days: Annotated[
        int, typer.Option("--days", min=2, max=BR_MAX_ARL_VALIDITY.days, help="nextUpdate - thisUpdate (ARL: <= 365)")
    ] = OFFLINE_ROOT_CRL_VALIDITY.days,
    revoke: Annotated[
        list[str] | None,
        typer.Option("--revoke", help="revoke an intermediate: HEXSERIAL or HEXSERIAL:reason (e.g. superseded)"),
    ] = None,
    passphrase_fd: RootFdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign the root's next CRL; it lists every intermediate revoked at this or an earlier ceremony."""
    with exit_on_error(as_json):
        wanted = []
        for item in revoke or []:
            serial, _, reason = item.partition(":")
            try:
                wanted.append((int(serial.replace(":", ""), 16), parse_reason(reason or None)))
            except ValueError:
                raise Malformed(f"--revoke {item!r}: a hex serial, optionally :reason") from None
        ceremony = _open_ceremony(root, passphrase_fd)
        crl = ceremony.sign_crl(SystemClock().now(), dt.timedelta(days=days), tuple(wanted))
        _write_new(out, crl.public_bytes(serialization.Encoding.DER))
        assert crl.next_update_utc is not None
        revoked = [f"{r.serial_number:x}" for r in crl]
        data: dict[str, object] = {
            "crl_number": crl_number(crl),
            "next_update": crl.next_update_utc.isoformat(),
            "revoked": revoked,
            "file": str(out),
        }
        _emit(
            data,
            as_json,
            f"root CRL {data['crl_number']} signed, next update {crl.next_update_utc:%Y-%m-%d}, "
            f"{len(revoked)} revoked\nwritten to {out}: carry it to the server, `mailkms ca import {out.name}`",
        )


@ceremony_app.command("migrate-key")
def ceremony_migrate_key(
    root: RootDirOpt,
    key_store: Annotated[
        str,
        typer.Option(
            "--key-store", help="pkcs11:token=NAME;object=LABEL?module-path=...&pin-source=file:... (RFC 7512)"
        ),
    ],
    passphrase_fd: RootFdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Put the root key into a PKCS#11 token (an HSM at the offline machine): imported sensitive and not
    extractable; root.key.pem is removed only after a signature by the token verifies under the root
    certificate. Later ceremonies use the token (its PIN file) and ask no root passphrase."""
    with exit_on_error(as_json):
        parse_key_store_uri(key_store)
        done = migrate_root_key_to_token(root, root_passphrase(passphrase_fd, new=False), key_store)
        _emit(
            {"role": done.role, "label": done.label, "id": done.key_id, "root": str(root)},
            as_json,
            f"the root key is now in the token as {done.label!r} (CKA_ID {done.key_id}); "
            f"{root / 'root.key.pem'} was removed",
        )


def register(ca_app: typer.Typer) -> None:
    ca_app.add_typer(ceremony_app, name="root-ceremony")

    @ca_app.command("request")
    def ca_request(
        kind: Annotated[str, typer.Option("--kind", help="issuing (S/MIME) or infrastructure (TLS)")],
        out: Annotated[Path, typer.Option("--out", help="write the CSR (PEM) here, to carry to the root")],
        new_key: Annotated[
            bool,
            typer.Option(
                "--new-key",
                help="a new key (kept in DATA/ca/pending until `ca import`; the issuing CA's is made in the "
                "token when [ca] key_store is set); default: the current key",
            ),
        ] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """A CSR for a new intermediate certificate, for the offline root's ceremony."""
        with exit_on_error(as_json):
            if kind not in KINDS:
                raise Malformed(f"--kind is one of {', '.join(KINDS)}")
            paths, passphrase = _server_ca()
            key_store = load_settings(data_dir_from_env()).ca.key_store
            now = SystemClock().now()
            csr = request_intermediate(paths, passphrase, KINDS[kind], new_key=new_key, key_store=key_store, now=now)
            out.write_bytes(csr)
            _emit(
                {"kind": KINDS[kind].value, "file": str(out)},
                as_json,
                f"CSR for the {kind} CA written to {out}: carry it to the root, "
                f"`mailkms ca root-ceremony sign-ca --root DIR {out.name} --out CERT`",
            )

    @ca_app.command("import")
    def ca_import(
        files: Annotated[list[Path], typer.Argument(help="certificates and root CRLs from the ceremony")],
        as_json: JsonOpt = False,
    ) -> None:
        """Install what the root ceremony signed (checked against the root first). A running server takes
        it within [ca] reload_check_seconds (5 s), or at once on SIGHUP; no restart. The issuing CA's
        certificate for the key of `ca request --new-key` rekeys it: the old certificate and key are
        kept in DATA/ca/previous/ (they go on answering OCSP for what the old key issued)."""
        with exit_on_error(as_json):
            paths, passphrase = _server_ca()
            clock = SystemClock()
            done = [import_signed(paths, passphrase, f.read_bytes(), clock.now()) for f in files]
            services = Services.build(load_settings(data_dir_from_env()), clock)
            try:
                live = _live_subscriber_certificates(services, clock.now()) if any(i.rekeyed for i in done) else 0
                with services.db.transaction() as session:
                    for item in done:
                        services.audit.append(
                            session,
                            ADMIN,
                            "ca.imported",
                            item.what,
                            serial=f"{item.serial:x}",
                            not_after=item.not_after,
                        )
                        if item.rekeyed is not None:
                            _audit_rekeyed(services, session, item.rekeyed, live)
            finally:
                services.close()
            rows: list[dict[str, str]] = []
            for i in done:
                row = {"what": i.what, "serial": f"{i.serial:x}", "not_after": i.not_after.isoformat()}
                if i.rekeyed is not None:
                    row |= _rekeyed_row(i.rekeyed)
                rows.append(row)
            _emit(
                {"imported": rows},
                as_json,
                "\n".join(
                    f"imported {r['what']} {r['serial']} (until {r['not_after'][:10]})"
                    + (f"; new key {r['new_key_id']}, the old one kept in {r['kept_in']}" if "kept_in" in r else "")
                    for r in rows
                ),
            )

    @ca_app.command("migrate-key")
    def ca_migrate_key(
        key_store: Annotated[
            str,
            typer.Option(
                "--key-store", help="pkcs11:token=NAME;object=LABEL?module-path=...&pin-source=file:... (RFC 7512)"
            ),
        ],
        as_json: JsonOpt = False,
    ) -> None:
        """Put the CA keys that are still files (issuing CA, OCSP responder, mail signer) into a PKCS#11
        token: imported sensitive and not extractable, each file removed only after a signature by the
        token verifies; [ca] key_store is written to mailkms.toml. Restart `mailkms serve` afterwards."""
        with exit_on_error(as_json):
            settings = load_settings(data_dir_from_env(), ca={"key_store": key_store})  # the URI checked here
            current = load_settings(data_dir_from_env()).ca.key_store
            if current and current != key_store:
                raise Conflict(f"mailkms.toml names another key store already: {current}")
            paths, passphrase = _server_ca()
            done = migrate_keys_to_token(paths, passphrase, settings.ca.key_store)
            if not current:
                set_key_store_in_config(settings.data_dir / CONFIG_FILE, key_store)
            services = Services.build(load_settings(data_dir_from_env()), SystemClock())
            try:
                with services.db.transaction() as session:
                    for item in done:
                        services.audit.append(session, ADMIN, "ca.key-migrated", item.role, label=item.label)
            finally:
                services.close()
            rows = [{"role": m.role, "label": m.label, "id": m.key_id} for m in done]
            _emit(
                {"migrated": rows, "key_store": key_store},
                as_json,
                "\n".join(f"{r['role']} key now in the token as {r['label']!r} (CKA_ID {r['id']})" for r in rows)
                + "\nthe key files were removed; restart `mailkms serve`",
            )

    @ca_app.command("rekey")
    def ca_rekey(
        force: Annotated[
            bool,
            typer.Option(
                "--force",
                help="accepted for scripts written before CRLs were signed per key; no longer needed",
                hidden=True,
            ),
        ] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """A new key pair for the S/MIME issuing CA (same name, new key identifier), signed by the online
        root; the old certificate and key are kept in DATA/ca/previous/. Running servers take it within
        [ca] reload_check_seconds, or at once on SIGHUP. The old key goes on signing the CRLs and OCSP
        answers of what it issued; the new key's certificates get CRL partitions of their own."""
        with exit_on_error(as_json):
            paths, passphrase = _server_ca()
            settings = load_settings(data_dir_from_env())
            clock = SystemClock()
            services = Services.build(settings, clock)
            try:
                now = clock.now()
                live = _live_subscriber_certificates(services, now)  # recorded: what the old key still answers for
                done = rekey_issuing_ca(paths, passphrase, settings.ca.key_store, public_urls(settings), now)
                with services.db.transaction() as session:
                    _audit_rekeyed(services, session, done, live)
            finally:
                services.close()
            _emit(
                _rekeyed_row(done),
                as_json,
                f"the issuing CA has a new key {done.new_key_id} (certificate {done.serial:x}, until "
                f"{done.not_after:%Y-%m-%d}); the old one ({done.old_key_id}) is kept in {done.kept_in}.\n"
                "Running servers take it within [ca] reload_check_seconds, or at once on SIGHUP.",
            )

    @ca_app.command("move-root")
    def ca_move_root(
        folder: Annotated[Path, typer.Argument(help="the root folder to create (removable disk)")],
        passphrase_fd: RootFdOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Take the root key of an existing install out of the data folder, into FOLDER under a root
        passphrase of its own. While it is still here it signs an infrastructure CA for the TLS
        certificate (if there is none yet) and a root CRL of 180 days. Restart the server afterwards."""
        with exit_on_error(as_json):
            paths, passphrase = _server_ca()
            if paths.root_offline:
                raise Conflict("the root key is not in the data folder")
            settings = load_settings(data_dir_from_env())
            new = root_passphrase(passphrase_fd, new=True)
            made = take_root_offline(paths, passphrase, folder, new, public_urls(settings), SystemClock().now())
            _emit(
                {"root_folder": str(folder), "made": made},
                as_json,
                f"signed with the root before it left: {', '.join(made)}\n"
                f"the root key is now only in {folder} (encrypted under the root passphrase) and was removed "
                "from the data folder.\nKeep the folder offline; restart `mailkms serve`.",
            )


def _audit_rekeyed(services: Services, session: Session, done: Rekeyed, live: int) -> None:
    services.audit.append(
        session,
        ADMIN,
        "ca.rekeyed",
        "issuing-ca",
        old_key_id=done.old_key_id,
        new_key_id=done.new_key_id,
        serial=f"{done.serial:x}",
        not_after=done.not_after,
        live_certificates=live,
    )


def _rekeyed_row(done: Rekeyed) -> dict[str, str]:
    return {
        "old_key_id": done.old_key_id,
        "new_key_id": done.new_key_id,
        "serial": f"{done.serial:x}",
        "not_after": done.not_after.isoformat(),
        "kept_in": str(done.kept_in),
    }


def _live_subscriber_certificates(services: Services, now: dt.datetime) -> int:
    """Unrevoked, unexpired S/MIME certificates of users (the server's own are re-issued by itself)."""
    kinds = (CertKind.SIGNING.value, CertKind.ENCRYPTION.value)
    with services.db.read_only() as session:
        query = select(func.count(Certificate.id)).where(
            Certificate.kind.in_(kinds), Certificate.revoked_at.is_(None), Certificate.not_after > now
        )
        return int(session.scalar(query) or 0)


def _server_ca() -> tuple[CAPaths, bytes]:
    settings = load_settings(data_dir_from_env())
    paths = CAPaths(settings.data_dir)
    if not paths.exists():
        raise ConfigError(f"no CA in {paths.ca_dir}: run `mailkms init`")
    return paths, ca_passphrase(paths, settings.ca_passphrase, create=False, production=settings.ca.production)
