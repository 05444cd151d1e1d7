"""M-of-N approvals in the console (services.Approvals): start a recovery or an archive export and
approve it with one's share file and passphrase (the recovery token shown once at the threshold,
the export downloadable); start a bulk revoke and approve it as another operator. Script-free
pages under the console's ordinary CSP; forms carry the session's CSRF token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request, Response, UploadFile
from fastapi.responses import RedirectResponse

from mailkms.api._console import SECURITY_HEADERS, console_session, page_for
from mailkms.api._schemas import RowId
from mailkms.errors import AdminAuthRequired, ApprovalNotFound, MailkmsError, Malformed
from mailkms.services import ConsoleSession, Permission, Services

MAX_SHARE = 64 * 1024


def approvals_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/admin", include_in_schema=False)
    approvals = services.approvals

    def current(request: Request, csrf: str | None = None, *, form: bool = False) -> ConsoleSession:
        return console_session(services, request, csrf, form=form)

    def page(session: ConsoleSession, template: str, status: int = 200, **context: object) -> Response:
        return page_for(
            session,
            template,
            status,
            may_recover=session.principal.may(Permission.RECOVERY),
            now=services.clock.now(),
            **context,
        )

    def opened(request_id: int) -> Response:
        return RedirectResponse(f"/admin/approvals/{request_id}", status_code=303, headers=SECURITY_HEADERS)

    @router.get("/approvals")
    def listing(request: Request) -> Response:
        session = current(request)
        return page(
            session,
            "approvals.html",
            requests=approvals.list(),
            threshold=services.recovery.status().threshold,
            bulk_threshold=services.settings.admin.bulk_revoke_approval_threshold,
            bulk_approvals=services.settings.admin.bulk_revoke_approvals,
        )

    @router.post("/approvals")
    def start(
        request: Request,
        email: Annotated[str, Form(max_length=320)],
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        session = current(request, csrf, form=True)
        return opened(approvals.start_recovery(session.principal, email))

    @router.post("/approvals/bulk-revoke")
    def start_bulk_revoke(
        request: Request,
        emails: Annotated[str, Form(max_length=400_000)],
        reason: Annotated[str, Form(max_length=40)] = "",
        confirm: Annotated[str, Form(max_length=10)] = "",
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        """One mailbox a line (or comma separated); revoked only when another operator approves."""
        session = current(request, csrf, form=True)
        session.principal.require(Permission.USERS)
        if confirm != "yes":
            raise Malformed("tick the confirmation to ask for this revocation")
        listed = [e for line in emails.splitlines() for e in line.split(",") if e.strip()]
        return opened(approvals.start_bulk_revoke(session.principal, listed, reason or None))

    @router.post("/approvals/replace-officers")
    def start_replace_officers(
        request: Request,
        officers: Annotated[str, Form(max_length=4000)],
        threshold: Annotated[int, Form(ge=1, le=32)],
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        """The new officers' administrator names, comma or line separated, and the new M."""
        session = current(request, csrf, form=True)
        names = [n for line in officers.splitlines() for n in line.split(",") if n.strip()]
        return opened(approvals.start_replace_officers(session.principal, names, threshold))

    @router.post("/approvals/{request_id}/share")
    def collect_share(
        request: Request,
        request_id: RowId,
        passphrase: Annotated[str, Form(max_length=1024)],
        again: Annotated[str, Form(max_length=1024)],
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        """A new officer's share, once, sealed to the passphrase typed here: downloaded as a file."""
        session = current(request, csrf, form=True)
        if passphrase != again:
            raise Malformed("the two passphrases differ")
        name, data = approvals.collect_share(session.principal, request_id, passphrase.encode())
        return Response(
            data,
            media_type="application/json",
            headers={**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{name}"'},
        )

    @router.post("/approvals/export")
    async def start_export(
        request: Request,
        recipient: UploadFile,
        email: Annotated[str, Form(max_length=320)] = "",
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        session = current(request, csrf, form=True)
        pem = await recipient.read(MAX_SHARE + 1)
        if len(pem) > MAX_SHARE:
            raise Malformed("that is not a certificate (too large)")
        return opened(approvals.start_export(session.principal, pem.decode("ascii", "replace"), email or None))

    @router.get("/approvals/{request_id}/export.json")
    def export_document(request: Request, request_id: RowId) -> Response:
        """The released export (each key enveloped to the recipient certificate): officers only."""
        session = current(request)
        session.principal.require(Permission.RECOVERY)
        view = approvals.show(request_id)
        if view.kind != "export" or not view.outcome:
            raise ApprovalNotFound(f"request {request_id} has released no export")
        return Response(
            view.outcome["document"],
            media_type="application/json",
            headers={**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="archive-{request_id}.json"'},
        )

    @router.get("/approvals/{request_id}")
    def show(request: Request, request_id: RowId) -> Response:
        session = current(request)
        return page(session, "approval.html", r=approvals.show(request_id), released=None, revoked=())

    @router.post("/approvals/{request_id}/approve")
    async def approve(
        request: Request,
        request_id: RowId,
        share: UploadFile | None = None,
        passphrase: Annotated[str, Form(max_length=1024)] = "",
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        session = current(request, csrf, form=True)
        data = await share.read(MAX_SHARE + 1) if share is not None else b""
        if len(data) > MAX_SHARE:
            raise Malformed("that is not a share file (too large)")
        try:
            if share is None:
                done = approvals.approve_plain(session.principal, request_id)
            else:
                done = approvals.approve(session.principal, request_id, data, passphrase.encode())
        except MailkmsError as exc:
            if exc.http_status >= 500 or isinstance(exc, AdminAuthRequired):
                raise
            return page(session, "approval.html", exc.http_status, r=approvals.show(request_id), failure=exc.detail)
        return page(session, "approval.html", r=done.view, released=done.released, revoked=done.revoked)

    return router
