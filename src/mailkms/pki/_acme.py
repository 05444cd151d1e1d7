"""ACME's pure parts: the JWS of RFC 8555 §6.2 (account key by `jwk` or `kid`, joserfc does the
JOSE work), and RFC 8823's email-reply-00 challenge: the challenge mail, the key authorization,
and the check of the reply (the standard library's email package reads the mail). No I/O."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.policy
import email.utils
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

from joserfc import jws
from joserfc.errors import BadSignatureError, ExceededSizeError, JoseError
from joserfc.jwk import ECKey, JWKRegistry, RSAKey
from joserfc.jws import FlattenedJSONSerialization
from joserfc.registry import HeaderParameter

from mailkms.errors import ACMEBadSignatureAlgorithm, ACMEIncorrectResponse, BadJWS, BadSignature

ALGORITHMS = ("RS256", "ES256", "ES384")
RESPONSE_BEGIN = "-----BEGIN ACME RESPONSE-----"
RESPONSE_END = "-----END ACME RESPONSE-----"
_RESPONSE = re.compile(re.escape(RESPONSE_BEGIN) + r"\s*([A-Za-z0-9_-]+)\s*" + re.escape(RESPONSE_END))


class _Registry(jws.JWSRegistry):
    max_header_length = 16 * 1024  # an RSA-4096 jwk is about 1 kB


_REGISTRY = _Registry(
    header_registry={
        "nonce": HeaderParameter("server nonce", "str", True),
        "url": HeaderParameter("request URL", "str", True),
    },
    algorithms=list(ALGORITHMS),
)
# keyChange's inner JWS (RFC 8555 §7.3.5): signed by the new key, with a url and no nonce
_INNER_REGISTRY = _Registry(
    header_registry={"url": HeaderParameter("request URL", "str", True)},
    algorithms=list(ALGORITHMS),
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


@dataclass(frozen=True)
class ACMEHeader:
    """The protected header, read before the signature is checked (to find the key)."""

    alg: str
    nonce: str
    url: str
    jwk: dict[str, Any] | None
    kid: str | None


def read_header(body: object, *, inner: bool = False) -> ACMEHeader:
    """The protected header; `inner`: keyChange's inner JWS, which has a jwk and no nonce."""
    if not isinstance(body, dict) or not all(
        isinstance(body.get(k), str) for k in ("protected", "payload", "signature")
    ):
        raise BadJWS("expected a flattened JWS: {protected, payload, signature}")
    if len(body["protected"]) > _REGISTRY.max_header_length:
        raise BadJWS("the protected header is too large")
    try:
        header = json.loads(b64url_decode(body["protected"]))
    except (binascii.Error, ValueError):
        raise BadJWS("the protected header cannot be decoded") from None
    if not isinstance(header, dict):
        raise BadJWS("the protected header is not a JSON object")
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise ACMEBadSignatureAlgorithm(f"algorithm {alg!r} is not supported", algorithms=" ".join(ALGORITHMS))
    for name in ("url",) if inner else ("nonce", "url"):
        if not isinstance(header.get(name), str):
            raise BadJWS(f"the protected header has no {name}")
    jwk, kid = header.get("jwk"), header.get("kid")
    if inner and ("nonce" in header or jwk is None):
        raise BadJWS("the inner JWS of keyChange has the new key's jwk and no nonce")
    if (jwk is None) == (kid is None):
        raise BadJWS("the protected header must have exactly one of jwk and kid")
    if jwk is not None and not isinstance(jwk, dict):
        raise BadJWS("jwk is not a JSON object")
    if kid is not None and not isinstance(kid, str):
        raise BadJWS("kid is not a string")
    return ACMEHeader(str(alg), str(header.get("nonce", "")), header["url"], jwk, kid)


