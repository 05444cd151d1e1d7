"""Enrolment with a one-time token: the first pair, or a new start after expiry or revocation."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailkms.clock import Clock
from mailkms.errors import BadKey, BadMessage, MailkmsError, TokenExpired, TokenInvalid, TokenReplaced, TokenUsed
from mailkms.pki import check_csr
from mailkms.services._audit import AuditLog
from mailkms.services._batching import GroupCommit
from mailkms.services._issuance import IssuedPair, PairIssuer
from mailkms.services._recovery import take_recovery_hold
from mailkms.services._refusals import Refusals
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


# Token refusals that show the caller held a real token of the mailbox (spent, replaced, expired):
# counted with the mailbox as subject; every other refusal before the token is accepted is anonymous.
HELD_A_TOKEN = (TokenUsed, TokenReplaced, TokenExpired)


class Enrolment:
    def __init__(
        self,
        db: Database,
        issuer: PairIssuer,
        clock: Clock,
        audit: AuditLog,
        mail_from: str,
        refusals: Refusals,
        commits: GroupCommit | None = None,
    ) -> None:
        self._db = db
        self._commits = commits or GroupCommit(db, 1)  # batched with other requests, answered once durable
        self._refusals = refusals
        self._issuer = issuer
        self._clock = clock
        self._audit = audit
        self._mail_from = mail_from

    def enrol(self, email: str, token: str, csr: bytes, transport_pem: str) -> EnrolmentAccepted:
        mailbox = normalise_mailbox(email)
        redeemed: list[bool] = []  # set by the unit of work once the token is accepted
        try:
            checked = check_csr(csr)
            transport = load_transport_certificate(transport_pem)
            key = self._issuer.key_for_token(self._db, mailbox, token)  # made with no lock held

            def work(session: Session) -> IssuedPair:
                user = session.execute(select(User).where(User.email == mailbox)).scalar_one_or_none()
                row = redeem_token(session, user, token, self._clock.now())
                redeemed.append(True)
                assert user is not None
                self._audit.append(session, mailbox, "token.used", mailbox, purpose=row.purpose)
                kind = "recovery" if row.purpose == "recovery" else "enrolment"
                # a recovery token brings the user's whole key history, held sealed since `mailkms recover`
                history = take_recovery_hold(session, row, token) if kind == "recovery" else []
                return self._issuer.issue_pair(
                    session,
                    user,
                    kind,
                    checked.public_key,
                    transport,
                    actor=mailbox,
                    extra_keys=history,
                    encryption_key=key,
                )

            with self._issuer.keep_unused(key) as served:
                served.append(self._commits.run(work))
            pair: IssuedPair = served[0]
        except MailkmsError as exc:
            self._refused(mailbox, exc, bool(redeemed))
            raise
        return EnrolmentAccepted(pair.request_id, mailbox, pair.generation, self._mail_from)

    def _refused(self, mailbox: str, exc: MailkmsError, redeemed: bool) -> None:
        """After the token was accepted: one audit record of its own (the failed transaction
        rolled back). Before: counted, never one record per request."""
        if redeemed:
            self._refusals.identified(mailbox, "enrolment.refused", mailbox, exc)
        else:
            self._refusals.anonymous("enrolment.refused", exc, mailbox if isinstance(exc, HELD_A_TOKEN) else "-")


__all__ = ["Enrolment", "EnrolmentAccepted", "TokenInvalid"]
