"""`mailkms`: the administrator's and the server's command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mailkms import logs
from mailkms.cli import _scale
from mailkms.cli._admins import register as _register_admins
from mailkms.cli._exit import exit_on_error
from mailkms.cli._outbox import register as _register_outbox
from mailkms.cli._recovery import register as _register_recovery
from mailkms.cli._remote import REMOTE_COMMANDS, Remote, local_services, remote, set_remote
from mailkms.cli._revoke import register as _register_revocation
from mailkms.cli._root import register as _register_root
from mailkms.cli._root import root_passphrase
from mailkms.clock import SystemClock
from mailkms.config import CONFIG_FILE, CONFIG_TEMPLATE, Settings, data_dir_from_env, load_settings
from mailkms.errors import ConfigError, Conflict, MailkmsError, Malformed
from mailkms.mail import token_mailer
from mailkms.pki import KeyType, check_admin_passphrase, fingerprint_sha256
from mailkms.services import (
    BOOTSTRAP_PASSPHRASE_FILE,
    PASSPHRASE_SOURCES,
    AuditReport,
    CAPaths,
    Services,
    TokenMail,
    UserState,
    health_checks,
    init_ca,
    new_bootstrap_passphrase,
    normalise_mailbox,
    open_database,
    passphrase_source,
    public_urls,
    tls_hostnames,
    write_secret_once,
)

app = typer.Typer(
    help="mailkms: Key Management Server for S/MIME.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
user_app = typer.Typer(help="Users: add, list, show, re-enrol.", no_args_is_help=True)
ca_app = typer.Typer(help="The certificate authority.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit chain.", no_args_is_help=True)
app.add_typer(user_app, name="user")
app.add_typer(ca_app, name="ca")
app.add_typer(audit_app, name="audit")

JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
ProductionOpt = Annotated[
    bool,
    typer.Option(
        "--production",
        help="refuse the CA passphrase file DATA/ca/passphrase and any bootstrap secret written beside the keys "
        "(also [ca] production = true, MAILKMS_CA__PRODUCTION=1)",
    ),
]
PassphraseFdOpt = Annotated[
    int | None,
    typer.Option(
        "--passphrase-fd",
        help="read the CA passphrase from this file descriptor (also MAILKMS_CA_PASSPHRASE_FD)",
        min=0,
    ),
]
ADMIN = f"admin:{os.environ.get('USER', 'unknown')}"
console = Console()


REMOTE_TOP = {"user", "revoke", "audit", "admin"}


@app.callback()
def _root(
    ctx: typer.Context,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            envvar="MAILKMS_REMOTE_URL",
            help=f"work against this server's admin API (https://HOST:8443) instead of the local data folder: "
            f"{REMOTE_COMMANDS}",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="MAILKMS_ADMIN_TOKEN", help="the API token (`mailkms admin token NAME`)"),
    ] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option("--ca-file", envvar="MAILKMS_REMOTE_CA_FILE", help="trust this CA (PEM) for the server's TLS"),
    ] = None,
) -> None:
    if server is None:
        set_remote(None)
        return
    with exit_on_error():
        if not token:
            raise Malformed("--server needs an API token: --token or MAILKMS_ADMIN_TOKEN (`mailkms admin token NAME`)")
        if ctx.invoked_subcommand not in REMOTE_TOP:
            raise Malformed(
                f"`mailkms {ctx.invoked_subcommand}` runs on the server only; with --server: {REMOTE_COMMANDS}"
            )
        set_remote(Remote(server, token, ca_file))


def _settings(passphrase_fd: int | None = None, **overrides: object) -> Settings:
    return load_settings(data_dir_from_env(), passphrase_fd=passphrase_fd, **overrides)


_services = local_services


def _emit(data: object, as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def _warn(text: str) -> None:
    print(text, file=sys.stderr)


@contextlib.contextmanager
def _undone_on_failure(data_dir: Path, outside: Path | None) -> Iterator[None]:
    """If init stops half-way, remove every file and folder it made (a half CA, the bootstrap share,
    its passphrase file, here or at --recovery-passphrase-out): none of them is of any use alone, and
    each would block or confuse the next `mailkms init`. What was there before is left alone."""
    existed = data_dir.exists()
    before = set(data_dir.rglob("*")) if existed else set()
    outside_existed = outside is not None and outside.exists()
    try:
        yield
    except BaseException as exc:
        made = [p for p in data_dir.rglob("*") if p not in before] if data_dir.exists() else []
        for path in sorted(made, key=lambda p: len(p.parts), reverse=True):  # files before their folders
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        if outside is not None and not outside_existed:
            with contextlib.suppress(OSError):
                outside.unlink()
        if not existed:
            with contextlib.suppress(OSError):
                data_dir.rmdir()
        if isinstance(exc, OSError):
            where = f" {exc.filename}" if exc.filename else ""
            raise ConfigError(
                f"init could not write{where} ({exc.strerror or exc}); what it had written was removed: "
                "fix that and run it again"
            ) from None
        raise


@app.command()
def init(
    hostname: Annotated[str, typer.Option(help="the name in the server's TLS certificate")] = "localhost",
    public_url: Annotated[
        str, typer.Option(help="http base of CRL/AIA links in certificates (default http://HOSTNAME/)")
    ] = "",
    key_type: Annotated[KeyType, typer.Option(help="CA key: rsa3072, rsa4096, p256, p384")] = KeyType.RSA3072,
    organization: Annotated[str, typer.Option(help="O in the CA names")] = "mailkms",
    country: Annotated[str | None, typer.Option(help="C in the CA names (two letters)")] = None,
    key_store: Annotated[
        str,
        typer.Option(
            "--key-store",
            help="keep the issuing CA, OCSP and mail-signing keys in a PKCS#11 token: "
            "'pkcs11:token=NAME;object=LABEL?module-path=/path/lib.so&pin-source=file:/path' (RFC 7512; no PIN)",
        ),
    ] = "",
    production: ProductionOpt = False,
    passphrase_fd: PassphraseFdOpt = None,
    recovery_passphrase_out: Annotated[
        Path | None,
        typer.Option(
            "--recovery-passphrase-out",
            help="write the generated passphrase of the bootstrap recovery share to this new file (mode 0600)",
        ),
    ] = None,
    offline_root: Annotated[
        Path | None,
        typer.Option(
            "--offline-root",
            help="write the root key only to this new folder (a removable disk), never to the data folder; "
            "the root passphrase comes from --root-passphrase-fd, MAILKMS_ROOT_PASSPHRASE or the terminal",
        ),
    ] = None,
    root_passphrase_fd: Annotated[
        int | None, typer.Option("--root-passphrase-fd", min=0, help="read the offline root's passphrase from this fd")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create the CA (root, S/MIME issuing CA, infrastructure CA for TLS), the server's TLS and
    mail-signing certificates, and the archive key."""
    with exit_on_error(as_json):
        data_dir = data_dir_from_env()
        paths = CAPaths(data_dir)
        if paths.exists():
            raise Conflict(f"a CA already exists in {paths.ca_dir}")
        server = {"hostname": hostname, "public_url": public_url}
        ca: dict[str, object] = {"key_type": key_type, "organization": organization, "country": country}
        if key_store:
            ca["key_store"] = key_store
        if production:
            ca["production"] = True
        settings = load_settings(data_dir, passphrase_fd=passphrase_fd, server=server, ca=ca)
        if settings.ca.key_type != key_type:
            raise ConfigError("ca.key_type differs between the option and the environment")
        production = settings.ca.production

        # Every refusal before anything is written.
        if not settings.ca_passphrase and production:
            raise ConfigError(f"production: no CA passphrase given; give it by {PASSPHRASE_SOURCES}")
        if production and paths.passphrase_file.exists():
            raise ConfigError(f"production: {paths.passphrase_file} exists; move the passphrase and delete the file")
        given = os.environ.get("MAILKMS_RECOVERY_PASSPHRASE") or None
        if given is not None:
            check_admin_passphrase("MAILKMS_RECOVERY_PASSPHRASE", given)
            if recovery_passphrase_out is not None:
                raise Malformed(
                    "--recovery-passphrase-out is for a generated passphrase; MAILKMS_RECOVERY_PASSPHRASE is set"
                )
        root_secret: bytes | None = None
        if offline_root is not None:
            if (offline_root / "root.key.pem").exists():
                raise Conflict(f"{offline_root} already holds a root")
            if offline_root.resolve().is_relative_to(data_dir.resolve()):
                raise Malformed("--offline-root must be outside the data folder (that is the point)")
            root_secret = root_passphrase(root_passphrase_fd, new=True)
        if recovery_passphrase_out is not None and recovery_passphrase_out.exists():
            raise Conflict(f"{recovery_passphrase_out} already exists; init writes the passphrase only to a new file")
        to_terminal = sys.stdout.isatty()
        if given is None and recovery_passphrase_out is None and not to_terminal and production:
            raise ConfigError(
                "production: stdout is not a terminal, so the bootstrap recovery passphrase cannot be shown; "
                "give --recovery-passphrase-out FILE or MAILKMS_RECOVERY_PASSPHRASE"
            )

        with (
            _undone_on_failure(data_dir, recovery_passphrase_out),  # a retry finds nothing in its way
            _undone_on_failure(offline_root, None) if offline_root is not None else contextlib.nullcontext(),
        ):
            data_dir.mkdir(parents=True, exist_ok=True)
            config_path = data_dir / CONFIG_FILE
            if not config_path.exists():  # 0600: it can hold the SMTP password
                text = CONFIG_TEMPLATE.format(hostname=hostname, public_url=public_url)
                if production:
                    text = text.replace("\nproduction = false ", "\nproduction = true  ", 1)
                if settings.ca.key_store:  # the URI (never a PIN: refused by the parser)
                    text = text.replace(
                        "\ncrl_partition_size = ",
                        f"\nkey_store = {json.dumps(settings.ca.key_store)}  # PKCS#11 token (README)\ncrl_partition_size = ",
                        1,
                    )
                write_secret_once(config_path, text.encode())
            if not settings.ca_passphrase:
                _warn(
                    f"WARNING: the CA passphrase is generated and kept in {paths.passphrase_file}, beside the CA keys:\n"
                    "  any copy of the data folder (a backup, a snapshot) is a full compromise of the CA.\n"
                    "  Fine for trying mailkms (`make serve`). For production give the passphrase by\n"
                    f"  {PASSPHRASE_SOURCES}, and run with --production (README: Security)."
                )

            recovery_passphrase = given or new_bootstrap_passphrase()
            written: Path | None = None
            if given is None and recovery_passphrase_out is not None:
                written = write_secret_once(recovery_passphrase_out, (recovery_passphrase + "\n").encode())
            elif given is None and not to_terminal:
                written = write_secret_once(
                    paths.recovery_dir / BOOTSTRAP_PASSPHRASE_FILE, (recovery_passphrase + "\n").encode()
                )
                _warn(
                    f"WARNING: stdout is not a terminal, so the bootstrap recovery passphrase was written to {written},\n"
                    "  beside its share: any copy of the data folder opens every archived key. Move both off this\n"
                    "  machine now and appoint officers (mailkms recovery init); `mailkms doctor` reminds you.\n"
                    "  Next time: --recovery-passphrase-out FILE, MAILKMS_RECOVERY_PASSPHRASE, or a terminal."
                )
            result = init_ca(
                paths,
                passphrase_env=settings.ca_passphrase,
                key_type=settings.ca.key_type,
                organization=settings.ca.organization,
                country=settings.ca.country,
                urls=public_urls(settings),
                hostnames=tls_hostnames(settings.server.hostname, settings.server.extra_tls_names),
                mail_from=settings.server.effective_mail_from,
                clock=SystemClock(),
                recovery_passphrase=recovery_passphrase,
                production=production,
                key_store=settings.ca.key_store,
                offline_root=offline_root,
                root_passphrase=root_secret,
            )
        data: dict[str, object] = {"root_fingerprint_sha256": result.root_fingerprint, "data_dir": str(data_dir)}
        text = f"CA created in {data_dir}\nroot SHA-256 fingerprint (give it to users): {result.root_fingerprint}"
        if offline_root is not None:
            data["offline_root"] = str(offline_root)
            text += (
                f"\nThe root key is only in {offline_root}: take it offline now. The root CRL it signed runs "
                "180 days;\nsign the next at a root ceremony (README: Offline root)."
            )
        if result.recovery_share:
            data["recovery_share"] = result.recovery_share
            text += (
                f"\n\nArchive recovery: a 1-of-1 bootstrap ceremony; its share file is {result.recovery_share}"
                "\nMove it off this machine and appoint officers: mailkms recovery init --officers N --threshold M"
            )
        if written is not None:
            data["recovery_passphrase_file"] = str(written)
            text += f"\nPassphrase of that share: in {written} (mode 0600); keep it offline and delete the file"
        elif given is None:  # a terminal: shown once, never stored
            data["recovery_passphrase"] = recovery_passphrase
            text += f"\nPassphrase of that share (shown once, never stored; keep it offline):\n  {recovery_passphrase}"
        _emit(data, as_json, text)


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="HTTPS port of the API")] = None,
    mail_sink_port: Annotated[int | None, typer.Option(help="port of the local SMTP sink")] = None,
    http_port: Annotated[
        int | None, typer.Option(help="plain-http port for CA certificates, CRL, OCSP (0 = off)")
    ] = None,
    bind: Annotated[str | None, typer.Option(help="address to listen on")] = None,
    production: ProductionOpt = False,
    passphrase_fd: PassphraseFdOpt = None,
) -> None:
    """Run the server: HTTPS API, plain-http publication, mail sink and outbox."""
    with exit_on_error():
        server: dict[str, object] = {}
        if port is not None:
            server["https_port"] = port
        if http_port is not None:
            server["http_port"] = http_port
        if bind is not None:
            server["bind"] = bind
        smtp = {"sink_port": mail_sink_port} if mail_sink_port is not None else {}
        overrides: dict[str, object] = {}
        if server:
            overrides["server"] = server
        if smtp:
            overrides["smtp"] = smtp
        if production:
            overrides["ca"] = {"production": True}
        settings = _settings(passphrase_fd, **overrides)
        logs.configure(settings.server.log_format)
        services = Services.build(settings, SystemClock())
        from mailkms.cli._serve import serve as run_server

        _event_loop_runner()(
            run_server(
                services,
                bind=settings.server.bind,
                https_port=settings.server.https_port,
                http_port=settings.server.http_port,
            )
        )