def load_account_key(jwk: dict[str, Any]) -> RSAKey | ECKey:
    """A public account key from its JWK (RSA of 2048 bits or more, P-256, P-384)."""
    try:
        key = JWKRegistry.import_key(jwk)
    except (JoseError, ValueError, TypeError, KeyError):
        raise BadJWS("the jwk cannot be read as a public key") from None
    if isinstance(key, RSAKey):
        if key.raw_value.key_size < 2048:
            raise BadJWS("RSA account keys must have at least 2048 bits")
        return key
    if isinstance(key, ECKey) and key.curve_name in ("P-256", "P-384"):
        return key
    raise BadJWS("account keys are RSA, P-256 or P-384")


def thumbprint(key: RSAKey | ECKey) -> str:
    """RFC 7638 SHA-256 thumbprint, base64url."""
    return str(key.thumbprint())


def public_jwk(key: RSAKey | ECKey) -> dict[str, Any]:
    return dict(key.as_dict(private=False))


def verify_jws(body: dict[str, str], key: RSAKey | ECKey, header: ACMEHeader, *, inner: bool = False) -> bytes:
    """The payload ("" for POST-as-GET) once the signature verifies with `key`."""
    expected = "RS256" if isinstance(key, RSAKey) else ("ES384" if key.curve_name == "P-384" else "ES256")
    if header.alg != expected:
        raise ACMEBadSignatureAlgorithm(f"algorithm {header.alg} does not fit the account key ({expected})")
    flattened: FlattenedJSONSerialization = {
        "protected": body["protected"],
        "payload": body["payload"],
        "signature": body["signature"],
    }
    try:
        verified = jws.deserialize_json(flattened, key, registry=_INNER_REGISTRY if inner else _REGISTRY)
    except ExceededSizeError:
        raise BadJWS("the signed request is too large") from None
    except BadSignatureError:
        raise BadSignature("the JWS signature does not verify with the account key") from None
    except JoseError as exc:
        raise BadJWS(f"the signed request is not acceptable ({exc.error})") from None
    except (ValueError, TypeError) as exc:
        raise BadJWS(f"the signed request cannot be read ({exc.__class__.__name__})") from None
    return bytes(verified.payload)


def key_authorization(token_part1: str, token_part2: str, account_thumbprint: str) -> str:
    """RFC 8823 §3: the token is part 1 || part 2; key authorization = token "." thumbprint."""
    return f"{token_part1}{token_part2}.{account_thumbprint}"


def expected_response(token_part1: str, token_part2: str, account_thumbprint: str) -> str:
    """What the reply carries between the ACME RESPONSE lines: base64url(SHA-256(key authorization))."""
    digest = hashlib.sha256(key_authorization(token_part1, token_part2, account_thumbprint).encode()).digest()
    return b64url(digest)


