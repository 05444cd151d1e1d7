"""The OCSP-only listener ([revocation] ocsp_listen): real processes on one port, raw HTTP from a socket.

What a client can send it (HTTP/1.0 and close, keep-alive and pipelined, GET, HEAD, anything else)
and what it answers, on SQLite and PostgreSQL; a revocation made by the services shows in every
process within a poll.
"""

from __future__ import annotations

import base64
import datetime as dt
import socket
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp
from prometheus_client import REGISTRY, generate_latest

from mailkms.api import OCSPListeners
from mailkms.clock import SystemClock
from mailkms.config import Settings
from mailkms.services import Services
from tests.e2e.conftest import free_port
from tests.integration.test_revocation import Enrolled, _ocsp_request


def _exchange(port: int, raw: bytes) -> bytes:
    """Send `raw` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(raw)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data


def _split(data: bytes) -> list[tuple[bytes, bytes]]:
    """(head, body) of each HTTP response in `data`."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        out.append((head, rest[:length]))
        data = rest[length:]
    return out


def _post(der: bytes, version: str = "1.0", extra: str = "") -> bytes:
    return (
        f"POST /ocsp HTTP/{version}\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n{extra}"
        f"Content-Length: {len(der)}\r\n\r\n"
    ).encode() + der


@pytest.fixture
def listeners(services: Services, settings: Settings, clock):  # type: ignore[no-untyped-def]
    """(the listener processes, their port)."""
    # The listener processes run on the system clock (their store polls look back from it): so do we here.
    clock.set(SystemClock().now())
    port = free_port()
    configured = settings.model_copy(
        update={
            "revocation": settings.revocation.model_copy(
                update={"ocsp_listen": f"127.0.0.1:{port}", "ocsp_processes": 2, "poll_seconds": 0.5}
            )
        }
    )
    services.ensure_server_identities()
    listeners = OCSPListeners(configured, services.ca.at_rest_passphrase)
    listeners.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    yield listeners, port
    listeners.stop()


@pytest.fixture
def listener(listeners: tuple[OCSPListeners, int]) -> int:
    return listeners[1]


def test_the_listener_answers_every_way_a_client_asks(services: Services, listener: int, clock) -> None:  # type: ignore[no-untyped-def]
    alice = Enrolled(services, "alice@example.org")
    der = _ocsp_request(alice.signing, services.ca.issuing.certificate)

    # HTTP/1.0, one request, the server closes: what openssl ocsp does.
    ((head, body),) = _split(_exchange(listener, _post(der)))
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head
    assert b"content-type: application/ocsp-response" in head
    answer = ocsp.load_der_ocsp_response(body)
    assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert answer.serial_number == alice.signing.serial_number

    # Keep-alive, three requests pipelined in one write (the last asks to close): three answers in order.
    other = _ocsp_request(
        alice.certs[0] if alice.certs[0] is not alice.signing else alice.certs[1], services.ca.issuing.certificate
    )
    raw = _post(der, "1.1") + _post(other, "1.1") + _post(der, "1.1", "Connection: close\r\n")
    answers = _split(_exchange(listener, raw))
    assert [ocsp.load_der_ocsp_response(b).serial_number for _, b in answers] == [
        alice.signing.serial_number,
        ocsp.load_der_ocsp_request(other).serial_number,
        alice.signing.serial_number,
    ]

    # GET with the request in the path (RFC 6960 A.1), and HEAD: same status, no body.
    path = "/ocsp/" + base64.b64encode(der).decode().replace("/", "%2F").replace("+", "%2B")
    ((head, body),) = _split(_exchange(listener, f"GET {path} HTTP/1.0\r\n\r\n".encode()))
    assert ocsp.load_der_ocsp_response(body).certificate_status is ocsp.OCSPCertStatus.GOOD
    data = _exchange(listener, f"HEAD {path} HTTP/1.0\r\n\r\n".encode())
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\n")

    # Not OCSP, a wrong method, garbage, a body too large.
    assert _exchange(listener, b"GET /crl/issuing.crl HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert _exchange(listener, b"GET /ocsp HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 405")
    ((head, body),) = _split(_exchange(listener, _post(b"not a request")))
    assert ocsp.load_der_ocsp_response(body).response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert _exchange(listener, _post(b"x" * 40_000)).startswith(b"HTTP/1.1 413")
    assert _exchange(listener, b"\x00\x01 not http\r\n\r\n").startswith(b"HTTP/1.1 400")

    # Revoked by the services (another process): every listener process says so within a poll.
    clock.advance(dt.timedelta(minutes=1))
    services.revocation.revoke_users([alice.mailbox], "keyCompromise", "admin:test")
    deadline = time.monotonic() + 120  # a revoked answer is signed anew after each poll: slow on a busy machine
    statuses: set[ocsp.OCSPCertStatus] = set()
    # Each process learns of it at its own poll: only once many answers in a row (spread over the
    # processes by the kernel) say revoked has every process caught up.
    answers: list[ocsp.OCSPResponse] = []
    while time.monotonic() < deadline:
        answers = [ocsp.load_der_ocsp_response(_split(_exchange(listener, _post(der)))[0][1]) for _ in range(16)]
        statuses = {a.certificate_status for a in answers}
        if statuses == {ocsp.OCSPCertStatus.REVOKED}:
            break
    assert statuses == {ocsp.OCSPCertStatus.REVOKED}
    response = answers[-1]
    assert response.revocation_reason is not None and response.revocation_reason.name == "key_compromise"
    assert response.public_bytes(serialization.Encoding.DER)  # a whole, signed response


def test_the_server_metrics_show_what_the_listener_processes_answered(
    services: Services, listeners: tuple[OCSPListeners, int]
) -> None:
    processes, port = listeners
    alice = Enrolled(services, "alice@example.org")
    der = _ocsp_request(alice.signing, services.ca.issuing.certificate)
    for _ in range(5):
        ((_, body),) = _split(_exchange(port, _post(der)))
        assert ocsp.load_der_ocsp_response(body).certificate_status is ocsp.OCSPCertStatus.GOOD
    _exchange(port, _post(b"not a request"))
    scraped = generate_latest(REGISTRY).decode()  # what the server's /metrics serves (the default registry)
    assert 'mailkms_ocsp_listener_requests_total{status="good"} 5.0' in scraped
    assert 'mailkms_ocsp_listener_requests_total{status="malformed"} 1.0' in scraped
    assert 'mailkms_ocsp_listener_requests_total{status="revoked"} 0.0' in scraped
    assert processes.counters.totals()["connections"] >= 6
    processes.stop()
    assert "mailkms_ocsp_listener_requests_total" not in generate_latest(REGISTRY).decode()
