"""CMP (RFC 9483, the lightweight CMP profile) on top of the dual-certificate lifecycle.

What each message does here:

- ``ir`` / ``cr``, MAC-protected (PasswordBasedMac or PBMAC1) with the user's one-time enrolment
  token as the secret and the mailbox as the reference (senderKID): spends the token and issues the
  whole generation as EST simpleenroll does (`EST.issue_with_token`). The answer carries the
  **signing** certificate for the CRMF key; the server-made **encryption** key waits sealed under
  the token for EST serverkeygen (same token, within the hour) and is archived as always.
- ``kur``, signed with the current signing certificate and key: the seed's renewal, by
  `Renewal.renew_proven` (the same rules: revoked, expired → re-enrol, not due; a repeat after a
  lost answer gets the pair already issued). The new encryption pair arrives by e-mail.
- ``rr``, signed by the holder: revokes one of the holder's own certificates.
- ``certConf`` closes an ir/cr/kur transaction (``pkiConf``); nothing is asynchronous, so
  ``pollReq`` is refused.

Every request's transactionID opens a transaction at most once, and its senderNonce is accepted
once; a certConf must carry our last senderNonce as recipNonce. Answers are MAC-protected with
the same secret when the request was, otherwise signed by the issuing CA (loaded once per process).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import (
    AlreadyRevoked,
    BadCMPMessage,
    BadCMPProtection,
    BadCSR,
    CertificateNotFound,
    CMPTransactionInUse,
    CMPUnknownTransaction,
    MailkmsError,
    Malformed,
    NotCurrentCertificate,
    NotOwner,
    ReplayedNonce,
    Revoked,
    StaleRequest,
    TokenInvalid,
    UnknownIssuer,
)
from mailkms.pki import CheckedCSR, same_public_key
from mailkms.pki._cmp import (
    IT_CA_CERTS,
    IT_CA_KEY_UPDATE_INFO,
    IT_CERT_REQ_TEMPLATE,
    IT_CURRENT_CRL,
    IT_ROOT_CA_CERT,
    IT_ROOT_CA_KEY_UPDATE,
    IT_SIGN_KEY_PAIR_TYPES,
    CMPRequest,
    cert_confirms,
    cert_hash,
    cert_requests,
    certificates_value,
    general_requests,
    key_pair_types_value,
    revocation_requests,
)
from mailkms.pki._cmp import FailInfo as CMPFailInfo
from mailkms.pki._cmp import Protection as CMPProtection
from mailkms.pki._cmp import Reply as CMPReply
from mailkms.pki._cmp import Signer as CMPSigner
from mailkms.pki._cmp import Status as CMPStatus
from mailkms.pki._cmp import error_without_request as cmp_error_without_request
from mailkms.pki._cmp import parse_request as parse_cmp_request
from mailkms.pki._cmp import verify_mac as verify_cmp_mac
from mailkms.pki._cmp import verify_signature as verify_cmp_signature
from mailkms.services._audit import AuditLog
from mailkms.services._ca import CAContext
from mailkms.services._enrolment import HELD_A_TOKEN
from mailkms.services._est import EST
from mailkms.services._issuance import serial_hex
from mailkms.services._refusals import Refusals
from mailkms.services._renewal import Renewal
from mailkms.services._revocation import Revocation
from mailkms.services._tokens import TokenSealer, redeem_token
from mailkms.services._users import normalise_mailbox
from mailkms.store import Certificate, CMPNonce, CMPTransaction, Database, Token, User

StatusOf = Callable[[MailkmsError], CMPStatus]
# CRLReason codes a holder may give (RFC 5280 §5.3.1), by the names `mailkms revoke` takes.
_REASONS = {
    0: None,
    1: "keyCompromise",
    3: "affiliationChanged",
    4: "superseded",
    5: "cessationOfOperation",
    9: "privilegeWithdrawn",
}


class CMP:
    def __init__(
        self,
        db: Database,
        ca: CAContext,
        est: EST,
        renewal: Renewal,
        revocation: Revocation,
        sealer: TokenSealer,
        settings: Settings,
        clock: Clock,
        audit: AuditLog,
        refusals: Refusals,
    ) -> None:
        self._db = db
        self._ca = ca
        self._est = est
        self._renewal = renewal
        self._revocation = revocation
        self._sealer = sealer
        self._settings = settings
        self._clock = clock
        self._audit = audit
        self._refusals = refusals

    @property
    def _signer(self) -> CMPSigner:
        """The issuing CA key protects every reply: read at each reply, so a running server that took a
        `ca rekey` or `ca import` (reload) answers with the new key at once (the key is already open)."""
        issuing = self._ca.issuing
        return CMPSigner(issuing.certificate, issuing.private_key, (self._ca.root,))

    @property
    def _window(self) -> dt.timedelta:
        return dt.timedelta(seconds=self._settings.policy.nonce_ttl_seconds)

    def handle(self, data: bytes, status_of: StatusOf) -> bytes:
        """One CMP request in, one CMP answer out (an error message for every refusal)."""
        now = self._clock.now()
        try:
            request = parse_cmp_request(data)
        except MailkmsError as exc:
            self._refusals.anonymous("cmp.refused", exc)
            return cmp_error_without_request(self._signer, now, status_of(exc))
        secret: list[str] = []  # the MAC secret, once the request proved it knows it
        proven: list[str] = []  # the mailbox, once the request proved it is theirs
        try:
            self._check_time(request, now)
            if request.body in ("ir", "cr", "p10cr", "kur", "rr", "genm"):
                self._check_fresh(request)
            if request.body == "genm":
                return self._general(request, secret, proven)
            if request.body in ("ir", "cr") or (request.body == "p10cr" and request.protection is CMPProtection.MAC):
                return self._enrol(request, secret, proven)
            if request.body in ("kur", "p10cr"):  # a signed p10cr: the renewal, as kur
                return self._update(request, proven)
            if request.body == "rr":
                return self._revoke(request, proven)
            if request.body == "certConf":
                return self._confirm(request, secret, proven)
            if request.body == "pollReq":
                raise BadCMPMessage(
                    "nothing is pending: every answer of this server is immediate", fail=CMPFailInfo.BAD_REQUEST
                )
            raise BadCMPMessage(
                f"{request.body} is not served here (ir, cr, p10cr, kur, rr, certConf, genm)",
                fail=CMPFailInfo.BAD_REQUEST,
            )
        except MailkmsError as exc:
            if proven:
                self._refusals.identified(proven[0], "cmp.refused", proven[0], exc, body=request.body)
            else:
                self._refusals.anonymous("cmp.refused", exc)
            mac = secret[0].encode() if secret else None
            return CMPReply(request, self._signer, self._clock.now(), mac).error(status_of(exc))

    # -- checks every request passes ------------------------------------------------------------------
    def _check_time(self, request: CMPRequest, now: dt.datetime) -> None:
        at = request.message_time
        if at is not None and abs(now - at) > self._window:
            raise StaleRequest(f"messageTime must be within {self._window} of the server's clock")

    def _check_fresh(self, request: CMPRequest) -> None:
        """A replayed first message is refused before its protection costs anything (no write)."""
        with self._db.read_only() as session:
            if session.get(CMPTransaction, request.transaction_id.hex()) is not None:
                raise CMPTransactionInUse()
            if session.get(CMPNonce, request.sender_nonce.hex()) is not None:
                raise ReplayedNonce("this senderNonce was used before: the message is a replay")

    def _spend_nonce(self, session: Session, request: CMPRequest) -> None:
        """senderNonce accepted once (kept twice the messageTime window); a replay is refused."""
        now = self._clock.now()
        session.execute(delete(CMPNonce).where(CMPNonce.expires_at < now))
        try:
            with session.begin_nested():
                session.add(CMPNonce(nonce=request.sender_nonce.hex(), expires_at=now + 2 * self._window))
        except IntegrityError:
            raise ReplayedNonce("this senderNonce was used before: the message is a replay") from None

    def _open(
        self,
        session: Session,
        request: CMPRequest,
        user: User | None,
        token: Token | None = None,
        signer_serial: str | None = None,
    ) -> CMPTransaction:
        now = self._clock.now()
        transaction_id = request.transaction_id.hex()
        if session.get(CMPTransaction, transaction_id) is not None:
            raise CMPTransactionInUse()
        if request.recip_nonce is not None:
            raise BadCMPMessage("the first message of a transaction has no recipNonce")
        self._spend_nonce(session, request)
        row = CMPTransaction(
            transaction_id=transaction_id,
            kind=request.body,
            user_id=user.id if user is not None else None,
            token_id=token.id if token is not None else None,
            signer_serial=signer_serial,
            created_at=now,
            expires_at=now + dt.timedelta(seconds=self._settings.cmp.transaction_seconds),
        )
        try:
            with session.begin_nested():  # two requests with one transactionID at once: one wins
                session.add(row)
        except IntegrityError:
            raise CMPTransactionInUse() from None
        return row

    # -- ir / cr: enrolment with the token ------------------------------------------------------------
    def _enrol(self, request: CMPRequest, secret: list[str], proven: list[str]) -> bytes:
        if request.protection is not CMPProtection.MAC:
            raise BadCMPProtection(
                f"an {request.body} is MAC-protected with the enrolment token: -ref MAILBOX -secret pass:TOKEN",
                fail=CMPFailInfo.NOT_AUTHORIZED,
            )
        mailbox = self._reference(request)
        wanted = cert_requests(request)[0]
        now = self._clock.now()
        try:
            with self._db.transaction() as session:
                user = session.execute(select(User).where(User.email == mailbox)).scalar_one_or_none()
                row, token = self._token_for_mac(session, user, request)
                secret.append(token)
                redeem_token(session, user, token, now)
                assert user is not None
                proven.append(mailbox)
                others = sorted({m for m in wanted.mailboxes if normalise_mailbox(m) != mailbox})
                if others:
                    raise BadCSR(f"the certificate template names {', '.join(others)}, not {mailbox}")
                transaction = self._open(session, request, user, token=row)
                pair = self._est.issue_with_token(session, user, row, token, wanted.public_key, via="cmp")
                reply = CMPReply(request, self._signer, now, token.encode())
                transaction.certificate_serial = serial_hex(pair.signing.serial_number)
                transaction.server_nonce = reply.nonce.hex()
                if request.implicit_confirm:  # granted (echoed in the answer): no certConf will come
                    transaction.closed_at = now
                    row.cmp_secret = None
                self._audit.append(
                    session, mailbox, "cmp.issued", mailbox, serial=transaction.certificate_serial, body=request.body
                )
                return reply.certificate(
                    wanted.cert_req_id, pair.signing, self._ca.chain_of(pair.signing), (self._ca.root,)
                )
        except MailkmsError as exc:
            if isinstance(exc, HELD_A_TOKEN) and not proven:
                proven.append(mailbox)  # a real token of this mailbox, spent or expired
            raise

    @staticmethod
    def _reference(request: CMPRequest) -> str:
        try:
            return normalise_mailbox(request.reference or "")
        except Malformed:
            raise TokenInvalid("the reference (senderKID) must be the mailbox the token was issued for") from None

    # -- genm: general information (RFC 9483 §4.3) -------------------------------------------------------
    def _general(self, request: CMPRequest, secret: list[str], proven: list[str]) -> bytes:
        """genm, protected as any request: MAC with a live enrolment token (before enrolment; the
        token is not spent) or signed by a holder. Answers CA certificates (caCerts), the key
        types accepted (signKeyPairTypes), the current CRL (currentCRL: what OpenSSL 3.0 can ask
        where RFC 9483 §4.3.4 has crlStatusList), and "no update" for the root CA key
        (rootCaCert, caKeyUpdateInfo) and "no template" (certReqTemplate). Other InfoTypes are left
        out of the genp, as RFC 4210 §5.3.19 lets a receiver do; an empty genm gets caCerts."""
        wanted = general_requests(request) or [IT_CA_CERTS]
        now = self._clock.now()
        with self._db.transaction() as session:
            if request.protection is CMPProtection.MAC:
                mailbox = self._reference(request)
                user = session.execute(select(User).where(User.email == mailbox)).scalar_one_or_none()
                row, token = self._token_for_mac(session, user, request)
                secret.append(token)
                proven.append(mailbox)
                if row.expires_at < now or row.revoked_at is not None:
                    raise TokenInvalid("the enrolment token has expired or was replaced")
            else:
                proven.append(self._holder(session, self._signed_by_holder(request)).email)
            self._spend_nonce(session, request)
        items: list[tuple[str, bytes | None]] = []
        for oid in wanted:
            if oid == IT_CA_CERTS:
                items.append(
                    (oid, certificates_value((*self._ca.issuing_certificates(self._clock.now()), self._ca.root)))
                )
            elif oid == IT_SIGN_KEY_PAIR_TYPES:
                items.append((oid, key_pair_types_value(self._settings.policy.signing_key_types)))
            elif oid == IT_CURRENT_CRL:
                crl = self._revocation.current_crl()
                items.append((oid, crl.der if crl is not None else None))
            elif oid == IT_ROOT_CA_CERT:
                items.append((IT_ROOT_CA_KEY_UPDATE, None))  # the root has no successor
            elif oid in (IT_CA_KEY_UPDATE_INFO, IT_CERT_REQ_TEMPLATE):
                items.append((oid, None))
        return CMPReply(request, self._signer, now, secret[0].encode() if secret else None).general(items)

    def _token_for_mac(self, session: Session, user: User | None, request: CMPRequest) -> tuple[Token, str]:
        """The user's newest token that verifies the MAC: the secret of an ir is that token."""
        if user is None:
            raise BadCMPProtection("no enrolment token is known for this reference")
        rows = session.execute(
            select(Token).where(Token.user_id == user.id, Token.cmp_secret.is_not(None)).order_by(Token.id.desc())
        ).scalars()
        for row in list(rows)[:3]:
            token = self._sealer.open(row, session)
            if token is None:
                continue
            try:
                verify_cmp_mac(request, token.encode())
            except BadCMPProtection:
                continue
            return row, token
        raise BadCMPProtection("the message's MAC does not verify with the enrolment token of this reference")

    # -- kur: the renewal --------------------------------------------------------------------------------
    def _signed_by_holder(self, request: CMPRequest) -> x509.Certificate:
        if request.protection is not CMPProtection.SIGNATURE:
            raise BadCMPProtection(
                f"a {request.body} is signed with your current certificate: -cert CERT -key KEY",
                fail=CMPFailInfo.NOT_AUTHORIZED,
            )
        signer = verify_cmp_signature(request)
        if not self._ca.issued_here(signer):  # the current key, or one `ca rekey` replaced
            raise UnknownIssuer("the signing certificate was not issued by this CA")
        return signer

    def _update(self, request: CMPRequest, proven: list[str]) -> bytes:
        signer = self._signed_by_holder(request)
        wanted = cert_requests(request)[0]
        with self._db.transaction() as session:
            user = self._holder(session, signer)
            proven.append(user.email)
            transaction = self._open(session, request, user, signer_serial=serial_hex(signer.serial_number))
            transaction_id = transaction.transaction_id
        checked = CheckedCSR(public_key=wanted.public_key, der=b"", claimed_emails=wanted.mailboxes)
        accepted = self._renewal.renew_proven(signer, checked, via="cmp")
        cert = self._renewal.signing_certificate(accepted)
        if accepted.already_issued and not same_public_key(cert.public_key(), wanted.public_key):
            # another kur with this certificate won (at once, or before): its certificate is for
            # another key, which this client would reject in its certConf (and so revoke)
            raise NotCurrentCertificate(
                "this certificate was already renewed with another key; use the new certificate"
            )
        reply = CMPReply(request, self._signer, self._clock.now())
        with self._db.transaction() as session:
            row = session.get(CMPTransaction, transaction_id)
            assert row is not None
            row.certificate_serial = serial_hex(cert.serial_number)
            row.server_nonce = reply.nonce.hex()
            if request.implicit_confirm:
                row.closed_at = self._clock.now()
            self._audit.append(
                session, user.email, "cmp.issued", user.email, serial=row.certificate_serial, body=request.body
            )
        return reply.certificate(wanted.cert_req_id, cert, self._ca.chain_of(cert))

    @staticmethod
    def _holder(session: Session, signer: x509.Certificate) -> User:
        row = session.execute(
            select(Certificate).where(Certificate.serial == serial_hex(signer.serial_number))
        ).scalar_one_or_none()
        if row is None or row.user_id is None or row.der != signer.public_bytes(serialization.Encoding.DER):
            raise UnknownIssuer("the signing certificate is not one this server issued to a user")
        user = session.get(User, row.user_id)
        assert user is not None
        if row.revoked_at is not None:
            raise Revoked("the signing certificate is revoked; ask an administrator to enrol you again")
        return user

    # -- rr: revocation by the holder ------------------------------------------------------------------
    def _revoke(self, request: CMPRequest, proven: list[str]) -> bytes:
        signer = self._signed_by_holder(request)
        wanted = revocation_requests(request)[0]
        issuer = self._ca.issuing.certificate.subject.public_bytes()
        if wanted.issuer is not None and wanted.issuer != issuer:
            raise CertificateNotFound("the certificate to revoke was not issued by this CA's issuing CA")
        if wanted.reason_code not in _REASONS:
            raise BadCMPMessage(f"CRL reason {wanted.reason_code} is not one a subscriber may give")
        serial = serial_hex(wanted.serial)
        with self._db.transaction() as session:
            user = self._holder(session, signer)
            proven.append(user.email)
            target = session.execute(select(Certificate).where(Certificate.serial == serial)).scalar_one_or_none()
            if target is None:
                raise CertificateNotFound(f"no certificate {serial} was issued by this CA")
            if target.user_id != user.id:
                raise NotOwner("you may revoke only your own certificates")
            if target.revoked_at is not None:
                raise AlreadyRevoked(f"certificate {serial} is already revoked")
            transaction = self._open(session, request, user, signer_serial=serial_hex(signer.serial_number))
            transaction.certificate_serial = serial
            transaction.closed_at = self._clock.now()
        self._revocation.revoke_serial(serial, _REASONS[wanted.reason_code], actor=user.email)
        return CMPReply(request, self._signer, self._clock.now()).revoked()

    # -- certConf ----------------------------------------------------------------------------------------
    def _confirm(self, request: CMPRequest, secret: list[str], proven: list[str]) -> bytes:
        now = self._clock.now()
        rejected: str | None = None
        with self._db.transaction() as session:
            row = session.get(CMPTransaction, request.transaction_id.hex(), with_for_update=True)
            if row is None or row.closed_at is not None or row.certificate_serial is None or now > row.expires_at:
                raise CMPUnknownTransaction()
            token = self._confirm_protection(session, row, request)
            if token is not None:
                secret.append(token)
            user = session.get(User, row.user_id)
            assert user is not None
            proven.append(user.email)
            if request.recip_nonce is None or request.recip_nonce.hex() != row.server_nonce:
                raise CMPUnknownTransaction(
                    "recipNonce is not the senderNonce of the server's answer", fail=CMPFailInfo.BAD_RECIPIENT_NONCE
                )
            self._spend_nonce(session, request)
            issued = session.execute(
                select(Certificate).where(Certificate.serial == row.certificate_serial)
            ).scalar_one()
            cert = x509.load_der_x509_certificate(issued.der)
            for confirm in cert_confirms(request):
                if confirm.cert_hash != cert_hash(cert, confirm.hash_oid):
                    raise BadCMPMessage(
                        "certHash is not the hash of the certificate issued", fail=CMPFailInfo.BAD_CERT_ID
                    )
                what = "cmp.confirmed" if confirm.accepted else "cmp.rejected-by-client"
                self._audit.append(session, user.email, what, user.email, serial=row.certificate_serial)
                if not confirm.accepted:
                    rejected = row.certificate_serial
            row.closed_at = now
            if row.token_id is not None:  # the transaction is over: the token need not be kept sealed
                spent = session.get(Token, row.token_id)
                if spent is not None:
                    spent.cmp_secret = None
            answer = CMPReply(request, self._signer, now, token.encode() if token else None).confirmed()
        if rejected is not None:  # RFC 9483 §4.1.1: a certificate the EE rejects is revoked
            self._revocation.revoke_serial(rejected, "cessationOfOperation", actor=user.email)
        return answer

    def _confirm_protection(self, session: Session, row: CMPTransaction, request: CMPRequest) -> str | None:
        """A certConf is protected as its transaction was: the same token's MAC, or the same signer."""
        if row.token_id is not None:
            token_row = session.get(Token, row.token_id)
            token = self._sealer.open(token_row, session) if token_row is not None else None
            if token is None or request.protection is not CMPProtection.MAC:
                raise BadCMPProtection("the certConf must be MAC-protected with the same enrolment token")
            verify_cmp_mac(request, token.encode())
            return token
        if request.protection is not CMPProtection.SIGNATURE:
            raise BadCMPProtection("the certConf must be signed with the certificate that signed the request")
        signer = verify_cmp_signature(request)
        if serial_hex(signer.serial_number) != row.signer_serial or not self._ca.issued_here(signer):
            raise BadCMPProtection("the certConf is signed by another certificate than the request was")
        return None

    def purge(self) -> int:
        """Forget the senderNonces past their window, transactions a day past their end, and the
        sealed copies of tokens that can no longer open a transaction (expired, replaced, or spent
        with no CMP transaction waiting for its certConf). Returns the rows changed."""
        now = self._clock.now()
        with self._db.transaction() as session:
            changed = _count(session.execute(delete(CMPNonce).where(CMPNonce.expires_at < now)))
            changed += _count(
                session.execute(delete(CMPTransaction).where(CMPTransaction.expires_at < now - dt.timedelta(days=1)))
            )
            waiting = select(CMPTransaction.token_id).where(
                CMPTransaction.token_id.is_not(None),
                CMPTransaction.closed_at.is_(None),
                CMPTransaction.expires_at >= now,
            )
            unusable = or_(Token.expires_at < now, Token.revoked_at.is_not(None), Token.used_at.is_not(None))
            changed += _count(
                session.execute(
                    update(Token)
                    .where(Token.cmp_secret.is_not(None), unusable, Token.id.not_in(waiting))
                    .values(cmp_secret=None)
                )
            )
            return changed


def _count(result: object) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


__all__ = ["CMP", "StatusOf"]
