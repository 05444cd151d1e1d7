"""An OCSP-only listener served by several processes on one port (`[revocation] ocsp_listen`).

One connection per request is what most OCSP clients do (openssl speaks HTTP/1.0 and closes), and
then the cost is accepting and parsing, not answering: one process tops out near one core. Here N
processes each bind the same address with SO_REUSEPORT (the kernel spreads connections over them)
and run the same bare OCSP endpoint, each with its own cache of signed answers, its own OCSP
threads, and its own poll of the store (`ocsp.sync`, every `poll_seconds`) that drops answers of
certificates revoked on any node. They hold the delegated responder's key only (re-read when
`serve` renews it), never a CA key. Anything but /ocsp gets 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
from multiprocessing.process import BaseProcess

import uvicorn
from starlette.types import Receive, Scope, Send

from mailkms.api._revocation import OCSPEndpoint
from mailkms.clock import SystemClock
from mailkms.config import Settings
from mailkms.services import CAPaths, FileResponderKeys, OCSPResponder, open_database

log = logging.getLogger("mailkms.ocsp")


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def _socket(host: str, port: int, listen: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # every process binds the same port
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    return sock


async def _poll(responder: OCSPResponder, keys: FileResponderKeys, every: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
        try:
            await asyncio.to_thread(responder.sync)
            await asyncio.to_thread(keys.refresh)  # a renewed responder: its answers are signed anew
        except Exception:
            log.exception("OCSP poll failed; retrying")


async def _serve_one(settings: Settings, passphrase: bytes, host: str, port: int) -> None:
    keys = FileResponderKeys(CAPaths(settings.data_dir), passphrase)
    db = open_database(settings)
    responder = OCSPResponder(db, keys, settings, SystemClock())
    limits = settings.limits
    server = uvicorn.Server(
        uvicorn.Config(
            OCSPEndpoint(_not_found, responder=responder),
            log_level="warning",
            log_config=None,
            access_log=False,
            limit_concurrency=limits.max_concurrency,
            timeout_keep_alive=int(limits.keep_alive_seconds),
            h11_max_incomplete_event_size=limits.max_header_bytes,
        )
    )
    stop = asyncio.Event()
    poll = asyncio.create_task(_poll(responder, keys, settings.revocation.poll_seconds, stop))
    try:
        await server.serve(sockets=[_socket(host, port)])
    finally:
        stop.set()
        await asyncio.gather(poll, return_exceptions=True)
        responder.close()
        db.dispose()


def run_ocsp_process(settings: Settings, passphrase: bytes, host: str, port: int) -> None:
    """The entry of one listener process (spawned by `serve`); SIGTERM stops it."""
    asyncio.run(_serve_one(settings, passphrase, host, port))


class OCSPListeners:
    """`serve`'s OCSP-only processes: started together, stopped together."""

    def __init__(self, settings: Settings, passphrase: bytes) -> None:
        """`passphrase` opens the responder key; it reaches each process through its start-up pipe."""
        address = settings.revocation.ocsp_address
        if address is None:
            raise ValueError("no [revocation] ocsp_listen")
        self.host, self.port = address
        context = multiprocessing.get_context("spawn")
        self._processes: list[BaseProcess] = [
            context.Process(
                target=run_ocsp_process,
                args=(settings, passphrase, self.host, self.port),
                name=f"mailkms-ocsp-{n}",
                daemon=True,
            )
            for n in range(settings.revocation.ocsp_processes)
        ]
        # Bound, not listening (it gets no connections): fails here, in `serve`, if the address is taken.
        self._probe = _socket(self.host, self.port, listen=False)

    def start(self) -> None:
        for process in self._processes:
            process.start()
        self._probe.close()

    def stop(self, timeout: float = 10.0) -> None:
        for process in self._processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in self._processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join()
