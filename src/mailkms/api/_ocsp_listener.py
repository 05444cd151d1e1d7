"""An OCSP-only listener served by several processes on one port (`[revocation] ocsp_listen`).

One connection per request is what most OCSP clients do (openssl speaks HTTP/1.0 and closes), and
then the cost is accepting and parsing, not answering: one process tops out near one core. Here N
processes each bind the same address with SO_REUSEPORT (the kernel spreads connections over them)
and answers OCSP on a bare asyncio protocol with httptools' parser (uvicorn's per-request ASGI
machinery cost ~150 µs of CPU per connection, several times the answer itself), each with its own
cache of signed answers, its own OCSP threads, and its own poll of the store (`ocsp.sync`, every
`poll_seconds`) that drops answers of certificates revoked on any node. They hold the delegated
responder's key only (re-read when `serve` renews it), never a CA key. Anything but /ocsp gets 404.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import typing
from collections.abc import Iterable, MutableSequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

import httptools
import uvloop
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from mailkms.api._revocation import MAX_OCSP_REQUEST, _decode_get
from mailkms.clock import SystemClock
from mailkms.config import Settings
from mailkms.pki import MALFORMED_RESPONSE, TRY_LATER_RESPONSE
from mailkms.services import CAPaths, FileResponderKeys, OCSPAnswer, OCSPResponder, open_database

log = logging.getLogger("mailkms.ocsp")


_CLOSE = b"connection: close\r\n"
# What each listener process counts, in a shared array (one row per process, each written by its
# process only), summed by the server's /metrics: OCSP answers by status, then connections.
STATUSES = ("good", "revoked", "unused", "unauthorized", "malformed", "tryLater")
_SLOTS = (*STATUSES, "connections")
_SLOT = {name: i for i, name in enumerate(_SLOTS)}
_HEAD_LIMIT = 16 * 1024  # request line and headers; an OCSP client sends a few hundred bytes
_STATUS = {200: b"200 OK", 400: b"400 Bad Request", 404: b"404 Not Found", 405: b"405 Method Not Allowed",
           413: b"413 Content Too Large", 503: b"503 Service Unavailable"}  # fmt: skip


def _response(status: int, body: bytes, headers: bytes, keep_alive: bool, head_only: bool = False) -> bytes:
    return b"".join(
        (
            b"HTTP/1.1 ", _STATUS[status], b"\r\n", headers,
            b"content-length: ", str(len(body)).encode(), b"\r\n",
            b"" if keep_alive else _CLOSE, b"\r\n",
            b"" if head_only else body,
        )
    )  # fmt: skip


class _OCSPConnection(asyncio.Protocol):
    """One client connection: HTTP/1.x parsed by httptools, answered in request order.

    A cached answer is written from `data_received` itself; a miss goes to the responder's threads
    (or tryLater) and later requests on the connection wait their turn. Limits as on the other
    ports: body at most MAX_OCSP_REQUEST, head at most 16 KiB, a request must arrive whole within
    `body_timeout_seconds`, an idle keep-alive connection closes after `keep_alive_seconds`, and at
    most `max_concurrency` connections per process (503 beyond).
    """

    def __init__(self, listener: _Listener) -> None:
        self._listener = listener
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body = bytearray()
        self._received = 0
        self._slots: collections.deque[list[bytes | None]] = collections.deque()  # answers in request order
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = typing.cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        listener = self._listener
        listener.count("connections")
        listener.connections.add(self)
        if len(listener.connections) > listener.max_connections:
            self._finish(_response(503, b"", b"", keep_alive=False))
            return
        self._arm(listener.body_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > _HEAD_LIMIT + MAX_OCSP_REQUEST:
            self._finish(_response(413, b"", b"", keep_alive=False))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._finish(_response(400, b"", b"", keep_alive=False))
        except httptools.HttpParserError:
            self._finish(_response(400, b"", b"", keep_alive=False))

    # --- httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body.clear()
        self._arm(self._listener.body_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self._received = 0
        keep_alive = self._parser.should_keep_alive()
        method = self._parser.get_method()
        path = self._url.split(b"?", 1)[0]
        der: bytes | None
        if path == b"/ocsp" and method == b"POST":
            der = bytes(self._body)
        elif path.startswith(b"/ocsp/") and method in (b"GET", b"HEAD"):
            der = _decode_get(path)
        elif path == b"/ocsp" or path.startswith(b"/ocsp/"):
            allow = b"allow: POST\r\n" if path == b"/ocsp" else b"allow: GET\r\n"
            self._queue(_response(405, b"", allow, keep_alive))
            return
        else:
            self._queue(_response(404, b"", b"", keep_alive))
            return
        head_only = method == b"HEAD"
        responder = self._listener.responder
        answer = None
        if der is None or len(der) > MAX_OCSP_REQUEST:
            answer = OCSPAnswer(MALFORMED_RESPONSE, "malformed")
        else:
            answer = responder.answer_cached(der)
        if answer is not None:
            self._listener.count(answer.status)
            self._queue(_ocsp_response(answer, keep_alive, head_only))
            return
        assert der is not None
        future = responder.submit(der)  # a store look-up and perhaps a signature, on the OCSP threads
        if future is None:
            self._listener.count("tryLater")
            self._queue(_ocsp_response(OCSPAnswer(TRY_LATER_RESPONSE, "tryLater"), keep_alive, head_only))
            return
        slot: list[bytes | None] = [None]
        self._slots.append(slot)
        loop = self._listener.loop

        def done(finished: concurrent.futures.Future[OCSPAnswer]) -> None:
            try:
                got = finished.result()
            except Exception:
                log.exception("OCSP answer failed")
                got = OCSPAnswer(TRY_LATER_RESPONSE, "tryLater")
            loop.call_soon_threadsafe(self._answered, slot, got, keep_alive, head_only)

        future.add_done_callback(done)

    # --- writing in order
    def _answered(self, slot: list[bytes | None], got: OCSPAnswer, keep_alive: bool, head_only: bool) -> None:
        self._listener.count(got.status)  # on the loop's thread: the only writer of this process's row
        self._fill(slot, _ocsp_response(got, keep_alive, head_only))

    def _queue(self, data: bytes) -> None:
        self._slots.append([data])
        self._flush()

    def _fill(self, slot: list[bytes | None], data: bytes) -> None:
        slot[0] = data
        self._flush()

    def _flush(self) -> None:
        while self._slots and self._slots[0][0] is not None and not self._closing:
            data = self._slots.popleft()[0]
            assert data is not None and self._transport is not None
            self._transport.write(data)
            if _CLOSE in data[: data.index(b"\r\n\r\n") + 2]:  # this answer's own head says so
                self._closing = True
                self._transport.close()
        if not self._slots and not self._closing:
            self._arm(self._listener.keep_alive)

    def _finish(self, data: bytes) -> None:
        if self._transport is not None and not self._closing:
            self._closing = True
            self._transport.write(data)
            self._transport.close()

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._listener.loop.call_later(seconds, self._expired)

    def _expired(self) -> None:
        if self._transport is not None and not self._closing:
            self._closing = True
            self._transport.close()


def _ocsp_response(answer: OCSPAnswer, keep_alive: bool, head_only: bool) -> bytes:
    cache = (
        f"public, max-age={answer.max_age}, no-transform, must-revalidate" if answer.max_age else "no-store"
    ).encode()
    headers = b"content-type: application/ocsp-response\r\ncache-control: " + cache + b"\r\n"
    return _response(200, answer.der, headers, keep_alive, head_only)


@dataclass
class _Listener:
    responder: OCSPResponder
    loop: asyncio.AbstractEventLoop
    max_connections: int
    body_timeout: float
    keep_alive: float
    counters: MutableSequence[int]  # this process's row of the shared array
    row: int
    connections: set[_OCSPConnection] = field(default_factory=set)

    def count(self, slot: str) -> None:
        index = self.row * len(_SLOTS) + _SLOT.get(slot, _SLOT["malformed"])
        self.counters[index] += 1


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


async def _serve_one(
    settings: Settings, passphrase: bytes, host: str, port: int, counters: MutableSequence[int], row: int
) -> None:
    keys = FileResponderKeys(CAPaths(settings.data_dir), passphrase)
    db = open_database(settings)
    responder = OCSPResponder(db, keys, settings, SystemClock())
    limits = settings.limits
    loop = asyncio.get_running_loop()
    listener = _Listener(
        responder,
        loop,
        limits.max_concurrency,
        limits.body_timeout_seconds,
        limits.keep_alive_seconds,
        counters,
        row,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: _OCSPConnection(listener), sock=_socket(host, port), backlog=2048)
    poll = asyncio.create_task(_poll(responder, keys, settings.revocation.poll_seconds, stop))
    try:
        await stop.wait()
    finally:
        server.close()
        for connection in list(listener.connections):
            connection._expired()
        await asyncio.gather(poll, return_exceptions=True)
        responder.close()
        db.dispose()


def run_ocsp_process(
    settings: Settings, passphrase: bytes, host: str, port: int, counters: MutableSequence[int], row: int
) -> None:
    """The entry of one listener process (spawned by `serve`); SIGTERM stops it."""
    uvloop.run(_serve_one(settings, passphrase, host, port, counters, row))


class ListenerCounters(Collector):
    """/metrics of the server: the listener processes' counts, summed over the processes."""

    def __init__(self, counters: MutableSequence[int], processes: int) -> None:
        self._counters = counters
        self._processes = processes

    def totals(self) -> dict[str, int]:
        values = list(self._counters)  # one copy: the processes keep counting meanwhile
        width = len(_SLOTS)
        return {name: sum(values[p * width + i] for p in range(self._processes)) for i, name in enumerate(_SLOTS)}

    def collect(self) -> Iterable[Metric]:
        totals = self.totals()
        answered = CounterMetricFamily(
            "mailkms_ocsp_listener_requests",
            "OCSP requests answered by the OCSP-only listener processes, by status",
            labels=["status"],
        )
        for status in STATUSES:
            answered.add_metric([status], totals[status])
        yield answered
        yield CounterMetricFamily(
            "mailkms_ocsp_listener_connections",
            "Connections accepted by the OCSP-only listener processes",
            value=totals["connections"],
        )


class OCSPListeners:
    """`serve`'s OCSP-only processes: started together, stopped together."""

    def __init__(self, settings: Settings, passphrase: bytes) -> None:
        """`passphrase` opens the responder key; it reaches each process through its start-up pipe."""
        address = settings.revocation.ocsp_address
        if address is None:
            raise ValueError("no [revocation] ocsp_listen")
        self.host, self.port = address
        context = multiprocessing.get_context("spawn")
        processes = settings.revocation.ocsp_processes
        # unsigned 64-bit counters in shared memory, no lock: each row has one writer (its process)
        counters = context.RawArray("Q", processes * len(_SLOTS))
        self.counters = ListenerCounters(counters, processes)
        self._processes: list[BaseProcess] = [
            context.Process(
                target=run_ocsp_process,
                args=(settings, passphrase, self.host, self.port, counters, n),
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
        REGISTRY.register(self.counters)  # the server's /metrics shows what the processes counted

    def stop(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(KeyError):
            REGISTRY.unregister(self.counters)
        for process in self._processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in self._processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join()
