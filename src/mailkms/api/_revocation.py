"""CRL and OCSP over plain http (the S/MIME BR want http for CDP and AIA) and https.

The paths are the ones `PublicURLs` writes into certificates: /crl/issuing.crl, /crl/root.crl,
/ocsp (POST) and /ocsp/<base64 request> (GET, RFC 6960 appendix A.1).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import urllib.parse
from email.utils import format_datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Request, Response

from mailkms import metrics
from mailkms.errors import Internal
from mailkms.pki import MALFORMED_RESPONSE
from mailkms.services import CRLView, OCSPAnswer, Services

PKIX_CRL = "application/pkix-crl"
PEM_FILE = "application/x-pem-file"
OCSP_RESPONSE = "application/ocsp-response"
MAX_OCSP_REQUEST = 8 * 1024  # a single-CertID request is under 200 bytes; a nonce adds a few more
CRL_MAX_AGE = 60  # proxies may keep a CRL this long; a revocation shows within it


def _wants_pem(request: Request) -> bool:
    return request.query_params.get("format", "").lower() == "pem" or PEM_FILE in request.headers.get("accept", "")


def _crl_response(der: bytes, number: int, this_update_http: str, pem: bool) -> Response:
    headers = {
        "Cache-Control": f"public, max-age={CRL_MAX_AGE}, no-transform",
        "ETag": f'"crl-{number}"',
        "Last-Modified": this_update_http,
    }
    if pem:
        body = x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)
        return Response(body, media_type=PEM_FILE, headers=headers)
    return Response(der, media_type=PKIX_CRL, headers=headers)


def _ocsp_response(answer: OCSPAnswer) -> Response:
    metrics.OCSP_REQUESTS.labels(status=answer.status).inc()
    headers = {"Cache-Control": f"public, max-age={answer.max_age}, no-transform, must-revalidate"}
    if answer.max_age == 0:
        headers = {"Cache-Control": "no-store"}
    return Response(answer.der, media_type=OCSP_RESPONSE, headers=headers)


def revocation_router(services: Services) -> APIRouter:
    router = APIRouter(tags=["revocation"])
    revocation = services.revocation
    ocsp = services.ocsp
    ca = services.ca
    clock = services.clock

    def crl_age() -> float:
        view = revocation.latest
        return (clock.now() - view.this_update).total_seconds() if view is not None else 0.0

    metrics.CRL_AGE.labels(crl="issuing").set_function(crl_age)

    async def latest_crl() -> CRLView:
        view = revocation.latest or await asyncio.to_thread(revocation.refresh_latest)
        if view is None:
            raise Internal("no CRL has been published yet")
        return view

    @router.get(
        "/crl/issuing.crl",
        response_class=Response,
        summary="CRL of the issuing CA (DER; PEM with ?format=pem or Accept: application/x-pem-file)",
        responses={200: {"content": {PKIX_CRL: {}, PEM_FILE: {}}}},
    )
    async def issuing_crl(request: Request) -> Response:
        view = await latest_crl()
        return _crl_response(view.der, view.number, format_datetime(view.this_update, usegmt=True), _wants_pem(request))

    @router.get(
        "/crl/root.crl",
        response_class=Response,
        summary="CRL of the root CA, covering the issuing CA (DER, or PEM as above)",
        responses={200: {"content": {PKIX_CRL: {}, PEM_FILE: {}}}},
    )
    async def root_crl(request: Request) -> Response:
        crl = ca.root_crl
        if crl is None:
            raise Internal("the root CA has no CRL yet")
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        der = crl.public_bytes(serialization.Encoding.DER)
        return _crl_response(der, number, format_datetime(crl.last_update_utc, usegmt=True), _wants_pem(request))

    async def answer(der: bytes) -> Response:
        cached = ocsp.answer_cached(der)
        if cached is None:
            cached = await asyncio.to_thread(ocsp.answer, der)
        return _ocsp_response(cached)

    @router.post(
        "/ocsp",
        response_class=Response,
        summary="OCSP (RFC 6960), request in the body (application/ocsp-request)",
        responses={200: {"content": {OCSP_RESPONSE: {}}}},
    )
    async def ocsp_post(request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_OCSP_REQUEST):
            return _ocsp_response(OCSPAnswer(MALFORMED_RESPONSE, "malformed"))
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_OCSP_REQUEST:
                return _ocsp_response(OCSPAnswer(MALFORMED_RESPONSE, "malformed"))
        return await answer(bytes(body))

    @router.get(
        "/ocsp/{encoded:path}",
        response_class=Response,
        summary="OCSP (RFC 6960 A.1), the DER request base64- and URL-encoded in the path",
        responses={200: {"content": {OCSP_RESPONSE: {}}}},
    )
    async def ocsp_get(encoded: str, request: Request) -> Response:
        # The raw path: base64 may hold '/' and '+', which path decoding must not touch twice.
        raw = request.scope.get("raw_path", b"").decode("latin-1").split("/ocsp/", 1)[-1]
        text = urllib.parse.unquote(raw or encoded)
        try:
            der = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            return _ocsp_response(OCSPAnswer(MALFORMED_RESPONSE, "malformed"))
        if len(der) > MAX_OCSP_REQUEST:
            return _ocsp_response(OCSPAnswer(MALFORMED_RESPONSE, "malformed"))
        return await answer(der)

    return router
