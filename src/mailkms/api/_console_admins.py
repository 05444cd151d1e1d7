"""Administrators managed from the console (superusers only, refused at the server with 403 for
every other role): add one (the initial password and the TOTP enrolment URI shown once), change a
role, disable or enable, end a lock-out. And every administrator's own passkeys: delete one after
typing one's password again. Every act is audited with the acting administrator's name; every
form carries the session's CSRF token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, Response
from fastapi.responses import RedirectResponse

from mailkms.api._console import SECURITY_HEADERS, console_session, render
from mailkms.api._schemas import RowId
from mailkms.errors import Malformed, RoleForbidden
from mailkms.services import ConsoleSession, Permission, Services, parse_role


def admins_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/admin", include_in_schema=False)
    admins = services.admins

    def current(request: Request, csrf: str | None = None, *, form: bool = False) -> ConsoleSession:
        return console_session(services, request, csrf, form=form)

    def superuser(request: Request, csrf: str | None = None, *, form: bool = False) -> ConsoleSession:
        session = current(request, csrf, form=form)
        session.principal.require(Permission.ADMINS)
        return session

    def not_self(session: ConsoleSession, name: str) -> None:
        if name == session.principal.name:
            raise RoleForbidden("not on your own account: another superuser does that (or the CLI)")

    def listing(session: ConsoleSession, status: int = 200, **context: object) -> Response:
        return render(
            "admins.html",
            status,
            me=session.principal,
            csrf=session.csrf,
            may_write=session.principal.may(Permission.USERS),
            accounts=admins.list(),
            roles=["auditor", "operator", "officer", "superuser"],
            **context,
        )

    def back(what: str) -> Response:
        return RedirectResponse(f"/admin/admins?done={what}", status_code=303, headers=SECURITY_HEADERS)

    @router.get("/admins")
    def page(request: Request, done: Annotated[str, Query(max_length=20)] = "") -> Response:
        session = superuser(request)
        return listing(session, done=done)

    @router.post("/admins")
    def add(
        request: Request,
        name: Annotated[str, Form(max_length=64)],
        role: Annotated[str, Form(max_length=20)],
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        session = superuser(request, csrf, form=True)
        chosen = parse_role(role)
        name = name.strip()
        password = admins.add(name, chosen, None, session.principal.actor)
        uri = admins.enrol_totp(name, session.principal.actor)
        return render(
            "admin_added.html",
            201,
            me=session.principal,
            csrf=session.csrf,
            may_write=session.principal.may(Permission.USERS),
            name=name,
            role=chosen.value,
            password=password,
            otpauth=uri,
        )

    @router.post("/admins/{name}/role")
    def change_role(
        request: Request,
        name: str,
        role: Annotated[str, Form(max_length=20)],
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        session = superuser(request, csrf, form=True)
        not_self(session, name)
        admins.set_role(name, parse_role(role), session.principal.actor)
        return back("role")

    @router.post("/admins/{name}/state")
    def change_state(
        request: Request,
        name: str,
        act: Annotated[str, Form(max_length=10)],
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        """act: disable, enable or unlock."""
        session = superuser(request, csrf, form=True)
        actor = session.principal.actor
        if act == "unlock":
            admins.unlock(name, actor)
        elif act in ("disable", "enable"):
            not_self(session, name)
            (admins.disable if act == "disable" else admins.enable)(name, actor)
        else:
            raise Malformed("act: disable, enable or unlock")
        return back(act)

    @router.post("/passkeys/{passkey_id}/delete")
    def delete_passkey(
        request: Request,
        passkey_id: RowId,
        password: Annotated[str, Form(max_length=1024)] = "",
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        """One's own passkey, after one's password again (a wrong one counts towards the lock-out)."""
        session = current(request, csrf, form=True)
        if not password:
            raise Malformed("type your password to delete a passkey")
        admins.check_password(session.principal.name, password)
        services.passkeys.delete(session.principal, passkey_id)
        return RedirectResponse("/admin/passkeys", status_code=303, headers=SECURITY_HEADERS)

    return router
