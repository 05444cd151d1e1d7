"""Issue 12 item 1 against a real `mailkms serve`: a 100 MB body sent slowly, chunked, from a real
client socket over TLS, is refused early and the server's resident memory does not grow."""

from __future__ import annotations

import select
import socket
import ssl
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import Deployment

MiB = 1024 * 1024
TARGET = 100 * MiB
PIECE = 64 * 1024


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _connect(port: int) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def _answer(sock: ssl.SSLSocket) -> bytes:
    data = b""
    sock.settimeout(10)
    while b"\r\n\r\n" not in data:
        more = sock.recv(4096)
        if not more:
            break
        data += more
    return data


def _available(sock: ssl.SSLSocket) -> bytes:
    """What the server has sent so far, without waiting (TLS records that carry no data, such as
    TLS 1.3 session tickets, make the socket readable but give nothing)."""
    if not select.select([sock], [], [], 0)[0] and not sock.pending():
        return b""
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return b""
    finally:
        sock.setblocking(True)
        sock.settimeout(10)


def send_slowly(port: int, path: str, media: str) -> tuple[bytes, int, float]:
    """POST a chunked body of up to 100 MB, 64 KiB at a time with a pause, until the server answers
    or hangs up; returns (the answer's head, bytes sent, seconds)."""
    sock = _connect(port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {media}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    sock.sendall(head)
    piece = b"%x\r\n" % PIECE + b"A" * PIECE + b"\r\n"
    sent, started, answer = 0, time.monotonic(), b""
    try:
        while sent < TARGET and b"\r\n\r\n" not in answer:
            answer += _available(sock)
            if answer:
                continue  # the server has begun to answer: read the rest, send no more
            sock.sendall(piece)
            sent += PIECE
            time.sleep(0.005)  # slowly: 100 MB would take over 8 s at this pace
        if b"\r\n\r\n" not in answer:
            answer += _answer(sock)
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError) as exc:
        answer += f"\n(connection: {exc!r})".encode()
    finally:
        sock.close()
    return answer, sent, time.monotonic() - started


def test_a_slow_100_mb_body_is_refused_early_and_rss_stays(deployment: Deployment) -> None:
    deployment.start()
    assert deployment.proc is not None
    pid = deployment.proc.pid
    with httpx.Client(base_url=deployment.url, verify=False, timeout=10) as client:
        for _ in range(20):  # warm up: imports, pools and caches the first requests make
            client.post("/api/v1/status", json={"protected": "x", "payload": "y", "signature": "z"})
            client.post(
                "/.well-known/est/simpleenroll", content=b"AAAA", headers={"Content-Type": "application/pkcs10"}
            )
        before = rss_kib(pid)

        # Declared: refused on the header alone, before any body is sent.
        sock = _connect(deployment.https_port)
        sock.sendall(
            f"POST /api/v1/enrolments HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {TARGET}\r\n\r\n".encode()
        )
        declared = _answer(sock)
        sock.close()
        assert declared.startswith(b"HTTP/1.1 413"), declared
        assert b"application/problem+json" in declared

        figures = []
        for path, media, kind in [
            ("/api/v1/enrolments", "application/json", b"application/problem+json"),
            ("/api/v1/renewals", "application/json", b"application/problem+json"),
            ("/.well-known/est/simpleenroll", "application/pkcs10", b"text/plain"),
        ]:
            answer, sent, seconds = send_slowly(deployment.https_port, path, media)
            figures.append((path, sent, seconds))
            assert answer.startswith(b"HTTP/1.1 413"), (path, answer, sent)
            assert kind in answer
            assert sent <= 4 * MiB, f"{path}: the server let {sent} bytes in before refusing"
        after = rss_kib(pid)
        # The server still answers, and stayed small.
        assert client.get("/healthz").status_code == 200
    print(f"RSS before {before} KiB, after {after} KiB; sent before the refusal: {figures}")
    assert after - before < 20 * 1024, f"RSS grew from {before} to {after} KiB"
