"""`mailkms revoke` and `mailkms crl`: take certificates back and publish the CRL."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated

import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.console import Console

from mailkms.cli._exit import exit_on_error
from mailkms.cli._remote import local_services, remote
from mailkms.errors import CRLNotFound, Malformed
from mailkms.pki import SUBSCRIBER_REASONS
from mailkms.services import Principal, RevocationReport, Role, Services, partition_scope

JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
ADMIN_NAME = os.environ.get("USER", "unknown")
ADMIN = f"admin:{ADMIN_NAME}"
log = logging.getLogger("mailkms.revoke")

REASONS = ", ".join(SUBSCRIBER_REASONS)
crl_app = typer.Typer(help="The issuing CA's CRL.", no_args_is_help=True)
console = Console(stderr=True)


_services = local_services


def _print_waiting(request_id: int, count: int, as_json: bool, approval: dict[str, object]) -> None:
    """More users than the threshold: nothing revoked, an approval request waits."""
    if as_json:
        print(json.dumps({"revoked": [], "approval": approval}, indent=2))
        return
    print(
        f"{count} users is more than [admin] bulk_revoke_approval_threshold: nothing revoked yet.\n"
        f"approval request {request_id} waits; other administrators approve it in the console "
        f"(/admin/approvals/{request_id}) or with POST /api/v1/admin/approvals/{request_id}/approve,\n"
        "and the revocation runs then (or, in an emergency on this machine: --break-glass)"
    )


def _break_glass(services: Services, emails: list[str], reason: str | None) -> list[RevocationReport]:
    """Revoke at once past the threshold: audited as revoke.break_glass BEFORE acting, logged at ERROR."""
    threshold = services.settings.admin.bulk_revoke_approval_threshold
    # the same checks an approval request gets (unknown users, too many): a refused list is not
    # recorded as a break-glass act
    mailboxes, _ = services.approvals.bulk_checked(emails, reason)
    if len(mailboxes) > threshold:
        with services.db.transaction() as session:
            services.audit.append(
                session, ADMIN, "revoke.break_glass", f"{len(mailboxes)} users", users=mailboxes, reason=reason
            )
        log.error(
            "BREAK GLASS: %s revokes %d users at once without approvals (threshold %d)",
            ADMIN,
            len(mailboxes),
            threshold,
        )
        console.print(f"[bold red]BREAK GLASS[/]: {len(mailboxes)} users revoked without approvals; audited")
    return services.revocation.revoke_users(mailboxes, reason, ADMIN)


def register(app: typer.Typer) -> None:
    @app.command()
    def revoke(
        emails: Annotated[list[str] | None, typer.Argument(help="users whose certificates to revoke")] = None,
        serial: Annotated[str | None, typer.Option("--serial", help="one certificate, by hex serial")] = None,
        reason: Annotated[
            str | None, typer.Option("--reason", help=f"RFC 5280 reason: {REASONS}; omit for none")
        ] = None,
        break_glass: Annotated[
            bool,
            typer.Option(
                "--break-glass",
                help="revoke more than [admin] bulk_revoke_approval_threshold users at once, without the "
                "approvals (audited as revoke.break_glass and logged at ERROR)",
            ),
        ] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Revoke all current certificates of users (they become REVOKED), or one certificate by serial.

        The CRL is published at once (one new CRL for all users named); OCSP answers change within
        seconds on every node. `mailkms user reenroll EMAIL` is the way back for a user.

        More users than [admin] bulk_revoke_approval_threshold at once start a bulk_revoke approval
        request instead (as in the console and the admin API): other administrators approve it
        (console /admin/approvals, or POST /api/v1/admin/approvals/ID/approve) and it runs then.
        `--break-glass` (on the server's machine only) revokes at once, loudly audited.
        """
        with exit_on_error(as_json):
            if emails and serial:
                raise Malformed("name users (EMAIL ...) or one certificate (--serial S), not both")
            if not emails and not serial:
                raise Malformed("name the users to revoke (EMAIL ...) or one certificate (--serial S)")
            if (far := remote()) is not None:
                if serial:
                    raise Malformed("with --server, name users (EMAIL ...); --serial runs on the server's machine")
                if break_glass:
                    raise Malformed("--break-glass runs on the server's machine only; remotely, ask for approvals")
                if len(emails or []) > 1:  # the server decides: revoked now, or an approval request
                    bulk = far.call("POST", "/revocations", body={"emails": emails, "reason": reason})
                    if bulk["approval"] is not None:
                        _print_waiting(bulk["approval"]["id"], len(emails or []), as_json, bulk["approval"])
                        return
                    answers = bulk["revoked"]
                else:
                    answers = [
                        far.call("POST", far.user_path(e) + "/revoke", body={"reason": reason}) for e in emails or []
                    ]
                out = [{**a, "subject": a["email"], "user_revoked": True} for a in answers]
                if as_json:
                    print(json.dumps({"revoked": out, "crl_number": answers[-1]["crl_number"]}, indent=2))
                else:
                    for a in answers:
                        print(f"revoked {a['email']}: {len(a['serials'])} certificate(s)")
                return
            services = _services()
            if serial:
                reports = [services.revocation.revoke_serial(serial, reason, ADMIN)]
            elif break_glass:
                reports = _break_glass(services, emails or [], reason)
            else:
                outcome = services.approvals.revoke_many(Principal(ADMIN_NAME, Role.OPERATOR), emails or [], reason)
                if isinstance(outcome, int):
                    _print_waiting(outcome, len(emails or []), as_json, services.approvals.show(outcome).to_dict())
                    return
                reports = outcome
            crl = services.revocation.latest
            data = {
                "revoked": [
                    {
                        "subject": r.subject,
                        "serials": list(r.serials),
                        "reason": r.reason,
                        "revoked_at": r.revoked_at.isoformat(),
                        "user_revoked": r.user_revoked,
                    }
                    for r in reports
                ],
                "crl_number": crl.number if crl else None,
            }
            if as_json:
                print(json.dumps(data, indent=2))
                return
            for r in reports:
                what = f"{len(r.serials)} certificate(s)" if r.serials else "no live certificates"
                print(f"revoked {r.subject}: {what}{' (' + r.reason + ')' if r.reason else ''}")
                for s in r.serials:
                    print(f"  {s}")
                if r.user_revoked:
                    print(f"  {r.subject} is REVOKED; `mailkms user reenroll {r.subject}` is the way back")
            if crl is not None:
                print(f"CRL {crl.number} published with {crl.entries} entries")

    @crl_app.command("generate")
    def crl_generate(
        force: Annotated[bool, typer.Option(help="publish even if nothing changed")] = True,
        as_json: JsonOpt = False,
    ) -> None:
        """Publish a new CRL now (the server also does on each revocation and on its schedule)."""
        with exit_on_error(as_json):
            services = _services()
            with console.status("building the CRL ...", spinner="dots"):
                view = services.revocation.publish_crl(ADMIN, force=force)
            view = view or services.revocation.refresh_latest()
            if view is None:
                raise Malformed("no CRL")
            data = {
                "number": view.number,
                "entries": view.entries,
                "this_update": view.this_update.isoformat(),
                "next_update": view.next_update.isoformat(),
                "bytes": len(view.der),
            }
            if as_json:
                print(json.dumps(data, indent=2))
            else:
                print(
                    f"CRL {view.number}: {view.entries} entries, {len(view.der)} bytes, "
                    f"next update {view.next_update:%Y-%m-%d %H:%M:%S} UTC"
                )

    @crl_app.command("export")
    def crl_export(
        pem: Annotated[bool, typer.Option("--pem", help="PEM instead of DER")] = False,
        partition: Annotated[
            int | None, typer.Option("--partition", help="the CRL of partition N (/crl/issuing/N.crl)")
        ] = None,
    ) -> None:
        """Write the current CRL to standard output (DER, or PEM with --pem)."""
        with exit_on_error():
            revocation = _services().revocation
            if partition is not None:
                view = revocation.refresh_scope(partition_scope(partition))
                if view is None:
                    raise CRLNotFound(f"there is no CRL partition {partition}")
            else:
                view = revocation.refresh_latest()
            if view is None:
                raise Malformed("no CRL has been published yet: run `mailkms crl generate`")
            if pem:
                sys.stdout.write(x509.load_der_x509_crl(view.der).public_bytes(serialization.Encoding.PEM).decode())
            else:
                sys.stdout.buffer.write(view.der)

    app.add_typer(crl_app, name="crl")
