"""The console's operational pages: bulk CSV import with a progress page (refreshed by
<meta http-equiv=refresh>, no script), the outbox's retry buttons, the key pool, reminders, and
CRL/OCSP state. Same rules as the rest of the console: roles checked at the server, a CSRF token
on every form, script-free pages under the strict CSP."""

from __future__ import annotations

import csv
import io
from typing import Annotated

from fastapi import APIRouter, Form, Request, Response, UploadFile
from fastapi.responses import RedirectResponse
from prometheus_client import REGISTRY

from mailkms.api._charts import bar_chart
from mailkms.api._console import SECURITY_HEADERS, console_session, page_for
from mailkms.api._token_mail import tokens_by_mail
from mailkms.errors import Malformed
from mailkms.services import ConsoleSession, Permission, Services, parse_users_csv
from mailkms.services._imports import MAX_ROWS

MAX_UPLOAD = 32 * 1024 * 1024  # bytes of CSV in one upload (~200,000 rows)
REFRESH_SECONDS = 1
OCSP_STATUSES = ("good", "revoked", "unused", "unauthorized", "malformed", "tryLater")  # as /metrics counts them


def pages_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/admin", include_in_schema=False)

    def current(request: Request, csrf: str | None = None, *, form: bool = False) -> ConsoleSession:
        return console_session(services, request, csrf, form=form)

    # -- bulk import ---------------------------------------------------------------------------------
    @router.get("/users/import")
    def import_form(request: Request) -> Response:
        session = current(request)
        session.principal.require(Permission.USERS)
        return page_for(session, "import.html", max_rows=MAX_ROWS)

    @router.post("/users/import")
    async def import_start(
        request: Request,
        csv_file: UploadFile,
        mail_tokens: Annotated[str, Form(max_length=10)] = "",
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        session = current(request, csrf, form=True)
        session.principal.require(Permission.USERS)
        data = await csv_file.read(MAX_UPLOAD + 1)
        if len(data) > MAX_UPLOAD:
            raise Malformed(f"the file is larger than {MAX_UPLOAD // (1024 * 1024)} MiB; use `mailkms user import`")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise Malformed("the file is not UTF-8 text; save the CSV as UTF-8") from None
        rows = parse_users_csv(io.StringIO(text, newline=""), csv_file.filename or "CSV", limit=MAX_ROWS)
        if not rows:
            raise Malformed("the file names no users (email,name[,group] per line)")
        job = services.imports.start(
            rows, session.principal.actor, tokens_by_mail(services, session.principal.actor) if mail_tokens else None
        )
        return RedirectResponse(f"/admin/imports/{job.id}", status_code=303, headers=SECURITY_HEADERS)

    @router.get("/imports/{job_id}")
    def import_progress(request: Request, job_id: str) -> Response:
        session = current(request)
        session.principal.require(Permission.USERS)
        job = services.imports.get(job_id, session.principal.actor).snapshot()
        return page_for(session, "import_progress.html", job=job, refresh=REFRESH_SECONDS if job.running else None)

    @router.post("/imports/{job_id}/tokens")
    def import_tokens(request: Request, job_id: str, csrf: Annotated[str | None, Form()] = None) -> Response:
        """The tokens as CSV (email,name,token,expires_at), once; then they are gone from the server."""
        session = current(request, csrf, form=True)
        session.principal.require(Permission.USERS)
        tokens = services.imports.take_tokens(job_id, session.principal.actor)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["email", "name", "token", "expires_at"])
        for t in tokens:
            writer.writerow([t.email, t.name, t.token, t.expires_at.isoformat(timespec="seconds")])
        headers = {**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="tokens-{job_id}.csv"'}
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)

    # -- outbox retry --------------------------------------------------------------------------------
    @router.post("/outbox/retry")
    def outbox_retry(
        request: Request,
        message: Annotated[int | None, Form(ge=1)] = None,
        every: Annotated[str, Form(alias="all", max_length=5)] = "",
        csrf: Annotated[str | None, Form()] = None,
    ) -> Response:
        """As `mailkms outbox retry ID` / `--all`: the next attempt moves to now."""
        session = current(request, csrf, form=True)
        session.principal.require(Permission.USERS)
        if (message is None) == (every != "yes"):
            raise Malformed("name one message to retry, or all")
        count = services.outbox.retry([message] if message else (), every=every == "yes", actor=session.principal.actor)
        listing = services.outbox.list(limit=200)
        return page_for(session, "outbox.html", listing=listing, all=False, retried=count)

    # -- status pages --------------------------------------------------------------------------------
    @router.get("/keypool")
    def keypool(request: Request) -> Response:
        session = current(request)
        counters = {
            "generated by this process": _sample("mailkms_keypool_generated_total"),
            "taken by this process": _sample("mailkms_keypool_taken_total"),
            "generated inline (pool empty or off)": _sample("mailkms_keypool_fallback_total"),
        }
        return page_for(session, "keypool.html", pool=services.status.pool(), counters=counters)

    @router.get("/reminders")
    def reminders(request: Request) -> Response:
        session = current(request)
        sweep = services.status.reminders()
        chart = bar_chart(
            "reminders", "Reminder mails queued per day, the last 30 days", sweep.per_day, label="day", every=7
        )
        return page_for(
            session,
            "reminders.html",
            sweep=sweep,
            chart=chart,
            final_days=services.settings.reminders.final_notice_days,
        )

    @router.get("/revocation")
    def revocation(request: Request) -> Response:
        session = current(request)
        return page_for(
            session,
            "revocation.html",
            statuses=OCSP_STATUSES,
            scopes=services.status.crls(),
            ocsp_here=_counts("mailkms_ocsp_requests_total"),
            ocsp_listeners=_counts("mailkms_ocsp_listener_requests_total"),
            connections=REGISTRY.get_sample_value("mailkms_ocsp_listener_connections_total"),
            cache_entries=_sample("mailkms_ocsp_cache_entries"),
            cache_bytes=_sample("mailkms_ocsp_cache_bytes"),
        )

    return router


def _sample(name: str) -> int:
    return int(REGISTRY.get_sample_value(name) or 0)


def _counts(sample: str) -> dict[str, int] | None:
    """A counter's values by status from this process's registry; None when nobody registered it
    (no OCSP-only listener runs in this process)."""
    values = {s: REGISTRY.get_sample_value(sample, {"status": s}) for s in OCSP_STATUSES}
    if all(v is None for v in values.values()):
        return None
    return {s: int(v) for s, v in values.items() if v is not None}
