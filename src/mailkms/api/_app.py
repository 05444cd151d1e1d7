"""The HTTP API (HTTPS) and the plain-http publication app (CA certificates, CRL, OCSP)."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailkms.api import _observability
from mailkms.api._acme import acme_router
from mailkms.api._admin import admin_router
from mailkms.api._admin_admins import admin_admins_router
from mailkms.api._admin_approvals import admin_approvals_router
from mailkms.api._cmp import cmp_router
from mailkms.api._console import console_router, error_page
from mailkms.api._console_admins import admins_router
from mailkms.api._console_approvals import approvals_router
from mailkms.api._console_pages import pages_router
from mailkms.api._console_webauthn import passkeys_router
from mailkms.api._directory import directory_router
from mailkms.api._est import est_router
from mailkms.api._limits import Limits
from mailkms.api._problems import (
    http_error_handler,
    mailkms_error_handler,
    problem_responses,
    unexpected_error_handler,
    validation_error_handler,
)
from mailkms.api._revocation import OCSPEndpoint, revocation_router
from mailkms.api._schemas import Accepted, EnrolmentRequest, ServerInfo, SignedRequestBody, StatusAnswer
from mailkms.errors import MailkmsError, NotFound
from mailkms.pki import fingerprint_sha256
from mailkms.services import RenewalAccepted, Services

PEM_CHAIN = "application/pem-certificate-chain"
PKIX_CERT = "application/pkix-cert"
_ERRORS = problem_responses(
    {
        400: "malformed",
        401: "not authenticated",
        403: "refused by policy",
        404: "not found",
        413: "body-too-large",
        429: "rate-limited (see Retry-After)",
    }
)


async def _error_handler(request: Request, exc: Exception) -> Response:
    """Problem documents, except on the console's pages (the same status, as a page)."""
    if isinstance(exc, MailkmsError) and request.url.path.startswith("/admin/"):
        return error_page(request, exc)
    return await mailkms_error_handler(request, exc)


def _install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MailkmsError, _error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)


def _install_limits(app: FastAPI, services: Services) -> None:
    """Outermost: a refusal for size, time or rate costs no routing and no read of the body."""
    refusals = services.refusals
    app.add_middleware(
        Limits, config=services.settings.limits, on_refused=lambda exc: refusals.anonymous("http.refused", exc)
    )


