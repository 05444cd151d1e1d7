"""Real processes: `mailkms serve`, the admin CLI and `mailkms-client`, optionally under faketime."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent
PUBLIC_URL = "http://kms.example.org/"
CLIENT_PASSPHRASE = "client-passphrase-made-for-this-run"

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def libfaketime() -> str:
    """libfaketime from Debian's faketime package, preloaded directly: the `faketime` wrapper
    keeps a named semaphore per pid that a SIGKILLed run leaves behind (sem_open: File exists)."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail("libfaketime is not installed (scripts/system-deps.sh installs the faketime package)")
    return found[0]


def faketime_env(offset_days: float | None) -> dict[str, str]:
    if not offset_days:
        return {}
    return {
        "LD_PRELOAD": libfaketime(),
        "FAKETIME": f"+{offset_days}d",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }


def _env(extra: dict[str, str] | None, offset_days: float | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKMS_") and not k.startswith("FAKETIME")}
    env.pop("LD_PRELOAD", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(faketime_env(offset_days))
    env.update(extra or {})
    return env


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


@dataclass
class Deployment:
    """One data folder, its server process, and helpers to run the admin CLI and clients."""

    data: Path
    https_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    sink_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    server_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.https_port}"

    @property
    def env(self) -> dict[str, str]:
        return {"MAILKMS_DATA": str(self.data), **self.server_env}

    def admin(self, *args: str, offset_days: float | None = None, check: bool = True) -> Result:
        cmd = [str(BIN / "mailkms"), *args]
        proc = subprocess.run(cmd, env=_env(self.env, offset_days), capture_output=True, text=True, timeout=120)
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"mailkms {' '.join(args)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
        return result

    def start(self, offset_days: float | None = None, extra_env: dict[str, str] | None = None) -> None:
        assert self.proc is None
        self.log_path = self.data / f"server-{time.monotonic_ns()}.log"
        log = open(self.log_path, "wb")
        cmd = [
            str(BIN / "mailkms"),
            "serve",
            "--port",
            str(self.https_port),
            "--mail-sink-port",
            str(self.sink_port),
            "--http-port",
            str(self.http_port),
        ]
        # A session of its own: signals go to the whole group, faketime's child included.
        self.proc = subprocess.Popen(
            cmd,
            env=_env({**self.env, **(extra_env or {})}, offset_days),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", verify=False, timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"server did not start: {self.log_path.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait()
        # wait until every process of the group is gone (faketime's child outlives the wrapper)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(pgid, signal.SIGKILL)
        self.proc = None

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.data.glob("server-*.log")))

    def maildir(self, mailbox: str) -> Path:
        return self.data / "mailboxes" / mailbox

    def mails(self, mailbox: str) -> list[Path]:
        """The delivery mails (certificates, keys) in the mailbox; reminder mails are left out."""
        box = self.maildir(mailbox)
        found = sorted([*box.glob("new/*"), *box.glob("cur/*")])
        return [p for p in found if "X-Mailkms-Delivery" in BytesHeaderParser().parsebytes(p.read_bytes())]

    def wait_for_mails(self, mailbox: str, count: int, timeout: float = 30) -> list[Path]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.mails(mailbox)
            if len(found) >= count:
                return found
            time.sleep(0.2)
        raise AssertionError(
            f"expected {count} mails for {mailbox}, found {len(self.mails(mailbox))}\n{self.log()[-3000:]}"
        )

    def fingerprint(self) -> str:
        return self.admin("ca", "fingerprint").out.strip()

    def add_user(self, mailbox: str, offset_days: float | None = None) -> str:
        data = self.admin("user", "add", mailbox, "--name", "Test User", "--json", offset_days=offset_days).json()
        assert isinstance(data, dict)
        return str(data["token"])


@dataclass
class ClientHome:
    home: Path
    mailbox: str

    def run(
        self,
        *args: str,
        offset_days: float | None = None,
        input_text: str | None = None,
        env_extra: dict[str, str] | None = None,
    ) -> Result:
        cmd = [str(BIN / "mailkms-client"), "--home", str(self.home), *args]
        env = _env({"MAILKMS_CLIENT_PASSPHRASE": CLIENT_PASSPHRASE, **(env_extra or {})}, offset_days)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, input=input_text)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def enroll(self, dep: Deployment, token: str, *extra: str, offset_days: float | None = None) -> Result:
        return self.run(
            "enroll",
            "--server",
            dep.url,
            "--fingerprint",
            dep.fingerprint(),
            "--email",
            self.mailbox,
            "--token",
            token,
            "--maildir",
            str(dep.maildir(self.mailbox)),
            *extra,
            offset_days=offset_days,
        )


def init_deployment(path: Path, extra: list[str] | None = None) -> Deployment:
    dep = Deployment(path)
    dep.admin("init", "--hostname", "localhost", "--public-url", PUBLIC_URL, *(extra or []))
    return dep


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    dep = init_deployment(tmp_path / "data")
    yield dep
    dep.stop()


def enrolled(dep: Deployment, tmp_path: Path, mailbox: str) -> ClientHome:
    """A user enrolled end to end: token, enrol over HTTPS, mail in the Maildir, installed."""
    token = dep.add_user(mailbox)
    (tmp_path / "token.txt").write_text(token)  # kept so tests can look for it in logs
    client = ClientHome(tmp_path / f"client-{mailbox}", mailbox)
    before = len(dep.mails(mailbox))
    res = client.enroll(dep, token)
    assert res.code == 0, res.err
    dep.wait_for_mails(mailbox, before + 1)
    res = client.run("sync")
    assert res.code == 0 and "Installed" in res.out, res.out + res.err
    return client


def openssl(*args: str, input_bytes: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], capture_output=True, input=input_bytes, timeout=60)


def pkilint_smime(pem_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "lint_cabf_smime_cert"), "lint", "-d", "-s", "WARNING", str(pem_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
