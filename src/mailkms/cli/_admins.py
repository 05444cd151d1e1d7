"""`mailkms admin ...`: the administrators of the web console and the admin API."""

from __future__ import annotations

import getpass
import json
import os
import sys
from typing import Annotated, Any
from urllib.parse import quote

import typer

from mailkms.cli._exit import exit_on_error
from mailkms.cli._remote import local_services, remote
from mailkms.errors import Malformed
from mailkms.services import Role, parse_role

JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
ADMIN = f"admin:{os.environ.get('USER', 'unknown')}"
ROLES = ", ".join(r.value for r in Role)
admin_app = typer.Typer(help="Administrators of the web console and the admin API.", no_args_is_help=True)


_services = local_services


def _read_password(fd: int | None, prompt: bool) -> str | None:
    """From a file descriptor (one trailing newline dropped), from the terminal, or None (generate)."""
    if fd is not None and prompt:
        raise Malformed("--password-fd or --prompt, not both")
    if fd is not None:
        with os.fdopen(os.dup(fd), "rb") as stream:
            return stream.read().decode().removesuffix("\n")
    if prompt:
        if not sys.stdin.isatty():
            raise Malformed("--prompt needs a terminal; use --password-fd N in scripts")
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise Malformed("the two passwords differ")
        return first
    return None


def _emit(data: dict[str, object], as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2) if as_json else text)


