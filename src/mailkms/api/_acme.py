"""ACME (RFC 8555) at /acme/ with RFC 8823's email identifier: thin handlers over services.ACME.

Every answer carries a fresh Replay-Nonce and a Link to the directory (RFC 8555 §6.5, §7.1).
Refusals are problem documents with `urn:ietf:params:acme:error:*` types; this module is the one
mapping from mailkms errors to them (most specific class first)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from mailkms.api._est import read_body
from mailkms.api._problems import PROBLEM_JSON, count_refusal
from mailkms.errors import (
    ACMEAccountDoesNotExist,
    ACMEBadSignatureAlgorithm,
    ACMEIncorrectResponse,
    ACMEKeyInUse,
    ACMENotFound,
    ACMEOrderNotReady,
    ACMERejectedIdentifier,
    ACMEUnsupportedIdentifier,
    AlreadyRevoked,
    BadCSR,
    BadKey,
    BadNonce,
    BadRevocationReason,
    BadSignature,
    MailkmsError,
    Malformed,
    NotFound,
    PolicyRefused,
    RateLimited,
    Unauthorized,
    UnsupportedMediaType,
)
from mailkms.services import ACME, AccountView, AuthzView, OrderView, Services, Verified

log = logging.getLogger("mailkms.api.acme")

PREFIX = "/acme"
JOSE_JSON = "application/jose+json"
PEM_CHAIN = "application/pem-certificate-chain"
MAX_BODY = 64 * 1024
ACME_ERROR = "urn:ietf:params:acme:error:"

# (class, ACME error type, HTTP status); the first class an error is an instance of decides.
_TYPES: tuple[tuple[type[MailkmsError], str, int], ...] = (
    (BadNonce, "badNonce", 400),  # unknown, stale and replayed nonces alike
    (ACMEBadSignatureAlgorithm, "badSignatureAlgorithm", 400),
    (BadSignature, "malformed", 400),  # as Boulder: "JWS verification error"
    (ACMEAccountDoesNotExist, "accountDoesNotExist", 400),
    (ACMEUnsupportedIdentifier, "unsupportedIdentifier", 400),
    (ACMERejectedIdentifier, "rejectedIdentifier", 400),
    (ACMEIncorrectResponse, "incorrectResponse", 403),
    (ACMEOrderNotReady, "orderNotReady", 403),
    (ACMEKeyInUse, "malformed", 409),
    (AlreadyRevoked, "alreadyRevoked", 400),
    (BadRevocationReason, "badRevocationReason", 400),
    (BadKey, "badPublicKey", 400),
    (BadCSR, "badCSR", 400),
    (RateLimited, "rateLimited", 429),
    (ACMENotFound, "malformed", 404),
    (NotFound, "malformed", 404),
    (UnsupportedMediaType, "malformed", 415),
    (Unauthorized, "unauthorized", 403),  # url mismatch and the like
    (PolicyRefused, "unauthorized", 403),
    (Malformed, "malformed", 400),
)
_BY_CODE = {cls.code: kind for cls, kind, _ in _TYPES}


def acme_type(exc: MailkmsError) -> tuple[str, int]:
    for cls, kind, status in _TYPES:
        if isinstance(exc, cls):
            return ACME_ERROR + kind, status
    return ACME_ERROR + "serverInternal", 500


def _stored_problem(error: dict[str, object] | None) -> dict[str, object] | None:
    """A problem stored with an order or challenge ({code, detail}) as an ACME problem document."""
    if error is None:
        return None
    kind = _BY_CODE.get(str(error.get("code")), "serverInternal")
    return {"type": ACME_ERROR + kind, "detail": error.get("detail", "")}


def _time(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


class _URLs:
    def __init__(self, request: Request) -> None:
        self.base = str(request.base_url).rstrip("/") + PREFIX

    def directory(self) -> str:
        return f"{self.base}/directory"

    def account_prefix(self) -> str:
        return f"{self.base}/account/"

    def orders(self, account_id: str) -> str:
        return f"{self.base}/account/{account_id}/orders"

    def order(self, order_id: str) -> str:
        return f"{self.base}/order/{order_id}"

    def authz(self, authz_id: str) -> str:
        return f"{self.base}/authz/{authz_id}"

    def challenge(self, challenge_id: str) -> str:
        return f"{self.base}/chall/{challenge_id}"


def acme_router(services: Services) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["acme"])
    acme: ACME = services.acme

    def headers(request: Request, **extra: str) -> dict[str, str]:
        index = f'<{_URLs(request).directory()}>;rel="index"'
        link = f"{index}, {extra.pop('Link')}" if "Link" in extra else index
        return {"Replay-Nonce": acme.new_nonce(), "Link": link, "Cache-Control": "no-store", **extra}

    def problem(request: Request, exc: MailkmsError) -> JSONResponse:
        count_refusal(request, exc)
        kind, status = acme_type(exc)
        log.info("ACME refused %s: %s", request.url.path, exc.code)
        body: dict[str, Any] = {"type": kind, "detail": exc.detail, "status": status}
        extra: dict[str, str] = {}
        retry = exc.extra.get("retry_after")
        if isinstance(retry, int | float):
            extra["Retry-After"] = str(int(retry))
        if isinstance(exc, ACMEKeyInUse):  # RFC 8555 §7.3.5: 409 with the account holding the key
            extra["Location"] = _URLs(request).account_prefix() + str(exc.extra.get("account", ""))
        return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers(request, **extra))

    def account_json(urls: _URLs, view: AccountView) -> dict[str, Any]:
        return {"status": view.status, "contact": list(view.contact), "orders": urls.orders(view.id)}

    def order_json(urls: _URLs, view: OrderView) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": view.status,
            "expires": _time(view.expires),
            "identifiers": [{"type": "email", "value": view.mailbox}],
            "authorizations": [urls.authz(view.authz_id)],
            "finalize": urls.order(view.id) + "/finalize",
        }
        if view.has_certificate:
            body["certificate"] = urls.order(view.id) + "/certificate"
        if view.error is not None:
            body["error"] = _stored_problem(view.error)
        return body

    def authz_json(urls: _URLs, view: AuthzView) -> dict[str, Any]:
        ch = view.challenge
        challenge: dict[str, Any] = {
            "type": "email-reply-00",
            "url": urls.challenge(ch.id),
            "status": ch.status,
            "token": ch.token,
            "from": ch.sender,
        }
        if ch.validated is not None:
            challenge["validated"] = _time(ch.validated)
        if ch.error is not None:
            challenge["error"] = _stored_problem(ch.error)
        return {
            "status": view.status,
            "expires": _time(view.expires),
            "identifier": {"type": "email", "value": view.mailbox},
            "challenges": [challenge],
        }

    async def signed(
        request: Request,
        work: Callable[[Verified, _URLs], Response],
        *,
        new_account: bool = False,
        by_jwk: bool = False,
    ) -> Response:
        urls = _URLs(request)
        try:
            media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != JOSE_JSON:
                raise UnsupportedMediaType(f"ACME takes {JOSE_JSON}, not {media or 'nothing'}")
            raw = await read_body(request, MAX_BODY, "ACME")
            try:
                body = json.loads(raw)
            except ValueError:
                raise Malformed("the body is not JSON") from None
            url = str(request.url.replace(query=""))

            def run() -> Response:
                verified = acme.verify(body, url, urls.account_prefix(), new_account=new_account, by_jwk=by_jwk)
                return work(verified, urls)

            return await run_in_threadpool(run)
        except MailkmsError as exc:
            return problem(request, exc)

    def answer(request: Request, body: dict[str, Any], status: int = 200, **extra: str) -> JSONResponse:
        return JSONResponse(body, status_code=status, headers=headers(request, **extra))

    @router.get("/directory", summary="ACME directory (RFC 8555 §7.1.1)")
    def directory(request: Request) -> JSONResponse:
        urls = _URLs(request)
        return JSONResponse(
            {
                "newNonce": f"{urls.base}/new-nonce",
                "newAccount": f"{urls.base}/new-account",
                "newOrder": f"{urls.base}/new-order",
                "revokeCert": f"{urls.base}/revoke-cert",
                "keyChange": f"{urls.base}/key-change",
                "meta": {
                    "website": services.settings.server.effective_public_url,
                    "externalAccountRequired": False,
                },
            }
        )

    @router.api_route("/new-nonce", methods=["GET", "HEAD"], summary="A fresh nonce")
    def new_nonce(request: Request) -> Response:
        status = 204 if request.method == "GET" else 200
        return Response(status_code=status, headers=headers(request))

    @router.post("/new-account", summary="Create or find the account of the JWS's key")
    async def new_account(request: Request) -> Response:
        def work(verified: Verified, urls: _URLs) -> Response:
            view = acme.new_account(verified)
            body = account_json(urls, view)
            return answer(request, body, 201 if view.created else 200, Location=urls.account_prefix() + view.id)

        return await signed(request, work, new_account=True)

    @router.post("/account/{account_id}", summary="The account (POST-as-GET, contact update or deactivation)")
    async def account(account_id: str, request: Request) -> Response:
        def work(verified: Verified, urls: _URLs) -> Response:
            if verified.account_id != account_id:
                raise Unauthorized("the JWS was signed by another account")
            view = acme.account(verified)
            return answer(request, account_json(urls, view))

        return await signed(request, work)

    @router.post("/account/{account_id}/orders", summary="The account's orders (RFC 8555 §7.1.2.1)")
    async def orders(account_id: str, request: Request) -> Response:
        def work(verified: Verified, urls: _URLs) -> Response:
            return answer(request, {"orders": [urls.order(o) for o in acme.orders(verified, account_id)]})

        return await signed(request, work)

    @router.post("/key-change", summary="Account key rollover (RFC 8555 §7.3.5)")
    async def key_change(request: Request) -> Response:
        def work(verified: Verified, urls: _URLs) -> Response:
            assert verified.account_id is not None
            account_url = urls.account_prefix() + verified.account_id
            view = acme.key_change(verified, f"{urls.base}/key-change", account_url)
            return answer(request, account_json(urls, view), Location=account_url)

        return await signed(request, work)

    @router.post("/new-order", summary="Order a certificate for one email identifier")
    async def new_order(request: Request) -> Response:
        def work(verified: Verified, urls: _URLs) -> Response:
            view = acme.new_order(verified, urls.directory())
            return answer(request, order_json(urls, view), 201, Location=urls.order(view.id))

        return await signed(request, work)

    @router.post("/order/{order_id}", summary="The order (POST-as-GET)")
    async def order(order_id: str, request: Request) -> Response:
        def work(verified: Verified, urls: _URLs) -> Response:
            return answer(request, order_json(urls, acme.order(verified, order_id)))

        return await signed(request, work)

    @router.post("/order/{order_id}/finalize", summary="Finalize with a CSR naming the mailbox")
    async def finalize(order_id: str, request: Request) -> Response:
        def work(verified: Verified, urls: _URLs) -> Response:
            view = acme.finalize(verified, order_id)
            return answer(request, order_json(urls, view), Location=urls.order(view.id))

        return await signed(request, work)

    @router.post("/order/{order_id}/certificate", summary="The certificate chain, PEM")
    async def certificate(order_id: str, request: Request) -> Response:
        def work(verified: Verified, urls: _URLs) -> Response:
            return Response(acme.certificate(verified, order_id), media_type=PEM_CHAIN, headers=headers(request))

        return await signed(request, work)

    @router.post("/revoke-cert", summary="Revoke a certificate this account ordered, or signed by its own key")
    async def revoke_cert(request: Request) -> Response:
        def work(verified: Verified, urls: _URLs) -> Response:
            acme.revoke(verified)
            return Response(status_code=200, headers=headers(request))

        return await signed(request, work, by_jwk=True)

    @router.post("/authz/{authz_id}", summary="The authorization (POST-as-GET, or deactivation)")
    async def authorization(authz_id: str, request: Request) -> Response:
        def work(verified: Verified, urls: _URLs) -> Response:
            return answer(request, authz_json(urls, acme.authorization(verified, authz_id)))

        return await signed(request, work)

    @router.post("/chall/{challenge_id}", summary="Answer the email-reply-00 challenge ({}), or read it")
    async def challenge(challenge_id: str, request: Request) -> Response:
        def work(verified: Verified, urls: _URLs) -> Response:
            view = acme.challenge(verified, challenge_id)
            body = authz_json(urls, view)["challenges"][0]
            return answer(request, body, Link=f'<{urls.authz(view.id)}>;rel="up"')

        return await signed(request, work)

    return router
