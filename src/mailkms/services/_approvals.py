"""M-of-N approvals in the console: an officer starts a recovery of a user's archived keys, other
officers approve it in their own sessions by uploading their share file and its passphrase; the
recovery (services.Recovery.recover) runs only when the ceremony's threshold of officers approved.

Each share is checked when it is uploaded (its structure, and that the passphrase opens it), then
kept sealed under the server's at-rest key (AES-256-GCM, bound to the request and the officer)
until the quorum, opened once for the recovery and erased. Every step is audited with names."""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import dataclass

from sqlalchemy import select

from mailkms.clock import Clock
from mailkms.errors import ApprovalClosed, ApprovalNotFound, MailkmsError
from mailkms.pki import open_share, read_share, wipe
from mailkms.services._admins import AdminAccounts, Permission, Principal
from mailkms.services._audit import AuditLog
from mailkms.services._recovery import Recovery, RecoveryResult, ShareInput
from mailkms.services._users import normalise_mailbox
from mailkms.store import ApprovalRequest, ApprovalVote, Database

REQUEST_HOURS = 24


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


@dataclass(frozen=True)
class Approved:
    view: ApprovalView
    released: RecoveryResult | None  # set for the approval that reached the quorum


def _context(request_id: int, officer: str) -> str:
    return f"approval:{request_id}:{officer}"


class Approvals:
    def __init__(self, db: Database, clock: Clock, audit: AuditLog, admins: AdminAccounts, recovery: Recovery) -> None:
        self._db = db
        self._clock = clock
        self._audit = audit
        self._admins = admins
        self._recovery = recovery

    def start_recovery(self, who: Principal, email: str) -> int:
        who.require(Permission.RECOVERY)
        mailbox = normalise_mailbox(email)
        self._recovery.archived_count(mailbox)  # no such user, or nothing archived: refused now
        now = self._clock.now()
        with self._db.transaction() as session:
            row = ApprovalRequest(
                kind="recover",
                subject=mailbox,
                started_by=who.name,
                created_at=now,
                expires_at=now + dt.timedelta(hours=REQUEST_HOURS),
            )
            session.add(row)
            session.flush()
            self._audit.append(session, who.actor, "approval.started", mailbox, request=row.id, kind="recover")
            return row.id

    def list(self) -> list[ApprovalView]:
        with self._db.read_only() as session:
            ids = session.execute(select(ApprovalRequest.id).order_by(ApprovalRequest.id.desc()).limit(50)).scalars()
            return [self.show(i) for i in ids]

    def show(self, request_id: int) -> ApprovalView:
        threshold = self._recovery.status().threshold
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
                threshold,
            )

    def approve(self, who: Principal, request_id: int, share: bytes, passphrase: bytes) -> Approved:
        """Check the share now (its passphrase opens it), keep it sealed; at the threshold, recover."""
        who.require(Permission.RECOVERY)
        sealed_share = read_share(share)
        wipe(open_share(sealed_share, passphrase))  # a wrong passphrase is refused here, not at the quorum
        kept = json.dumps(
            {"share": base64.b64encode(share).decode(), "passphrase": base64.b64encode(passphrase).decode()}
        )
        threshold = self._recovery.status().threshold
        now = self._clock.now()
        with self._db.transaction() as session:
            row = session.get(ApprovalRequest, request_id, with_for_update=True)
            if row is None:
                raise ApprovalNotFound(f"no approval request {request_id}")
            if row.released_at is not None or row.expires_at <= now:
                raise ApprovalClosed("this request is released or expired")
            votes = session.execute(select(ApprovalVote).where(ApprovalVote.request_id == row.id)).scalars().all()
            if any(v.officer == who.name for v in votes):
                raise ApprovalClosed(f"{who.name} has approved this request already")
            if any(v.share_officer == sealed_share.header.officer for v in votes):
                raise ApprovalClosed(f"the share of {sealed_share.header.officer} was given already")
            session.add(
                ApprovalVote(
                    request_id=row.id,
                    officer=who.name,
                    share_officer=sealed_share.header.officer,
                    sealed=self._admins.seal_secret(_context(row.id, who.name), kept),
                    created_at=now,
                )
            )
            self._audit.append(
                session,
                who.actor,
                "approval.approved",
                row.subject,
                request=row.id,
                holder=sealed_share.header.officer,
                approvals=len(votes) + 1,
                threshold=threshold,
            )
            reached = len(votes) + 1 >= threshold
            if reached:  # claimed in this transaction: a concurrent last approval finds it released
                row.released_at, row.released_by = now, who.name
            mailbox = row.subject
        if not reached:
            return Approved(self.show(request_id), None)
        return Approved(self.show(request_id), self._release(who, request_id, mailbox))

    def _release(self, who: Principal, request_id: int, mailbox: str) -> RecoveryResult:
        with self._db.read_only() as session:
            votes = session.execute(select(ApprovalVote).where(ApprovalVote.request_id == request_id)).scalars().all()
            quorum = []
            approvers = []
            for vote in votes:
                assert vote.sealed is not None
                doc = json.loads(self._admins.open_secret(_context(request_id, vote.officer), vote.sealed))
                quorum.append(ShareInput(base64.b64decode(doc["share"]), base64.b64decode(doc["passphrase"])))
                approvers.append(vote.officer)
        try:
            result = self._recovery.recover(mailbox, quorum, who.actor)
        except MailkmsError:
            with self._db.transaction() as session:
                row = session.get(ApprovalRequest, request_id)
                if row is not None:
                    row.released_at = row.released_by = None  # not released: the votes stay for another try
            raise
        with self._db.transaction() as session:
            for vote in session.execute(select(ApprovalVote).where(ApprovalVote.request_id == request_id)).scalars():
                vote.sealed = None  # the shares are not kept past the release
            self._audit.append(
                session,
                who.actor,
                "approval.released",
                mailbox,
                request=request_id,
                approved_by=approvers,
                serials=list(result.key_serials),
            )
        return result
