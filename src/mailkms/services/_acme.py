"""ACME (RFC 8555) for S/MIME with RFC 8823's `email` identifier and `email-reply-00` challenge.

Flow: newAccount (JWS with the account's jwk) → newOrder (one email identifier, its domain in
`[acme] allowed_domains`): the challenge mail ("ACME: <token-part1>") is queued in the outbox in
the order's transaction → the client replies from the mailbox and POSTs the challenge → the
server reads the replies that reached its challenge address (the embedded sink's Maildir, or the
Maildir the relay delivers into: `[acme] reply_maildir`) whenever the authorization, challenge or
order is asked for → finalize with a CSR naming only that mailbox → a signing certificate, issued
by the same issuer and profile as enrolment (encryption keys stay server-made and archived),
unless `[acme] signing_only = false` and the CSR asks for an encryption key usage: then the
encryption profile for the client's own key, which the server never sees and does not archive.

A reply is judged as the relay delivered it: From must be the mailbox, the Subject must carry
token part 1, In-Reply-To the challenge's Message-ID, and the body the base64url SHA-256 of the
key authorization (RFC 8823 §3.2). DKIM is not checked. A reply that names the challenge but
fails makes the challenge invalid, unless another reply passes: only a reader of the challenge
mail knows its Message-ID and token, so no one else can spoil a challenge this way.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import ECKey, RSAKey
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import (
    ACMEAccountDeactivated,
    ACMEAccountDoesNotExist,
    ACMEIncorrectResponse,
    ACMEKeyInUse,
    ACMENotFound,
    ACMEOrderNotReady,
    ACMERejectedIdentifier,
    ACMEUnsupportedIdentifier,
    BadCSR,
    BadJWS,
    BadRevocationReason,
    MailkmsError,
    Malformed,
    RateLimited,
    Unauthorized,
    URLMismatch,
)
from mailkms.pki import CertKind, PublicKey, check_csr, inspect_csr, same_public_key, subscriber_validity
from mailkms.pki import _acme as wire
from mailkms.services._audit import AuditLog
from mailkms.services._ca import CAContext
from mailkms.services._issuance import PairIssuer, certificate_row, queue_message, serial_hex
from mailkms.services._nonces import Nonces
from mailkms.services._refusals import Refusals
from mailkms.services._revocation import Revocation
from mailkms.services._users import normalise_mailbox
from mailkms.store import ACMEAccount, ACMEAuthorization, ACMEOrder, Certificate, Database, User

log = logging.getLogger("mailkms.acme")

CHALLENGE_TYPE = "email-reply-00"
# RFC 5280 reason codes an ACME client may give (RFC 8555 §7.6); 0 = none encoded (S/MIME BR 7.2.2)
REASON_CODES: dict[int, str | None] = {
    0: None,
    1: "keyCompromise",
    3: "affiliationChanged",
    4: "superseded",
    5: "cessationOfOperation",
    9: "privilegeWithdrawn",
}
MAX_REPLY_BYTES = 256 * 1024
ACTOR = "acme"


@dataclass(frozen=True)
class Verified:
    """A request whose JWS verified and whose nonce was fresh (and is now spent)."""

    thumbprint: str
    jwk: dict[str, object]
    account_id: str | None
    payload: bytes

    def json(self) -> dict[str, object]:
        if not self.payload:
            return {}
        try:
            data = json.loads(self.payload)
        except ValueError:
            raise Malformed("the JWS payload is not JSON") from None
        if not isinstance(data, dict):
            raise Malformed("the JWS payload is not a JSON object")
        return data


@dataclass(frozen=True)
class AccountView:
    id: str
    status: str
    contact: tuple[str, ...]
    created: bool = False


@dataclass(frozen=True)
class ChallengeView:
    id: str
    status: str
    token: str  # token part 2
    sender: str  # the address the challenge mail came from (and the reply goes to)
    validated: dt.datetime | None
    error: dict[str, object] | None


@dataclass(frozen=True)
class AuthzView:
    id: str
    status: str
    mailbox: str
    expires: dt.datetime
    challenge: ChallengeView


@dataclass(frozen=True)
class OrderView:
    id: str
    status: str
    mailbox: str
    expires: dt.datetime
    authz_id: str
    has_certificate: bool
    error: dict[str, object] | None


def _problem(exc: MailkmsError) -> str:
    return json.dumps({"code": exc.code, "detail": exc.detail})


def _error(text: str | None) -> dict[str, object] | None:
    if not text:
        return None
    data = json.loads(text)
    return data if isinstance(data, dict) else None


class ACME:
    def __init__(
        self,
        db: Database,
        ca: CAContext,
        issuer: PairIssuer,
        nonces: Nonces,
        settings: Settings,
        clock: Clock,
        audit: AuditLog,
        refusals: Refusals,
        revocation: Revocation,
    ) -> None:
        self._db = db
        self._revocation = revocation
        self._ca = ca
        self._issuer = issuer
        self._nonces = nonces
        self._settings = settings
        self._clock = clock
        self._audit = audit
        self._refusals = refusals
        self.dns: wire.DNSLookup | None = None  # DKIM keys: the real DNS unless a test sets this

    @property
    def challenge_from(self) -> str:
        return self._settings.acme_challenge_from

    def new_nonce(self) -> str:
        return self._nonces.new()

    # --- requests ------------------------------------------------------------------------
    def verify(
        self, body: object, url: str, account_prefix: str, *, new_account: bool = False, by_jwk: bool = False
    ) -> Verified:
        """Check the JWS (RFC 8555 §6.2-6.5): the URL it was made for, the account key (jwk only for
        newAccount, else kid = an account URL; `by_jwk`: either, as revokeCert takes the
        certificate's own key), the signature, then spend the nonce."""
        try:
            header = wire.read_header(body)
            if header.url != url:
                raise URLMismatch(f"the JWS was made for {header.url}, not {url}")
            assert isinstance(body, dict)
            account_id: str | None = None
            if new_account:
                if header.jwk is None:
                    raise BadJWS("newAccount is signed with the account's jwk, not a kid")
                key = wire.load_account_key(header.jwk)
            elif by_jwk and header.jwk is not None:
                key = wire.load_account_key(header.jwk)
            else:
                if header.kid is None:
                    raise BadJWS("this request is signed with the account URL as kid, not a jwk")
                account_id, key = self._account_key(header.kid, account_prefix)
            payload = wire.verify_jws(body, key, header)
            self._nonces.consume(header.nonce)
        except MailkmsError as exc:
            self._refusals.anonymous("acme.refused", exc)
            raise
        thumb = wire.thumbprint(key)
        return Verified(thumb, wire.public_jwk(key), account_id, payload)

    def _account_key(self, kid: str, prefix: str) -> tuple[str, RSAKey | ECKey]:
        if not kid.startswith(prefix):
            raise ACMEAccountDoesNotExist("the kid is not an account URL of this server")
        account_id = kid[len(prefix) :]
        with self._db.read_only() as session:
            account = session.get(ACMEAccount, account_id)
            if account is None:
                raise ACMEAccountDoesNotExist()
            if account.status != "valid":
                raise ACMEAccountDeactivated("this account was deactivated; its key can no longer act")
            return account.id, wire.load_account_key(json.loads(account.jwk))

    # --- accounts ------------------------------------------------------------------------
    def new_account(self, request: Verified) -> AccountView:
        payload = request.json()
        contact = payload.get("contact", [])
        if not isinstance(contact, list) or not all(isinstance(c, str) for c in contact):
            raise Malformed("contact is a list of URLs")
        with self._db.transaction() as session:
            found = session.execute(
                select(ACMEAccount).where(ACMEAccount.thumbprint == request.thumbprint)
            ).scalar_one_or_none()
            if found is not None:
                if found.status != "valid":
                    raise ACMEAccountDeactivated("the account of this key was deactivated")
                return AccountView(found.id, found.status, tuple(json.loads(found.contact)))
            if payload.get("onlyReturnExisting") is True:
                raise ACMEAccountDoesNotExist()
            account = ACMEAccount(
                id=secrets.token_urlsafe(16),
                thumbprint=request.thumbprint,
                jwk=json.dumps(request.jwk, sort_keys=True),
                contact=json.dumps(contact),
                status="valid",
                created_at=self._clock.now(),
            )
            session.add(account)
            self._audit.append(session, ACTOR, "acme.account.created", account.id, thumbprint=request.thumbprint)
            return AccountView(account.id, "valid", tuple(contact), created=True)

    def account(self, request: Verified) -> AccountView:
        """POST-as-GET reads the account; {"contact": [...]} updates it; {"status": "deactivated"}
        deactivates it for good (RFC 8555 §7.3.2, §7.3.6): its pending authorizations are
        deactivated, its open orders invalid, and every later request with its key is refused."""
        payload = request.json()
        status, contact = payload.get("status"), payload.get("contact")
        if status not in (None, "valid", "deactivated"):
            raise Malformed(f"an account's status may only be set to deactivated, not {status!r}")
        if contact is not None and (not isinstance(contact, list) or not all(isinstance(c, str) for c in contact)):
            raise Malformed("contact is a list of URLs")
        with self._db.transaction() as session:
            account = session.get(ACMEAccount, request.account_id, with_for_update=True)
            if account is None:
                raise ACMEAccountDoesNotExist()
            if account.status != "valid":
                raise ACMEAccountDeactivated("this account was deactivated")
            if contact is not None and status != "deactivated":
                account.contact = json.dumps(contact)
            if status == "deactivated":
                account.status = "deactivated"
                self._deactivate_orders(session, account.id)
                self._audit.append(session, f"acme:{account.id}", "acme.account.deactivated", account.id)
            return AccountView(account.id, account.status, tuple(json.loads(account.contact)))

    def orders(self, request: Verified, account_id: str) -> list[str]:
        """The account's orders list (RFC 8555 §7.1.2.1): its pending, ready and valid orders, newest
        first (invalid ones left out, as the RFC advises); only the account itself may read it."""
        if request.account_id != account_id:
            raise Unauthorized("the JWS was signed by another account")
        with self._db.read_only() as session:
            return list(
                session.execute(
                    select(ACMEOrder.id)
                    .where(ACMEOrder.account_id == account_id, ACMEOrder.status.in_(("pending", "ready", "valid")))
                    .order_by(ACMEOrder.created_at.desc(), ACMEOrder.id)
                ).scalars()
            )

    def _deactivate_orders(self, session: Session, account_id: str) -> None:
        orders = select(ACMEOrder.id).where(ACMEOrder.account_id == account_id)
        session.execute(
            update(ACMEAuthorization)
            .where(ACMEAuthorization.order_id.in_(orders), ACMEAuthorization.status.in_(("pending", "valid")))
            .values(status="deactivated")
        )
        session.execute(
            update(ACMEOrder)
            .where(ACMEOrder.account_id == account_id, ACMEOrder.status.in_(("pending", "ready")))
            .values(status="invalid", error=_problem(Unauthorized("the account was deactivated")))
        )

    def key_change(self, request: Verified, url: str, account_url: str) -> AccountView:
        """Account key rollover (RFC 8555 §7.3.5): the outer JWS by the account's current key (kid),
        its payload an inner JWS by the new key (jwk, same url, no nonce) naming the account and
        the old key. Afterwards only the new key acts for the account."""
        inner = request.json()
        header = wire.read_header(inner, inner=True)
        if header.url != url:
            raise Malformed("the inner JWS was made for another URL than the outer one")
        assert header.jwk is not None
        new_key = wire.load_account_key(header.jwk)
        try:
            payload = json.loads(
                wire.verify_jws(
                    {k: str(inner[k]) for k in ("protected", "payload", "signature")}, new_key, header, inner=True
                )
            )
        except ValueError:
            raise Malformed("the inner JWS payload is not JSON") from None
        if not isinstance(payload, dict) or payload.get("account") != account_url:
            raise Malformed("the inner JWS must name this account's URL in account")
        old = payload.get("oldKey")
        if not isinstance(old, dict) or wire.thumbprint(wire.load_account_key(old)) != request.thumbprint:
            raise Malformed("oldKey is not the key that signed the outer JWS")
        new_thumbprint = wire.thumbprint(new_key)
        with self._db.transaction() as session:
            account = session.get(ACMEAccount, request.account_id, with_for_update=True)
            if account is None or account.thumbprint != request.thumbprint:
                raise Unauthorized("the account's key changed while this request was made")
            holder = session.execute(
                select(ACMEAccount.id).where(ACMEAccount.thumbprint == new_thumbprint)
            ).scalar_one_or_none()
            if holder is not None:
                raise ACMEKeyInUse("the new key already belongs to an account", account=holder)
            account.jwk = json.dumps(wire.public_jwk(new_key), sort_keys=True)
            account.thumbprint = new_thumbprint
            self._audit.append(
                session,
                f"acme:{account.id}",
                "acme.account.key-changed",
                account.id,
                old_thumbprint=request.thumbprint,
                thumbprint=new_thumbprint,
            )
            return AccountView(account.id, account.status, tuple(json.loads(account.contact)))

    # --- orders --------------------------------------------------------------------------
    def _mailbox(self, payload: dict[str, object]) -> str:
        identifiers = payload.get("identifiers")
        if not isinstance(identifiers, list) or len(identifiers) != 1 or not isinstance(identifiers[0], dict):
            raise ACMEUnsupportedIdentifier("an order names exactly one identifier, of type email")
        ident = identifiers[0]
        if ident.get("type") != "email" or not isinstance(ident.get("value"), str):
            raise ACMEUnsupportedIdentifier(f"identifier type {ident.get('type')!r} is not served; use email")
        mailbox = normalise_mailbox(str(ident["value"]))
        domain = mailbox.rsplit("@", 1)[1]
        if domain not in self._settings.acme.allowed_domains:
            raise ACMERejectedIdentifier(f"{domain} is not among the domains that may enrol by ACME")
        return mailbox

    def new_order(self, request: Verified, directory_url: str) -> OrderView:
        account_id = str(request.account_id)
        try:
            mailbox = self._mailbox(request.json())
        except MailkmsError as exc:
            self._refusals.identified(f"acme:{account_id}", "acme.refused", "-", exc)
            raise
        now = self._clock.now()
        expires = now + dt.timedelta(seconds=self._settings.acme.order_ttl_seconds)
        with self._db.transaction() as session:
            open_orders = session.execute(
                select(func.count())
                .select_from(ACMEOrder)
                .where(
                    ACMEOrder.account_id == account_id,
                    ACMEOrder.status.in_(("pending", "ready")),
                    ACMEOrder.expires_at > now,
                )
            ).scalar_one()
            if open_orders >= self._settings.acme.pending_orders_per_account:
                raise RateLimited("this account has too many open orders; finish or let some expire", retry_after=3600)
            order = ACMEOrder(
                id=secrets.token_urlsafe(16),
                account_id=account_id,
                mailbox=mailbox,
                status="pending",
                expires_at=expires,
                created_at=now,
            )
            session.add(order)
            session.flush()  # no ORM relationship orders the inserts: the order row first
            part1, part2 = wire.b64url(secrets.token_bytes(18)), wire.b64url(secrets.token_bytes(18))
            domain = self.challenge_from.rsplit("@", 1)[-1]
            message_id = f"<acme-{secrets.token_hex(16)}@{domain}>"
            authz = ACMEAuthorization(
                id=secrets.token_urlsafe(16),
                challenge_id=secrets.token_urlsafe(16),
                order_id=order.id,
                mailbox=mailbox,
                status="pending",
                challenge_status="pending",
                token_part1=part1,
                token_part2=part2,
                message_id=message_id,
                expires_at=expires,
                attempts=0,
            )
            session.add(authz)
            session.flush()
            body = wire.challenge_mail(
                sender=self.challenge_from,
                recipient=mailbox,
                token_part1=part1,
                message_id=message_id,
                now=now,
                directory_url=directory_url,
            )
            queue_message(
                session,
                self._audit,
                now,
                message_id=message_id,
                sender=self.challenge_from,
                recipient=mailbox,
                body=body,
                purpose="acme-challenge",
            )
            self._audit.append(session, f"acme:{account_id}", "acme.order.created", mailbox, order=order.id)
            return self._order_view(order, authz)

    def _owned(
        self, session: Session, account_id: str | None, order_id: str, *, lock: bool = True
    ) -> tuple[ACMEOrder, ACMEAuthorization]:
        """The order and its authorization, if the account owns them; locked (FOR UPDATE on
        PostgreSQL) unless read in a read-only transaction."""
        order = session.get(ACMEOrder, order_id, with_for_update=lock)
        if order is None or order.account_id != account_id:
            raise ACMENotFound("no such order for this account")
        authz = session.execute(select(ACMEAuthorization).where(ACMEAuthorization.order_id == order.id)).scalar_one()
        return order, authz

    def _by_authz(
        self, session: Session, account_id: str | None, column: InstrumentedAttribute[str], value: str
    ) -> tuple[ACMEOrder, ACMEAuthorization]:
        authz = session.execute(select(ACMEAuthorization).where(column == value)).scalar_one_or_none()
        if authz is None:
            raise ACMENotFound("no such authorization for this account")
        return self._owned(session, account_id, authz.order_id)

    def order(self, request: Verified, order_id: str) -> OrderView:
        with self._db.transaction() as session:
            order, authz = self._owned(session, request.account_id, order_id)
            self._refresh(session, order, authz)
            return self._order_view(order, authz)

    def authorization(self, request: Verified, authz_id: str) -> AuthzView:
        """POST-as-GET reads it; {"status": "deactivated"} deactivates a pending or valid
        authorization (RFC 8555 §7.5.2): its order, if not finalized yet, becomes invalid."""
        status = request.json().get("status")
        if status not in (None, "deactivated"):
            raise Malformed(f"an authorization's status may only be set to deactivated, not {status!r}")
        with self._db.transaction() as session:
            order, authz = self._by_authz(session, request.account_id, ACMEAuthorization.id, authz_id)
            self._refresh(session, order, authz)
            if status == "deactivated":
                if authz.status not in ("pending", "valid"):
                    raise Malformed(f"the authorization is {authz.status}; only pending or valid ones deactivate")
                authz.status = "deactivated"
                self._refresh(session, order, authz)
                self._audit.append(
                    session,
                    f"acme:{request.account_id}",
                    "acme.authorization.deactivated",
                    authz.mailbox,
                    order=order.id,
                )
            return self._authz_view(authz)

    def challenge(self, request: Verified, challenge_id: str) -> AuthzView:
        """POST {} to the challenge: the client says it has replied; the server looks for the reply.
        POST-as-GET (empty payload) only reads."""
        with self._db.transaction() as session:
            order, authz = self._by_authz(session, request.account_id, ACMEAuthorization.challenge_id, challenge_id)
            if request.payload and authz.challenge_status == "pending":
                authz.challenge_status = "processing"
                self._audit.append(
                    session, f"acme:{request.account_id}", "acme.challenge.answered", authz.mailbox, order=order.id
                )
            self._refresh(session, order, authz)
            return self._authz_view(authz)

    # --- validation ----------------------------------------------------------------------
    def _refresh(self, session: Session, order: ACMEOrder, authz: ACMEAuthorization) -> None:
        now = self._clock.now()
        if authz.status == "pending" and now > authz.expires_at:
            authz.status = "invalid"
            authz.challenge_status = "invalid"
            authz.error = _problem(ACMEIncorrectResponse("the authorization expired before a reply arrived"))
        if authz.challenge_status == "processing" and authz.status == "pending":
            self._validate(session, order, authz, now)
        if order.status == "pending" and authz.status == "valid":
            order.status = "ready"
        if order.status in ("pending", "ready") and authz.status == "deactivated":
            order.status = "invalid"
            order.error = _problem(Unauthorized("the authorization was deactivated"))
        if order.status in ("pending", "ready") and (authz.status == "invalid" or now > order.expires_at):
            order.status = "invalid"
            order.error = authz.error or _problem(Malformed("the order expired"))

    def _validate(self, session: Session, order: ACMEOrder, authz: ACMEAuthorization, now: dt.datetime) -> None:
        account = session.get(ACMEAccount, order.account_id)
        assert account is not None
        expected = wire.expected_response(authz.token_part1, authz.token_part2, account.thumbprint)
        failure: MailkmsError | None = None
        marks = (authz.message_id.encode(), authz.token_part1.encode())
        for data in self._replies():
            if not any(mark in data for mark in marks):
                continue  # names neither the challenge mail nor its token: not parsed at all
            try:
                reply = wire.read_reply(data)
            except (ValueError, TypeError, LookupError):
                continue
            if not wire.answers(reply, authz.message_id, authz.token_part1):
                continue
            authz.attempts += 1
            dkim_ok = (
                wire.dkim_aligned(data, authz.mailbox.rsplit("@", 1)[1], self.dns)
                if self._settings.acme.require_dkim and reply.sender == authz.mailbox
                else None
            )
            try:
                wire.check_reply(
                    reply,
                    mailbox=authz.mailbox,
                    message_id=authz.message_id,
                    token_part1=authz.token_part1,
                    response=expected,
                    same=hmac.compare_digest,
                    dkim_ok=dkim_ok,
                )
            except ACMEIncorrectResponse as exc:
                failure = failure or exc
                continue
            authz.status = authz.challenge_status = "valid"
            authz.validated_at = now
            authz.error = None
            self._audit.append(session, f"acme:{account.id}", "acme.challenge.valid", authz.mailbox, order=order.id)
            return
        if failure is not None:
            authz.status = authz.challenge_status = "invalid"
            authz.error = _problem(failure)
            self._audit.append(
                session,
                f"acme:{account.id}",
                "acme.challenge.invalid",
                authz.mailbox,
                order=order.id,
                reason=failure.detail,
            )

    def _replies(self) -> Iterator[bytes]:
        """Every mail that reached the challenge address (Maildir new/ and cur/)."""
        root: Path = self._settings.acme_reply_maildir
        for sub in ("new", "cur"):
            folder = root / sub
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                try:
                    if path.is_file() and path.stat().st_size <= MAX_REPLY_BYTES:
                        yield path.read_bytes()
                except OSError:
                    continue

    # --- finalize and certificate ----------------------------------------------------------
    def finalize(self, request: Verified, order_id: str) -> OrderView:
        payload = request.json()
        csr_text = payload.get("csr")
        if not isinstance(csr_text, str):
            raise BadCSR('finalize takes {"csr": base64url DER}')
        try:
            der = wire.b64url_decode(csr_text)
        except ValueError:
            raise BadCSR("the csr is not base64url") from None
        with self._db.transaction() as session:
            order, authz = self._owned(session, request.account_id, order_id)
            self._refresh(session, order, authz)
            if order.status != "ready":
                raise ACMEOrderNotReady(f"the order is {order.status}, not ready")
            checked = check_csr(der)
            names = {n.strip().lower() for n in inspect_csr(checked.der).mailboxes}
            if names != {order.mailbox}:
                raise BadCSR(
                    f"the CSR must name exactly the order's mailbox {order.mailbox} (it names {sorted(names)})"
                )
            kind = self._kind(checked.der)
            cert = self._issue(session, order, checked.public_key, kind)
            order.status = "valid"
            order.certificate_serial = serial_hex(cert.serial_number)
            return self._order_view(order, authz)

    def _kind(self, csr_der: bytes) -> CertKind:
        """Which certificate the CSR asks for, by its requested keyUsage: keyEncipherment (RSA) or
        keyAgreement (EC) without digitalSignature asks for an encryption certificate, issued only
        with `[acme] signing_only = false`; anything else gets the signing certificate."""
        try:
            requested = x509.load_der_x509_csr(csr_der).extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            return CertKind.SIGNING
        except ValueError:
            raise BadCSR("the CSR's requested extensions cannot be read") from None
        encrypts = requested.key_encipherment or requested.key_agreement
        if not encrypts or requested.digital_signature:
            return CertKind.SIGNING
        if self._settings.acme.signing_only:
            raise BadCSR(
                "this server issues signing certificates only by ACME ([acme] signing_only); "
                "encryption keys come through enrolment, where the server makes and archives them"
            )
        return CertKind.ENCRYPTION

    def _issue(self, session: Session, order: ACMEOrder, public_key: PublicKey, kind: CertKind) -> x509.Certificate:
        policy = self._settings.policy
        user = session.execute(select(User).where(User.email == order.mailbox)).scalar_one_or_none()
        lifetime, _ = policy.for_group(user.group if user is not None else None)
        validity = subscriber_validity(self._clock.now(), lifetime)
        partitions = self._issuer.partitions
        issuer = self._ca.issuer
        partition = partitions.take(session, issuer.key_id) if partitions is not None else None
        prepared = issuer.prepare_subscriber(
            kind,
            order.mailbox,
            public_key,
            validity,
            policy.signing_key_types,
            partition,
        )
        cert = issuer.issue(prepared)
        session.add(certificate_row(cert, user.id if user is not None else None, f"acme-{kind}", 0, partition))
        # the client made the key and kept it: an ACME encryption key is never archived (no recovery)
        archived = {"key_archived": False} if kind is CertKind.ENCRYPTION else {}
        self._audit.append(
            session,
            f"acme:{order.account_id}",
            "certificate.issued",
            order.mailbox,
            serial=serial_hex(cert.serial_number),
            kind=str(kind),
            via="acme",
            order=order.id,
            not_after=cert.not_valid_after_utc.isoformat(),
            **archived,
        )
        return cert

    def certificate(self, request: Verified, order_id: str) -> bytes:
        """The PEM chain: the certificate, then the issuing CA."""
        with self._db.read_only() as session:
            order, _ = self._owned(session, request.account_id, order_id, lock=False)
            if order.certificate_serial is None:
                raise ACMENotFound("the order has no certificate")
            der = session.execute(
                select(Certificate.der).where(Certificate.serial == order.certificate_serial)
            ).scalar_one()
        cert = x509.load_der_x509_certificate(der)
        chain = [cert, self._ca.chain_of(cert)[0]]  # the key that signed it, also after a `ca rekey`
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)

    def revoke(self, request: Verified) -> None:
        """revokeCert (RFC 8555 §7.6), signed either by the account that ordered the certificate
        (kid), or by the certificate's own key (jwk): then any certificate this CA issued for that
        key, however it was enrolled, since holding the key proves the right to revoke it."""
        payload = request.json()
        text = payload.get("certificate")
        reason = payload.get("reason", 0)
        if not isinstance(text, str):
            raise Malformed('revokeCert takes {"certificate": base64url DER}')
        if not isinstance(reason, int) or reason not in REASON_CODES:
            raise BadRevocationReason(f"reason {reason!r} is not one of {sorted(REASON_CODES)}")
        try:
            cert = x509.load_der_x509_certificate(wire.b64url_decode(text))
        except ValueError:
            raise Malformed("the certificate is not base64url DER") from None
        serial = serial_hex(cert.serial_number)
        if request.account_id is None:
            actor = f"acme-key:{request.thumbprint}"
            if not same_public_key(wire.load_account_key(dict(request.jwk)).public_key, cert.public_key()):
                raise Unauthorized("the JWS key is not the certificate's key")
            with self._db.read_only() as session:
                der = session.execute(select(Certificate.der).where(Certificate.serial == serial)).scalar_one_or_none()
            if der != cert.public_bytes(serialization.Encoding.DER):
                raise ACMENotFound("this CA did not issue that certificate")
        else:
            actor = f"acme:{request.account_id}"
            with self._db.read_only() as session:
                owned = session.execute(
                    select(ACMEOrder.id).where(
                        ACMEOrder.account_id == request.account_id, ACMEOrder.certificate_serial == serial
                    )
                ).first()
            if owned is None:
                raise ACMENotFound("this account did not order that certificate")
        self._revocation.revoke_serial(serial, REASON_CODES[reason], actor)

    def purge(self, keep: dt.timedelta = dt.timedelta(days=1)) -> int:
        """Forget orders that ended without a certificate (expired or invalid) `keep` after their
        expiry, with their authorizations; orders that issued stay (they name the serial)."""
        cutoff = self._clock.now() - keep
        with self._db.transaction() as session:
            stale = select(ACMEOrder.id).where(ACMEOrder.certificate_serial.is_(None), ACMEOrder.expires_at < cutoff)
            session.execute(delete(ACMEAuthorization).where(ACMEAuthorization.order_id.in_(stale)))
            result = session.execute(delete(ACMEOrder).where(ACMEOrder.id.in_(stale.scalar_subquery())))
            return int(getattr(result, "rowcount", 0) or 0)

    # --- views -----------------------------------------------------------------------------
    def _order_view(self, order: ACMEOrder, authz: ACMEAuthorization) -> OrderView:
        return OrderView(
            order.id,
            order.status,
            order.mailbox,
            order.expires_at,
            authz.id,
            order.certificate_serial is not None,
            _error(order.error),
        )

    def _authz_view(self, authz: ACMEAuthorization) -> AuthzView:
        challenge = ChallengeView(
            authz.challenge_id,
            authz.challenge_status,
            authz.token_part2,
            self.challenge_from,
            authz.validated_at,
            _error(authz.error),
        )
        return AuthzView(authz.id, authz.status, authz.mailbox, authz.expires_at, challenge)


__all__ = ["ACME", "CHALLENGE_TYPE", "AccountView", "AuthzView", "ChallengeView", "OrderView", "Verified"]