def _event_loop_runner() -> Any:
    """uvloop when installed (the server extra brings it): HTTP, and so OCSP, is bound by the loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


# --- users -----------------------------------------------------------------------------------
@user_app.command("add")
def user_add(
    email: str,
    name: Annotated[str, typer.Option("--name", help="display name")] = "",
    group: Annotated[str | None, typer.Option(help="policy group (see [policy.groups])")] = None,
    mail_token: Annotated[
        bool, typer.Option("--mail-token", help="also send the token to the user as a signed mail")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Register a user; prints their one-time enrolment token, once."""
    with exit_on_error(as_json):
        if (far := remote()) is not None:
            body = {"email": email, "name": name, "group": group, "mail_token": mail_token}
            added = far.call("POST", "/users", body=body)
            token, ttl = added["token"], added["expires_in_days"]
        else:
            services = _services()
            token = services.users.add(email, name, group, ADMIN)
            ttl = services.settings.policy.token_ttl_days
            if mail_token:
                try:
                    mailer = token_mailer(services)
                    mailer.send([TokenMail(normalise_mailbox(email), name, token, mailer.expiry())], ADMIN)
                except MailkmsError as exc:  # the user is stored: the token must still be shown
                    _warn(f"the token was not queued as a mail: {exc.detail}")
                    mail_token = False
        mailed = f"\n(also queued as a mail to {email.strip().lower()})" if mail_token else ""
        _emit(
            {"email": email.strip().lower(), "token": token, "expires_in_days": ttl, "mailed": mail_token},
            as_json,
            f"one-time enrolment token for {email} (valid {ttl} days, shown once):\n{token}{mailed}",
        )


