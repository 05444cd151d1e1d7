"""A real `mailkms serve` on free loopback ports, and real `mailkms-client` key stores enrolled on it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent
PASSPHRASE = "client-passphrase-made-at-run-time"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Kms:
    data: Path
    https_port: int
    http_port: int
    fingerprint: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    homes: dict[str, Path] = field(default_factory=dict)
    smtp_port: int = 0
    prefix: tuple[str, ...] = ()  # e.g. ("faketime", "-f", "+400d"): the server and clients live then

    @property
    def url(self) -> str:
        return f"https://localhost:{self.https_port}"

    @property
    def root_pem(self) -> Path:
        return self.data / "ca" / "root.crt.pem"

    @property
    def issuing_pem(self) -> Path:
        return self.data / "ca" / "issuing.crt.pem"

    def admin(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*self.prefix, str(BIN / "mailkms"), *args], env=self.env, capture_output=True, timeout=120
        )

    def client(
        self, home: Path, *args: str, data: bytes | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        full_env = {**self.env, "MAILKMS_CLIENT_PASSPHRASE": PASSPHRASE, **(env or {})}
        return subprocess.run(
            [*self.prefix, str(BIN / "mailkms-client"), "--home", str(home), *args],
            input=data,
            env=full_env,
            capture_output=True,
            timeout=120,
        )

    def enrol(self, mailbox: str, home: Path) -> Path:
        added = self.admin("user", "add", mailbox, "--json")
        assert added.returncode == 0, added.stderr
        token = json.loads(added.stdout)["token"]
        maildir = self.data / "mailboxes" / mailbox
        done = self.client(
            home,
            "enroll",
            "--server",
            self.url,
            "--fingerprint",
            self.fingerprint,
            "--email",
            mailbox,
            "--token",
            token,
            "--maildir",
            str(maildir),
        )
        assert done.returncode == 0, done.stderr
        self.wait_installed(home, maildir)
        self.homes[mailbox] = home
        return home

    def wait_installed(self, home: Path, maildir: Path) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if maildir.exists():
                synced = self.client(home, "sync")
                if b"Installed" in synced.stdout:
                    return
            time.sleep(0.3)
        raise AssertionError(f"the certificates for {home} never arrived")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def start_kms(folder: Path) -> Kms:
    data = folder / "data"
    https_port, http_port, smtp_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKMS_")} | {
        "MAILKMS_DATA": str(data),
        "MAILKMS_RECOVERY_PASSPHRASE": "recovery-passphrase-made-at-run-time",
    }
    init = subprocess.run(
        [str(BIN / "mailkms"), "init", "--hostname", "localhost", "--public-url", f"http://localhost:{http_port}/"],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr
    fp = subprocess.run([str(BIN / "mailkms"), "ca", "fingerprint", "--json"], env=env, capture_output=True, timeout=60)
    fingerprint = json.loads(fp.stdout)["sha256"]
    kms = Kms(data, https_port, http_port, fingerprint, env, None, smtp_port=smtp_port)  # type: ignore[arg-type]
    launch(kms, folder)
    return kms


def launch(kms: Kms, folder: Path, prefix: tuple[str, ...] = ()) -> None:
    """Start (or start again, e.g. under faketime) `mailkms serve` on the kms's ports."""
    kms.prefix = prefix
    with open(folder / "serve.log", "ab") as log:  # the child keeps its own copy of the descriptor
        kms.process = subprocess.Popen(
            [
                *prefix,
                str(BIN / "mailkms"),
                "serve",
                "--port",
                str(kms.https_port),
                "--http-port",
                str(kms.http_port),
                "--mail-sink-port",
                str(kms.smtp_port),
                "--bind",
                "127.0.0.1",
            ],
            env=kms.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if kms.process.poll() is not None:
            raise AssertionError((folder / "serve.log").read_text())
        try:
            if httpx.get(f"{kms.url}/healthz", verify=False, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    kms.stop()
    raise AssertionError("mailkms serve did not come up")
