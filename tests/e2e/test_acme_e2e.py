"""ACME for S/MIME end to end: a real `mailkms serve` with [acme] on, certbot's `acme` package as
the client (account, order, nonces, JWS, challenge, finalize, certificate), and the e-mail half
done by the test over the real mail path: the challenge mail read from the Maildir the server's
sink filed it into, the reply sent over SMTP to the server's sink, which files it where the
server reads replies. Judges: pkilint (S/MIME mailbox-validated strict) and `openssl verify`.

Refusals, each an ACME problem document (urn:ietf:params:acme:error:*): a domain not allowed,
a replayed nonce, a bad JWS signature, a reply from the wrong address, a reply with the wrong
response."""

from __future__ import annotations

import base64
import datetime as dt
import email.policy
import email.utils
import hashlib
import json
import smtplib
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import httpx
import josepy as jose
import pytest
import requests
from acme import challenges, client, errors, messages
from acme import jws as acme_jws
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.e2e.conftest import Deployment, init_deployment
from tests.judges import lint_smime

pytestmark = pytest.mark.e2e

EMAIL = messages.IdentifierType("email")  # RFC 8823's identifier type, unknown to the package until named
CHALLENGE_FROM = "acme-challenge@kms.example.org"  # the default: acme-challenge@<host of the public URL>


@challenges.ChallengeResponse.register
class EmailReply00Response(challenges.KeyAuthorizationChallengeResponse):
    """RFC 8823's challenge response: the body sent is {} (the key authorization is left out, as
    for http-01; the proof travels by mail). A response with no field at all would be falsy, and
    the package would send an empty payload (a POST-as-GET) instead of {}."""

    typ = "email-reply-00"


@dataclass
class World:
    dep: Deployment
    root: Path
    directory_url: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("acme")
    dep = init_deployment(tmp / "data")
    dep.server_env.update({"MAILKMS_ACME__ENABLED": "true", "MAILKMS_ACME__ALLOWED_DOMAINS": '["example.org"]'})
    # every test of the module is one client on 127.0.0.1: the default bucket (60 at once, then
    # 120/min per group) ran dry on a slow CI run and one test got 429 instead of its own answer
    dep.server_env["MAILKMS_LIMITS__RATE_BURST"] = "10000"
    certs = x509.load_pem_x509_certificates(dep.admin("ca", "chain").out.encode())
    root = tmp / "root.pem"
    root.write_bytes(certs[-1].public_bytes(serialization.Encoding.PEM))
    dep.start()
    try:
        yield World(dep, root, f"{dep.url}/acme/directory")
    finally:
        dep.stop()


def new_client(world: World, key: jose.JWK | None = None) -> client.ClientV2:
    key = key or jose.JWKRSA(key=rsa.generate_private_key(65537, 2048))
    net = client.ClientNetwork(key, verify_ssl=str(world.root), user_agent="mailkms-tests")
    directory = client.ClientV2.get_directory(world.directory_url, net)
    acme = client.ClientV2(directory, net)
    acme.net.account = acme.new_account(messages.NewRegistration.from_data(terms_of_service_agreed=True))
    return acme


