"""The one mapping from mailkms errors to RFC 9457 problem documents."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailkms import logs
from mailkms.errors import PROBLEM_BASE, MailkmsError, Malformed, MethodNotAllowed, NotFound
from mailkms.services import is_recorded

log = logging.getLogger("mailkms.api")

PROBLEM_JSON = "application/problem+json"


def problem_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses`: each status a problem document, with what it means on those paths."""
    from mailkms.api._schemas import Problem

    return {status: {"model": Problem, "description": text} for status, text in descriptions.items()}


def problem_response(exc: MailkmsError) -> JSONResponse:
    body = {
        "type": exc.problem_type(),
        "title": exc.title,
        "status": exc.http_status,
        "detail": exc.detail,
        **{k: v for k, v in exc.extra.items() if isinstance(v, str | int | float | bool)},
    }
    return JSONResponse(body, status_code=exc.http_status, media_type=PROBLEM_JSON)


def count_refusal(request: Request, exc: MailkmsError) -> None:
    """A refusal the services did not see (the HTTP layer's own checks) still counts, as anonymous."""
    refusals = getattr(request.app.state, "refusals", None)
    if refusals is not None and not is_recorded(exc):
        refusals.anonymous("request.refused", exc)


async def mailkms_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MailkmsError)
    log.info("refused %s %s: %s", request.method, request.url.path, exc.code)
    count_refusal(request, exc)
    return problem_response(exc)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    count_refusal(request, Malformed())
    fields = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    body = {"type": PROBLEM_BASE + "malformed", "title": "The request is malformed", "status": 400, "detail": fields}
    return JSONResponse(body, status_code=400, media_type=PROBLEM_JSON)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """The framework's own refusals (no such path, method not allowed) as problem documents too."""
    assert isinstance(exc, StarletteHTTPException)
    known: dict[int, type[MailkmsError]] = {404: NotFound, 405: MethodNotAllowed}
    cls = known.get(exc.status_code)
    if cls is not None:
        kind, title = cls.problem_type(), cls.title
    else:
        kind, title = PROBLEM_BASE + f"http-{exc.status_code}", "The request was refused"
    body = {"type": kind, "title": title, "status": exc.status_code, "detail": title}
    return JSONResponse(body, status_code=exc.status_code, media_type=PROBLEM_JSON, headers=exc.headers)


def internal_error_body(request_id: str | None) -> dict[str, object]:
    """What a client learns of an unexpected error: that it happened, and the id to quote."""
    body: dict[str, object] = {
        "type": PROBLEM_BASE + "internal",
        "title": "Internal error",
        "status": 500,
        "detail": "internal error; the server's log has the details under this request id",
    }
    if request_id:
        body["request_id"] = request_id
    return body


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """The last resort (an error outside the request-id layer): the traceback to the log only."""
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(internal_error_body(logs.request_id.get()), status_code=500, media_type=PROBLEM_JSON)
