"""CRL and OCSP over plain http (the S/MIME BR want http for CDP and AIA) and https.

The paths are the ones `PublicURLs` writes into certificates: /crl/issuing.crl, /crl/root.crl,
/crl/infrastructure.crl (the TLS certificate's CDP),
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
from starlette.types import ASGIApp, Receive, Scope, Send

from mailkms import metrics
from mailkms.errors import CRLNotFound, Internal
from mailkms.pki import MALFORMED_RESPONSE, TRY_LATER_RESPONSE, crl_number
from mailkms.services import CRLView, OCSPAnswer, OCSPResponder, Services, partition_scope

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


def _whole_crl(crl: x509.CertificateRevocationList, request: Request) -> Response:
    der = crl.public_bytes(serialization.Encoding.DER)
    return _crl_response(der, crl_number(crl), format_datetime(crl.last_update_utc, usegmt=True), _wants_pem(request))


def revocation_router(services: Services) -> APIRouter:
    router = APIRouter(tags=["revocation"])
    revocation = services.revocation
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
        "/crl/issuing/{partition}.crl",
        response_class=Response,
        summary="CRL of one partition of the issuing CA's certificates (the URL in their CDP; DER, or PEM as above)",
        responses={200: {"content": {PKIX_CRL: {}, PEM_FILE: {}}}, 404: {}},
    )
    async def partition_crl(partition: int, request: Request) -> Response:
        scope = partition_scope(partition)
        view = revocation.latest_of(scope) or await asyncio.to_thread(revocation.refresh_scope, scope)
        if view is None:
            raise CRLNotFound(f"there is no CRL partition {partition}")
        return _crl_response(view.der, view.number, format_datetime(view.this_update, usegmt=True), _wants_pem(request))

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
        return _whole_crl(crl, request)

    @router.get(
        "/crl/infrastructure.crl",
        response_class=Response,
        summary="CRL of the infrastructure CA, covering the server's TLS certificates (DER, or PEM as above)",
        responses={200: {"content": {PKIX_CRL: {}, PEM_FILE: {}}}, 404: {}},
    )
    async def infrastructure_crl(request: Request) -> Response:
        crl = ca.infrastructure_crl
        if crl is None:
            raise CRLNotFound("this server has no infrastructure CA (its TLS certificate comes from the root)")
        return _whole_crl(crl, request)

    return router


def _decode_get(raw_path: bytes) -> bytes | None:
    """RFC 6960 A.1: GET {url}/{url-encoding of base-64 encoding of the DER request}."""
    text = urllib.parse.unquote(raw_path.decode("latin-1").split("/ocsp/", 1)[-1])
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


class OCSPEndpoint:
    """/ocsp (POST) and /ocsp/<request> (GET) as a bare ASGI layer in front of the app.

    A cached answer costs a dictionary lookup; the framework's routing, validation and
    request-id middleware would cost several times that, so OCSP does not go through them.
    A miss goes to the responder's own bounded threads (store look-up, signature); when they are
    busy and their queue is full the answer is `tryLater` at once. Everything else passes on to `app`.
    """

    def __init__(self, app: ASGIApp, services: Services | None = None, responder: OCSPResponder | None = None) -> None:
        self._app = app
        found = responder or (services.ocsp if services is not None else None)
        if found is None:
            raise Internal("OCSPEndpoint needs the services or a responder")
        self._ocsp = found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != "/ocsp" and not path.startswith("/ocsp/"):
            await self._app(scope, receive, send)
            return
        method = scope["method"]
        der: bytes | None
        if path == "/ocsp" and method == "POST":
            der = await _read_body(scope, receive)
        elif path.startswith("/ocsp/") and method in ("GET", "HEAD"):
            der = _decode_get(scope.get("raw_path") or path.encode())
        else:
            await _send(send, 405, b"", [(b"allow", b"POST" if path == "/ocsp" else b"GET")])
            return
        answer: OCSPAnswer | None = None
        if der is None or len(der) > MAX_OCSP_REQUEST:
            answer = OCSPAnswer(MALFORMED_RESPONSE, "malformed")
        else:
            answer = self._ocsp.answer_cached(der)
        if answer is None:
            assert der is not None
            future = self._ocsp.submit(der)  # a store look-up and perhaps a signature, on the OCSP threads
            answer = OCSPAnswer(TRY_LATER_RESPONSE, "tryLater") if future is None else await asyncio.wrap_future(future)
        metrics.OCSP_REQUESTS.labels(status=answer.status).inc()
        cache = (
            f"public, max-age={answer.max_age}, no-transform, must-revalidate" if answer.max_age else "no-store"
        ).encode()
        await _send(
            send,
            200,
            b"" if method == "HEAD" else answer.der,
            [(b"content-type", OCSP_RESPONSE.encode()), (b"cache-control", cache)],
            length=len(answer.der),
        )


async def _read_body(scope: Scope, receive: Receive) -> bytes | None:
    """The body, or None past MAX_OCSP_REQUEST (announced or sent)."""
    for name, value in scope.get("headers") or []:
        if name == b"content-length" and (not value.isdigit() or int(value) > MAX_OCSP_REQUEST):
            return None
    body = bytearray()
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > MAX_OCSP_REQUEST:
            return None
    return bytes(body)


async def _send(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], length: int | None = None
) -> None:
    size = len(body) if length is None else length
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(size).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
