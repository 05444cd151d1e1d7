"""The JSON admin API (`/api/v1/admin/...`): per-administrator Bearer tokens, roles checked here
at the server, every change made by the same services as the CLI (audited with the admin's name)."""

# No `from __future__ import annotations`: FastAPI must see the local `Admin` dependency type.

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from mailkms.api._problems import problem_responses
from mailkms.api._schemas import (
    AdminRevoke,
    AdminRevoked,
    AdminUserAdd,
    AdminUserAdded,
    AdminWhoAmI,
    AuditVerifyAnswer,
)
from mailkms.api._token_mail import mail_token_to
from mailkms.errors import AdminAuthRequired
from mailkms.services import Permission, Principal, Services, UserState

ADMIN_ERRORS = problem_responses(
    {
        400: "malformed",
        401: "no or a wrong API token (admin-auth-required)",
        403: "the role does not allow it (role-forbidden)",
        404: "not found",
        409: "conflict (user-exists, already-revoked)",
    }
)


def parse_state(text: str | None) -> UserState | None:
    from mailkms.errors import Malformed

    if not text:
        return None
    try:
        return UserState(text.strip().upper())
    except ValueError:
        raise Malformed(f"{text!r} is not a state: {', '.join(s.value for s in UserState)}") from None


def bearer_principal(services: Services) -> Callable[[Request], Principal]:
    """The dependency that turns `Authorization: Bearer TOKEN` into the administrator (401 otherwise)."""

    def principal(request: Request) -> Principal:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AdminAuthRequired()
        return services.admins.authenticate_token(token.strip())

    return principal


def admin_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/api/v1/admin", tags=["admin"], responses=ADMIN_ERRORS)
    Admin = Annotated[Principal, Depends(bearer_principal(services))]

    @router.get("/whoami", response_model=AdminWhoAmI, summary="The administrator this token belongs to")
    def whoami(admin: Admin) -> AdminWhoAmI:
        return AdminWhoAmI(
            name=admin.name, role=admin.role.value, permissions=[p.value for p in Permission if admin.may(p)]
        )

    @router.get("/users", summary="Users, paged and filtered at the server")
    def users(
        admin: Admin,
        state: Annotated[str | None, Query(description="REGISTERED, ACTIVE, DUE, EXPIRED or REVOKED")] = None,
        due_within_days: Annotated[
            int | None, Query(ge=0, le=36_600, description="valid certificates expiring within N days")
        ] = None,
        q: Annotated[str | None, Query(max_length=320, description="text in the mailbox or the name")] = None,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
        limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    ) -> dict[str, object]:
        admin.require(Permission.READ)
        page = services.users.page(
            state=parse_state(state),
            due_within_days=due_within_days,
            query=q,
            offset=offset,
            limit=limit or services.settings.admin.page_size,
        )
        return page.to_dict()

    @router.get("/users/{email}", summary="One user: state, certificates, history")
    def user(admin: Admin, email: str) -> dict[str, object]:
        admin.require(Permission.READ)
        view = services.users.show(email)
        history = services.audit_records(subject=view.email, limit=100)
        return {**view.to_dict(), "history": [h.to_dict() for h in history]}

    @router.post("/users", status_code=201, response_model=AdminUserAdded, summary="Add a user (token shown once)")
    def add_user(admin: Admin, body: AdminUserAdd) -> AdminUserAdded:
        admin.require(Permission.USERS)
        token = services.users.add(body.email, body.name, body.group, admin.actor)
        mailed = body.mail_token and mail_token_to(services, body.email, body.name, token, admin.actor)
        return AdminUserAdded(
            email=body.email.strip().lower(),
            token=token,
            expires_in_days=services.settings.policy.token_ttl_days,
            mailed=mailed,
        )

    @router.post(
        "/users/{email}/reenroll", status_code=201, response_model=AdminUserAdded, summary="A new one-time token"
    )
    def reenroll(admin: Admin, email: str) -> AdminUserAdded:
        """For a user whose certificates expired, were revoked or were lost; replaces an unused token."""
        admin.require(Permission.USERS)
        token = services.users.reenroll(email, admin.actor)
        return AdminUserAdded(
            email=email.strip().lower(), token=token, expires_in_days=services.settings.policy.token_ttl_days
        )

    @router.post("/users/{email}/revoke", response_model=AdminRevoked, summary="Revoke a user's certificates")
    def revoke(admin: Admin, email: str, body: AdminRevoke) -> AdminRevoked:
        admin.require(Permission.USERS)
        (report,) = services.revocation.revoke_users([email], body.reason, admin.actor)
        crl = services.revocation.latest
        return AdminRevoked(
            email=report.subject,
            serials=list(report.serials),
            reason=report.reason,
            revoked_at=report.revoked_at.isoformat(),
            crl_number=crl.number if crl else None,
        )

    @router.get("/outbox", summary="Mail waiting to go out, and why")
    def outbox(admin: Admin, all: bool = False, limit: Annotated[int, Query(ge=1, le=500)] = 100) -> dict[str, object]:
        admin.require(Permission.READ)
        return services.outbox.list(include_sent=all, limit=limit).to_dict()

    @router.get("/audit", summary="The audit chain, newest first, filtered")
    def audit(
        admin: Admin,
        actor: str | None = None,
        user: str | None = None,
        action: Annotated[str | None, Query(description="an action or its prefix (user., certificate.)")] = None,
        before: Annotated[
            int | None, Query(ge=1, le=2**62, description="records before this seq (the next page)")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> dict[str, object]:
        admin.require(Permission.READ)
        records = services.audit_records(actor=actor, subject=user, action=action, before_seq=before, limit=limit)
        return {"records": [r.to_dict() for r in records], "next_before": records[-1].seq if records else None}

    @router.get("/audit/verify", response_model=AuditVerifyAnswer, summary="Check the hash chain and checkpoints")
    def audit_verify(admin: Admin) -> AuditVerifyAnswer:
        admin.require(Permission.READ)
        report = services.verify_audit()
        return AuditVerifyAnswer(
            ok=report.ok, records=report.records, checkpoints=report.checkpoints, problems=list(report.problems)
        )

    return router
