"""GET /api/v1/directory/{email}: a colleague's current encryption certificate."""

from __future__ import annotations

from typing import Annotated, Any

from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Header, Query, Response

from mailkms.api._schemas import Problem
from mailkms.pki import certs_only
from mailkms.services import Services

CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
PEM_CHAIN = "application/pem-certificate-chain"

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The encryption certificate, then the issuing CA certificate.",
        "content": {
            "application/pkcs7-mime": {
                "schema": {"type": "string", "format": "binary"},
                "example": "(certs-only PKCS#7, DER; smime-type=certs-only, RFC 8551 §3.6)",
            },
            PEM_CHAIN: {"schema": {"type": "string"}, "example": "-----BEGIN CERTIFICATE-----\n..."},
        },
    },
    400: {"model": Problem, "description": "not an e-mail address (malformed)"},
    404: {
        "model": Problem,
        "description": "not-in-directory: unknown, not yet enrolled, expired or revoked (not told apart)",
    },
}


def directory_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["directory"])

    @router.get(
        "/directory/{email}",
        response_class=Response,
        responses=_RESPONSES,
        summary="A user's current encryption certificate (certs-only PKCS#7 or PEM)",
    )
    def directory(
        email: str,
        format: Annotated[str | None, Query(description="`pem` for a PEM chain; default certs-only PKCS#7")] = None,
        accept: Annotated[str | None, Header()] = None,
    ) -> Response:
        """What `mailkms-client encrypt --to` uses, as the address book was: the current encryption
        certificate of an ACTIVE or DUE user, followed by the issuing CA certificate.

        `Accept: application/pem-certificate-chain` or `?format=pem` gives PEM; otherwise the
        answer is `application/pkcs7-mime; smime-type=certs-only` (DER). Revoked, expired and
        unknown users get 404 `not-in-directory`. Clients must check the chain to the root they
        pinned, that the certificate names the address, and that it is for key encipherment.
        """
        entry = services.directory.lookup(email)
        certs = [entry.certificate, entry.issuing]
        headers = {"Cache-Control": "no-cache"}
        if (format or "").lower() == "pem" or PEM_CHAIN in (accept or ""):
            body = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
            return Response(body, media_type=PEM_CHAIN, headers=headers)
        headers["Content-Disposition"] = f'attachment; filename="{entry.mailbox}.p7c"'
        return Response(certs_only(certs), media_type=CERTS_ONLY, headers=headers)

    return router
