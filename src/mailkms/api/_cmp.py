"""CMP over HTTP (RFC 6712, RFC 9483 §6.1) on the HTTPS app: POST /.well-known/cmp (and
/.well-known/cmp/p/<label>, the same service), `application/pkixcmp` both ways.

Every refusal the CMP layer can express is a CMP error message (PKIStatusInfo rejection with a
failInfo bit) with HTTP 200, as RFC 9483 §6.1 wants, so clients report it as a CMP error. This
module is the one mapping from mailkms errors to failInfo bits. Only what is not CMP at all gets an
HTTP refusal (a problem document, as the rest of the API): a wrong content type (415) or an
oversized body (413).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from mailkms.api._est import read_body
from mailkms.api._problems import count_refusal, problem_response
from mailkms.errors import (
    AlreadyRevoked,
    BadCMPMessage,
    BadCMPProtection,
    BadCSR,
    BadKey,
    BadNonce,
    BadPOP,
    CertificateNotFound,
    CMPTransactionInUse,
    CMPUnknownTransaction,
    MailkmsError,
    Malformed,
    NotCurrentCertificate,
    NotOwner,
    PolicyRefused,
    ReplayedNonce,
    Revoked,
    StaleRequest,
    Unauthorized,
    UnknownIssuer,
    UnsupportedMediaType,
)
from mailkms.pki._cmp import FailInfo as CMPFailInfo
from mailkms.pki._cmp import Status as CMPStatus
from mailkms.services import Services

log = logging.getLogger("mailkms.api.cmp")

PATH = "/.well-known/cmp"
PKIXCMP = "application/pkixcmp"
MAX_BODY = 64 * 1024

# The first class an error is an instance of decides its failInfo (most specific first).
_FAIL_INFO: tuple[tuple[type[MailkmsError], CMPFailInfo], ...] = (
    (ReplayedNonce, CMPFailInfo.BAD_SENDER_NONCE),
    (StaleRequest, CMPFailInfo.BAD_TIME),
    (BadNonce, CMPFailInfo.BAD_SENDER_NONCE),
    (CMPTransactionInUse, CMPFailInfo.TRANSACTION_ID_IN_USE),
    (CMPUnknownTransaction, CMPFailInfo.BAD_REQUEST),
    (BadCMPProtection, CMPFailInfo.BAD_MESSAGE_CHECK),
    (BadPOP, CMPFailInfo.BAD_POP),
    (BadKey, CMPFailInfo.BAD_CERT_TEMPLATE),
    (BadCSR, CMPFailInfo.BAD_CERT_TEMPLATE),
    (BadCMPMessage, CMPFailInfo.BAD_DATA_FORMAT),
    (AlreadyRevoked, CMPFailInfo.CERT_REVOKED),
    (Revoked, CMPFailInfo.CERT_REVOKED),
    (CertificateNotFound, CMPFailInfo.BAD_CERT_ID),
    (NotOwner, CMPFailInfo.NOT_AUTHORIZED),
    (UnknownIssuer, CMPFailInfo.SIGNER_NOT_TRUSTED),
    (NotCurrentCertificate, CMPFailInfo.SIGNER_NOT_TRUSTED),
    (Unauthorized, CMPFailInfo.NOT_AUTHORIZED),  # token unknown, used, expired, replaced
    (PolicyRefused, CMPFailInfo.NOT_AUTHORIZED),  # not due, expired (re-enrol)
    (Malformed, CMPFailInfo.BAD_REQUEST),
)


def status_of(exc: MailkmsError) -> CMPStatus:
    """PKIStatusInfo for a refusal: rejection, the readable detail and the problem code, one failInfo bit."""
    fail = exc.extra.get("fail")
    if not isinstance(fail, CMPFailInfo):
        fail = next((bit for cls, bit in _FAIL_INFO if isinstance(exc, cls)), CMPFailInfo.SYSTEM_FAILURE)
    return CMPStatus(status=2, text=f"{exc.detail} ({exc.problem_type()})", fail=fail)


def cmp_router(services: Services) -> APIRouter:
    router = APIRouter(tags=["cmp"])
    cmp = services.cmp

    async def _serve(request: Request) -> Response:
        try:
            media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != PKIXCMP:
                raise UnsupportedMediaType(f"CMP takes {PKIXCMP}, not {media or 'nothing'}")
            body = await read_body(request, MAX_BODY, "CMP")
        except MailkmsError as exc:
            count_refusal(request, exc)
            log.info("CMP refused %s: %s", request.url.path, exc.code)
            return problem_response(exc)
        answer = await run_in_threadpool(cmp.handle, body, status_of)
        return Response(answer, media_type=PKIXCMP, headers={"Cache-Control": "no-store"})

    doc = {
        "requestBody": {
            "required": True,
            "content": {PKIXCMP: {"schema": {"type": "string", "format": "binary", "description": "DER PKIMessage"}}},
        }
    }
    responses: dict[int | str, dict[str, object]] = {
        200: {"description": "a DER PKIMessage: ip/cp/kup/rp/pkiconf, or an error message", "content": {PKIXCMP: {}}},
        413: {"description": f"body over {MAX_BODY} bytes"},
        415: {"description": f"not {PKIXCMP}"},
    }

    @router.post(PATH, response_class=Response, openapi_extra=doc, responses=responses, summary="CMP (RFC 9483)")
    async def cmp_default(request: Request) -> Response:
        """ir/cr (MAC with the enrolment token, reference = mailbox), kur and rr (signed with the
        current certificate), certConf. Refusals are CMP error messages."""
        return await _serve(request)

    @router.post(
        PATH + "/p/{label}", response_class=Response, openapi_extra=doc, responses=responses, summary="CMP, labelled"
    )
    async def cmp_labelled(label: str, request: Request) -> Response:
        """The same service under an RFC 9483 §6.1 path label (there is one CA: every label is it)."""
        return await _serve(request)

    return router
