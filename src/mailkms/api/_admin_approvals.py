"""M-of-N approvals on the JSON admin API (`/api/v1/admin/approvals`, `/api/v1/admin/revocations`):
the same services.Approvals as the console, roles checked at the server, each approval by the
administrator whose Bearer token it carries."""

# No `from __future__ import annotations`: FastAPI must see the local `Admin` dependency type.

import base64
import binascii
from typing import Annotated

from fastapi import APIRouter, Depends, Response

from mailkms.api._admin import ADMIN_ERRORS, bearer_principal
from mailkms.api._schemas import (
    AdminBulkRevoke,
    AdminBulkRevoked,
    AdminRevoked,
    ApprovalGive,
    ApprovalOut,
    ApprovalStart,
    RowId,
    ShareCollect,
    ShareCollected,
)
from mailkms.errors import Malformed
from mailkms.services import ApprovalView, Approved, Permission, Principal, Services


def approval_out(admin: Principal, view: ApprovalView, token: str | None = None) -> ApprovalOut:
    """The request as JSON; an export's document (keys enveloped to its recipient) only to officers."""
    data = view.to_dict()
    if view.outcome and "document" in view.outcome and not admin.may(Permission.RECOVERY):
        data["outcome"] = {k: v for k, v in view.outcome.items() if k != "document"}
    return ApprovalOut.model_validate({**data, "token": token})


def admin_approvals_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/api/v1/admin", tags=["admin"], responses=ADMIN_ERRORS)
    Admin = Annotated[Principal, Depends(bearer_principal(services))]
    approvals = services.approvals

    @router.get("/approvals", response_model=list[ApprovalOut], summary="Approval requests, newest first")
    def listing(admin: Admin) -> list[ApprovalOut]:
        admin.require(Permission.READ)
        return [approval_out(admin, v) for v in approvals.list()]

    @router.get("/approvals/{request_id}", response_model=ApprovalOut, summary="One approval request")
    def show(admin: Admin, request_id: RowId) -> ApprovalOut:
        admin.require(Permission.READ)
        return approval_out(admin, approvals.show(request_id))

    @router.post(
        "/approvals", status_code=201, response_model=ApprovalOut, summary="Start a dangerous act that needs approvals"
    )
    def start(admin: Admin, body: ApprovalStart) -> ApprovalOut:
        """recover and export: officers approve with their shares, at the ceremony's threshold;
        bulk_revoke: [admin] bulk_revoke_approvals other administrators who may revoke approve."""
        if body.kind == "recover":
            request_id = approvals.start_recovery(admin, body.email or "")
        elif body.kind == "export":
            if not body.recipient:
                raise Malformed("an export needs the recipient certificate (PEM)")
            request_id = approvals.start_export(admin, body.recipient, body.email)
        elif body.kind == "replace_officers":
            request_id = approvals.start_replace_officers(admin, body.officers or [], body.threshold or 0)
        else:
            request_id = approvals.start_bulk_revoke(admin, body.emails or [], body.reason)
        return approval_out(admin, approvals.show(request_id))

    @router.post("/approvals/{request_id}/approve", response_model=ApprovalOut, summary="Approve a request")
    def approve(admin: Admin, request_id: RowId, body: ApprovalGive | None = None) -> ApprovalOut:
        """With a share (base64 of the share file) and its passphrase for recover and export; with
        no body for bulk_revoke. The approval that reaches the threshold runs the act, once."""
        done: Approved
        if body is not None and body.share is not None:
            try:
                share = base64.b64decode(body.share, validate=True)
            except (binascii.Error, ValueError):
                raise Malformed("share: not base64") from None
            done = approvals.approve(admin, request_id, share, (body.passphrase or "").encode())
        else:
            done = approvals.approve_plain(admin, request_id)
        return approval_out(admin, done.view, done.released.token if done.released else None)

    @router.post("/approvals/{request_id}/share", response_model=ShareCollected, summary="Collect your new share, once")
    def collect(admin: Admin, request_id: RowId, body: ShareCollect) -> ShareCollected:
        """After a released replace_officers: your share of the new split, sealed now to the passphrase
        you send (never stored). Once: a second call is 409."""
        name, data = approvals.collect_share(admin, request_id, body.passphrase.encode())
        return ShareCollected(file=name, share=base64.b64encode(data).decode())

    @router.post(
        "/revocations",
        response_model=AdminBulkRevoked,
        responses={202: {"description": "more users than the threshold: an approval request, nothing revoked yet"}},
        summary="Revoke many users at once",
    )
    def revoke_many(admin: Admin, body: AdminBulkRevoke, response: Response) -> AdminBulkRevoked:
        """Up to [admin] bulk_revoke_approval_threshold users are revoked at once (200); more start a
        bulk_revoke approval request (202) that runs when other administrators approve it."""
        result = approvals.revoke_many(admin, body.emails, body.reason)
        if isinstance(result, int):
            response.status_code = 202
            return AdminBulkRevoked(revoked=[], approval=approval_out(admin, approvals.show(result)))
        crl = services.revocation.latest
        return AdminBulkRevoked(
            revoked=[
                AdminRevoked(
                    email=r.subject,
                    serials=list(r.serials),
                    reason=r.reason,
                    revoked_at=r.revoked_at.isoformat(),
                    crl_number=crl.number if crl else None,
                )
                for r in result
            ],
            approval=None,
        )

    return router
