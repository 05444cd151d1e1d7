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
