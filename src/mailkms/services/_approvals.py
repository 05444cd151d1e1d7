"""M-of-N approvals for every dangerous act: one model (kind, payload, started_by, approvals by
distinct administrators, expiry, released once), used by the console and the admin API.

Kinds and their rule:
- "recover" (a user's archived keys) and "export" (the archive re-enveloped to a certificate):
  started by an officer; approved by officers, each in their own session with their share file and
  passphrase; released at the recovery ceremony's threshold M of distinct administrators giving
  distinct shares (the starter may give one: the shares are the gate, as with the CLI).
- "bulk_revoke" (more than [admin] bulk_revoke_approval_threshold users at once): started by an
  operator or superuser; released at [admin] bulk_revoke_approvals approvals from distinct
  administrators who may revoke (operator, superuser) and are NOT the starter (two-person rule).

Each share is checked when it is uploaded (its structure, and that the passphrase opens it), then
kept sealed under the server's at-rest key (AES-256-GCM, bound to the request and the officer)
until the quorum, opened once for the act and erased. The last approval claims the request in its
transaction (row locked FOR UPDATE): a concurrent approval finds it released, so the act runs once.
If the act fails, the claim is undone and the approvals stay for another try. Every step is
audited with names (approval.started, approval.approved, approval.released, approval.failed)."""

from __future__ import annotations

import base64
import datetime as dt
import enum
import json
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import ApprovalClosed, ApprovalNotFound, BadKey, MailkmsError, Malformed, UserNotFound
from mailkms.pki import (
    check_officer_name,
    check_officer_passphrase,
    open_share,
    parse_reason,
    read_share,
    reason_name,
    seal_share,
    wipe,
)
from mailkms.services._admins import AdminAccounts, Permission, Principal
from mailkms.services._audit import AuditLog
from mailkms.services._recovery import ArchiveExport, NewOfficer, Recovery, RecoveryResult, ShareInput
from mailkms.services._revocation import Revocation, RevocationReport
from mailkms.services._users import normalise_mailbox
from mailkms.store import ApprovalRequest, ApprovalVote, Database, User

REQUEST_HOURS = 24
MAX_BULK = 10_000


class ApprovalKind(enum.StrEnum):
    RECOVER = "recover"
    EXPORT = "export"
    BULK_REVOKE = "bulk_revoke"
    REPLACE_OFFICERS = "replace_officers"

    @property
    def with_shares(self) -> bool:
        return self is not ApprovalKind.BULK_REVOKE

    @property
    def permission(self) -> Permission:
        return Permission.USERS if self is ApprovalKind.BULK_REVOKE else Permission.RECOVERY


@dataclass(frozen=True)
class ApprovalView:
    id: int
    kind: str
    subject: str
    started_by: str
    created_at: dt.datetime
    expires_at: dt.datetime
    released_at: dt.datetime | None
    released_by: str | None
    approvers: tuple[str, ...]
    threshold: int
    payload: dict[str, Any]
    outcome: dict[str, Any] | None

    @property
    def with_shares(self) -> bool:
        return ApprovalKind(self.kind).with_shares

    def expired(self, now: dt.datetime) -> bool:
        return self.released_at is None and self.expires_at <= now

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kind": self.kind,
            "subject": self.subject,
            "started_by": self.started_by,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "released_at": self.released_at.isoformat() if self.released_at else None,
            "released_by": self.released_by,
            "approvers": list(self.approvers),
            "threshold": self.threshold,
            "with_shares": self.with_shares,
            "payload": {k: v for k, v in self.payload.items() if k != "recipient"},
            "outcome": _public(self.outcome),
        }

    def to_collect(self) -> list[str]:
        """replace_officers: the new officers whose share waits for them."""
        return sorted((self.outcome or {}).get("handover", {}))


def _public(outcome: dict[str, Any] | None) -> dict[str, Any] | None:
    """An outcome without the sealed hand-over of new shares (the names that still wait instead)."""
    if outcome is None or "handover" not in outcome:
        return outcome
    return {**{k: v for k, v in outcome.items() if k != "handover"}, "to_collect": sorted(outcome["handover"])}


@dataclass(frozen=True)
class Approved:
    view: ApprovalView
    released: RecoveryResult | None  # set for the approval that released a recovery (its token, once)
    export: ArchiveExport | None = None  # set for the approval that released an export
    revoked: tuple[RevocationReport, ...] = ()  # set for the approval that released a bulk revoke


def _context(request_id: int, officer: str) -> str:
    return f"approval:{request_id}:{officer}"


def _recipient(pem: str) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise Malformed("the export recipient is not a PEM certificate") from None
    public = cert.public_key()
    if not isinstance(public, rsa.RSAPublicKey) or public.key_size < 2048:
        raise BadKey("the export recipient must be an RSA certificate of at least 2048 bits")
    return cert


