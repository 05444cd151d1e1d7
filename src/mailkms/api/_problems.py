"""The one mapping from mailkms errors to RFC 9457 problem documents."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from mailkms.errors import PROBLEM_BASE, MailkmsError

log = logging.getLogger("mailkms.api")

PROBLEM_JSON = "application/problem+json"


def problem_response(exc: MailkmsError) -> JSONResponse:
    body = {
        "type": exc.problem_type(),
        "title": exc.title,
        "status": exc.http_status,
        "detail": exc.detail,
        **{k: v for k, v in exc.extra.items() if isinstance(v, str | int | float | bool)},
    }
    return JSONResponse(body, status_code=exc.http_status, media_type=PROBLEM_JSON)


async def mailkms_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MailkmsError)
    log.info("refused %s %s: %s", request.method, request.url.path, exc.code)
    return problem_response(exc)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    fields = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    body = {"type": PROBLEM_BASE + "malformed", "title": "The request is malformed", "status": 400, "detail": fields}
    return JSONResponse(body, status_code=400, media_type=PROBLEM_JSON)


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path)
    body = {"type": PROBLEM_BASE + "internal", "title": "Internal error", "status": 500, "detail": "internal error"}
    return JSONResponse(body, status_code=500, media_type=PROBLEM_JSON)
