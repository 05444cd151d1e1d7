"""EST (RFC 7030) on the HTTPS app, under /.well-known/est/.

Bodies are base64 of DER both ways (RFC 8951: whitespace tolerated, Content-Transfer-Encoding
ignored on input). Refusals are text/plain (RFC 7030 §4.2.3, RFC 8951 §3.3) with the status of
the error: 400 malformed, 401 + WWW-Authenticate: Basic for the token-authenticated operations,
403 refused by policy (and for a re-enrolment whose proof does not identify a current
certificate: Basic would not help there), 413 too large, 415 wrong content type.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from mailkms.api._problems import count_refusal
from mailkms.errors import BodyTooLarge, CredentialsRequired, MailkmsError, UnsupportedMediaType
from mailkms.pki import certs_only, decode_body, encode_body, serverkeygen_response
from mailkms.services import Services

log = logging.getLogger("mailkms.api.est")

PREFIX = "/.well-known/est"
PKCS10 = "application/pkcs10"
PKCS7 = "application/pkcs7-mime"
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
CHALLENGE = 'Basic realm="mailkms EST", charset="UTF-8"'
MAX_BODY = 64 * 1024

Credentials = tuple[str, str]
Work = Callable[[Credentials | None, bytes, str], Response]


def _base64_response(der: bytes, media_type: str) -> Response:
    return Response(
        encode_body(der),
        media_type=media_type,
        headers={"Content-Transfer-Encoding": "base64", "Cache-Control": "no-store"},
    )


def _refusal(request: Request, exc: MailkmsError, basic: bool) -> Response:
    status = exc.http_status
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        if basic:
            headers["WWW-Authenticate"] = CHALLENGE
        else:
            status = 403
    log.info("EST refused %s: %s", request.url.path, exc.code)
    count_refusal(request, exc)
    text = exc.detail[:1].upper() + exc.detail[1:]
    return PlainTextResponse(f"{text}\n({exc.problem_type()})\n", status_code=status, headers=headers)


def _credentials(request: Request) -> Credentials:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        raise CredentialsRequired()
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise CredentialsRequired("the Basic credentials are not base64 of mailbox:token") from None
    username, sep, password = decoded.partition(":")
    if not sep or not username or not password:
        raise CredentialsRequired("the Basic credentials must be mailbox:token")
    return username, password


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The whole body, refused (413) as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"{what} requests are at most {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"{what} requests are at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _handle(request: Request, *, basic: bool, accepts: tuple[str, ...], work: Work) -> Response:
    """Credentials, then content type, then base64; the service checks the rest."""
    try:
        credentials = _credentials(request) if basic else None
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media not in accepts:
            raise UnsupportedMediaType(f"{request.url.path} takes {' or '.join(accepts)}, not {media or 'nothing'}")
        der = decode_body(await read_body(request, MAX_BODY, "EST"))
        return await run_in_threadpool(work, credentials, der, media)
    except MailkmsError as exc:
        return _refusal(request, exc, basic)


def _request_doc(*media: str) -> dict[str, Any]:
    schema = {"type": "string", "format": "base64", "description": "base64 of the DER structure"}
    return {"requestBody": {"required": True, "content": {m: {"schema": schema} for m in media}}}


def _response_doc(media: str, what: str, basic: bool = True) -> dict[int | str, dict[str, Any]]:
    text = {"text/plain": {"schema": {"type": "string"}}}
    doc: dict[int | str, dict[str, Any]] = {
        200: {"description": what, "content": {media: {"schema": {"type": "string", "format": "base64"}}}},
        400: {"description": "malformed base64, DER or request", "content": text},
        403: {"description": "refused by policy" + ("" if basic else ", or no proof of a current certificate")},
        413: {"description": f"body over {MAX_BODY} bytes", "content": text},
        415: {"description": "wrong content type", "content": text},
    }
    doc[403]["content"] = text
    if basic:
        doc[401] = {"description": "missing, bad, used or expired token (WWW-Authenticate: Basic)", "content": text}
    return doc


def est_router(services: Services) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["est"])
    est = services.est

    @router.get(
        "/cacerts",
        response_class=Response,
        summary="CA certificates (RFC 7030 §4.1): issuing CA (after a rekey, every key's) and root, certs-only, base64",
        responses={200: {"content": {CERTS_ONLY: {"schema": {"type": "string", "format": "base64"}}}}},
    )
    def cacerts() -> Response:
        return _base64_response(est.cacerts(), CERTS_ONLY)

    @router.get("/csrattrs", status_code=204, response_class=Response, summary="CSR attributes (RFC 7030 §4.5)")
    def csrattrs() -> Response:
        """None are required: subject and SAN are built from the mailbox whatever the request says."""
        return Response(status_code=204)

    def _enrol(credentials: Credentials | None, der: bytes, media: str) -> Response:
        assert credentials is not None
        cert = est.simpleenroll(credentials[0], credentials[1], der)
        return _base64_response(certs_only([cert]), CERTS_ONLY)

    @router.post(
        "/simpleenroll",
        response_class=Response,
        summary="Enrol (RFC 7030 §4.2.1): HTTP Basic mailbox:token, PKCS#10 of the signing key",
        openapi_extra=_request_doc(PKCS10),
        responses=_response_doc(CERTS_ONLY, "the signing certificate"),
    )
    async def simpleenroll(request: Request) -> Response:
        """Spends the one-time token and issues the user's pair: the signing certificate for the
        request's key is returned; the encryption key made by the server waits for /serverkeygen
        (same credentials, within an hour). Subject and SAN come from the mailbox."""
        return await _handle(request, basic=True, accepts=(PKCS10,), work=_enrol)

    def _reenrol(credentials: Credentials | None, der: bytes, media: str) -> Response:
        cert = est.simplereenroll(der) if media == PKCS10 else est.simplereenroll_signed(der)
        return _base64_response(certs_only([cert]), CERTS_ONLY)

    @router.post(
        "/simplereenroll",
        response_class=Response,
        summary="Renew (RFC 7030 §4.2.2): proof of the current signing key, no TLS client certificate",
        openapi_extra=_request_doc(PKCS10, PKCS7),
        responses=_response_doc(CERTS_ONLY, "the new signing certificate", basic=False),
    )
    async def simplereenroll(request: Request) -> Response:
        """application/pkcs10: a request for the key of the current signing certificate (renew);
        its signature is the proof. application/pkcs7-mime: a CMS SignedData made with the current
        signing key and certificate holding the PKCS#10 of a new key (rekey), signingTime within
        the nonce lifetime. The renewal rules apply (due, expired, revoked); the new encryption
        key and certificate arrive by e-mail, enveloped to the current encryption certificate."""
        return await _handle(request, basic=False, accepts=(PKCS10, PKCS7), work=_reenrol)

    def _keygen(credentials: Credentials | None, der: bytes, media: str) -> Response:
        assert credentials is not None
        key = est.serverkeygen(credentials[0], credentials[1], der)
        content_type, body = serverkeygen_response(key.private_key_der, certs_only([key.certificate]))
        return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})

    @router.post(
        "/serverkeygen",
        response_class=Response,
        summary="Server-made encryption key (RFC 7030 §4.4): the one simpleenroll made, over TLS",
        openapi_extra=_request_doc(PKCS10),
        responses=_response_doc("multipart/mixed", "application/pkcs8 key part, then the certificate part"),
    )
    async def serverkeygen(request: Request) -> Response:
        """The same Basic credentials as the /simpleenroll they follow. The request's key and
        signature are ignored (§4.4.1). The key is returned unencrypted inside TLS
        (application/pkcs8); requests asking for an encrypted key are refused."""
        return await _handle(request, basic=True, accepts=(PKCS10,), work=_keygen)

    return router
