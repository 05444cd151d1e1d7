"""Enrolment with a one-time token: the first pair, or a new start after expiry or revocation."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select

from mailkms.clock import Clock
from mailkms.errors import BadKey, BadMessage, MailkmsError, TokenInvalid
from mailkms.pki import check_csr
from mailkms.services._audit import AuditLog
from mailkms.services._issuance import PairIssuer
from mailkms.services._recovery import take_recovery_hold
from mailkms.services._tokens import redeem_token
from mailkms.services._users import normalise_mailbox
from mailkms.store import Database, User


@dataclass(frozen=True)
class EnrolmentAccepted:
    request_id: str
    mailbox: str
    generation: int
    mail_from: str


def load_transport_certificate(pem: str) -> x509.Certificate:
    """The client's transport key, as a self-signed certificate: the envelope recipient at enrolment."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise BadMessage("transport_certificate is not a PEM certificate") from None
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
        raise BadKey("the transport key must be RSA, at least 2048 bits")
    return cert


class Enrolment:
    def __init__(self, db: Database, issuer: PairIssuer, clock: Clock, audit: AuditLog, mail_from: str) -> None:
        self._db = db
        self._issuer = issuer
        self._clock = clock
        self._audit = audit
        self._mail_from = mail_from

    def enrol(self, email: str, token: str, csr: bytes, transport_pem: str) -> EnrolmentAccepted:
        mailbox = normalise_mailbox(email)
        try:
            checked = check_csr(csr)
            transport = load_transport_certificate(transport_pem)
            with self._db.transaction() as session:
                user = session.execute(select(User).where(User.email == mailbox)).scalar_one_or_none()
                row = redeem_token(session, user, token, self._clock.now())
                assert user is not None
                self._audit.append(session, mailbox, "token.used", mailbox, purpose=row.purpose)
                kind = "recovery" if row.purpose == "recovery" else "enrolment"
                # a recovery token brings the user's whole key history, held sealed since `mailkms recover`
                history = take_recovery_hold(session, row, token) if kind == "recovery" else []
                pair = self._issuer.issue_pair(
                    session, user, kind, checked.public_key, transport, actor=mailbox, extra_keys=history
                )
        except MailkmsError as exc:
            self._refused(mailbox, exc)
            raise
        return EnrolmentAccepted(pair.request_id, mailbox, pair.generation, self._mail_from)

    def _refused(self, mailbox: str, exc: MailkmsError) -> None:
        """Refusals are audited in a transaction of their own (the failed one rolled back)."""
        with self._db.transaction() as session:
            self._audit.append(session, mailbox, "enrolment.refused", mailbox, reason=exc.code)


__all__ = ["Enrolment", "EnrolmentAccepted", "TokenInvalid"]
