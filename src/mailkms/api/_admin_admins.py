"""The administrators on the JSON admin API (superuser only, as in the console): list, add (the
initial password and TOTP URI returned once), change the role, disable/enable, unlock, and
require a passkey. Every act is audited by the service with the caller's name."""

# No `from __future__ import annotations`: FastAPI must see the local `Admin` dependency type.

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field

from mailkms.api._admin import ADMIN_ERRORS, bearer_principal
from mailkms.errors import Malformed, RoleForbidden
from mailkms.services import Permission, Principal, Services, parse_role

AdminName = Annotated[str, Path(min_length=2, max_length=64, description="the administrator's name")]


class AdminAccount(BaseModel):
    name: str
    role: str = Field(description="auditor, operator, officer or superuser")
    totp: bool = Field(description="a TOTP second factor is enrolled")
    disabled: bool
    locked_until: str | None = Field(description="locked out after failed log-ins until then (ISO 8601)")
    created_at: str
    passkey_required: bool = Field(description="only a passkey logs this administrator in")


class AdminAccountAdd(BaseModel):
    name: str = Field(min_length=2, max_length=64, description="a-z first, then a-z 0-9 . _ -")
    role: str = Field(max_length=20, description="auditor, operator, officer or superuser")
    password: str | None = Field(
        default=None, max_length=1024, description="the initial password; omitted: one is generated and returned"
    )


class AdminAccountAdded(AdminAccount):
    password: str | None = Field(description="the generated initial password, shown once (None when given)")
    otpauth_uri: str = Field(description="the TOTP secret as an otpauth:// URI, shown once")


class AdminRoleChange(BaseModel):
    role: str = Field(max_length=20, description="auditor, operator, officer or superuser")


class AdminPasskeyRule(BaseModel):
    required: bool = Field(description="true: only a passkey logs in; false: password + TOTP again")


def admin_admins_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/api/v1/admin", tags=["admin"], responses=ADMIN_ERRORS)
    Admin = Annotated[Principal, Depends(bearer_principal(services))]
    admins = services.admins

    def superuser(admin: Principal) -> Principal:
        admin.require(Permission.ADMINS)
        return admin

    def not_self(admin: Principal, name: str) -> None:
        if name == admin.name:
            raise RoleForbidden("not on your own account: another superuser does that (or the CLI)")

    def account(name: str) -> AdminAccount:
        return AdminAccount.model_validate(admins.show(name).to_dict())

    @router.get("/admins", response_model=list[AdminAccount], summary="Administrators (superuser)")
    def listing(admin: Admin) -> list[AdminAccount]:
        superuser(admin)
        return [AdminAccount.model_validate(v.to_dict()) for v in admins.list()]

    @router.get("/admins/{name}", response_model=AdminAccount, summary="One administrator (superuser)")
    def show(admin: Admin, name: AdminName) -> AdminAccount:
        superuser(admin)
        return account(name)

    @router.post(
        "/admins",
        status_code=201,
        response_model=AdminAccountAdded,
        summary="Add an administrator (initial password and TOTP URI returned once)",
    )
    def add(admin: Admin, body: AdminAccountAdd) -> AdminAccountAdded:
        superuser(admin)
        name = body.name.strip()
        password = admins.add(name, parse_role(body.role), body.password, admin.actor)
        uri = admins.enrol_totp(name, admin.actor)
        return AdminAccountAdded(
            **account(name).model_dump(), password=None if body.password else password, otpauth_uri=uri
        )

    @router.put("/admins/{name}/role", response_model=AdminAccount, summary="Change an administrator's role")
    def change_role(admin: Admin, name: AdminName, body: AdminRoleChange) -> AdminAccount:
        """Their console sessions end; the next log-in has the new role. Not on your own account."""
        superuser(admin)
        not_self(admin, name)
        admins.set_role(name, parse_role(body.role), admin.actor)
        return account(name)

    @router.post("/admins/{name}/{act}", response_model=AdminAccount, summary="Disable, enable or unlock")
    def change_state(admin: Admin, name: AdminName, act: str) -> AdminAccount:
        """act: `disable` (log-ins, sessions and API tokens end at once), `enable` (log-ins again;
        ended tokens stay ended) or `unlock` (ends a lock-out after failed log-ins)."""
        superuser(admin)
        if act == "unlock":
            admins.unlock(name, admin.actor)
        elif act in ("disable", "enable"):
            not_self(admin, name)
            (admins.disable if act == "disable" else admins.enable)(name, admin.actor)
        else:
            raise Malformed("act: disable, enable or unlock")
        return account(name)

    @router.put("/admins/{name}/passkey-required", response_model=AdminAccount, summary="Require a passkey")
    def passkey_rule(admin: Admin, name: AdminName, body: AdminPasskeyRule) -> AdminAccount:
        """With `required`, a password and TOTP code no longer log NAME in; refused while NAME has
        no passkey."""
        superuser(admin)
        not_self(admin, name)  # a bearer token must not lift its own owner's passkey rule
        admins.require_passkey(name, body.required, admin.actor)
        return account(name)

    return router
