"""What one request and one client may cost: a body cap, a body deadline and per-client rate limits.

`Limits` is a bare ASGI layer in front of everything (OCSP included), so a refusal costs no
routing, no validation and no read of the body:

- Content-Length over `limits.max_body_bytes`: 413 at once, nothing read.
- A body without Content-Length (chunked): read here, counting bytes, into a buffer that never
  holds more than the cap; 413 as soon as the count passes it. The app then reads the buffer.
- The whole body must arrive within `limits.body_timeout_seconds` (408), so a slow sender holds
  a connection slot for a bounded time.
- Token buckets per (client address, group) for the endpoints that cost work or take
  credentials (a nonce costs an HMAC and no write: not limited): 429 with Retry-After. In memory, per process; the table of buckets is bounded
  (`limits.rate_clients`, least recently seen dropped first).

Refusals are problem documents, except under /.well-known/est where they are text/plain as
EST's own refusals are (RFC 7030 §4.2.3), and /ocsp, which gets an empty body. Each answer
closes the connection, so a sender that goes on sending is cut off.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailkms import metrics
from mailkms.config import LimitsConfig
from mailkms.errors import BodyTooLarge, MailkmsError, RateLimited, RequestTimeout

EST_PREFIX = "/.well-known/est/"
PROBLEM_JSON = b"application/problem+json"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# path -> group; other paths are not rate-limited (EST's others are "est").
_GROUPS: dict[str, str] = {
    "/api/v1/enrolments": "token",
    EST_PREFIX + "simpleenroll": "token",
    EST_PREFIX + "serverkeygen": "token",
    "/api/v1/renewals": "signed",
    "/api/v1/resync": "signed",
    "/api/v1/status": "signed",
    EST_PREFIX + "simplereenroll": "signed",
    "/admin/login": "login",  # password guessing across accounts (each account also locks itself)
    "/admin/login/passkey/options": "login",  # the password step of the passkey log-in
    "/.well-known/cmp": "token",  # CMP: MAC by the token or signature; one group, the stricter one
    "/acme/new-account": "token",  # ACME: what creates rows or sends mail is in the stricter group
    "/acme/new-order": "token",
}
ACME_PREFIX = "/acme/"


def rate_group(path: str) -> str | None:
    group = _GROUPS.get(path)
    if group is None and path.startswith(EST_PREFIX):
        return "est"
    if group is None and path.startswith("/.well-known/cmp/"):
        return "token"
    if group is None and path.startswith(ACME_PREFIX):
        return "signed"  # ACME polling and the other signed requests
    return group


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """Token buckets: `burst` at once, then `per_minute`; thread-safe; at most `clients` buckets."""

    def __init__(self, per_minute: float, burst: int, clients: int, now: Callable[[], float] = time.monotonic) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._clients = clients
        self._now = now
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def take(self, group: str, client: str) -> float:
        """0 if the request may go on; otherwise the seconds until it may (Retry-After)."""
        if not self.enabled:
            return 0.0
        now = self._now()
        key = (group, client)
        with self._lock:
            bucket = self._buckets.pop(key, None) or _Bucket(self._burst, now)
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) * self._rate)
            bucket.at = now
            self._buckets[key] = bucket  # most recently seen last
            while len(self._buckets) > self._clients:
                self._buckets.popitem(last=False)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self._rate

    def size(self) -> int:
        return len(self._buckets)


class Limits:
    def __init__(
        self,
        app: ASGIApp,
        config: LimitsConfig,
        on_refused: Callable[[MailkmsError], None] | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._app = app
        self._max = config.max_body_bytes
        self._timeout = config.body_timeout_seconds
        self._limiter = limiter or RateLimiter(config.rate_per_minute, config.rate_burst, config.rate_clients)
        self._on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        group = rate_group(path)
        if group is not None:
            client = (scope.get("client") or ("unknown", 0))[0]
            wait = self._limiter.take(group, client)
            if wait > 0:
                metrics.RATE_LIMITED.labels(group=group).inc()
                retry = max(1, math.ceil(wait))
                exc = RateLimited(f"too many requests from your address; try again in {retry} s")
                await self._refuse(scope, send, exc, [(b"retry-after", str(retry).encode())])
                return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if declared is not None and (not declared.isdigit() or int(declared) > self._max):
            await self._refuse(scope, send, self._too_large())
            return
        if not chunked and (declared is None or int(declared) == 0) and scope["method"] not in _BODY_METHODS:
            await self._app(scope, receive, send)  # no body: nothing to hold back
            return
        try:
            async with asyncio.timeout(self._timeout):
                body, disconnected = await self._read(receive)
        except TimeoutError:
            await self._refuse(scope, send, RequestTimeout(f"the request body must arrive within {self._timeout:g} s"))
            return
        except BodyTooLarge as exc:
            await self._refuse(scope, send, exc)
            return
        if disconnected:
            return
        await self._app(scope, _replay(body, receive), send)

    def _too_large(self) -> BodyTooLarge:
        return BodyTooLarge(f"request bodies are at most {self._max} bytes")

    async def _read(self, receive: Receive) -> tuple[bytes, bool]:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", True
            body += message.get("body", b"")
            if len(body) > self._max:
                raise self._too_large()
            if not message.get("more_body", False):
                return bytes(body), False

    async def _refuse(
        self, scope: Scope, send: Send, exc: MailkmsError, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        if self._on_refused is not None:
            self._on_refused(exc)
        path: str = scope.get("path", "")
        if path.startswith(EST_PREFIX):
            text = exc.detail[:1].upper() + exc.detail[1:]
            body = f"{text}\n({exc.problem_type()})\n".encode()
            media = b"text/plain; charset=utf-8"
        elif path == "/ocsp" or path.startswith("/ocsp/"):
            body, media = b"", b"application/ocsp-response"
        else:
            doc = {"type": exc.problem_type(), "title": exc.title, "status": exc.http_status, "detail": exc.detail}
            body, media = json.dumps(doc).encode(), PROBLEM_JSON
        headers = [
            (b"content-type", media),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (b"connection", b"close"),  # the server stops reading what the client still sends
            *(extra or []),
        ]
        await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: a disconnect, when it comes

    return replay


__all__ = ["Limits", "RateLimiter", "rate_group"]
