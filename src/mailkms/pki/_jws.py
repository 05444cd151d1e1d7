"""Signed requests in the style of ACME (RFC 8555 §6.2): flattened JWS (RFC 7515) with the
signer's certificate chain in `x5c`, a server nonce and the request URL in the protected
header. joserfc does the JOSE work."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws
from joserfc.errors import BadSignatureError, ExceededSizeError, JoseError
from joserfc.jwk import ECKey, RSAKey
from joserfc.jws import FlattenedJSONSerialization
from joserfc.registry import HeaderParameter

from mailkms.errors import BadJWS, BadSignature
from mailkms.pki._keys import PrivateKey


class _Registry(jws.JWSRegistry):
    # joserfc caps the protected header at 512 bytes, but one x5c certificate is about 1 kB:
    # with the default every real request failed as a "bad signature". 32 KiB holds a chain of
    # RSA-4096 certificates and still bounds what an unauthenticated caller can make us parse.
    max_header_length = 32 * 1024


_REGISTRY = _Registry(
    header_registry={
        "nonce": HeaderParameter("server nonce", "str", True),
        "url": HeaderParameter("request URL", "str", True),
    },
    algorithms=["RS256", "ES256", "ES384"],
)


def _alg_for(key: PrivateKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    return "ES384" if key.curve.name == "secp384r1" else "ES256"


def _jwk(key: Any) -> RSAKey | ECKey:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return RSAKey.import_key(key)
    return ECKey.import_key(key)


def sign_request(
    key: PrivateKey,
    chain: Sequence[x509.Certificate],
    nonce: str,
    url: str,
    payload: dict[str, object],
) -> dict[str, str]:
    x5c = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain]
    protected = {"alg": _alg_for(key), "x5c": x5c, "nonce": nonce, "url": url}
    body = json.dumps(payload, sort_keys=True).encode()
    result = jws.serialize_json({"protected": protected}, body, _jwk(key), registry=_REGISTRY)
    return dict(result)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SignedRequest:
    nonce: str
    url: str
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    payload: dict[str, object]


def _b64url_json(value: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise BadJWS(f"the protected header cannot be decoded ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise BadJWS("the protected header is not a JSON object")
    return data


def verify_request(body: object) -> SignedRequest:
    """Verify the JWS with the key of the first x5c certificate. Trust is the caller's to decide."""
    if not isinstance(body, dict) or not all(k in body for k in ("protected", "payload", "signature")):
        raise BadJWS("expected a flattened JWS: {protected, payload, signature}")
    if len(str(body["protected"])) > _REGISTRY.max_header_length:
        raise BadJWS("the signed request is too large")
    header = _b64url_json(str(body["protected"]))
    x5c = header.get("x5c")
    if not isinstance(x5c, list) or not x5c:
        raise BadJWS("the protected header has no x5c certificate chain")
    for name in ("nonce", "url", "alg"):
        if not isinstance(header.get(name), str):
            raise BadJWS(f"the protected header has no {name}")
    try:
        chain = tuple(x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in x5c)
    except (binascii.Error, ValueError, TypeError):
        raise BadJWS("an x5c entry is not a base64 DER certificate") from None
    public = chain[0].public_key()
    if not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise BadJWS("unsupported key type in x5c")
    if header["alg"] != _alg_for(public):
        raise BadJWS(f"algorithm {header['alg']} does not fit the certificate's key")
    try:
        flattened: FlattenedJSONSerialization = {
            "protected": str(body["protected"]),
            "payload": str(body["payload"]),
            "signature": str(body["signature"]),
        }
        verified = jws.deserialize_json(
            flattened,
            _jwk(public),
            registry=_REGISTRY,
        )
    except ExceededSizeError:
        raise BadJWS("the signed request is too large") from None
    except BadSignatureError:
        raise BadSignature("the request's signature does not verify") from None
    except JoseError as exc:
        raise BadJWS(f"the signed request is not acceptable ({exc.error})") from None
    except (ValueError, TypeError) as exc:
        raise BadJWS(f"the signed request cannot be read ({exc.__class__.__name__})") from None
    try:
        payload = json.loads(verified.payload)
    except ValueError:
        raise BadJWS("the payload is not JSON") from None
    if not isinstance(payload, dict):
        raise BadJWS("the payload is not a JSON object")
    return SignedRequest(str(header["nonce"]), str(header["url"]), chain[0], chain, payload)
