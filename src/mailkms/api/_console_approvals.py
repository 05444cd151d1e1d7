"""M-of-N approvals in the console (services.Approvals): start a recovery, approve it with one's
share file and passphrase, see the recovery token once the threshold is reached. Script-free
pages under the console's ordinary CSP; forms carry the session's CSRF token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request, Response, UploadFile
from fastapi.responses import RedirectResponse

from mailkms.api._console import SECURITY_HEADERS, console_session, page_for
from mailkms.errors import AdminAuthRequired, MailkmsError, Malformed
from mailkms.services import ConsoleSession, Permission, Services

MAX_SHARE = 64 * 1024


def approvals_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/admin", include_in_schema=False)
    approvals = services.approvals

    def current(request: Request, csrf: str | None = None, *, form: bool = False) -> ConsoleSession:
        return console_session(services, request, csrf, form=form)

    def page(session: ConsoleSession, template: str, status: int = 200, **context: object) -> Response:
        return page_for(session, template, status, may_recover=session.principal.may(Permission.RECOVERY), **context)

    @router.get("/approvals")
    def listing(request: Request) -> Response:
        session = current(request)
        return page(
            session, "approvals.html", requests=approvals.list(), threshold=services.recovery.status().threshold
        )

    @router.post("/approvals")
    def start(
        request: Request,
        email: Annotated[str, Form(max_length=320)],
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        session = current(request, csrf, form=True)
        request_id = approvals.start_recovery(session.principal, email)
        return RedirectResponse(f"/admin/approvals/{request_id}", status_code=303, headers=SECURITY_HEADERS)

    @router.get("/approvals/{request_id}")
    def show(request: Request, request_id: int) -> Response:
        session = current(request)
        return page(session, "approval.html", r=approvals.show(request_id), released=None)

    @router.post("/approvals/{request_id}/approve")
    async def approve(
        request: Request,
        request_id: int,
        share: UploadFile,
        passphrase: Annotated[str, Form(max_length=1024)],
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        session = current(request, csrf, form=True)
        data = await share.read(MAX_SHARE + 1)
        if len(data) > MAX_SHARE:
            raise Malformed("that is not a share file (too large)")
        try:
            done = approvals.approve(session.principal, request_id, data, passphrase.encode())
        except MailkmsError as exc:
            if exc.http_status >= 500 or isinstance(exc, AdminAuthRequired):
                raise
            return page(session, "approval.html", exc.http_status, r=approvals.show(request_id), failure=exc.detail)
        return page(session, "approval.html", r=done.view, released=done.released)

    return router
