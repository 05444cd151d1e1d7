"""The ACME service on an injected clock, SQLite and PostgreSQL: requests signed by certbot's
acme package (acme.jws), the reply dropped into the challenge Maildir as the sink would file it.
What the e2e tests cannot reach without waiting: expiry, the open-order limit, another account's
resources, and that a reply counts only once the client has POSTed the challenge."""

from __future__ import annotations

import datetime as dt
import email.policy
import json
import subprocess
from collections.abc import Callable
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import josepy as jose
import pytest
from acme import jws as acme_jws
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import select

from mailkms.clock import FakeClock
from mailkms.errors import ACMENotFound, ACMEOrderNotReady, BadCSR, Malformed, RateLimited, ReplayedNonce, Unauthorized
from mailkms.mail import file_into_maildir
from mailkms.pki import _acme as wire
from mailkms.services import Services, Verified
from mailkms.store import AuditRecord, Certificate, OutboxMessage
from tests.acme_support import DKIMSigner
from tests.conftest import CA_PASSPHRASE, PUBLIC_URL, make_csr
from tests.judges import lint_smime

BASE = "https://localhost/acme"
PREFIX = BASE + "/account/"


@pytest.fixture
def settings(data_dir: Path, db_url: str):  # type: ignore[no-untyped-def]
    from mailkms.config import load_settings

    return load_settings(
        data_dir,
        database_url=db_url,
        ca_passphrase=CA_PASSPHRASE,
        server={"hostname": "localhost", "public_url": PUBLIC_URL},
        acme={"enabled": True, "allowed_domains": ["example.org"], "pending_orders_per_account": 2},
    )


class Account:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.key = jose.JWKRSA(key=rsa.generate_private_key(65537, 2048))
        self.kid: str | None = None
        made = self.post(BASE + "/new-account", {"termsOfServiceAgreed": True}, new_account=True)
        self.kid = PREFIX + services.acme.new_account(made).id

    def post(self, url: str, payload: dict[str, Any] | None, *, new_account: bool = False, nonce: str = "") -> Verified:
        nonce = nonce or self.services.acme.new_nonce()
        body = b"" if payload is None else json.dumps(payload).encode()
        signed = acme_jws.JWS.sign(
            body, key=self.key, alg=jose.RS256, nonce=jose.b64decode(nonce), url=url, kid=self.kid
        )
        return self.services.acme.verify(json.loads(signed.json_dumps()), url, PREFIX, new_account=new_account)

    def order(self, mailbox: str) -> str:
        payload = {"identifiers": [{"type": "email", "value": mailbox}]}
        return self.services.acme.new_order(self.post(BASE + "/new-order", payload), BASE + "/directory").id


def challenge_mail(services: Services, mailbox: str) -> EmailMessage:
    with services.db.read_only() as session:
        body = session.execute(select(OutboxMessage.body).where(OutboxMessage.recipient == mailbox)).scalars().all()
    msg = BytesParser(policy=email.policy.default).parsebytes(body[-1])
    assert isinstance(msg, EmailMessage)
    return msg


def file_reply(
    services: Services, account: Account, mailbox: str, token2: str, sign: Callable[[bytes], bytes] | None = None
) -> None:
    mail = challenge_mail(services, mailbox)
    part1 = str(mail["Subject"]).removeprefix("ACME: ")
    thumb = jose.b64encode(account.key.thumbprint()).decode()
    reply = EmailMessage()
    reply["From"], reply["Subject"], reply["In-Reply-To"] = mailbox, f"Re: ACME: {part1}", str(mail["Message-ID"])
    reply["Message-ID"] = f"<reply-{part1}@example.org>"
    reply.set_content(f"{wire.RESPONSE_BEGIN}\n{wire.expected_response(part1, token2, thumb)}\n{wire.RESPONSE_END}\n")
    root = services.settings.acme_reply_maildir
    data = reply.as_bytes(policy=email.policy.SMTP)
    file_into_maildir(root.parent, root.name, sign(data) if sign else data)