@user_app.command("reenroll")
def user_reenroll(email: str, as_json: JsonOpt = False) -> None:
    """A new one-time token for a user whose certificates expired, were revoked or were lost."""
    with exit_on_error(as_json):
        if (far := remote()) is not None:
            again = far.call("POST", far.user_path(email) + "/reenroll")
            token, ttl = again["token"], again["expires_in_days"]
        else:
            services = _services()
            token = services.users.reenroll(email, ADMIN)
            ttl = services.settings.policy.token_ttl_days
        _emit(
            {"email": email.strip().lower(), "token": token, "expires_in_days": ttl},
            as_json,
            f"one-time re-enrolment token for {email} (valid {ttl} days, shown once):\n{token}",
        )


@user_app.command("list")
def user_list(
    due: Annotated[bool, typer.Option("--due", help="only users past the reminder point")] = False,
    expired: Annotated[bool, typer.Option("--expired", help="only users whose certificates expired")] = False,
    expiring_within: Annotated[
        str | None, typer.Option("--expiring-within", help="only users whose certificates expire within e.g. 30d")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Users with their state and dates."""
    with exit_on_error(as_json):
        states: set[UserState] | None = None
        if due or expired:
            states = set()
            if due:
                states.add(UserState.DUE)
            if expired:
                states.add(UserState.EXPIRED)
        if (far := remote()) is not None:
            rows = _remote_users(far, states, expiring_within)
            if as_json:
                print(json.dumps(rows, indent=2))
            else:
                for row in rows:
                    print(f"{row['email']:40} {row['state']:10} {row['expires_at'] or '-'}")
            return
        services = _services()
        views = services.users.list(states)
        if expiring_within is not None:
            views = _scale.expiring(views, _scale.parse_duration(expiring_within), services.clock.now())
        if as_json:
            print(json.dumps([v.to_dict() for v in views], indent=2))
            return
        table = Table("email", "name", "state", "gen", "reminder", "expires")
        for v in views:
            table.add_row(
                v.email,
                v.display_name,
                v.state.value,
                str(v.generation),
                f"{v.reminder_at:%Y-%m-%d}" if v.reminder_at else "-",
                f"{v.expires_at:%Y-%m-%d %H:%M:%S}" if v.expires_at else "-",
            )
        console.print(table)


@user_app.command("show")
def user_show(email: str, as_json: JsonOpt = False) -> None:
    """One user: state, certificates, dates."""
    with exit_on_error(as_json):
        if (far := remote()) is not None:
            shown = far.call("GET", far.user_path(email))
            shown.pop("history", None)
            print(
                json.dumps(shown, indent=2) if as_json else f"{shown['email']} {shown['name']}  state: {shown['state']}"
            )
            return
        view = _services().users.show(email)
        if as_json:
            print(json.dumps(view.to_dict(), indent=2))
            return
        console.print(
            f"[bold]{view.email}[/bold] {view.display_name}  state: {view.state.value}  generation: {view.generation}"
        )
        if view.reminder_at:
            console.print(
                f"reminder from {view.reminder_at:%Y-%m-%d %H:%M:%S} UTC, expires {view.expires_at:%Y-%m-%d %H:%M:%S} UTC"
            )
        table = Table("serial", "kind", "gen", "not before", "not after", "revoked")
        for c in view.certificates:
            table.add_row(
                c.serial,
                c.kind,
                str(c.generation),
                f"{c.not_before:%Y-%m-%d %H:%M:%S}",
                f"{c.not_after:%Y-%m-%d %H:%M:%S}",
                f"{c.revoked_at:%Y-%m-%d} {c.revocation_reason}" if c.revoked_at else "",
            )
        console.print(table)


def _remote_users(far: Remote, states: set[UserState] | None, expiring_within: str | None) -> list[dict[str, Any]]:
    """Every matching user, page by page, from the admin API."""
    days = _scale.parse_duration(expiring_within).days if expiring_within is not None else None
    rows: list[dict[str, Any]] = []
    for state in sorted(states) if states else [None]:
        offset = 0
        while True:
            page = far.call("GET", "/users", state=state, due_within_days=days, offset=offset, limit=500)
            rows += page["users"]
            offset += len(page["users"])
            if not page["users"] or offset >= page["total"]:
                break
    return sorted(rows, key=lambda row: row["email"])


# --- CA ----------------------------------------------------------------------------------------
def _ca_paths() -> CAPaths:
    paths = CAPaths(data_dir_from_env())
    if not paths.exists():
        raise ConfigError(f"no CA in {paths.ca_dir}: run `mailkms init`")
    return paths


@ca_app.command("fingerprint")
def ca_fingerprint(as_json: JsonOpt = False) -> None:
    """SHA-256 fingerprint of the root certificate, to give to users."""
    from cryptography import x509

    with exit_on_error(as_json):
        root = x509.load_pem_x509_certificate(_ca_paths().root_cert.read_bytes())
        fp = fingerprint_sha256(root)
        _emit({"sha256": fp}, as_json, fp)


@ca_app.command("chain")
def ca_chain() -> None:
    """The issuing then the root CA certificate, PEM."""
    with exit_on_error():
        paths = _ca_paths()
        print((paths.issuing_cert.read_text() + paths.root_cert.read_text()).strip())


# --- audit ---------------------------------------------------------------------------------------
@audit_app.command("verify")
def audit_verify(
    checkpoints: Annotated[
        Path | None,
        typer.Option("--checkpoints", help="signed checkpoints to check against (default: [audit] checkpoints_file)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the hash chain and its signed checkpoints: reports every edited, removed or reordered
    record, and a chain rewritten with recomputed hashes."""
    with exit_on_error(as_json):
        if (far := remote()) is not None:
            if checkpoints is not None:
                raise Malformed("--checkpoints names a file on this machine; with --server the server checks its own")
            answer = far.call("GET", "/audit/verify")
            report = AuditReport(answer["records"], tuple(answer["problems"]), answer["checkpoints"])
        else:
            report = _services().verify_audit(checkpoints)
        _emit(
            {
                "ok": report.ok,
                "records": report.records,
                "checkpoints": report.checkpoints,
                "problems": list(report.problems),
            },
            as_json,
            f"audit chain OK: {report.records} records, {report.checkpoints} signed checkpoints"
            if report.ok
            else "audit chain BROKEN:\n" + "\n".join(report.problems),
        )
        if not report.ok:
            raise typer.Exit(9)


@audit_app.command("checkpoint")
def audit_checkpoint(as_json: JsonOpt = False) -> None:
    """Sign the chain's head now and append it to the checkpoints file (`serve` does so hourly and at stop)."""
    with exit_on_error(as_json):
        services = _services()
        cp = services.checkpoints.write(force=True)
        assert cp is not None
        _emit(
            {"seq": cp.seq, "head": cp.head, "at": cp.at.isoformat(), "file": str(services.checkpoints.path)},
            as_json,
            f"checkpoint of record {cp.seq} appended to {services.checkpoints.path}",
        )


# --- health --------------------------------------------------------------------------------------
@app.command()
def doctor(production: ProductionOpt = False, as_json: JsonOpt = False) -> None:
    """Health of key custody: secrets beside the keys, the bootstrap ceremony, file modes, audit
    checkpoints. Exit 78 when a finding is critical."""
    with exit_on_error(as_json):
        overrides: dict[str, object] = {"ca": {"production": True}} if production else {}
        settings = _settings(None, **overrides)
        db = open_database(settings) if CAPaths(settings.data_dir).exists() else None
        try:
            findings = health_checks(settings, db, SystemClock())
        finally:
            if db is not None:
                db.dispose()
        critical = [f for f in findings if f.severity == "critical"]
        source = passphrase_source(settings, CAPaths(settings.data_dir))
        if as_json:
            print(
                json.dumps(
                    {
                        "ok": not critical,
                        "production": settings.ca.production,
                        "ca_passphrase_source": source,
                        "findings": [f.to_dict() for f in findings],
                    },
                    indent=2,
                )
            )
        else:
            print(f"production: {'yes' if settings.ca.production else 'no'}; CA passphrase from: {source}")
            for f in findings:
                print(f"{f.severity.upper():8} {f.code}: {f.message}")
            print(
                "no findings" if not findings else f"{len(critical)} critical, {len(findings) - len(critical)} warnings"
            )
        if critical:
            raise typer.Exit(78)


_scale.register(app)
_register_recovery(app)
_register_revocation(app)
_register_root(ca_app)
_register_outbox(app)
_register_admins(app)


def main() -> None:
    app()


__all__ = ["main"]