class Approvals:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        audit: AuditLog,
        admins: AdminAccounts,
        recovery: Recovery,
        revocation: Revocation,
        settings: Settings,
    ) -> None:
        self._db = db
        self._clock = clock
        self._audit = audit
        self._admins = admins
        self._recovery = recovery
        self._revocation = revocation
        self._settings = settings

    # -- starting ------------------------------------------------------------------------------------
    def start_recovery(self, who: Principal, email: str) -> int:
        who.require(Permission.RECOVERY)
        mailbox = normalise_mailbox(email)
        self._recovery.archived_count(mailbox)  # no such user, or nothing archived: refused now
        return self._start(who, ApprovalKind.RECOVER, mailbox, {"email": mailbox}, None)

    def start_export(self, who: Principal, recipient_pem: str, email: str | None = None) -> int:
        """The archive (or one user's part) re-enveloped to an RSA certificate, at M officers' shares."""
        who.require(Permission.RECOVERY)
        cert = _recipient(recipient_pem)
        mailbox = normalise_mailbox(email) if email else None
        if mailbox is not None:
            self._recovery.archived_count(mailbox)
        subject = f"archive of {mailbox}" if mailbox else "whole archive"
        payload = {"email": mailbox, "recipient": recipient_pem, "recipient_subject": cert.subject.rfc4514_string()}
        return self._start(who, ApprovalKind.EXPORT, subject, payload, None)

    def start_bulk_revoke(self, who: Principal, emails: list[str], reason: str | None) -> int:
        who.require(Permission.USERS)
        mailboxes, flag = self.bulk_checked(emails, reason)
        subject = f"{len(mailboxes)} users: {', '.join(mailboxes)}"
        if len(subject) > 320:
            subject = subject[:317] + "..."
        payload = {"emails": mailboxes, "reason": flag}
        return self._start(who, ApprovalKind.BULK_REVOKE, subject, payload, self._settings.admin.bulk_revoke_approvals)

    def start_replace_officers(self, who: Principal, officers: list[str], threshold: int) -> int:
        """A new share split (new officers, new recovery key, the archive re-wrapped), at M shares of
        the current officers. The new officers are administrators who may hold a share: each
        collects their new share in their own session, sealing it under a passphrase they choose."""
        who.require(Permission.RECOVERY)
        names = list(dict.fromkeys(n.strip() for n in officers if n.strip()))
        if not 1 <= threshold <= len(names):
            raise Malformed(f"the threshold must be between 1 and the number of officers ({len(names)})")
        for name in names:
            check_officer_name(name)
            if not Principal(name, self._admins.show(name).role).may(Permission.RECOVERY):
                raise Malformed(f"{name} is not an officer or superuser: they could not collect their share")
        subject = f"officers {', '.join(names)} ({threshold} of {len(names)})"[:320]
        payload = {"officers": names, "threshold": threshold}
        return self._start(who, ApprovalKind.REPLACE_OFFICERS, subject, payload, None)

    def collect_share(self, who: Principal, request_id: int, passphrase: bytes) -> tuple[str, bytes]:
        """A new officer's share of a released replace_officers, once: sealed now under the
        passphrase they choose (never stored); returns (file name, share file bytes)."""
        who.require(Permission.RECOVERY)
        check_officer_passphrase(who.name, passphrase)
        with self._db.transaction() as session:
            row = session.get(ApprovalRequest, request_id, with_for_update=True)
            if row is None or row.kind != ApprovalKind.REPLACE_OFFICERS.value:
                raise ApprovalNotFound(f"no replacement of officers {request_id}")
            outcome = json.loads(row.outcome) if row.outcome else {}
            sealed = outcome.get("handover", {}).pop(who.name, None)
            if sealed is None:
                raise ApprovalClosed("no share waits for you here (not released, collected already, or not yours)")
            doc = json.loads(
                self._admins.open_secret(_context(request_id, f"new:{who.name}"), base64.b64decode(sealed))
            )
            share = read_share(base64.b64decode(doc["share"]))
            secret = open_share(share, doc["passphrase"].encode())
            try:
                data = seal_share(share.header, secret, passphrase, scrypt_n=self._recovery.scrypt_n)
            finally:
                wipe(secret)
            row.outcome = json.dumps(outcome)
            self._audit.append(session, who.actor, "approval.share.collected", row.subject, request=request_id)
        return doc["file"], data

    def revoke_many(self, who: Principal, emails: list[str], reason: str | None) -> list[RevocationReport] | int:
        """Up to [admin] bulk_revoke_approval_threshold users: revoked now. More: an approval request (its id)."""
        who.require(Permission.USERS)
        mailboxes, _ = self.bulk_checked(emails, reason)
        if len(mailboxes) > self._settings.admin.bulk_revoke_approval_threshold:
            return self.start_bulk_revoke(who, mailboxes, reason)
        return self._revocation.revoke_users(mailboxes, reason, who.actor)

    def bulk_checked(self, emails: list[str], reason: str | None) -> tuple[list[str], str | None]:
        flag = reason_name(parse_reason(reason))
        mailboxes = list(dict.fromkeys(normalise_mailbox(e) for e in emails if e.strip()))
        if not mailboxes:
            raise Malformed("name at least one user")
        if len(mailboxes) > MAX_BULK:
            raise Malformed(f"at most {MAX_BULK} users in one request")
        with self._db.read_only() as session:
            known = set(session.execute(select(User.email).where(User.email.in_(mailboxes))).scalars())
        missing = [m for m in mailboxes if m not in known]
        if missing:
            raise UserNotFound(f"no user {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        return mailboxes, flag

    def _start(
        self, who: Principal, kind: ApprovalKind, subject: str, payload: dict[str, Any], required: int | None
    ) -> int:
        now = self._clock.now()
        with self._db.transaction() as session:
            row = ApprovalRequest(
                kind=kind.value,
                subject=subject,
                started_by=who.name,
                created_at=now,
                expires_at=now + dt.timedelta(hours=REQUEST_HOURS),
                payload=json.dumps(payload),
                required=required,
            )
            session.add(row)
            session.flush()
            self._audit.append(session, who.actor, "approval.started", subject, request=row.id, kind=kind.value)
            return row.id

    # -- reading -------------------------------------------------------------------------------------
    def list(self) -> list[ApprovalView]:
        with self._db.read_only() as session:
            ids = session.execute(select(ApprovalRequest.id).order_by(ApprovalRequest.id.desc()).limit(50)).scalars()
            return [self.show(i) for i in ids]

    def show(self, request_id: int) -> ApprovalView:
        with self._db.read_only() as session:
            row = session.get(ApprovalRequest, request_id)
            if row is None:
                raise ApprovalNotFound(f"no approval request {request_id}")
            names = session.execute(
                select(ApprovalVote.officer).where(ApprovalVote.request_id == row.id).order_by(ApprovalVote.id)
            ).scalars()
            return ApprovalView(
                row.id,
                row.kind,
                row.subject,
                row.started_by,
                row.created_at,
                row.expires_at,
                row.released_at,
                row.released_by,
                tuple(names),
                self._needed(row),
                json.loads(row.payload) if row.payload else {"email": row.subject},
                json.loads(row.outcome) if row.outcome else None,
            )

    def _needed(self, row: ApprovalRequest) -> int:
        return row.required if row.required is not None else self._recovery.status().threshold

    # -- approving -----------------------------------------------------------------------------------
    def approve(self, who: Principal, request_id: int, share: bytes, passphrase: bytes) -> Approved:
        """A recovery or export: check the share now (its passphrase opens it), keep it sealed."""
        who.require(Permission.RECOVERY)
        sealed_share = read_share(share)
        wipe(open_share(sealed_share, passphrase))  # a wrong passphrase is refused here, not at the quorum
        kept = json.dumps(
            {"share": base64.b64encode(share).decode(), "passphrase": base64.b64encode(passphrase).decode()}
        )
        holder = sealed_share.header.officer
        return self._vote(who, request_id, holder, self._admins.seal_secret(_context(request_id, who.name), kept))

    def approve_plain(self, who: Principal, request_id: int) -> Approved:
        """A bulk revoke: an approval by an administrator who may revoke and did not start it."""
        return self._vote(who, request_id, None, None)

    def _vote(self, who: Principal, request_id: int, holder: str | None, sealed: bytes | None) -> Approved:
        # read before the write transaction (on SQLite a second one inside it would wait for it)
        ceremony_threshold = self._recovery.status().threshold if holder is not None else 0
        now = self._clock.now()
        with self._db.transaction() as session:
            row = session.get(ApprovalRequest, request_id, with_for_update=True)
            if row is None:
                raise ApprovalNotFound(f"no approval request {request_id}")
            kind = ApprovalKind(row.kind)
            who.require(kind.permission)
            if kind.with_shares != (holder is not None):
                raise Malformed(
                    "this request is approved with a share file" if kind.with_shares else "this request takes no share"
                )
            if row.released_at is not None or row.expires_at <= now:
                raise ApprovalClosed("this request is released or expired")
            if not kind.with_shares and row.started_by == who.name:
                raise ApprovalClosed("the administrator who started this request cannot approve it")
            votes = session.execute(select(ApprovalVote).where(ApprovalVote.request_id == row.id)).scalars().all()
            if any(v.officer == who.name for v in votes):
                raise ApprovalClosed(f"{who.name} has approved this request already")
            if holder is not None and any(v.share_officer == holder for v in votes):
                raise ApprovalClosed(f"the share of {holder} was given already")
            threshold = row.required if row.required is not None else ceremony_threshold
            session.add(
                ApprovalVote(
                    request_id=row.id, officer=who.name, share_officer=holder or "", sealed=sealed, created_at=now
                )
            )
            extra = {"holder": holder} if holder else {}
            self._audit.append(
                session,
                who.actor,
                "approval.approved",
                row.subject,
                request=row.id,
                kind=kind.value,
                approvals=len(votes) + 1,
                threshold=threshold,
                **extra,
            )
            reached = len(votes) + 1 >= threshold
            if reached:  # claimed in this transaction: a concurrent last approval finds it released
                row.released_at, row.released_by = now, who.name
        if not reached:
            return Approved(self.show(request_id), None)
        return self._release(who, request_id)

    # -- releasing -----------------------------------------------------------------------------------
    def _release(self, who: Principal, request_id: int) -> Approved:
        view = self.show(request_id)
        kind = ApprovalKind(view.kind)
        with self._db.read_only() as session:
            votes = session.execute(
                select(ApprovalVote).where(ApprovalVote.request_id == request_id).order_by(ApprovalVote.id)
            ).scalars()
            quorum = []
            for vote in votes:
                if vote.sealed is not None:
                    doc = json.loads(self._admins.open_secret(_context(request_id, vote.officer), vote.sealed))
                    quorum.append(ShareInput(base64.b64decode(doc["share"]), base64.b64decode(doc["passphrase"])))
        recovered: RecoveryResult | None = None
        exported: ArchiveExport | None = None
        revoked: list[RevocationReport] = []
        try:
            if kind is ApprovalKind.RECOVER:
                recovered = self._recovery.recover(view.payload["email"], quorum, who.actor)
                outcome: dict[str, Any] = {"serials": list(recovered.key_serials)}
            elif kind is ApprovalKind.REPLACE_OFFICERS:
                outcome = self._replace_officers(request_id, view, quorum, who)
            elif kind is ApprovalKind.EXPORT:
                cert = _recipient(view.payload["recipient"])
                exported = self._recovery.export_archive(cert, quorum, who.actor, view.payload.get("email"))
                outcome = {"keys": exported.count, "document": exported.document.decode()}
            else:
                revoked = self._revocation.revoke_users(
                    view.payload["emails"], view.payload.get("reason"), f"admin:{view.started_by}"
                )
                outcome = {"revoked": [r.subject for r in revoked], "serials": sum(len(r.serials) for r in revoked)}
        except MailkmsError as exc:
            with self._db.transaction() as session:
                row = session.get(ApprovalRequest, request_id, with_for_update=True)
                if row is not None:
                    row.released_at = row.released_by = None  # not released: the votes stay for another try
                self._audit.append(
                    session, who.actor, "approval.failed", view.subject, request=request_id, error=exc.code
                )
            raise
        finally:
            del quorum
        with self._db.transaction() as session:
            self._erase_shares(session, request_id)
            row = session.get(ApprovalRequest, request_id, with_for_update=True)
            assert row is not None
            row.outcome = json.dumps(outcome)
            self._audit.append(
                session,
                who.actor,
                "approval.released",
                view.subject,
                request=request_id,
                kind=kind.value,
                started_by=view.started_by,
                approved_by=list(view.approvers),
                **{k: v for k, v in outcome.items() if k not in ("document", "handover")},
            )
        return Approved(self.show(request_id), recovered, exported, tuple(revoked))

    def _replace_officers(
        self, request_id: int, view: ApprovalView, quorum: Sequence[ShareInput], who: Principal
    ) -> dict[str, Any]:
        """The new split, each new share sealed under a one-off passphrase, that and the share kept
        sealed under the at-rest key until its officer collects it (then re-sealed to their own)."""
        names: list[str] = view.payload["officers"]
        once = {n: secrets.token_urlsafe(24).encode() for n in names}
        with tempfile.TemporaryDirectory() as folder:
            officers = [NewOfficer(n, once[n]) for n in names]
            result = self._recovery.replace_ceremony(
                officers, view.payload["threshold"], quorum, Path(folder), who.actor
            )
            handover = {}
            for path in result.share_files:
                data = path.read_bytes()
                name = read_share(data).header.officer
                kept = json.dumps(
                    {"file": path.name, "share": base64.b64encode(data).decode(), "passphrase": once[name].decode()}
                )
                sealed = self._admins.seal_secret(_context(request_id, f"new:{name}"), kept)
                handover[name] = base64.b64encode(sealed).decode()
        return {"ceremony": result.ceremony_id, "rewrapped": result.rewrapped, "handover": handover}

    @staticmethod
    def _erase_shares(session: Session, request_id: int) -> None:
        for vote in session.execute(select(ApprovalVote).where(ApprovalVote.request_id == request_id)).scalars():
            vote.sealed = None  # the shares are not kept past the release
