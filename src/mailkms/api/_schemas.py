"""Wire messages of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, Field


class EnrolmentRequest(BaseModel):
    mailbox: str = Field(description="the enrolled e-mail address")
    token: str = Field(description="the one-time enrolment token from the administrator")
    csr: str = Field(description="PKCS#10 request (PEM) for the signing key made on the client")
    transport_certificate: str = Field(
        description="self-signed certificate (PEM) of the client's RSA transport key; the new encryption "
        "private key is enveloped to it"
    )


class Accepted(BaseModel):
    request_id: str
    mailbox: str
    generation: int
    mail_from: str = Field(description="the server's sender address; the reply comes from it, signed")
    message: str
    already_issued: bool = False


class ServerInfo(BaseModel):
    hostname: str
    public_url: str
    mail_from: str
    root_fingerprint_sha256: str
    lifetime_months: int
    reminder_months: int


class SignedRequestBody(BaseModel):
    """Flattened JWS (RFC 7515 §7.2.2), as ACME (RFC 8555 §6.2)."""

    protected: str
    payload: str
    signature: str


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str


class StatusAnswer(BaseModel):
    mailbox: str
    state: str = Field(description="ACTIVE, DUE, EXPIRED, REVOKED")


class AdminUserAdd(BaseModel):
    email: str = Field(description="the user's mailbox")
    name: str = Field(default="", description="display name")
    group: str | None = Field(default=None, description="policy group ([policy.groups])")
    mail_token: bool = Field(
        default=False, description="also send the token to the user as a signed mail (sealed in the outbox)"
    )


class AdminUserAdded(BaseModel):
    email: str
    token: str = Field(description="the one-time enrolment token: shown once, never stored")
    expires_in_days: int
    mailed: bool = Field(default=False, description="the token was queued as a mail to the user")


class AdminRevoke(BaseModel):
    reason: str | None = Field(
        default=None,
        description="RFC 5280 reason allowed by the S/MIME BR: keyCompromise, affiliationChanged, superseded, "
        "cessationOfOperation, privilegeWithdrawn; omit for none",
    )


class AdminRevoked(BaseModel):
    email: str
    serials: list[str]
    reason: str | None
    revoked_at: str
    crl_number: int | None


class AdminWhoAmI(BaseModel):
    name: str
    role: str
    permissions: list[str]


class AuditVerifyAnswer(BaseModel):
    ok: bool
    records: int
    checkpoints: int
    problems: list[str]


class ApprovalStart(BaseModel):
    kind: Literal["recover", "export", "bulk_revoke", "replace_officers"] = Field(
        description="the dangerous act to be approved"
    )
    email: str | None = Field(default=None, description="recover: the user; export: only this user's keys")
    emails: list[str] | None = Field(default=None, max_length=10_000, description="bulk_revoke: the users")
    reason: str | None = Field(default=None, description="bulk_revoke: BR revocation reason, as in AdminRevoke")
    recipient: str | None = Field(
        default=None, max_length=20_000, description="export: PEM certificate (RSA >= 2048) the keys are enveloped to"
    )
    officers: list[str] | None = Field(
        default=None, max_length=32, description="replace_officers: the new officers (administrators' names)"
    )
    threshold: int | None = Field(default=None, ge=1, le=32, description="replace_officers: the new M")


class ShareCollect(BaseModel):
    passphrase: str = Field(min_length=1, max_length=1024, description="the passphrase your new share is sealed to")


class ShareCollected(BaseModel):
    file: str = Field(description="the share file's name")
    share: str = Field(description="the share file, base64: keep it; it is not stored anywhere else")


class ApprovalGive(BaseModel):
    share: str | None = Field(
        default=None, max_length=90_000, description="recover/export: the officer's share file, base64"
    )
    passphrase: str | None = Field(default=None, max_length=1024, description="recover/export: the share passphrase")


class ApprovalOut(BaseModel):
    id: int
    kind: str
    subject: str
    started_by: str
    created_at: str
    expires_at: str
    released_at: str | None
    released_by: str | None
    approvers: list[str]
    threshold: int = Field(description="approvals needed")
    with_shares: bool = Field(description="approved with officers' share files (recover, export)")
    payload: dict[str, Any]
    outcome: dict[str, Any] | None = Field(description="what the act did, once released (export: the document)")
    token: str | None = Field(default=None, description="recover: the one-time recovery token, in this answer only")


class AdminBulkRevoke(AdminRevoke):
    emails: list[str] = Field(min_length=1, max_length=10_000, description="the users to revoke")


class AdminBulkRevoked(BaseModel):
    revoked: list[AdminRevoked] = Field(description="revoked now (at most [admin] bulk_revoke_approval_threshold)")
    approval: ApprovalOut | None = Field(description="more users: the approval request that waits, revoked nothing")


RowId = Annotated[int, Path(ge=1, le=2**31 - 1, description="a row's number")]  # beyond it: 422, not a DB overflow