@admin_app.command("add")
def admin_add(
    name: str,
    role: Annotated[str, typer.Option("--role", help=f"one of {ROLES}")],
    password_fd: Annotated[
        int | None, typer.Option("--password-fd", min=0, help="read the password from this file descriptor")
    ] = None,
    prompt: Annotated[bool, typer.Option("--prompt", help="read the password from the terminal")] = False,
    totp: Annotated[bool, typer.Option("--totp", help="enrol the TOTP second factor now (as `admin totp`)")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Add an administrator. Without --password-fd/--prompt a one-time initial password is printed, once."""
    with exit_on_error(as_json):
        given = _read_password(password_fd, prompt)
        if (far := remote()) is not None:  # the server enrols the TOTP too: its URI comes back once
            added = far.call("POST", "/admins", body={"name": name, "role": role, "password": given})
            password, totp = added["password"], True
        else:
            services = _services()
            password = services.admins.add(name, parse_role(role), given, ADMIN)
        data: dict[str, object] = {"name": name, "role": parse_role(role).value}
        text = f"administrator {name} ({parse_role(role).value}) added"
        if given is None:
            data["password"] = password
            text += f"\ninitial password (shown once):\n{password}"
        if totp:
            uri = added["otpauth_uri"] if far is not None else services.admins.enrol_totp(name, ADMIN)
            data["otpauth_uri"] = uri
            text += f"\nTOTP (shown once; scan or paste it into an authenticator app):\n{uri}"
        else:
            text += f"\nnext: mailkms admin totp {name}   (the console wants a one-time code too)"
        _emit(data, as_json, text)


@admin_app.command("password")
def admin_password(
    name: str,
    password_fd: Annotated[
        int | None, typer.Option("--password-fd", min=0, help="read the password from this file descriptor")
    ] = None,
    prompt: Annotated[bool, typer.Option("--prompt", help="read the password from the terminal")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Set a new password (printed once when generated); unlocks the account and ends its sessions."""
    with exit_on_error(as_json):
        given = _read_password(password_fd, prompt)
        password = _services().admins.set_password(name, given, ADMIN)
        data: dict[str, object] = {"name": name}
        text = f"new password for {name}"
        if given is None:
            data["password"] = password
            text += f" (shown once):\n{password}"
        _emit(data, as_json, text)


@admin_app.command("list")
def admin_list(as_json: JsonOpt = False) -> None:
    """Administrators with their role, second factor and state."""
    with exit_on_error(as_json):
        far = remote()
        views: list[dict[str, Any]] = (
            far.call("GET", "/admins") if far is not None else [v.to_dict() for v in _services().admins.list()]
        )
        if as_json:
            print(json.dumps(views, indent=2))
            return
        for v in views:
            locked = f"locked until {v['locked_until'][11:19]}" if v["locked_until"] else ""
            state = "disabled" if v["disabled"] else locked
            print(f"{v['name']:24} {v['role']:10} totp={'yes' if v['totp'] else 'no':3} {state}".rstrip())


@admin_app.command("disable")
def admin_disable(name: str, as_json: JsonOpt = False) -> None:
    """No more log-ins for this administrator; their API tokens and sessions end at once."""
    with exit_on_error(as_json):
        _state(name, "disable")
        _emit({"name": name, "disabled": True}, as_json, f"administrator {name} disabled")


@admin_app.command("enable")
def admin_enable(name: str, as_json: JsonOpt = False) -> None:
    """Log-ins again for a disabled administrator (API tokens ended by `disable` stay ended)."""
    with exit_on_error(as_json):
        _state(name, "enable")
        _emit({"name": name, "disabled": False}, as_json, f"administrator {name} enabled")


@admin_app.command("unlock")
def admin_unlock(name: str, as_json: JsonOpt = False) -> None:
    """End a lock-out after repeated failed log-ins."""
    with exit_on_error(as_json):
        _state(name, "unlock")
        _emit({"name": name, "locked_until": None}, as_json, f"administrator {name} unlocked")


@admin_app.command("role")
def admin_role(
    name: str,
    role: Annotated[str, typer.Argument(help=f"one of {ROLES}")],
    as_json: JsonOpt = False,
) -> None:
    """Change an administrator's role; their console sessions end."""
    with exit_on_error(as_json):
        chosen = parse_role(role)
        if (far := remote()) is not None:
            far.call("PUT", _path(name) + "/role", body={"role": chosen.value})
        else:
            _services().admins.set_role(name, chosen, ADMIN)
        _emit({"name": name, "role": chosen.value}, as_json, f"administrator {name} is now {chosen.value}")


def _path(name: str) -> str:
    return "/admins/" + quote(name.strip(), safe="")


def _state(name: str, act: str) -> None:
    """disable, enable or unlock: through the admin API with --server, else on the local store."""
    if (far := remote()) is not None:
        far.call("POST", f"{_path(name)}/{act}")
        return
    admins = _services().admins
    {"disable": admins.disable, "enable": admins.enable, "unlock": admins.unlock}[act](name, ADMIN)


@admin_app.command("require-passkey")
def admin_require_passkey(
    name: str,
    off: Annotated[bool, typer.Option("--off", help="allow the password + TOTP log-in again")] = False,
    as_json: JsonOpt = False,
) -> None:
    """From now on only a passkey logs NAME in (a password + TOTP code is refused); NAME must have one."""
    with exit_on_error(as_json):
        if (far := remote()) is not None:
            far.call("PUT", _path(name) + "/passkey-required", body={"required": not off})
        else:
            _services().admins.require_passkey(name, not off, ADMIN)
        state = "no longer needs" if off else "must now log in with"
        _emit({"name": name, "passkey_required": not off}, as_json, f"administrator {name} {state} a passkey")


@admin_app.command("totp")
def admin_totp(name: str, as_json: JsonOpt = False) -> None:
    """Enrol (or replace) the TOTP second factor: prints the otpauth:// URI once (for an authenticator app)."""
    with exit_on_error(as_json):
        uri = _services().admins.enrol_totp(name, ADMIN)
        _emit({"name": name, "otpauth_uri": uri}, as_json, f"TOTP for {name} (shown once; scan or paste it):\n{uri}")


@admin_app.command("token")
def admin_token(name: str, as_json: JsonOpt = False) -> None:
    """A new API token for the admin API (Authorization: Bearer ...), shown once."""
    with exit_on_error(as_json):
        token = _services().admins.new_api_token(name, ADMIN)
        _emit({"name": name, "token": token}, as_json, f"API token for {name} (shown once):\n{token}")


def register(app: typer.Typer) -> None:
    app.add_typer(admin_app, name="admin")
