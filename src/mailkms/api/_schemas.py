"""Wire messages of the HTTP API."""

from __future__ import annotations

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


class AdminUserAdded(BaseModel):
    email: str
    token: str = Field(description="the one-time enrolment token: shown once, never stored")
    expires_in_days: int


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