def challenge_mail(
    *, sender: str, recipient: str, token_part1: str, message_id: str, now: dt.datetime, directory_url: str
) -> bytes:
    """The challenge mail of RFC 8823 §3.1: Subject "ACME: <token-part1>", Auto-Submitted type=acme."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = f"ACME: {token_part1}"
    msg["Date"] = email.utils.format_datetime(now)
    msg["Message-ID"] = message_id
    msg["Auto-Submitted"] = "auto-generated; type=acme"
    msg.set_content(
        "This mail is an ACME challenge (RFC 8823) for an S/MIME certificate for this address,\n"
        f"requested through {directory_url}.\n\n"
        "If you did not ask for a certificate, ignore this mail: nothing is issued without a reply.\n"
        "Your ACME client answers it by replying from this mailbox.\n"
    )
    return msg.as_bytes()


@dataclass(frozen=True)
class Reply:
    """A mail that answers (or claims to answer) a challenge, read with the email package."""

    sender: str  # the From address, lower-case
    subject: str
    in_reply_to: tuple[str, ...]
    response: str | None


def read_reply(data: bytes) -> Reply:
    msg = BytesParser(policy=email.policy.default).parsebytes(data)
    addresses = email.utils.getaddresses([str(v) for v in msg.get_all("From", [])])
    sender = addresses[0][1].strip().lower() if len(addresses) == 1 else ""
    in_reply_to = tuple(re.findall(r"<[^<>\s]+>", str(msg.get("In-Reply-To", ""))))
    text = ""
    if isinstance(msg, EmailMessage):
        part = msg.get_body(preferencelist=("plain",))
        if part is not None and isinstance(part, EmailMessage):
            text = str(part.get_content())
    found = _RESPONSE.search(text)
    return Reply(sender, str(msg.get("Subject", "")), in_reply_to, found.group(1) if found else None)


def answers(reply: Reply, message_id: str, token_part1: str) -> bool:
    """Whether the mail is a reply to this challenge at all (In-Reply-To, or the Subject's token)."""
    return message_id in reply.in_reply_to or subject_token(reply.subject) == token_part1


def subject_token(subject: str) -> str | None:
    found = re.fullmatch(r"\s*(?:(?:re|aw|sv)\s*:\s*)*ACME:\s*([A-Za-z0-9_-]+)\s*", subject, re.IGNORECASE)
    return found.group(1) if found else None


DNSLookup = Callable[..., bytes | None]  # dkimpy's dnsfunc: (name, timeout=...) -> the TXT record


def dkim_aligned(data: bytes, domain: str, dns: DNSLookup | None = None) -> bool:
    """Whether a DKIM signature of the mail verifies (dkimpy; the key from `dns`, else the real
    DNS) and is the From domain's own: d= is that domain or a parent of it (relaxed alignment)."""
    import dkim

    headers = BytesParser(policy=email.policy.default).parsebytes(data, headersonly=True)
    verifier = dkim.DKIM(data)
    domain = domain.lower()
    for index in range(len(headers.get_all("DKIM-Signature", []))):
        try:
            ok = verifier.verify(index, dnsfunc=dns) if dns is not None else verifier.verify(index)
        except dkim.DKIMException:
            continue
        signer = (verifier.domain or b"").decode("ascii", "replace").lower()
        if ok and signer and (domain == signer or domain.endswith("." + signer)):
            return True
    return False


def check_reply(
    reply: Reply,
    *,
    mailbox: str,
    message_id: str,
    token_part1: str,
    response: str,
    same: Callable[[str, str], bool],
    dkim_ok: bool | None = None,
) -> None:
    """RFC 8823 §3.2: From is the identifier, the Subject carries token part 1, In-Reply-To names
    the challenge mail, and the response is the digest of the key authorization. `dkim_ok`: None
    when DKIM is not asked for, else whether `dkim_aligned` found the From domain's signature."""
    if reply.sender != mailbox.lower():
        raise ACMEIncorrectResponse(f"the reply came from {reply.sender or 'no single address'}, not {mailbox}")
    if dkim_ok is False:
        raise ACMEIncorrectResponse(f"the reply carries no valid DKIM signature of {mailbox.rsplit('@', 1)[-1]}")
    if subject_token(reply.subject) != token_part1:
        raise ACMEIncorrectResponse("the reply's Subject does not carry the challenge's token")
    if message_id not in reply.in_reply_to:
        raise ACMEIncorrectResponse("the reply's In-Reply-To does not name the challenge mail")
    if reply.response is None:
        raise ACMEIncorrectResponse("the reply has no ACME RESPONSE block")
    if not same(reply.response, response):
        raise ACMEIncorrectResponse("the reply's response does not match the key authorization")


__all__ = [
    "ALGORITHMS",
    "RESPONSE_BEGIN",
    "RESPONSE_END",
    "ACMEHeader",
    "DNSLookup",
    "Reply",
    "answers",
    "b64url",
    "b64url_decode",
    "challenge_mail",
    "check_reply",
    "dkim_aligned",
    "expected_response",
    "key_authorization",
    "load_account_key",
    "public_jwk",
    "read_header",
    "read_reply",
    "subject_token",
    "thumbprint",
    "verify_jws",
]
