"""Renewal on the user's word: a JWS signed by the current signing key, no administrator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import (
    BadCSR,
    BadJWS,
    MailkmsError,
    NotCurrentCertificate,
    NotDue,
    NothingToResend,
    NotOwner,
    ReenrolmentRequired,
    Revoked,
    UnknownIssuer,
    URLMismatch,
)
from mailkms.pki import CheckedCSR, PrivateKey, PublicKey, SignedRequest, check_csr, verify_request
from mailkms.services._audit import AuditLog
from mailkms.services._batching import GroupCommit
from mailkms.services._ca import CAContext
from mailkms.services._issuance import PairIssuer, PresignedPair, serial_hex
from mailkms.services._lifecycle import UserState
from mailkms.services._nonces import Nonces
from mailkms.services._refusals import Refusals
from mailkms.services._users import current_encryption, normalise_mailbox, state_of, state_with
from mailkms.store import Certificate, Database, IssuanceRequest, User


@dataclass(frozen=True)
class RenewalAccepted:
    request_id: str
    generation: int
    already_issued: bool  # a repeat of a request that was already served
    mailbox: str


class Renewal:
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
        commits: GroupCommit | None = None,
    ) -> None:
        self._db = db
        # A renewal's rows are stored by group commit: batched with other requests' in one
        # transaction, each in a savepoint of its own, answered only once the batch is committed.
        self._commits = commits or GroupCommit(db, 1)
        self._ca = ca
        self._issuer = issuer
        self._refusals = refusals
        self._nonces = nonces
        self._settings = settings
        self._clock = clock
        self._audit = audit

    # -- shared authentication ---------------------------------------------------------------
    def _authenticate(self, body: object, url: str) -> SignedRequest:
        request = verify_request(body)  # BadJWS / BadSignature
        if request.url != url:
            raise URLMismatch(f"the request was signed for {request.url!r}, not {url!r}")
        # Checks that cost no write come first: only a request signed by a certificate of this CA
        # spends (writes) its nonce.
        if not self._ca.issued_here(request.certificate):
            raise UnknownIssuer("the signing certificate was not issued by this CA")
        self._nonces.consume(request.nonce)
        return request

    def _certificate_owner(
        self, session: Session, request: SignedRequest, proven: list[str] | None = None
    ) -> tuple[Certificate, User]:
        """The signer's stored certificate and user; `proven` gets the user's mailbox as soon as
        the signature is known to be theirs (so a refusal from then on is theirs, not anonymous)."""
        row, user = _known_signing(session, request.certificate)
        if proven is not None:
            proven.append(user.email)
        claimed = request.payload.get("mailbox")
        if not isinstance(claimed, str) or normalise_mailbox(claimed) != user.email:
            raise NotOwner(f"this certificate belongs to {user.email}, not to the mailbox in the request")
        return row, user

    # -- renewal ----------------------------------------------------------------------------------
    def renew(self, body: object, url: str) -> RenewalAccepted:
        proven: list[str] = []
        try:
            request = self._authenticate(body, url)
            csr_text = request.payload.get("csr")
            if not isinstance(csr_text, str):
                raise BadJWS("the payload has no csr")
            return self._serve(
                proven, lambda session: self._certificate_owner(session, request, proven), csr_text.encode()
            )
        except IntegrityError:
            # Another request for the same generation won the race: answer with its result.
            return self._after_race(proven[0])
        except MailkmsError as exc:
            self._refused(proven, "renewal.refused", exc)
            raise

    def renew_proven(self, certificate: x509.Certificate, csr: bytes | CheckedCSR, via: str = "est") -> RenewalAccepted:
        """Renewal for a requester who proved by other means than a JWS that they hold the key of
        `certificate` (EST simplereenroll, CMP kur). The same rules and the same issuance as `renew`;
        `csr` is a PKCS#10, or the key and names of a request already checked (CMP's CRMF)."""
        proven: list[str] = []

        def owner(session: Session) -> tuple[Certificate, User]:
            cert, user = _known_signing(session, certificate)
            proven.append(user.email)
            return cert, user

        try:
            if not self._ca.issued_here(certificate):
                raise UnknownIssuer("the signing certificate was not issued by this CA")
            return self._serve(proven, owner, csr)
        except IntegrityError:
            return self._after_race(proven[0])
        except MailkmsError as exc:
            self._refused(proven, "renewal.refused", exc, via=via)
            raise

    def _serve(
        self, proven: list[str], owner: Callable[[Session], tuple[Certificate, User]], csr: bytes | CheckedCSR
    ) -> RenewalAccepted:
        """The rules checked first in a read (a refusal costs no signature), the pair signed by the
        signer processes with no transaction open, then the rules again and the rows in the batch's
        transaction. Without signer processes (or when a CRL partition must be counted) the pair is
        signed in the transaction, as before."""
        wanted: tuple[str, str | None, int, PublicKey] | None = None
        with self._db.read_only() as session:
            cert, user = owner(session)
            checked = self._check(session, cert, user, csr)
            if checked is not None:  # None: a repeat, answered in the transaction
                csr = checked
                if self._issuer.presigns(session):
                    wanted = (user.email, user.group, user.generation + 1, checked.public_key)
        presigned = self._issuer.presign(*wanted) if wanted is not None else None  # no transaction open
        del proven[1:]  # the owner is read again below
        key = None if presigned is not None else self._issuer.key_in_advance()  # no lock held meanwhile

        def work(session: Session) -> RenewalAccepted:
            cert, user = owner(session)
            return self._renew(session, cert, user, csr, key, presigned)

        # A pre-signed pair's encryption key is never given back to the pool: a certificate names it.
        with self._issuer.keep_unused(key) as served:
            served.append(self._commits.run(work))
        accepted: RenewalAccepted = served[0]
        return accepted

    def _check(self, session: Session, cert: Certificate, user: User, csr: bytes | CheckedCSR) -> CheckedCSR | None:
        """The renewal rules: revoked, not current, expired, not due, the request's names; None for a
        repeat of a renewal already served (the caller answers it with that one)."""
        if user.status == "revoked" or cert.revoked_at is not None:
            raise Revoked("the certificates were revoked; ask an administrator to enrol you again")
        if cert.generation == user.generation - 1:
            served = self._request_for(session, user, user.generation)
            if served is not None and served.kind == "renewal":
                return None
        if cert.generation != user.generation:
            raise NotCurrentCertificate("this is not your current signing certificate")
        # `cert` is the current signing certificate (checked just above): no second read of it.
        state = state_with(user, cert, self._settings, self._clock.now())
        if state is UserState.EXPIRED:
            raise ReenrolmentRequired(
                "your certificates have expired and cannot be renewed; ask an administrator to enrol you again"
            )
        if state is not UserState.DUE:
            raise NotDue("your certificates are not yet due for renewal")
        checked = csr if isinstance(csr, CheckedCSR) else check_csr(csr)
        if any(normalise_mailbox(e) != user.email for e in checked.claimed_emails):
            raise BadCSR("the certificate request names another mailbox")
        return checked

    def _renew(
        self,
        session: Session,
        cert: Certificate,
        user: User,
        csr: bytes | CheckedCSR,
        key: PrivateKey | None = None,
        presigned: PresignedPair | None = None,
    ) -> RenewalAccepted:
        """The rules (`_check`), again inside the transaction; then the repeat's answer or a new pair."""
        checked = self._check(session, cert, user, csr)
        if checked is None:
            served = self._request_for(session, user, user.generation)
            assert served is not None
            self._audit.append(session, user.email, "renewal.repeated", user.email, request_id=served.id)
            return RenewalAccepted(served.id, served.generation, True, user.email)
        enc = current_encryption(session, user)
        assert enc is not None
        recipient = x509.load_der_x509_certificate(enc.der)
        self._audit.append_deferred(session, user.email, "renewal.received", user.email, serial=cert.serial)
        pair = self._issuer.issue_pair(
            session,
            user,
            "renewal",
            checked.public_key,
            recipient,
            actor=user.email,
            encryption_key=key,
            presigned=presigned,
        )
        return RenewalAccepted(pair.request_id, pair.generation, False, user.email)

    def signing_certificate(self, accepted: RenewalAccepted) -> x509.Certificate:
        """The signing certificate of the generation a renewal answered with."""
        with self._db.read_only() as session:
            user = session.execute(select(User).where(User.email == accepted.mailbox)).scalar_one()
            row = session.execute(
                select(Certificate).where(
                    Certificate.user_id == user.id,
                    Certificate.kind == "signing",
                    Certificate.generation == accepted.generation,
                )
            ).scalar_one()
            return x509.load_der_x509_certificate(row.der)

    def _after_race(self, mailbox: str) -> RenewalAccepted:
        with self._db.transaction() as session:
            user = session.execute(select(User).where(User.email == mailbox)).scalar_one()
            served = self._request_for(session, user, user.generation)
            assert served is not None
            self._audit.append(session, mailbox, "renewal.repeated", mailbox, request_id=served.id)
            return RenewalAccepted(served.id, served.generation, True, mailbox)

    # -- resync -------------------------------------------------------------------------------------
    def resync(self, body: object, url: str) -> RenewalAccepted:
        """Send the latest reply again (lost mail, or client and server out of step). Issues nothing."""
        proven: list[str] = []
        try:
            request = self._authenticate(body, url)
            with self._db.transaction() as session:
                cert, user = self._certificate_owner(session, request, proven)
                if user.status == "revoked" or cert.revoked_at is not None:
                    raise Revoked("the certificates were revoked; ask an administrator to enrol you again")
                if cert.generation not in (user.generation, user.generation - 1):
                    raise NotCurrentCertificate("this certificate is older than the previous generation")
                latest = self._request_for(session, user, user.generation)
                if latest is None or latest.outbox_id is None:  # EST enrolments send no mail
                    raise NothingToResend()
                self._issuer.requeue(session, latest, user, actor=user.email)
                return RenewalAccepted(latest.id, latest.generation, True, user.email)
        except MailkmsError as exc:
            self._refused(proven, "resync.refused", exc)
            raise

    # -- status ----------------------------------------------------------------------------------------
    def status(self, body: object, url: str) -> tuple[str, UserState]:
        """The user's state as the server sees it (the client's log-on asks, to learn of revocation)."""
        try:
            request = self._authenticate(body, url)
        except MailkmsError as exc:
            self._refused([], "status.refused", exc)
            raise
        with self._db.read_only() as session:
            _, user = self._certificate_owner(session, request)
            state, _ = state_of(session, user, self._settings, self._clock.now())
            return user.email, state

    @staticmethod
    def _request_for(session: Session, user: User, generation: int) -> IssuanceRequest | None:
        return session.execute(
            select(IssuanceRequest).where(IssuanceRequest.user_id == user.id, IssuanceRequest.generation == generation)
        ).scalar_one_or_none()

    def _refused(self, proven: list[str], action: str, exc: MailkmsError, **details: object) -> None:
        """Per event once the signer is a known user (their key signed it); counted otherwise."""
        if proven:
            self._refusals.identified(proven[0], action, proven[0], exc, **details)
        else:
            self._refusals.anonymous(action, exc)


def _known_signing(session: Session, certificate: x509.Certificate) -> tuple[Certificate, User]:
    """The stored signing certificate that is exactly `certificate`, and its owner."""
    found = session.execute(
        select(Certificate, User)
        .join(User, User.id == Certificate.user_id)  # one statement for both
        .where(Certificate.serial == serial_hex(certificate.serial_number))
    ).one_or_none()
    if found is None:
        raise NotCurrentCertificate("the certificate is not a signing certificate this server knows")
    row, user = found
    if row.kind != "signing" or row.der != certificate.public_bytes(serialization.Encoding.DER):
        raise NotCurrentCertificate("the certificate is not a signing certificate this server knows")
    return row, user
