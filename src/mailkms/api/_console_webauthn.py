"""Passkeys (WebAuthn) in the console: register one after logging in, log in with password +
passkey. These pages load the console's own script (/admin/static/webauthn.js) and their
Content-Security-Policy allows script-src 'self' (no inline script, no CDN); every other page keeps
the script-free policy. The JSON calls carry the CSRF token in an X-CSRF-Token header; the stored
challenge is named by a handle in its own HttpOnly cookie."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from mailkms.api._console import (
    COOKIE,
    CSP,
    HERE,
    PRE_COOKIE,
    SECURITY_HEADERS,
    _set_cookie,
    render,
)
from mailkms.errors import AdminAuthRequired, CSRFRefused, MailkmsError, Malformed
from mailkms.services import ConsoleSession, Services, credential_text

HANDLE_COOKIE = "mailkms_webauthn"
SCRIPT_HEADERS = {
    **SECURITY_HEADERS,
    "Content-Security-Policy": CSP.replace(
        "default-src 'none';", "default-src 'none'; script-src 'self'; connect-src 'self';"
    ),
}


def _json_error(exc: MailkmsError) -> JSONResponse:
    return JSONResponse(
        {"title": exc.title, "detail": exc.detail}, status_code=exc.http_status, headers=SECURITY_HEADERS
    )


async def _body(request: Request) -> dict[str, Any]:
    if len(await request.body()) > 64 * 1024:
        raise Malformed("the request is too large")
    try:
        body = await request.json()
    except ValueError as exc:
        raise Malformed("expected a JSON body") from exc
    if not isinstance(body, dict):
        raise Malformed("expected a JSON object")
    return body


def passkeys_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/admin", include_in_schema=False)
    admins = services.admins
    passkeys = services.passkeys
    settings = services.settings

    def scripted(template: str, **context: Any) -> Response:
        response = render(template, **context)
        response.headers["Content-Security-Policy"] = SCRIPT_HEADERS["Content-Security-Policy"]
        return response

    def current(request: Request, *, header_csrf: bool) -> ConsoleSession:
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            raise AdminAuthRequired("log in first")
        session = admins.session(cookie)
        request.state.console_session = session
        if header_csrf:
            sent = request.headers.get("x-csrf-token", "")
            if not sent or not secrets.compare_digest(sent, session.csrf):
                raise CSRFRefused("the CSRF token is missing or wrong; reload the page")
        return session

    def pre_checked(request: Request) -> None:
        pre, sent = request.cookies.get(PRE_COOKIE), request.headers.get("x-csrf-token", "")
        if not pre or not sent or not secrets.compare_digest(pre, sent):
            raise CSRFRefused("the log-in form's CSRF token is missing or wrong; reload the page")

    def with_handle(payload: str, handle: str) -> Response:
        response = Response(payload, media_type="application/json", headers=SECURITY_HEADERS)
        _set_cookie(response, HANDLE_COOKIE, handle, 300)
        return response

    @router.get("/static/webauthn.js")
    def script() -> FileResponse:
        return FileResponse(
            HERE / "static" / "webauthn.js",
            media_type="text/javascript",
            headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    @router.get("/passkeys")
    def passkeys_page(request: Request) -> Response:
        session = current(request, header_csrf=False)
        return scripted(
            "passkeys.html",
            me=session.principal,
            csrf=session.csrf,
            may_write=False,
            passkeys=passkeys.list(session.principal.name),
        )

    @router.post("/passkeys/options")
    async def registration_options(request: Request) -> Response:
        try:
            session = current(request, header_csrf=True)
            ceremony = passkeys.begin_registration(session.principal)
        except MailkmsError as exc:
            return _json_error(exc)
        return with_handle(ceremony.options, ceremony.handle)

    @router.post("/passkeys")
    async def register(request: Request) -> Response:
        try:
            session = current(request, header_csrf=True)
            body = await _body(request)
            passkeys.finish_registration(
                session.principal,
                request.cookies.get(HANDLE_COOKIE, ""),
                credential_text(body.get("credential")),
                request.headers.get("origin", ""),
                str(body.get("label", "")),
            )
        except MailkmsError as exc:
            return _json_error(exc)
        response = JSONResponse({"registered": True}, headers=SECURITY_HEADERS)
        response.delete_cookie(HANDLE_COOKIE, path="/admin", secure=True, httponly=True, samesite="strict")
        return response

    @router.get("/login/passkey")
    def login_page() -> Response:
        token = secrets.token_urlsafe(32)
        response = scripted("login_passkey.html", me=None, csrf=token)
        _set_cookie(response, PRE_COOKIE, token, 600)
        return response

    @router.post("/login/passkey/options")
    async def login_options(request: Request) -> Response:
        try:
            pre_checked(request)
            body = await _body(request)
            name, password = body.get("name"), body.get("password")
            if not isinstance(name, str) or not isinstance(password, str) or len(name) > 64 or len(password) > 1024:
                raise Malformed("name and password are expected")
            ceremony = passkeys.begin_login(name.strip(), password)
        except MailkmsError as exc:
            return _json_error(exc)
        return with_handle(ceremony.options, ceremony.handle)

    @router.post("/login/passkey")
    async def login(request: Request) -> Response:
        try:
            pre_checked(request)
            body = await _body(request)
            session = passkeys.finish_login(
                request.cookies.get(HANDLE_COOKIE, ""),
                credential_text(body.get("credential")),
                request.headers.get("origin", ""),
            )
        except MailkmsError as exc:
            return _json_error(exc)
        response = JSONResponse({"next": "/admin/users"}, headers=SECURITY_HEADERS)
        _set_cookie(response, COOKIE, session.cookie, settings.admin.session_minutes * 60)
        for gone in (PRE_COOKIE, HANDLE_COOKIE):
            response.delete_cookie(gone, path="/admin", secure=True, httponly=True, samesite="strict")
        return response

    return router