def test_a_reply_counts_once_the_challenge_is_posted_and_issuance_follows(services: Services) -> None:
    alice = Account(services)
    order_id = alice.order("alice@example.org")
    order = services.acme.order(alice.post(f"{BASE}/order/{order_id}", None), order_id)
    authz = services.acme.authorization(alice.post(f"{BASE}/authz/{order.authz_id}", None), order.authz_id)
    file_reply(services, alice, "alice@example.org", authz.challenge.token)
    again = services.acme.authorization(alice.post(f"{BASE}/authz/{authz.id}", None), authz.id)
    assert again.status == "pending"  # the client has not said it replied
    chall = f"{BASE}/chall/{authz.challenge.id}"
    answered = services.acme.challenge(alice.post(chall, {}), authz.challenge.id)
    assert answered.status == "valid" and answered.challenge.status == "valid"
    csr, _ = make_csr("alice@example.org")
    der = wire.b64url(x509_der(csr))
    done = services.acme.finalize(alice.post(f"{BASE}/order/{order_id}/finalize", {"csr": der}), order_id)
    assert done.status == "valid" and done.has_certificate
    pem = services.acme.certificate(alice.post(f"{BASE}/order/{order_id}/certificate", None), order_id)
    assert pem.count(b"BEGIN CERTIFICATE") == 2


def x509_der(csr_pem: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)


def test_an_order_expires_unanswered(services: Services, clock: FakeClock) -> None:
    alice = Account(services)
    order_id = alice.order("alice@example.org")
    clock.advance(dt.timedelta(seconds=services.settings.acme.order_ttl_seconds + 1))
    order = services.acme.order(alice.post(f"{BASE}/order/{order_id}", None), order_id)
    assert order.status == "invalid"
    assert order.error is not None and "expired" in str(order.error["detail"])
    csr, _ = make_csr("alice@example.org")
    with pytest.raises(ACMEOrderNotReady):
        payload = {"csr": wire.b64url(x509_der(csr))}
        services.acme.finalize(alice.post(f"{BASE}/order/{order_id}/finalize", payload), order_id)


def test_open_orders_are_limited_per_account(services: Services, clock: FakeClock) -> None:
    alice = Account(services)
    alice.order("a1@example.org")
    alice.order("a2@example.org")
    with pytest.raises(RateLimited):
        alice.order("a3@example.org")
    clock.advance(dt.timedelta(seconds=services.settings.acme.order_ttl_seconds + 1))
    alice.order("a4@example.org")  # the expired ones no longer count


def test_another_account_sees_nothing_and_nonces_are_single_use(services: Services) -> None:
    alice, mallory = Account(services), Account(services)
    order_id = alice.order("alice@example.org")
    with pytest.raises(ACMENotFound):
        services.acme.order(mallory.post(f"{BASE}/order/{order_id}", None), order_id)
    nonce = services.acme.new_nonce()
    alice.post(f"{BASE}/order/{order_id}", None, nonce=nonce)
    with pytest.raises(ReplayedNonce):
        alice.post(f"{BASE}/order/{order_id}", None, nonce=nonce)


