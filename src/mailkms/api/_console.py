"""The administrator's web console under `/admin/`: server-rendered pages (Jinja2, autoescaped),
no script at all, a strict Content-Security-Policy, a short session in a Secure/HttpOnly/
SameSite=Strict cookie and a CSRF token on every form. Roles are checked here at the server
(services.Principal.require), not only by hiding buttons."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from mailkms.api._admin import parse_state
from mailkms.api._charts import bar_chart
from mailkms.api._token_mail import mail_token_to
from mailkms.errors import AdminAuthRequired, CSRFRefused, MailkmsError, Malformed
from mailkms.pki import SUBSCRIBER_REASONS
from mailkms.services import ConsoleSession, Permission, Services

HERE = Path(__file__).parent / "console"
COOKIE = "mailkms_admin"
PRE_COOKIE = "mailkms_login"  # the log-in form's CSRF (double submit), before there is a session
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}

_env = Environment(
    loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]), auto_reload=False
)


def render(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _env.get_template(template).render(reasons=list(SUBSCRIBER_REASONS), **context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def error_page(request: Request, exc: MailkmsError) -> Response:
    """The console's face of the one error mapping: same status, a page instead of JSON (a page
    asked for without a session goes to the log-in form)."""
    if isinstance(exc, AdminAuthRequired) and request.method == "GET":
        return RedirectResponse("/admin/login", status_code=303, headers=SECURITY_HEADERS)
    session: ConsoleSession | None = getattr(request.state, "console_session", None)
    return render("error.html", exc.http_status, error=exc, me=session.principal if session else None, csrf=None)


COUNT_UP_TO = 10_000  # the users list counts matches this far, then says "more than 10,000"
DEFAULT_GROUP = "-"  # the users list's filter value for users in no policy group


def parse_group(value: str | None) -> str | None:
    """The users filter's group: None (any), "" (the default policy, no group) or a group's name."""
    if not value:
        return None
    return "" if value == DEFAULT_GROUP else value


def console_session(
    services: Services, request: Request, csrf: str | None = None, *, form: bool = False
) -> ConsoleSession:
    """The request's live console session; for a form post (`form`) also its CSRF token, compared
    in constant time."""
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        raise AdminAuthRequired("log in first")
    session = services.admins.session(cookie)
    request.state.console_session = session
    if form and (not csrf or not secrets.compare_digest(csrf, session.csrf)):
        raise CSRFRefused("the form's CSRF token is missing or wrong; reload the page and try again")
    return session


def page_for(session: ConsoleSession, template: str, status: int = 200, **context: Any) -> Response:
    """A console page for the session's administrator (their name, role, CSRF token)."""
    return render(
        template,
        status,
        me=session.principal,
        csrf=session.csrf,
        may_write=session.principal.may(Permission.USERS),
        **context,
    )


