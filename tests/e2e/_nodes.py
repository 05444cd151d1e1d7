"""Helpers for tests that run several real `mailkms serve` processes on one PostgreSQL.

A fresh PostgreSQL schema per test, a CA made by the real `mailkms init`, a recording SMTP sink
that counts every DATA (so a double send shows even though Maildir filing de-duplicates), and
server processes on free ports.
"""

from __future__ import annotations

import collections
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import httpx
from aiosmtpd.controller import Controller

from mailkms.mail import file_into_maildir

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_mailkms(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "mailkms"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def make_data_dir(path: Path, key_type: str = "p256") -> dict[str, str]:
    """`mailkms init` into `path`; returns the environment that points at it."""
    env = {**os.environ, "MAILKMS_DATA": str(path), "MAILKMS_RECOVERY_PASSPHRASE": "recovery-" + uuid.uuid4().hex}
    done = run_mailkms(
        ["init", "--hostname", "localhost", "--public-url", "http://kms.example.org/", "--key-type", key_type], env
    )
    assert done.returncode == 0, done.stderr
    return env


@dataclass
class Delivery:
    message_id: str
    recipient: str
    peer: str
    delivery: bool = False  # carries the X-Mailkms-Delivery header (certificates), not a reminder


class RecordingHandler:
    """Files into a Maildir root like the embedded sink, and records every DATA it accepted."""

    def __init__(self, root: Path, delay: float) -> None:
        self.root = root
        self.delay = delay
        self.lock = threading.Lock()
        self.deliveries: list[Delivery] = []
        self.in_data = 0  # DATA received in full and queued
        self.answered = 0  # DATA answered 250 (after `delay`)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """As a real MTA does: the message is queued (here: filed and recorded) once the whole DATA
        is in, then answered; `delay` holds the answer, so a sender that dies meanwhile has
        delivered without knowing it."""
        import asyncio

        data = envelope.original_content or b""
        headers = BytesHeaderParser().parsebytes(data)
        message_id = str(headers.get("Message-ID", "")).strip()
        for rcpt in envelope.rcpt_tos:
            file_into_maildir(self.root, rcpt, data)
            with self.lock:
                self.deliveries.append(Delivery(message_id, rcpt, str(session.peer), "X-Mailkms-Delivery" in headers))
        with self.lock:
            self.in_data += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        with self.lock:
            self.answered += 1
        return "250 Message accepted for delivery"


@dataclass
class RecordingSink:
    root: Path
    delay: float = 0.0
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.handler = RecordingHandler(self.root, self.delay)
        self._controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, decode_data=False)

    def __enter__(self) -> RecordingSink:
        self.root.mkdir(parents=True, exist_ok=True)
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()

    @property
    def count(self) -> int:
        with self.handler.lock:
            return len(self.handler.deliveries)

    def per_message(self) -> collections.Counter[str]:
        with self.handler.lock:
            return collections.Counter(d.message_id for d in self.handler.deliveries)

    def maildir_files(self) -> list[Path]:
        return sorted(self.root.glob("*/new/*"))


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_node(env: dict[str, str], log: Path, **config: str) -> Node:
    """`mailkms serve` on a free port; `config` adds MAILKMS_* variables (e.g. OUTBOX__LEASE_SECONDS="3")."""
    port = free_port()
    node_env = {**env, **{f"MAILKMS_{k.upper()}": v for k, v in config.items()}}
    fh = open(log, "wb")
    proc = subprocess.Popen(
        [str(BIN / "mailkms"), "serve", "--port", str(port), "--http-port", "0"],
        env=node_env,
        stdout=fh,
        stderr=subprocess.STDOUT,
    )
    node = Node(proc, port, log)
    ca = ssl.create_default_context(cafile=str(Path(env["MAILKMS_DATA"]) / "ca" / "root.crt.pem"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mailkms serve exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"https://localhost:{port}/healthz", verify=ca, timeout=2).status_code == 200:
                return node
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    node.stop()
    raise AssertionError(f"mailkms serve did not come up: {log.read_text()[-3000:]}")


def wait_for(predicate: Any, timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
