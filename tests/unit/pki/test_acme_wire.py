"""RFC 8823's pure parts: the challenge mail, the key authorization, and the check of a reply;
RFC 8555's JWS header rules. Replies are made with the standard library's email package, the JWS
with certbot's acme package (acme.jws), so neither side is ours."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default

import josepy as jose
import pytest
from acme import jws as acme_jws
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mailkms.errors import ACMEBadSignatureAlgorithm, ACMEIncorrectResponse, BadJWS, BadSignature
from mailkms.pki import _acme as wire
from tests.acme_support import DKIMSigner

MAILBOX = "alice@example.org"
MESSAGE_ID = "<acme-1@kms.example.org>"
PART1, PART2, THUMB = "part-one-token", "part-two-token", "thumbprint"


def reply_bytes(
    sender: str = MAILBOX,
    subject: str = f"Re: ACME: {PART1}",
    in_reply_to: str | None = MESSAGE_ID,
    response: str | None = None,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "acme-challenge@kms.example.org"
    msg["Subject"] = subject
    if in_reply_to is not None:
        msg["In-Reply-To"] = in_reply_to
    body = response if response is not None else wire.expected_response(PART1, PART2, THUMB)
    msg.set_content(f"Hello\n\n{wire.RESPONSE_BEGIN}\n{body}\n{wire.RESPONSE_END}\n")
    return msg.as_bytes()


def check(data: bytes) -> None:
    wire.check_reply(
        wire.read_reply(data),
        mailbox=MAILBOX,
        message_id=MESSAGE_ID,
        token_part1=PART1,
        response=wire.expected_response(PART1, PART2, THUMB),
        same=hmac.compare_digest,
    )


def test_expected_response_is_the_digest_of_the_key_authorization() -> None:
    digest = hashlib.sha256(f"{PART1}{PART2}.{THUMB}".encode()).digest()
    assert wire.expected_response(PART1, PART2, THUMB) == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_a_good_reply_passes() -> None:
    check(reply_bytes())
    check(reply_bytes(sender=f"Alice <{MAILBOX.upper()}>", subject=f"AW: RE: ACME: {PART1}"))


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"sender": "mallory@example.org"}, "came from mallory@example.org"),
        ({"sender": f"{MAILBOX}, mallory@example.org"}, "no single address"),
        ({"subject": "Re: ACME: another-token"}, "Subject"),
        ({"subject": "Re: your certificate"}, "Subject"),
        ({"in_reply_to": "<other@kms.example.org>"}, "In-Reply-To"),
        ({"in_reply_to": None}, "In-Reply-To"),
        ({"response": "wrong-response"}, "does not match"),
    ],
    ids=["wrong-from", "two-from", "wrong-token", "no-token", "wrong-in-reply-to", "no-in-reply-to", "wrong-response"],
)
def test_a_bad_reply_is_an_incorrect_response(kwargs: dict[str, str | None], says: str) -> None:
    with pytest.raises(ACMEIncorrectResponse) as refused:
        check(reply_bytes(**kwargs))  # type: ignore[arg-type]
    assert says in refused.value.detail


def test_a_reply_without_the_block_is_refused() -> None:
    msg = EmailMessage()
    msg["From"], msg["Subject"], msg["In-Reply-To"] = MAILBOX, f"Re: ACME: {PART1}", MESSAGE_ID
    msg.set_content("I agree")
    with pytest.raises(ACMEIncorrectResponse, match="no ACME RESPONSE"):
        check(msg.as_bytes())


def test_which_mails_answer_a_challenge() -> None:
    assert wire.answers(wire.read_reply(reply_bytes(in_reply_to=None)), MESSAGE_ID, PART1)  # by the Subject
    assert wire.answers(wire.read_reply(reply_bytes(subject="Re: hi")), MESSAGE_ID, PART1)  # by In-Reply-To
    assert not wire.answers(wire.read_reply(reply_bytes(subject="hi", in_reply_to=None)), MESSAGE_ID, PART1)


def test_the_challenge_mail() -> None:
    data = wire.challenge_mail(
        sender="acme-challenge@kms.example.org",
        recipient=MAILBOX,
        token_part1=PART1,
        message_id=MESSAGE_ID,
        now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        directory_url="https://kms.example.org/acme/directory",
    )
    msg = BytesParser(policy=default).parsebytes(data)
    assert msg["Subject"] == f"ACME: {PART1}"
    assert msg["Auto-Submitted"] == "auto-generated; type=acme"
    assert msg["Message-ID"] == MESSAGE_ID and msg["To"] == MAILBOX


def signed(key: jose.JWK, alg: jose.JWASignature, *, kid: str | None = None, payload: bytes = b"{}") -> dict[str, str]:
    jws = acme_jws.JWS.sign(payload, key=key, alg=alg, nonce=b"nonce", url="https://kms/acme/x", kid=kid)
    return dict(json.loads(jws.json_dumps()))


@pytest.mark.parametrize(
    ("key", "alg"),
    [
        (jose.JWKRSA(key=rsa.generate_private_key(65537, 2048)), jose.RS256),
        (jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1())), jose.ES256),
        (jose.JWKEC(key=ec.generate_private_key(ec.SECP384R1())), jose.ES384),
    ],
    ids=["RS256", "ES256", "ES384"],
)
def test_jws_from_the_acme_package_verifies(key: jose.JWK, alg: jose.JWASignature) -> None:
    body = signed(key, alg)
    header = wire.read_header(body)
    account = wire.load_account_key(header.jwk or {})
    assert wire.verify_jws(body, account, header) == b"{}"
    assert wire.thumbprint(account) == jose.b64encode(key.thumbprint()).decode()  # RFC 7638, as certbot has it
    forged = dict(body, signature=signed(key, alg, payload=b'{"x":1}')["signature"])
    with pytest.raises(BadSignature):
        wire.verify_jws(forged, account, wire.read_header(forged))


def test_header_rules() -> None:
    key = jose.JWKRSA(key=rsa.generate_private_key(65537, 2048))
    body = signed(key, jose.RS256)
    header = json.loads(base64.urlsafe_b64decode(body["protected"] + "=="))
    for change, error in (
        ({"alg": "HS256"}, ACMEBadSignatureAlgorithm),
        ({"alg": "none"}, ACMEBadSignatureAlgorithm),
        ({"kid": "https://kms/acme/account/1"}, BadJWS),  # jwk and kid both
        ({"nonce": None}, BadJWS),
    ):
        changed = {k: v for k, v in {**header, **change}.items() if v is not None}
        protected = base64.urlsafe_b64encode(json.dumps(changed).encode()).rstrip(b"=").decode()
        with pytest.raises(error):
            wire.read_header(dict(body, protected=protected))
    small = jose.JWKRSA(key=rsa.generate_private_key(65537, 1024))
    with pytest.raises(BadJWS, match="2048"):
        wire.load_account_key(wire.read_header(signed(small, jose.RS256)).jwk or {})
    with pytest.raises(BadJWS):
        wire.read_header({"payload": "", "signature": ""})


def test_dkim_of_the_from_domain_passes_and_nothing_else_does() -> None:
    own, other = DKIMSigner("example.org"), DKIMSigner("elsewhere.test")
    data = reply_bytes().replace(b"\n", b"\r\n")
    signed_mail = own.sign(data)
    assert wire.dkim_aligned(signed_mail, "example.org", own.dns)
    assert wire.dkim_aligned(signed_mail, "mail.example.org", own.dns)  # a parent domain's signature aligns
    assert not wire.dkim_aligned(data, "example.org", own.dns)  # unsigned
    assert not wire.dkim_aligned(other.sign(data), "example.org", other.dns)  # signed, by another domain
    tampered = signed_mail.replace(b"BEGIN ACME RESPONSE-----\r\n", b"BEGIN ACME RESPONSE-----\r\nX")
    assert not wire.dkim_aligned(tampered, "example.org", own.dns)  # body changed after signing
    assert not wire.dkim_aligned(signed_mail, "example.org", other.dns)  # the DNS key is another's
    with pytest.raises(ACMEIncorrectResponse, match="DKIM"):
        wire.check_reply(
            wire.read_reply(data),
            mailbox=MAILBOX,
            message_id=MESSAGE_ID,
            token_part1=PART1,
            response=wire.expected_response(PART1, PART2, THUMB),
            same=hmac.compare_digest,
            dkim_ok=False,
        )
