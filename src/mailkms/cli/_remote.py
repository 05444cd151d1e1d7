"""`mailkms --server URL ...`: the admin commands against a remote server's admin API, with a
per-administrator API token, instead of the local data folder. Problem documents come back as
the same mailkms errors, so the exit codes are those of the local commands."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from mailkms import errors
from mailkms.clock import SystemClock
from mailkms.config import data_dir_from_env, load_settings
from mailkms.errors import Internal, MailkmsError, Malformed, ServerUnreachable
from mailkms.services import Services

REMOTE_COMMANDS = (
    "user add|list|show|reenroll, revoke EMAIL..., audit verify, "
    "admin add|list|role|disable|enable|unlock|require-passkey"
)
_BY_STATUS: dict[int, type[MailkmsError]] = {
    400: errors.Malformed,
    401: errors.Unauthorized,
    403: errors.PolicyRefused,
    404: errors.NotFound,
    409: errors.Conflict,
}


def _error_classes(root: type[MailkmsError] = MailkmsError) -> dict[str, type[MailkmsError]]:
    found = {root.code: root}
    for sub in root.__subclasses__():
        for code, cls in _error_classes(sub).items():
            found.setdefault(code, cls)
    return found


def error_from_problem(status: int, problem: dict[str, Any]) -> MailkmsError:
    """The mailkms error a problem document names (its type's last part), else one by HTTP status."""
    code = str(problem.get("type", "")).rsplit(":", 1)[-1]
    cls = _error_classes().get(code) or _BY_STATUS.get(status, Internal)
    if cls is errors.ServerRefused:
        cls = Internal
    return cls(str(problem.get("detail") or problem.get("title") or f"HTTP {status}"))


@dataclass(frozen=True)
class Remote:
    url: str
    token: str
    ca_file: Path | None = None

    def call(self, method: str, path: str, *, body: dict[str, Any] | None = None, **params: Any) -> Any:
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True
        query = {k: v for k, v in params.items() if v is not None}
        try:
            with httpx.Client(verify=verify, timeout=60) as client:
                resp = client.request(
                    method,
                    self.url.rstrip("/") + "/api/v1/admin" + path,
                    headers={"Authorization": f"Bearer {self.token}"},
                    json=body,
                    params=query,
                )
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"{self.url}: {exc}") from None
        if resp.status_code >= 400:
            try:
                problem = resp.json()
            except ValueError:
                problem = {}
            raise error_from_problem(resp.status_code, problem if isinstance(problem, dict) else {})
        return resp.json()

    @staticmethod
    def user_path(email: str) -> str:
        return "/users/" + quote(email.strip(), safe="@")


_remote: list[Remote] = []


def set_remote(remote: Remote | None) -> None:
    _remote.clear()
    if remote is not None:
        _remote.append(remote)


def remote() -> Remote | None:
    return _remote[0] if _remote else None


def local_services() -> Services:
    """The services on this machine's data folder; refused when the command line named --server."""
    if remote() is not None:
        raise Malformed(f"this command runs on the server's machine only; with --server: {REMOTE_COMMANDS}")
    return Services.build(load_settings(data_dir_from_env()), SystemClock())