def _set_cookie(response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/admin", secure=True, httponly=True, samesite="strict")


def console_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/admin", include_in_schema=False)
    admins = services.admins
    settings = services.settings

    def current(request: Request) -> ConsoleSession:
        return console_session(services, request)

    def checked(request: Request, csrf: str | None) -> ConsoleSession:
        """A form post: a live session and its CSRF token (compared in constant time)."""
        return console_session(services, request, csrf, form=True)

    def page(session: ConsoleSession, template: str, **context: Any) -> Response:
        return page_for(session, template, **context)

    @router.get("/static/console.css")
    def css() -> FileResponse:
        return FileResponse(
            HERE / "static" / "console.css", media_type="text/css", headers={"Cache-Control": "max-age=300"}
        )

    @router.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse("/admin/dashboard", status_code=303, headers=SECURITY_HEADERS)

    @router.get("/dashboard")
    def dashboard(request: Request) -> Response:
        session = current(request)
        board = services.dashboard
        waiting, oldest = services.outbox.depth()
        charts = [
            bar_chart(
                "expiring",
                "Certificates expiring per week, the next 18 months",
                board.expiring_per_week(78),
                label="week of",
                every=13,
            ),
            bar_chart(
                "renewals", "Renewals per day, the last 30 days", board.issued_per_day("renewal"), label="day", every=7
            ),
            bar_chart(
                "enrolments",
                "Enrolments per day, the last 30 days",
                board.issued_per_day("enrolment"),
                label="day",
                every=7,
                color="#1a7f37",
            ),
            bar_chart(
                "refusals",
                "Refused requests per day, the last 30 days",
                board.refusals_per_day(),
                label="day",
                every=7,
                color="#b3261e",
            ),
        ]
        return page(session, "dashboard.html", charts=charts, waiting=waiting, oldest=oldest)

    @router.get("/login")
    def login_form() -> HTMLResponse:
        token = secrets.token_urlsafe(32)
        response = render("login.html", me=None, csrf=token)
        _set_cookie(response, PRE_COOKIE, token, 600)
        return response

    @router.post("/login")
    def login(
        request: Request,
        name: Annotated[str, Form(max_length=64)],
        password: Annotated[str, Form(max_length=1024)],
        code: Annotated[str, Form(max_length=16)],
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        pre = request.cookies.get(PRE_COOKIE)
        if not csrf or not pre or not secrets.compare_digest(csrf, pre):
            raise CSRFRefused("the log-in form's CSRF token is missing or wrong; reload the page")
        try:
            session = admins.login(name.strip(), password, code)
        except MailkmsError as exc:
            return render("login.html", exc.http_status, me=None, csrf=pre, failure=exc.detail, name=name)
        response: Response = RedirectResponse("/admin/users", status_code=303, headers=SECURITY_HEADERS)
        _set_cookie(response, COOKIE, session.cookie, settings.admin.session_minutes * 60)
        response.delete_cookie(PRE_COOKIE, path="/admin", secure=True, httponly=True, samesite="strict")
        return response

    @router.post("/logout")
    def logout(request: Request, csrf: Annotated[str | None, Form()] = None) -> Response:
        checked(request, csrf)
        admins.logout(request.cookies.get(COOKIE, ""))
        response = RedirectResponse("/admin/login", status_code=303, headers=SECURITY_HEADERS)
        response.delete_cookie(COOKIE, path="/admin", secure=True, httponly=True, samesite="strict")
        return response

    @router.get("/users")
    def users(
        request: Request,
        state: str | None = None,
        due: Annotated[int | None, Query(ge=0, le=3650)] = None,
        q: Annotated[str | None, Query(max_length=320)] = None,
        group: Annotated[str | None, Query(max_length=100)] = None,
        page_no: Annotated[int, Query(alias="page", ge=1, le=10**6)] = 1,
    ) -> Response:
        session = current(request)
        size = settings.admin.page_size
        result = services.users.page(
            state=parse_state(state),
            due_within_days=due,
            query=q or None,
            group=parse_group(group),
            offset=(page_no - 1) * size,
            limit=size,
            count_up_to=COUNT_UP_TO,
        )
        pages = max(1, -(-result.total // size))  # at least, when the count stopped (not result.exact)
        keep = "&".join(
            f"{k}={quote(str(v))}"
            for k, v in (("state", state), ("due", due), ("q", q), ("group", group))
            if v not in (None, "")
        )
        return page(
            session,
            "users.html",
            result=result,
            state=state or "",
            due=due,
            q=q or "",
            page_no=page_no,
            pages=pages,
            keep=keep,
            states=["REGISTERED", "ACTIVE", "DUE", "EXPIRED", "REVOKED"],
            group=group or "",
            groups=list(settings.policy.groups),
        )

    @router.get("/users/new")
    def new_user(request: Request) -> Response:
        session = current(request)
        session.principal.require(Permission.USERS)
        return page(session, "user_new.html", groups=list(settings.policy.groups))

    @router.post("/users")
    def add_user(
        request: Request,
        email: Annotated[str, Form(max_length=320)],
        name: Annotated[str, Form(max_length=200)] = "",
        group: Annotated[str, Form(max_length=100)] = "",
        mail_token: Annotated[str, Form(max_length=10)] = "",
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        session = checked(request, csrf)
        session.principal.require(Permission.USERS)
        token = services.users.add(email, name, group or None, session.principal.actor)
        mailed = bool(mail_token) and mail_token_to(services, email, name, token, session.principal.actor)
        return render(
            "token.html",
            me=session.principal,
            csrf=session.csrf,
            may_write=True,
            email=email.strip().lower(),
            token=token,
            ttl=settings.policy.token_ttl_days,
            mailed=mailed,
            mail_asked=bool(mail_token),
        )

    @router.get("/users/{email}")
    def user(request: Request, email: str) -> Response:
        session = current(request)
        view = services.users.show(email)
        history = services.audit_records(subject=view.email, limit=100)
        return page(session, "user.html", user=view, history=history)

    @router.post("/users/{email}/reenroll")
    def reenroll(request: Request, email: str, csrf: Annotated[str | None, Form()] = None) -> Response:
        session = checked(request, csrf)
        session.principal.require(Permission.USERS)
        token = services.users.reenroll(email, session.principal.actor)
        return render(
            "token.html",
            me=session.principal,
            csrf=session.csrf,
            may_write=True,
            email=services.users.show(email).email,
            token=token,
            ttl=settings.policy.token_ttl_days,
            reenrol=True,
        )

    @router.get("/users/{email}/revoke")
    def revoke_confirm(request: Request, email: str) -> Response:
        session = current(request)
        session.principal.require(Permission.USERS)
        return page(session, "revoke.html", user=services.users.show(email))

    @router.post("/users/{email}/revoke")
    def revoke(
        request: Request,
        email: str,
        reason: Annotated[str, Form(max_length=40)] = "",
        confirm: Annotated[str, Form(max_length=10)] = "",
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        session = checked(request, csrf)
        session.principal.require(Permission.USERS)
        if confirm != "yes":
            raise Malformed("tick the confirmation to revoke")
        (report,) = services.revocation.revoke_users([email], reason or None, session.principal.actor)
        return render(
            "revoked.html",
            me=session.principal,
            csrf=session.csrf,
            may_write=True,
            report=report,
            crl=services.revocation.latest,
        )

    @router.get("/outbox")
    def outbox(request: Request, all: bool = False) -> Response:
        session = current(request)
        return page(session, "outbox.html", listing=services.outbox.list(include_sent=all, limit=200), all=all)

    @router.get("/audit")
    def audit(
        request: Request,
        actor: str | None = None,
        user: str | None = None,
        action: str | None = None,
        before: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    ) -> Response:
        session = current(request)
        records = services.audit_records(
            actor=actor or None, subject=user or None, action=action or None, before_seq=before, limit=50
        )
        keep = "&".join(f"{k}={quote(v)}" for k, v in (("actor", actor), ("user", user), ("action", action)) if v)
        return page(
            session, "audit.html", records=records, actor=actor or "", user=user or "", action=action or "", keep=keep
        )

    @router.get("/audit/verify")
    def audit_verify(request: Request) -> Response:
        session = current(request)
        return page(session, "verify.html", report=services.verify_audit())

    return router
