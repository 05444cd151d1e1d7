"""What a request and a client may cost (issue 12, items 1, 3, 5), through the real app on a real store:
the body cap before the body is read, the body deadline, per-client rate limits, nonces that write
nothing until spent, anonymous refusals as bounded counts, reads without the SQLite write lock,
and the catch-all that keeps internal text from the client."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from mailkms.api import create_app
from mailkms.api._limits import RateLimiter
from mailkms.config import LimitsConfig
from mailkms.errors import BadNonce, ReplayedNonce, StaleNonce
from mailkms.services import Services
from mailkms.store import AuditRecord, Nonce
from tests.conftest import make_csr, transport_pem

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
MiB = 1024 * 1024


def _services(settings, clock, **limits: Any) -> Services:  # type: ignore[no-untyped-def]
    """Services with `[limits]` changed (the settings model is frozen: a copy with the new section)."""
    changed = settings.model_copy(update={"limits": LimitsConfig(**{**settings.limits.model_dump(), **limits})})
    return Services.build(changed, clock)


@pytest.fixture
def open_services(settings, clock):  # type: ignore[no-untyped-def]
    made: list[Services] = []

    def build(**limits: Any) -> Services:
        svc = _services(settings, clock, **limits)
        made.append(svc)
        return svc

    yield build
    for svc in made:
        svc.close()


def _rows(services: Services, model: Any) -> int:
    with services.db.read_only() as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


# --- ASGI by hand: what the server would hand the app, and whether the body was read -------------------
class Sender:
    """A client that sends `total` bytes of body in `chunk`-sized pieces, counting what was taken."""

    def __init__(self, total: int, chunk: int = 16 * 1024, delay: float = 0.0) -> None:
        self.total, self.chunk, self.delay = total, chunk, delay
        self.taken = 0
        self.calls = 0

    async def receive(self) -> dict[str, Any]:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        piece = min(self.chunk, self.total - self.taken)
        self.taken += piece
        return {"type": "http.request", "body": b"x" * piece, "more_body": self.taken < self.total}


def _call(
    app: Any, method: str, path: str, headers: dict[str, str], sender: Sender
) -> tuple[int, dict[str, str], bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("198.51.100.7", 40000),
        "server": ("testserver", 443),
    }
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, sender.receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


# --- 1. request bodies ---------------------------------------------------------------------------------
@SQLITE_ONLY
@pytest.mark.parametrize("path", ["/api/v1/enrolments", "/api/v1/renewals", "/api/v1/resync", "/api/v1/status"])
def test_a_declared_100_mb_body_is_refused_before_a_byte_is_read(services, path: str) -> None:
    sender = Sender(100 * MiB)
    status, headers, body = _call(
        create_app(services),
        "POST",
        path,
        {"content-type": "application/json", "content-length": str(100 * MiB)},
        sender,
    )
    assert status == 413
    assert sender.calls == 0, "the body was read"
    assert headers["content-type"] == "application/problem+json" and headers["connection"] == "close"
    problem = json.loads(body)
    assert problem["type"] == "urn:mailkms:problem:body-too-large" and problem["status"] == 413
    assert set(problem) >= {"type", "title", "status", "detail"}


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("path", "media", "refusal"),
    [
        ("/api/v1/renewals", "application/json", "application/problem+json"),
        ("/.well-known/est/simpleenroll", "application/pkcs10", "text/plain"),  # EST refuses in its own text
        ("/ocsp", "application/ocsp-request", "application/ocsp-response"),
    ],
)
def test_a_chunked_body_is_counted_and_cut_off_at_the_cap(services, path: str, media: str, refusal: str) -> None:
    sender = Sender(100 * MiB)
    status, headers, body = _call(
        create_app(services), "POST", path, {"content-type": media, "transfer-encoding": "chunked"}, sender
    )
    assert status == 413 and headers["content-type"].startswith(refusal)
    if refusal != "application/ocsp-response":
        assert b"urn:mailkms:problem:body-too-large" in body
    cap = services.settings.limits.max_body_bytes
    assert sender.taken <= cap + sender.chunk, f"read {sender.taken} bytes of a {cap}-byte cap"


def test_the_cap_is_configurable_and_a_body_under_it_goes_through(open_services) -> None:  # type: ignore[no-untyped-def]
    services = open_services(max_body_bytes=2048)
    client = TestClient(create_app(services))
    big = client.post("/api/v1/status", json={"protected": "a" * 3000, "payload": "", "signature": ""})
    assert big.status_code == 413 and big.headers["content-type"] == "application/problem+json"
    small = client.post("/api/v1/status", json={"protected": "a" * 100, "payload": "", "signature": ""})
    assert small.status_code == 400 and small.json()["type"] == "urn:mailkms:problem:bad-jws"


@SQLITE_ONLY
def test_a_body_that_trickles_in_is_refused_at_the_deadline(open_services) -> None:  # type: ignore[no-untyped-def]
    services = open_services(body_timeout_seconds=0.5)
    sender = Sender(60 * 1024, chunk=100, delay=0.05)  # 600 pieces, 30 s at that pace
    started = time.monotonic()
    status, _, body = _call(
        create_app(services),
        "POST",
        "/api/v1/enrolments",
        {"content-type": "application/json", "transfer-encoding": "chunked"},
        sender,
    )
    assert status == 408 and json.loads(body)["type"] == "urn:mailkms:problem:request-timeout"
    assert time.monotonic() - started < 5


# --- 3. rate limits ------------------------------------------------------------------------------------------
def test_the_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=3, clients=16, now=lambda: now[0])
    assert [limiter.take("token", "a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("token", "a") == pytest.approx(1.0)
    assert limiter.take("token", "b") == 0.0, "another client has its own bucket"
    assert limiter.take("signed", "a") == 0.0, "another group has its own bucket"
    now[0] += 1.0
    assert limiter.take("token", "a") == 0.0
    assert limiter.take("token", "a") > 0


def test_the_bucket_table_is_bounded() -> None:
    limiter = RateLimiter(per_minute=60, burst=1, clients=16)
    for i in range(1000):
        limiter.take("token", f"10.0.{i // 256}.{i % 256}")
    assert limiter.size() == 16


@SQLITE_ONLY
def test_rate_limited_with_retry_after_and_a_problem_document(open_services) -> None:  # type: ignore[no-untyped-def]
    services = open_services(rate_per_minute=6, rate_burst=3)
    client = TestClient(create_app(services))
    junk = {"mailbox": "x@example.org", "token": "t", "csr": "no", "transport_certificate": "no"}
    codes = [client.post("/api/v1/enrolments", json=junk).status_code for _ in range(3)]
    assert codes == [400, 400, 400]
    limited = client.post("/api/v1/enrolments", json=junk)
    assert limited.status_code == 429
    assert limited.headers["content-type"] == "application/problem+json"
    assert int(limited.headers["retry-after"]) == 10  # one request per 10 s at 6 a minute
    assert limited.json()["type"] == "urn:mailkms:problem:rate-limited" and limited.json()["status"] == 429
    # EST's token operations share the "token" group, and refuse in EST's text/plain.
    est = client.post(
        "/.well-known/est/simpleenroll",
        content=b"AAAA",
        headers={"Content-Type": "application/pkcs10"},
        auth=("x@example.org", "t"),
    )
    assert est.status_code == 429 and est.headers["content-type"].startswith("text/plain")
    assert "retry-after" in est.headers
    # Other groups and paths are untouched; the directory and publication are not limited.
    assert client.head("/api/v1/nonce").status_code == 204
    assert client.get("/healthz").status_code == 200


# --- 3. nonces cost no write; the replay set is written on spending only ----------------------------------
def test_nonces_are_made_without_a_write_and_spent_once(services, clock) -> None:  # type: ignore[no-untyped-def]
    before = _rows(services, Nonce)
    client = TestClient(create_app(services))
    values = {client.head("/api/v1/nonce").headers["Replay-Nonce"] for _ in range(200)}
    values |= {client.get("/api/v1/nonce").headers["Replay-Nonce"] for _ in range(200)}
    assert len(values) == 400
    assert _rows(services, Nonce) == before, "handing out nonces wrote rows"
    value = values.pop()
    services.nonces.consume(value)
    assert _rows(services, Nonce) == before + 1
    with pytest.raises(ReplayedNonce):
        services.nonces.consume(value)
    forged = value[:-2] + ("AA" if not value.endswith("AA") else "BB")
    with pytest.raises(BadNonce):
        services.nonces.consume(forged)
    with pytest.raises(BadNonce):
        services.nonces.consume("made-up")
    stale = values.pop()
    clock.advance(services.nonces.ttl + __import__("datetime").timedelta(seconds=1))
    with pytest.raises(StaleNonce):
        services.nonces.consume(stale)
    # The spent row stays while its nonce could still be fresh on a node whose clock is behind,
    # then the purge drops it; a replay after that is stale, not accepted.
    assert services.nonces.purge() == 0
    clock.advance(__import__("datetime").timedelta(seconds=61))
    assert services.nonces.purge() == 1
    with pytest.raises(StaleNonce):
        services.nonces.consume(value)
    assert _rows(services, Nonce) == before


def test_every_node_accepts_every_nodes_nonces(settings, clock) -> None:  # type: ignore[no-untyped-def]
    """Two processes on one store (SQLite and PostgreSQL): the key comes from the store."""
    first, second = Services.build(settings, clock), Services.build(settings, clock)
    try:
        made_by_first = first.nonces.new()
        second.nonces.consume(made_by_first)
        with pytest.raises(ReplayedNonce):
            first.nonces.consume(made_by_first)
    finally:
        first.close()
        second.close()


# --- 3. reads without the write lock ------------------------------------------------------------------------
@SQLITE_ONLY
def test_sqlite_reads_do_not_wait_for_a_writer(services) -> None:  # type: ignore[no-untyped-def]
    db = services.db
    holding, release = threading.Event(), threading.Event()

    def writer() -> None:
        with db.transaction() as session:  # BEGIN IMMEDIATE: holds the write lock
            session.execute(text("UPDATE audit_head SET seq = seq WHERE id = 1"))
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=writer)
    thread.start()
    assert holding.wait(10)
    done: dict[str, float] = {}

    def read(kind: str) -> None:
        started = time.monotonic()
        with db.read_only() if kind == "read" else db.transaction() as session:
            session.execute(text("SELECT count(*) FROM users")).scalar_one()
        done[kind] = time.monotonic() - started

    reader = threading.Thread(target=read, args=("read",))
    reader.start()
    reader.join(5)
    blocked = threading.Thread(target=read, args=("write",))
    blocked.start()
    blocked.join(0.5)
    try:
        assert "read" in done and done["read"] < 2, "a read-only transaction waited for the writer"
        assert "write" not in done, "a write transaction should wait for the writer (the test would prove nothing)"
    finally:
        release.set()
        thread.join()
        blocked.join(30)
    with pytest.raises(Exception, match="readonly"):
        with db.read_only() as session:
            session.execute(text("DELETE FROM users"))


# --- 3. 10,000 junk requests ---------------------------------------------------------------------------------------
@SQLITE_ONLY
def test_ten_thousand_junk_requests_leave_the_audit_chain_and_nonce_table_bounded(open_services) -> None:  # type: ignore[no-untyped-def]
    services = open_services(rate_per_minute=0)  # the limits' own test is above; here every request gets in
    services.users.add("alice@example.org", "", None, "admin:test")
    client = TestClient(create_app(services))
    csr, _ = make_csr("alice@example.org")
    pem, _, _ = transport_pem()
    audit_before, nonces_before = _rows(services, AuditRecord), _rows(services, Nonce)
    jws = {"protected": "eyJhbGciOiJub25lIn0", "payload": "e30", "signature": "AAAA"}
    requests: list[Any] = [
        lambda i: client.head("/api/v1/nonce"),
        lambda i: client.get("/api/v1/nonce"),
        lambda i: client.post("/api/v1/renewals", json={**jws, "signature": f"junk{i}"}),
        lambda i: client.post("/api/v1/resync", json=jws),
        lambda i: client.post("/api/v1/status", json={"protected": str(i)}),
        lambda i: client.post(
            "/api/v1/enrolments",
            json={
                "mailbox": "alice@example.org",
                "token": f"guess-{i}",
                "csr": csr.decode(),
                "transport_certificate": pem,
            },
        ),
        lambda i: client.post(
            "/api/v1/enrolments",
            json={"mailbox": f"nobody{i}@example.org", "token": "x", "csr": "junk", "transport_certificate": "junk"},
        ),
        lambda i: client.post(
            "/.well-known/est/simpleenroll",
            content=b"AAAA",
            headers={"Content-Type": "application/pkcs10"},
            auth=(f"u{i}@example.org", "t"),
        ),
        lambda i: client.post(
            "/.well-known/est/simplereenroll", content=b"!!", headers={"Content-Type": "application/pkcs10"}
        ),
        lambda i: client.post("/api/v1/renewals", content=b"x" * 70_000, headers={"Content-Type": "application/json"}),
    ]
    started = time.monotonic()
    statuses: dict[int, int] = {}
    for i in range(10_000):
        status = requests[i % len(requests)](i).status_code
        statuses[status] = statuses.get(status, 0) + 1
    elapsed = time.monotonic() - started
    assert statuses.get(204) == 2000 and 500 not in statuses, statuses
    assert _rows(services, Nonce) == nonces_before, "junk wrote nonce rows"
    assert _rows(services, AuditRecord) == audit_before, "junk wrote audit records one by one"
    written = services.refusals.flush()
    after = _rows(services, AuditRecord)
    assert after - audit_before == written <= 12, f"{written} count records for 10,000 requests"
    with services.db.read_only() as session:
        counted = [
            json.loads(r.details)
            for r in session.execute(select(AuditRecord).where(AuditRecord.seq > audit_before)).scalars()
        ]
    assert sum(int(d["count"]) for d in counted) == 8000  # every refused request is in a count
    assert services.verify_audit().ok
    print(f"10,000 junk requests in {elapsed:.1f} s: {statuses}; audit +{after - audit_before}, nonces +0")


# --- 5. the catch-all ------------------------------------------------------------------------------------------------
@SQLITE_ONLY
def test_an_unexpected_error_reaches_the_client_as_a_generic_problem(services, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    def broken(*_: object) -> None:
        raise RuntimeError("cannot open /srv/mailkms/secret-place/ca.key: <object at 0xdeadbeef>")

    monkeypatch.setattr(services.directory, "lookup", broken)
    client = TestClient(create_app(services), raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="mailkms.api"):
        resp = client.get("/api/v1/directory/alice@example.org", headers={"X-Request-ID": "rid-500"})
    assert resp.status_code == 500
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.headers["x-request-id"] == "rid-500"
    problem = resp.json()
    assert problem["type"] == "urn:mailkms:problem:internal" and problem["request_id"] == "rid-500"
    assert set(problem) >= {"type", "title", "status", "detail"}
    for leak in ("/srv", "secret-place", "RuntimeError", "0xdeadbeef", "Traceback"):
        assert leak not in resp.text
    [record] = [r for r in caplog.records if r.exc_info]
    assert "secret-place" in "".join(__import__("traceback").format_exception(*record.exc_info))
    assert "rid-500" in record.getMessage()


@SQLITE_ONLY
def test_unknown_paths_and_methods_are_problem_documents(services) -> None:  # type: ignore[no-untyped-def]
    client = TestClient(create_app(services))
    missing = client.get("/api/v1/nothing-here")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["type"] == "urn:mailkms:problem:not-found"
    wrong = client.delete("/api/v1/enrolments")
    assert wrong.status_code == 405 and wrong.headers["content-type"] == "application/problem+json"
    assert wrong.json()["type"] == "urn:mailkms:problem:method-not-allowed" and "allow" in wrong.headers


@SQLITE_ONLY
def test_the_server_bounds_connections_from_the_config(open_services) -> None:  # type: ignore[no-untyped-def]
    import uvicorn

    from mailkms.cli._serve import _limits

    services = open_services(max_concurrency=7, keep_alive_seconds=2, max_header_bytes=8192)
    config = uvicorn.Config(lambda *_: None, **_limits(services))  # type: ignore[arg-type]
    assert (config.limit_concurrency, config.timeout_keep_alive, config.h11_max_incomplete_event_size) == (7, 2, 8192)
    assert config.proxy_headers is False, "no proxy is trusted unless configured"