def test_with_require_dkim_only_a_signed_reply_passes(settings, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    acme_settings = settings.acme.model_copy(update={"require_dkim": True})
    services = Services.build(settings.model_copy(update={"acme": acme_settings}), clock)
    signer = DKIMSigner("example.org")
    services.acme.dns = signer.dns
    try:
        results = {}
        for mailbox, sign in (("unsigned@example.org", False), ("signed@example.org", True)):
            alice = Account(services)
            order_id = alice.order(mailbox)
            order = services.acme.order(alice.post(f"{BASE}/order/{order_id}", None), order_id)
            authz = services.acme.authorization(alice.post(f"{BASE}/authz/{order.authz_id}", None), order.authz_id)
            file_reply(services, alice, mailbox, authz.challenge.token, signer.sign if sign else None)
            chall = f"{BASE}/chall/{authz.challenge.id}"
            results[sign] = services.acme.challenge(alice.post(chall, {}), authz.challenge.id)
        assert results[True].status == "valid"
        assert results[False].status == "invalid"
        assert results[False].challenge.error is not None
        assert "DKIM" in str(results[False].challenge.error["detail"])
    finally:
        services.close()


def test_purge_forgets_orders_that_ended_without_a_certificate(services: Services, clock: FakeClock) -> None:
    alice = Account(services)
    gone = alice.order("a1@example.org")
    clock.advance(dt.timedelta(seconds=services.settings.acme.order_ttl_seconds))
    assert services.acme.purge() == 0  # not a day past its expiry yet
    kept = alice.order("a2@example.org")
    clock.advance(dt.timedelta(days=1, seconds=1))
    assert services.acme.purge() == 1
    with pytest.raises(ACMENotFound):
        services.acme.order(alice.post(f"{BASE}/order/{gone}", None), gone)
    assert services.acme.order(alice.post(f"{BASE}/order/{kept}", None), kept).status == "pending"


def valid_order(services: Services, account: Account, mailbox: str) -> str:
    """An order whose challenge the reply has validated: ready to finalize."""
    order_id = account.order(mailbox)
    order = services.acme.order(account.post(f"{BASE}/order/{order_id}", None), order_id)
    authz = services.acme.authorization(account.post(f"{BASE}/authz/{order.authz_id}", None), order.authz_id)
    file_reply(services, account, mailbox, authz.challenge.token)
    answered = services.acme.challenge(account.post(f"{BASE}/chall/{authz.challenge.id}", {}), authz.challenge.id)
    assert answered.status == "valid"
    return order_id


def openssl_csr(tmp_path: Path, mailbox: str, key_usage: str, newkey: list[str]) -> tuple[bytes, Path]:
    """A CSR made by `openssl req` with the keyUsage it asks for; (DER, the key file)."""
    key = tmp_path / f"{key_usage}.key"
    done = subprocess.run(
        [
            "openssl",
            "req",
            "-new",
            *newkey,
            "-nodes",
            "-keyout",
            str(key),
            "-subj",
            "/",
            "-outform",
            "DER",
            "-addext",
            f"keyUsage=critical,{key_usage}",
            "-addext",
            f"subjectAltName=email:{mailbox}",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return done.stdout, key


def audit_details(services: Services, action: str) -> list[dict[str, Any]]:
    with services.db.read_only() as session:
        rows = session.execute(select(AuditRecord.details).where(AuditRecord.action == action)).scalars().all()
    return [json.loads(r) for r in rows]


@pytest.mark.parametrize(
    ("key_usage", "newkey"),
    [
        ("keyEncipherment", ["-newkey", "rsa:2048"]),
        ("keyAgreement", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
    ],
    ids=["rsa", "ec"],
)
def test_with_signing_only_false_an_encryption_csr_gets_an_encryption_certificate(
    settings,  # type: ignore[no-untyped-def]
    clock: FakeClock,
    tmp_path: Path,
    key_usage: str,
    newkey: list[str],
) -> None:
    acme_settings = settings.acme.model_copy(update={"signing_only": False})
    services = Services.build(settings.model_copy(update={"acme": acme_settings}), clock)
    try:
        alice = Account(services)
        mailbox = "alice@example.org"
        order_id = valid_order(services, alice, mailbox)
        der, key = openssl_csr(tmp_path, mailbox, key_usage, newkey)
        done = services.acme.finalize(
            alice.post(f"{BASE}/order/{order_id}/finalize", {"csr": wire.b64url(der)}), order_id
        )
        assert done.status == "valid"
        pem = services.acme.certificate(alice.post(f"{BASE}/order/{order_id}/certificate", None), order_id)
        cert = x509.load_pem_x509_certificates(pem)[0]
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert not ku.digital_signature
        assert ku.key_encipherment if key_usage == "keyEncipherment" else ku.key_agreement
        verdict = lint_smime(cert)
        assert verdict.exit_code == 0, str(verdict)
        # a sender encrypts to it with openssl cms; the client's own key decrypts
        (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        secret = b"for alice only\n"
        sealed = subprocess.run(
            ["openssl", "cms", "-encrypt", "-binary", "-aes-256-cbc", "-outform", "DER", str(tmp_path / "cert.pem")],
            input=secret,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        opened = subprocess.run(
            ["openssl", "cms", "-decrypt", "-inform", "DER", "-recip", str(tmp_path / "cert.pem"), "-inkey", str(key)],
            input=sealed,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        assert opened == secret
        issued = audit_details(services, "certificate.issued")
        assert issued[-1]["kind"] == "encryption" and issued[-1]["key_archived"] is False
        with services.db.read_only() as session:
            kind = session.execute(
                select(Certificate.kind).where(Certificate.der == cert.public_bytes(Encoding.DER))
            ).scalar()
        assert kind == "acme-encryption"
    finally:
        services.close()


def test_by_default_an_encryption_csr_is_refused_and_the_order_stays_ready(services: Services, tmp_path: Path) -> None:
    alice = Account(services)
    order_id = valid_order(services, alice, "alice@example.org")
    der, _ = openssl_csr(tmp_path, "alice@example.org", "keyEncipherment", ["-newkey", "rsa:2048"])
    with pytest.raises(BadCSR, match="signing certificates only"):
        services.acme.finalize(alice.post(f"{BASE}/order/{order_id}/finalize", {"csr": wire.b64url(der)}), order_id)
    assert services.acme.order(alice.post(f"{BASE}/order/{order_id}", None), order_id).status == "ready"
    # a dual-use request (digitalSignature + keyEncipherment) gets the signing certificate
    der, _ = openssl_csr(tmp_path, "alice@example.org", "digitalSignature,keyEncipherment", ["-newkey", "rsa:2048"])
    done = services.acme.finalize(alice.post(f"{BASE}/order/{order_id}/finalize", {"csr": wire.b64url(der)}), order_id)
    pem = services.acme.certificate(alice.post(f"{BASE}/order/{order_id}/certificate", None), done.id)
    ku = x509.load_pem_x509_certificates(pem)[0].extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_encipherment


@pytest.mark.parametrize("flaw", ["nonce", "url", "old-key", "account"])
def test_a_bad_key_change_is_refused_and_the_key_stays(services: Services, flaw: str) -> None:
    alice = Account(services)
    new_key = jose.JWKRSA(key=rsa.generate_private_key(65537, 2048))
    url = f"{BASE}/key-change"
    old = jose.JWKRSA(key=rsa.generate_private_key(65537, 2048)) if flaw == "old-key" else alice.key
    payload = {
        "account": PREFIX + "someone-else" if flaw == "account" else alice.kid,
        "oldKey": old.public_key().to_partial_json(),
    }
    inner = acme_jws.JWS.sign(
        json.dumps(payload).encode(),
        key=new_key,
        alg=jose.RS256,
        nonce=b"nonce" if flaw == "nonce" else None,
        url=url + "/elsewhere" if flaw == "url" else url,
    )
    assert alice.kid is not None
    with pytest.raises(Malformed):
        services.acme.key_change(alice.post(url, json.loads(inner.json_dumps())), url, alice.kid)
    assert services.acme.account(alice.post(alice.kid, None)).status == "valid"  # the old key still acts


def test_the_orders_list_holds_the_accounts_live_orders_only(services: Services) -> None:
    alice, mallory = Account(services), Account(services)
    assert alice.kid is not None
    first = alice.order("a1@example.org")
    second = alice.order("a2@example.org")
    alice_id = alice.kid.removeprefix(PREFIX)
    listed = services.acme.orders(alice.post(alice.kid + "/orders", None), alice_id)
    assert listed[0] in (first, second) and sorted(listed) == sorted([first, second])
    order = services.acme.order(alice.post(f"{BASE}/order/{first}", None), first)
    services.acme.authorization(alice.post(f"{BASE}/authz/{order.authz_id}", {"status": "deactivated"}), order.authz_id)
    assert services.acme.orders(alice.post(alice.kid + "/orders", None), alice_id) == [second]  # invalid: left out
    with pytest.raises(Unauthorized):
        services.acme.orders(mallory.post(alice.kid + "/orders", None), alice_id)


def test_a_certificate_downloaded_after_a_rekey_comes_with_the_ca_that_signed_it(services: Services) -> None:
    """An order finished before `mailkms ca rekey`, its certificate downloaded after: the chain
    names the replaced issuing CA that signed it (its AKI), not the current one, so it verifies."""
    from mailkms.pki import issued_by
    from mailkms.services import rekey_issuing_ca

    alice = Account(services)
    order_id = valid_order(services, alice, "alice@example.org")
    csr, _ = make_csr("alice@example.org")
    der = wire.b64url(x509_der(csr))
    services.acme.finalize(alice.post(f"{BASE}/order/{order_id}/finalize", {"csr": der}), order_id)
    old_ca = services.ca.issuing.certificate
    rekey_issuing_ca(services.ca.paths, CA_PASSPHRASE.encode(), "", services.ca.urls, services.clock.now())
    services.reload_ca()
    assert services.ca.issuing.certificate != old_ca
    pem = services.acme.certificate(alice.post(f"{BASE}/order/{order_id}/certificate", None), order_id)
    cert, issuer = x509.load_pem_x509_certificates(pem)
    assert issuer == old_ca and issued_by(cert, issuer)