def csr_for(mailbox: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(mailbox)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def email_order(acme: client.ClientV2, mailbox: str) -> messages.OrderResource:
    """ClientV2.new_order for an email identifier (the package derives dns/ip ones from the CSR);
    the same calls it makes, through its own network layer."""
    order = messages.NewOrder(identifiers=[messages.Identifier(typ=EMAIL, value=mailbox)])
    response = acme._post(acme.directory["newOrder"], order)
    body = messages.Order.from_json(response.json())
    authzs = [acme._authzr_from_response(acme._post_as_get(url), uri=url) for url in body.authorizations]
    return messages.OrderResource(
        body=body, uri=response.headers.get("Location"), authorizations=authzs, csr_pem=csr_for(mailbox)
    )


def challenge_mail(dep: Deployment, mailbox: str, seen: int = 0, timeout: float = 30) -> EmailMessage:
    """The newest ACME challenge mail filed for `mailbox` once there are more than `seen`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = []
        for path in sorted(dep.maildir(mailbox).glob("new/*")):
            msg = BytesParser(policy=email.policy.default).parsebytes(path.read_bytes())
            if str(msg["Subject"]).startswith("ACME: "):
                found.append(msg)
        if len(found) > seen:
            assert isinstance(found[-1], EmailMessage)
            return found[-1]
        time.sleep(0.2)
    raise AssertionError(f"no challenge mail for {mailbox}\n{dep.log()[-3000:]}")


def response_for(token1: str, token2: str, key: jose.JWK) -> str:
    """RFC 8823 §3.1: base64url(SHA-256(token-part1 || token-part2 "." thumbprint))."""
    thumbprint = jose.b64encode(key.thumbprint()).decode()
    digest = hashlib.sha256(f"{token1}{token2}.{thumbprint}".encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def reply(dep: Deployment, challenge: EmailMessage, sender: str, response: str) -> None:
    """Reply as RFC 8823 §3.1 asks, over SMTP to the server's sink."""
    with smtplib.SMTP("127.0.0.1", dep.sink_port, timeout=30) as smtp:
        smtp.send_message(reply_message(challenge, sender, response), from_addr=sender, to_addrs=[CHALLENGE_FROM])


def reply_message(challenge: EmailMessage, sender: str, response: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = str(challenge["From"])
    msg["Subject"] = f"Re: {challenge['Subject']}"
    msg["In-Reply-To"] = str(challenge["Message-ID"])
    msg["Message-ID"] = email.utils.make_msgid(domain="example.org")
    msg["Date"] = email.utils.format_datetime(dt.datetime.now(dt.UTC))
    msg.set_content(f"-----BEGIN ACME RESPONSE-----\n{response}\n-----END ACME RESPONSE-----\n")
    return msg


def challenge_of(orderr: messages.OrderResource, sender: str = CHALLENGE_FROM) -> messages.ChallengeBody:
    challb = orderr.authorizations[0].body.challenges[0]
    assert challb.chall.jobj["type"] == "email-reply-00"
    assert challb.chall.jobj["from"] == sender
    return challb


def deadline(seconds: float = 30) -> dt.datetime:
    return dt.datetime.now() + dt.timedelta(seconds=seconds)


def test_acme_issues_a_signing_certificate_after_the_mail_reply(world: World, tmp_path: Path) -> None:
    mailbox = "alice@example.org"
    acme = new_client(world)
    orderr = email_order(acme, mailbox)
    assert orderr.body.status == messages.STATUS_PENDING
    challb = challenge_of(orderr)

    mail = challenge_mail(world.dep, mailbox)
    assert mail["From"] == CHALLENGE_FROM and mail["Auto-Submitted"].startswith("auto-generated; type=acme")
    token1 = str(mail["Subject"]).removeprefix("ACME: ")
    token2 = challb.chall.jobj["token"]
    assert len(base64.urlsafe_b64decode(token1 + "==")) * 8 >= 128
    reply(world.dep, mail, mailbox, response_for(token1, token2, acme.net.key))
    acme.answer_challenge(challb, EmailReply00Response(key_authorization="by-mail"))

    orderr = acme.poll_authorizations(orderr, deadline())
    assert orderr.authorizations[0].body.status == messages.STATUS_VALID
    orderr = acme.finalize_order(orderr, deadline())
    chain = x509.load_pem_x509_certificates(orderr.fullchain_pem.encode())
    cert = chain[0]
    # the account's orders list (RFC 8555 §7.1.2.1; the package has no call: its POST-as-GET)
    assert acme.net.account is not None
    orders_url = acme._post_as_get(acme.net.account.uri).json()["orders"]
    assert acme._post_as_get(orders_url).json()["orders"] == [orderr.uri]

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == [mailbox]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_encipherment  # a signing certificate only
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.EMAIL_PROTECTION]
    verdict = lint_smime(cert)
    assert verdict.exit_code == 0, str(verdict)
    (tmp_path / "leaf.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "issuing.pem").write_bytes(chain[1].public_bytes(serialization.Encoding.PEM))
    done = subprocess.run(
        [
            "openssl",
            "verify",
            "-purpose",
            "smimesign",
            "-CAfile",
            str(world.root),
            "-untrusted",
            str(tmp_path / "issuing.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert ocsp_status(world, tmp_path, "good")
    # revokeCert: only the account that ordered it; then OCSP says revoked; a second time is refused
    with pytest.raises(messages.Error) as refused:
        new_client(world).revoke(cert, 1)
    assert refused.value.code == "malformed" and "did not order" in str(refused.value.detail)
    acme.revoke(cert, 1)  # keyCompromise
    assert ocsp_status(world, tmp_path, "revoked")
    with pytest.raises(messages.Error) as again:
        acme.revoke(cert, 1)
    assert again.value.typ == "urn:ietf:params:acme:error:alreadyRevoked"
    audit = world.dep.admin("audit", "verify")
    assert audit.code == 0


def ocsp_status(world: World, tmp_path: Path, wanted: str, timeout: float = 30) -> bool:
    """`openssl ocsp` as the relying party, polled until it says `wanted` (verified answers only)."""
    command = ["openssl", "ocsp", "-issuer", str(tmp_path / "issuing.pem"), "-cert", str(tmp_path / "leaf.pem")]
    command += ["-url", f"http://127.0.0.1:{world.dep.http_port}/ocsp", "-CAfile", str(world.root), "-no_nonce"]
    deadline = time.monotonic() + timeout
    said = ""
    while time.monotonic() < deadline:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        said = done.stdout + done.stderr
        if done.returncode == 0 and "Response verify OK" in done.stderr and f"leaf.pem: {wanted}" in done.stdout:
            return True
        time.sleep(0.5)
    raise AssertionError(f"OCSP never said {wanted}: {said}")


def test_domain_not_allowed_is_a_rejected_identifier(world: World) -> None:
    acme = new_client(world)
    with pytest.raises(messages.Error) as refused:
        email_order(acme, "bob@elsewhere.test")
    assert refused.value.typ == "urn:ietf:params:acme:error:rejectedIdentifier"
    assert not world.dep.maildir("bob@elsewhere.test").exists()  # no challenge mail went out


@pytest.mark.parametrize(
    ("mailbox", "sender", "wrong_token"),
    [
        ("carol@example.org", "mallory@example.org", False),  # the reply comes from another mailbox
        ("dave@example.org", "dave@example.org", True),  # the response is not the key authorization's
    ],
    ids=["wrong-from", "wrong-token"],
)
def test_a_bad_reply_makes_the_challenge_invalid(world: World, mailbox: str, sender: str, wrong_token: bool) -> None:
    acme = new_client(world)
    orderr = email_order(acme, mailbox)
    challb = challenge_of(orderr)
    mail = challenge_mail(world.dep, mailbox)
    token1 = str(mail["Subject"]).removeprefix("ACME: ")
    token2 = challb.chall.jobj["token"]
    other = jose.JWKRSA(key=rsa.generate_private_key(65537, 2048))
    response = response_for(token1, token2, other if wrong_token else acme.net.key)
    reply(world.dep, mail, sender, response)
    acme.answer_challenge(challb, EmailReply00Response(key_authorization="by-mail"))
    with pytest.raises(errors.ValidationError) as failed:
        acme.poll_authorizations(orderr, deadline())
    authz = failed.value.failed_authzrs[0].body
    assert authz.status == messages.STATUS_INVALID
    error = authz.challenges[0].chall.jobj["error"]
    assert error["type"] == "urn:ietf:params:acme:error:incorrectResponse"
    assert ("from " + sender) in error["detail"] if not wrong_token else "response" in error["detail"]
    # the order cannot be finalized
    with pytest.raises(messages.Error) as refused:
        acme._post(orderr.body.finalize, messages.CertificateRequest(csr=x509.load_pem_x509_csr(orderr.csr_pem)))
    assert refused.value.typ == "urn:ietf:params:acme:error:orderNotReady"


def raw_post(
    world: World, url: str, key: jose.JWK, nonce: str, kid: str | None, payload: bytes, signed_for: str | None = None
) -> httpx.Response:
    """A request signed by the package's JWS code (acme.jws), posted as it is: no retry on badNonce."""
    alg = jose.RS256 if isinstance(key, jose.JWKRSA) else jose.ES256
    signed = acme_jws.JWS.sign(payload, key=key, alg=alg, nonce=jose.b64decode(nonce), url=signed_for or url, kid=kid)
    return httpx.post(
        url, content=signed.json_dumps(), headers={"Content-Type": "application/jose+json"}, verify=trust(world)
    )


def trust(world: World) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(world.root))


def fresh_nonce(world: World) -> str:
    answer = httpx.head(f"{world.dep.url}/acme/new-nonce", verify=trust(world))
    assert answer.status_code == 200
    return answer.headers["Replay-Nonce"]


def test_replayed_nonce_and_bad_signature_are_refused(world: World) -> None:
    acme = new_client(world)
    kid = acme.net.account.uri
    nonce = fresh_nonce(world)
    first = raw_post(world, kid, acme.net.key, nonce, kid, b"")
    assert first.status_code == 200, first.text
    again = raw_post(world, kid, acme.net.key, nonce, kid, b"")
    assert again.status_code == 400
    assert again.headers["content-type"] == "application/problem+json"
    assert again.json()["type"] == "urn:ietf:params:acme:error:badNonce"
    assert again.headers["Replay-Nonce"]  # the client may retry with it

    intruder = jose.JWKRSA(key=rsa.generate_private_key(65537, 2048))
    forged = raw_post(world, kid, intruder, fresh_nonce(world), kid, b"")
    assert forged.status_code == 400
    assert forged.json()["type"] == "urn:ietf:params:acme:error:malformed"
    assert "signature" in forged.json()["detail"]

    new_order = f"{world.dep.url}/acme/new-order"
    payload = json.dumps({"identifiers": [{"type": "dns", "value": "example.org"}]}).encode()
    dns = raw_post(world, new_order, acme.net.key, fresh_nonce(world), kid, payload)
    assert dns.json()["type"] == "urn:ietf:params:acme:error:unsupportedIdentifier"
    with_kid = raw_post(world, f"{world.dep.url}/acme/new-account", acme.net.key, fresh_nonce(world), kid, payload)
    assert with_kid.json()["type"] == "urn:ietf:params:acme:error:malformed"  # newAccount takes a jwk
    elsewhere = raw_post(world, kid, acme.net.key, fresh_nonce(world), kid, b"", signed_for=new_order)
    assert elsewhere.status_code == 403
    assert elsewhere.json()["type"] == "urn:ietf:params:acme:error:unauthorized"  # signed for another URL


def issued(world: World, acme: client.ClientV2, mailbox: str, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The whole flow through certbot's client: order, challenge mail, reply, finalize; the
    certificate for `key`."""
    orderr = email_order(acme, mailbox)
    challb = challenge_of(orderr)
    mail = challenge_mail(world.dep, mailbox)
    token1 = str(mail["Subject"]).removeprefix("ACME: ")
    reply(world.dep, mail, mailbox, response_for(token1, challb.chall.jobj["token"], acme.net.key))
    acme.answer_challenge(challb, EmailReply00Response(key_authorization="by-mail"))
    orderr = acme.poll_authorizations(orderr, deadline())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(mailbox)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    orderr = acme.finalize_order(orderr.update(csr_pem=csr.public_bytes(serialization.Encoding.PEM)), deadline())
    return x509.load_pem_x509_certificates(orderr.fullchain_pem.encode())[0]


def key_client(world: World, key: jose.JWK, alg: jose.JWASignature) -> client.ClientV2:
    """A client with no account: every request signed with `key` as jwk (revokeCert by the
    certificate's key, RFC 8555 §7.6)."""
    net = client.ClientNetwork(key, alg=alg, verify_ssl=str(world.root), user_agent="mailkms-tests")
    return client.ClientV2(client.ClientV2.get_directory(world.directory_url, net), net)


def test_revoke_cert_signed_by_the_certificate_key(world: World, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issued(world, new_client(world), "erin@example.org", key)
    (tmp_path / "leaf.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    chain = x509.load_pem_x509_certificates(world.dep.admin("ca", "chain").out.encode())
    (tmp_path / "issuing.pem").write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
    # another key (no account, jwk) is not the certificate's: refused, nothing revoked
    other = key_client(world, jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1())), jose.ES256)
    with pytest.raises(messages.Error) as refused:
        other.revoke(cert, 1)
    assert refused.value.typ == "urn:ietf:params:acme:error:unauthorized"
    assert ocsp_status(world, tmp_path, "good")
    key_client(world, jose.JWKEC(key=key), jose.ES256).revoke(cert, 1)  # keyCompromise, by the key itself
    assert ocsp_status(world, tmp_path, "revoked")


def key_change(acme: client.ClientV2, new_key: jose.JWK) -> requests.Response:
    """RFC 8555 §7.3.5 through the package's JWS and network layers (ClientV2 has no call for it):
    the inner JWS by the new key (jwk, no nonce), posted as the payload of the outer one (kid)."""
    url = acme.directory["keyChange"]
    payload = {"account": acme.net.account.uri, "oldKey": acme.net.key.public_key().to_partial_json()}
    inner = acme_jws.JWS.sign(json.dumps(payload).encode(), key=new_key, alg=jose.RS256, nonce=None, url=url)
    return acme._post(url, inner)


def test_account_key_rollover_then_the_old_key_is_refused(world: World) -> None:
    acme = new_client(world)
    account = acme.net.account
    old_key = acme.net.key
    new_key = jose.JWKRSA(key=rsa.generate_private_key(65537, 2048))
    # a key that another account holds: 409 with that account's URL
    taken = new_client(world)
    with pytest.raises(errors.ConflictError) as conflict:  # the package's reading of a 409
        key_change(acme, taken.net.key)
    assert taken.net.account is not None and conflict.value.location == taken.net.account.uri
    answer = key_change(acme, new_key)
    assert answer.status_code == 200 and answer.headers["Location"] == account.uri
    # the old key no longer acts for the account
    with pytest.raises(messages.Error) as refused:
        acme.query_registration(account)  # signs newAccount onlyReturnExisting with the old jwk
    assert refused.value.typ == "urn:ietf:params:acme:error:accountDoesNotExist"
    old_net = client.ClientNetwork(old_key, account=account, verify_ssl=str(world.root))
    with pytest.raises(messages.Error) as old:
        client.ClientV2(acme.directory, old_net)._post_as_get(account.uri)
    assert old.value.typ == "urn:ietf:params:acme:error:malformed" and "signature" in str(old.value.detail)
    # the new key finds the same account and orders with it
    new_net = client.ClientNetwork(new_key, verify_ssl=str(world.root))
    renewed = client.ClientV2(acme.directory, new_net)
    assert renewed.query_registration(account).uri == account.uri
    assert email_order(renewed, "frank@example.org").body.status == messages.STATUS_PENDING


def test_a_deactivated_account_is_refused_unauthorized(world: World) -> None:
    acme = new_client(world)
    orderr = email_order(acme, "gina@example.org")
    done = acme.deactivate_registration(acme.net.account)
    assert done.body.status == "deactivated"  # Registration keeps it a string
    for attempt in (
        lambda: email_order(acme, "gina@example.org"),
        lambda: acme._post_as_get(orderr.uri),
        lambda: acme.query_registration(acme.net.account),  # newAccount with its key
    ):
        with pytest.raises(messages.Error) as refused:
            attempt()
        assert refused.value.typ == "urn:ietf:params:acme:error:unauthorized", refused.value


def test_a_deactivated_authorization_invalidates_its_order(world: World) -> None:
    acme = new_client(world)
    orderr = email_order(acme, "hugo@example.org")
    authzr = acme.deactivate_authorization(orderr.authorizations[0])
    assert authzr.body.status == messages.STATUS_DEACTIVATED
    order = messages.Order.from_json(acme._post_as_get(orderr.uri).json())
    assert order.status == messages.STATUS_INVALID
    with pytest.raises(messages.Error) as refused:
        acme._post(orderr.body.finalize, messages.CertificateRequest(csr=x509.load_pem_x509_csr(orderr.csr_pem)))
    assert refused.value.typ == "urn:ietf:params:acme:error:orderNotReady"
    with pytest.raises(messages.Error) as again:  # a deactivated authorization stays so
        acme.deactivate_authorization(orderr.authorizations[0])
    assert again.value.typ == "urn:ietf:params:acme:error:malformed"
