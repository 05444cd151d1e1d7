"""Talking to the server over HTTPS, trusting only the pinned root."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import quote

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from mailkms.errors import FingerprintMismatch, Malformed, ServerNotPinned, ServerRefused, ServerUnreachable
from mailkms.pki import fingerprint_sha256, normalise_fingerprint


def _client(server: str, verify: ssl.SSLContext | bool) -> httpx.Client:
    return httpx.Client(base_url=server.rstrip("/"), verify=verify, timeout=30.0)


def fetch_pinned_root(server: str, fingerprint: str) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """First contact: TLS is not yet trusted, so the root is accepted only if its SHA-256 matches."""
    want = normalise_fingerprint(fingerprint)
    try:
        with _client(server, verify=False) as http:
            resp = http.get("/api/v1/ca/chain")
    except httpx.HTTPError as exc:
        raise ServerUnreachable(f"cannot reach {server}: {exc}") from None
    if resp.status_code != 200:
        raise ServerUnreachable(f"{server} did not give its CA chain (HTTP {resp.status_code})")
    try:
        chain = x509.load_pem_x509_certificates(resp.content)
    except ValueError:
        raise Malformed("the server's CA chain is not PEM") from None
    for cert in chain:
        if fingerprint_sha256(cert) == want:
            if not _is_self_signed(cert):
                # the issuing CA's fingerprint would pin a CA the server's TLS chain never ends in
                raise FingerprintMismatch(
                    "the fingerprint you were given is of an intermediate CA, not of the root: "
                    "ask your administrator for the output of `mailkms ca fingerprint`"
                )
            return cert, chain
    raise FingerprintMismatch(
        "the server's root CA does not match the fingerprint you were given: do not trust this server"
    )


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def pinned_context(root: x509.Certificate) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=root.public_bytes(serialization.Encoding.PEM).decode())
    return ctx


def _verify_failure(exc: BaseException) -> str | None:
    """OpenSSL's reason when the TLS handshake failed on the certificate (another CA, another
    host name), found in the chain of exceptions httpx raises from; None for any other failure."""
    seen: BaseException | None = exc
    for _ in range(16):  # a chain of causes can loop; httpx's is a few links long
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message or seen.reason or "certificate verify failed")
        seen = seen.__cause__ or seen.__context__
    return None


class Api:
    def __init__(self, server: str, root: x509.Certificate) -> None:
        self.server = server.rstrip("/")
        self._ctx = pinned_context(root)

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            with _client(self.server, self._ctx) as http:
                resp = http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            untrusted = _verify_failure(exc)
            if untrusted is not None:
                raise ServerNotPinned(
                    f"the server at {self.server} is not the one you enrolled with: its TLS certificate"
                    f" does not come from your pinned CA ({untrusted}); nothing was sent"
                ) from None
            raise ServerUnreachable(f"cannot reach {self.server}: {exc}") from None
        if resp.status_code >= 400:
            try:
                problem = resp.json()
            except ValueError:
                problem = {"detail": resp.text[:200]}
            raise ServerRefused(resp.status_code, problem if isinstance(problem, dict) else {})
        return resp

    def url(self, path: str) -> str:
        return self.server + path

    def server_info(self) -> dict[str, Any]:
        data = self._call("GET", "/api/v1/server").json()
        assert isinstance(data, dict)
        return data

    def enrol(self, body: dict[str, str]) -> dict[str, Any]:
        data = self._call("POST", "/api/v1/enrolments", json=body).json()
        assert isinstance(data, dict)
        return data

    def nonce(self) -> str:
        resp = self._call("HEAD", "/api/v1/nonce")
        value = resp.headers.get("Replay-Nonce")
        if not value:
            raise Malformed("the server gave no Replay-Nonce")
        return str(value)

    def post_signed(self, path: str, jws: dict[str, str]) -> dict[str, Any]:
        data = self._call("POST", path, json=jws, headers={"Content-Type": "application/jose+json"}).json()
        assert isinstance(data, dict)
        return data

    def ca_chain(self) -> bytes:
        """Issuing then root CA certificate, PEM."""
        return self._call("GET", "/api/v1/ca/chain").content

    def issuing_ca(self, key_id: str) -> bytes:
        """The issuing CA certificate of the key `key_id` (hex SKI), current or replaced by a rekey; DER."""
        return self._call("GET", f"/ca/issuing/{quote(key_id, safe='')}.crt").content

    def directory(self, address: str) -> bytes:
        """A colleague's current encryption certificate (and its issuer), certs-only PKCS#7 DER."""
        resp = self._call(
            "GET", f"/api/v1/directory/{quote(address, safe='@')}", headers={"Accept": "application/pkcs7-mime"}
        )
        return resp.content