def publication_router(services: Services) -> APIRouter:
    """Paths written into certificates (AIA caIssuers); served on http and https."""
    router = APIRouter(tags=["publication"])
    ca = services.ca

    @router.get("/ca/root.crt", response_class=Response, summary="Root CA certificate (DER)")
    def root_der() -> Response:
        return Response(ca.root.public_bytes(serialization.Encoding.DER), media_type=PKIX_CERT)

    @router.get(
        "/ca/issuing.crt",
        response_class=Response,
        summary="Issuing CA certificate (DER): the one the AIA of its certificates names; after `mailkms ca "
        "rekey` that stays the first key's, and later keys are at /ca/issuing/<key id>.crt",
    )
    def issuing_der() -> Response:
        return Response(ca.first_key_issuing_certificate.public_bytes(serialization.Encoding.DER), media_type=PKIX_CERT)

    @router.get(
        "/ca/issuing/{key_id}.crt",
        response_class=Response,
        summary="An issuing CA certificate by its Subject Key Identifier (hex): the current key's or one "
        "`mailkms ca rekey` replaced (DER)",
        responses={404: {}},
    )
    def issuing_by_key(key_id: str) -> Response:
        for cert in (ca.issuing.certificate, *ca.previous_issuing):
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
            if ski.hex() == key_id.lower():
                return Response(cert.public_bytes(serialization.Encoding.DER), media_type=PKIX_CERT)
        raise NotFound("no issuing CA certificate of this server has that key identifier")

    @router.get(
        "/ca/infrastructure.crt",
        response_class=Response,
        summary="Infrastructure CA certificate, the TLS certificate's issuer (DER)",
        responses={404: {}},
    )
    def infrastructure_der() -> Response:
        if ca.infrastructure is None:
            raise NotFound("this server has no infrastructure CA (its TLS certificate comes from the root)")
        return Response(ca.infrastructure.certificate.public_bytes(serialization.Encoding.DER), media_type=PKIX_CERT)

    @router.get("/healthz", summary="Liveness")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return router


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        title="mailkms",
        version="1",
        description="Key Management Server for S/MIME. Errors are RFC 9457 problem documents.",
    )
    _install_handlers(app)
    app.state.refusals = services.refusals
    app.include_router(publication_router(services))
    app.include_router(revocation_router(services))
    app.include_router(est_router(services))
    if services.settings.cmp.enabled:
        app.include_router(cmp_router(services))
    if services.settings.acme.enabled:
        app.include_router(acme_router(services))
    api = APIRouter(prefix="/api/v1", responses=_ERRORS)
    ca = services.ca
    settings = services.settings

    @api.get("/ca/chain", response_class=Response, tags=["ca"], summary="Issuing then root CA certificate, PEM")
    def chain() -> Response:
        body = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in ca.chain)
        return Response(body, media_type=PEM_CHAIN)

    @api.get("/server", response_model=ServerInfo, tags=["ca"], summary="What a client needs to know")
    def server_info() -> ServerInfo:
        return ServerInfo(
            hostname=settings.server.hostname,
            public_url=settings.server.effective_public_url,
            mail_from=settings.server.effective_mail_from,
            root_fingerprint_sha256=fingerprint_sha256(ca.root),
            lifetime_months=settings.policy.lifetime_months,
            reminder_months=settings.policy.reminder_months,
        )

    @api.post("/enrolments", status_code=202, response_model=Accepted, tags=["enrolment"])
    def enrol(body: EnrolmentRequest) -> Accepted:
        """Enrol with a one-time token. The certificates and the encryption key arrive by e-mail."""
        accepted = services.enrolment.enrol(body.mailbox, body.token, body.csr.encode(), body.transport_certificate)
        return Accepted(
            request_id=accepted.request_id,
            mailbox=accepted.mailbox,
            generation=accepted.generation,
            mail_from=accepted.mail_from,
            message="Your certificates are on their way by e-mail.",
        )

    @api.get("/nonce", status_code=204, tags=["renewal"], summary="A fresh nonce", operation_id="new_nonce")
    @api.head("/nonce", status_code=204, tags=["renewal"], summary="A fresh nonce", operation_id="new_nonce_head")
    def nonce() -> Response:
        """The nonce is in the Replay-Nonce header (RFC 8555 §7.2)."""
        return Response(status_code=204, headers={"Replay-Nonce": services.nonces.new(), "Cache-Control": "no-store"})

    def _accepted(result: RenewalAccepted, what: str) -> Accepted:
        return Accepted(
            request_id=result.request_id,
            mailbox=result.mailbox,
            generation=result.generation,
            mail_from=settings.server.effective_mail_from,
            message=what,
            already_issued=result.already_issued,
        )

    @api.post("/renewals", status_code=202, response_model=Accepted, tags=["renewal"])
    def renew(body: SignedRequestBody, request: Request) -> Accepted:
        """Certificate update request: a JWS signed with the current signing key (x5c, nonce, url).

        Refusals: bad-signature, unknown-issuer, not-current-certificate, not-owner, revoked,
        reenrolment-required, not-due, bad-nonce, nonce-reused, nonce-stale, url-mismatch, bad-csr.
        A repeat of an accepted request answers with the same request id and issues nothing.
        """
        result = services.renewal.renew(body.model_dump(), _url(request))
        return _accepted(result, "The update request was accepted; the new certificates arrive by e-mail.")

    @api.post("/resync", status_code=202, response_model=Accepted, tags=["renewal"])
    def resync(body: SignedRequestBody, request: Request) -> Accepted:
        """Send the latest reply again; never issues a new pair."""
        result = services.renewal.resync(body.model_dump(), _url(request))
        return _accepted(result, "The latest reply is sent again by e-mail.")

    @api.post("/status", response_model=StatusAnswer, tags=["renewal"])
    def status(body: SignedRequestBody, request: Request) -> StatusAnswer:
        """The signer's state as the server sees it (revoked, expired, due), signed like a renewal."""
        mailbox, state = services.renewal.status(body.model_dump(), _url(request))
        return StatusAnswer(mailbox=mailbox, state=state.value)

    app.include_router(api)
    app.include_router(admin_router(services))
    app.include_router(admin_approvals_router(services))
    app.include_router(admin_admins_router(services))
    app.include_router(pages_router(services))  # before /admin/users/{email}: /admin/users/import
    app.include_router(console_router(services))
    app.include_router(passkeys_router(services))
    app.include_router(approvals_router(services))
    app.include_router(admins_router(services))
    app.include_router(directory_router(services))
    _observability.install(app, services)
    app.add_middleware(OCSPEndpoint, services=services)  # OCSP skips the rest
    _install_limits(app, services)
    return app


def _url(request: Request) -> str:
    return str(request.url.replace(query=""))


def create_http_app(services: Services) -> FastAPI:
    """Plain http: only what the S/MIME BR want over http (CA certificates, CRL, OCSP)."""
    app = FastAPI(title="mailkms publication", docs_url=None, redoc_url=None, openapi_url=None)
    _install_handlers(app)
    app.include_router(publication_router(services))
    app.include_router(revocation_router(services))
    _observability.install(app, services, http=True)
    app.add_middleware(OCSPEndpoint, services=services)
    _install_limits(app, services)
    return app
