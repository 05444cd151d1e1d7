"""Request ids, request metrics and `/metrics` (Prometheus)."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailkms import logs, metrics
from mailkms.api._problems import PROBLEM_JSON, internal_error_body, problem_response
from mailkms.errors import MetricsTokenInvalid
from mailkms.services import Services

log = logging.getLogger("mailkms.api")
_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class RequestIdMiddleware:
    """Takes a sane X-Request-ID from the caller or makes one; logs carry it; the response echoes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _RID.match(given) else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        status = 500
        started = time.perf_counter()

        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started_response = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # The catch-all: the traceback goes to the log with the request id, the client gets a
            # generic problem document that quotes the id (never the exception's text or a path).
            log.exception("internal error on %s %s (request %s)", scope.get("method", ""), scope.get("path", ""), rid)
            if started_response:
                raise  # too late for an answer of our own: the server drops the connection
            body = json.dumps(internal_error_body(rid)).encode()
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", PROBLEM_JSON.encode()),
                        (b"content-length", str(len(body)).encode()),
                        (b"cache-control", b"no-store"),
                    ],
                }
            )
            await send_with_id({"type": "http.response.body", "body": body})
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            metrics.REQUEST_SECONDS.labels(scope.get("method", ""), path, str(status)).observe(
                time.perf_counter() - started
            )
            logs.request_id.reset(token)


class StoreCollector(Collector):
    """Gauges read from the shared store at scrape time: the same figures on every node."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def collect(self) -> Iterable[Metric]:
        depth, oldest = self._services.outbox.depth()
        now = self._services.clock.now()
        yield GaugeMetricFamily("mailkms_outbox_depth", "Mails queued and not yet sent", value=depth)
        yield GaugeMetricFamily(
            "mailkms_outbox_oldest_age_seconds",
            "Age of the oldest unsent mail (0 when the outbox is empty)",
            value=(now - oldest).total_seconds() if oldest else 0.0,
        )
        waiting = GaugeMetricFamily(
            "mailkms_outbox_waiting",
            'Unsent mails by the kind of their last send failure ("none": not failed yet)',
            labels=["kind"],
        )
        for kind, count in sorted(self._services.outbox.waiting_by_kind().items()):
            waiting.add_metric([kind], count)
        yield waiting
        pool = self._services.key_pool
        yield GaugeMetricFamily(
            "mailkms_keypool_size", "Pre-generated encryption keys ready", value=pool.size() if pool else 0
        )
        yield GaugeMetricFamily(
            "mailkms_keypool_target", "Configured key-pool size", value=self._services.settings.pool.size
        )


def _bearer_matches(request: Request, expected: bytes) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"), expected)


def metrics_router(services: Services, extra: Callable[[], bytes] | None = None) -> APIRouter:
    router = APIRouter(tags=["operations"])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(services))
    token = services.settings.metrics.bearer_token().encode()

    @router.get("/metrics", response_class=Response, summary="Prometheus metrics")
    def prometheus(request: Request) -> Response:
        if token and not _bearer_matches(request, token):
            refused = problem_response(MetricsTokenInvalid())
            refused.headers["WWW-Authenticate"] = 'Bearer realm="mailkms-metrics"'
            return refused
        body = generate_latest(REGISTRY) + generate_latest(registry) + (extra() if extra else b"")
        return Response(body, media_type=PROMETHEUS_TEXT, headers={"Cache-Control": "no-store"})

    return router


def install(app: Any, services: Services, http: bool = False) -> None:
    """Request ids on every app; /metrics on the HTTPS app (and on plain http when configured),
    unless `[metrics] listen` gives it a listener of its own (`create_metrics_app`)."""
    app.add_middleware(RequestIdMiddleware)
    if services.settings.metrics.listen_address is not None:
        return
    if not http or services.settings.server.metrics_on_http:
        app.include_router(metrics_router(services))


def create_metrics_app(services: Services) -> FastAPI:
    """Only /metrics, for the separate `[metrics] listen` address (plain http)."""
    app = FastAPI(title="mailkms metrics", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(metrics_router(services))
    app.add_middleware(RequestIdMiddleware)
    return app
