"""EST (RFC 7030) on top of the dual-certificate lifecycle.

How EST maps onto a user's pair (one generation = a signing and an encryption certificate):

- ``simpleenroll`` (HTTP Basic: mailbox + one-time enrolment token) spends the token and issues
  the whole generation in one transaction, as the enrolment API does: the signing certificate
  for the CSR's key (returned), and the encryption key made here, certified and archived. No
  delivery mail (an EST client has no transport key to envelope to); instead the encryption key
  waits for ``serverkeygen``, sealed under a key derived from the token (see ``pki._est``).
- ``serverkeygen`` with the *same* credentials within ``HANDOVER_WINDOW`` of simpleenroll hands
  that key over (PKCS#8 over TLS) with its certificate. Repeats within the window answer the same
  key again (a lost reply must not leave client and server holding different keys); nothing new
  is issued. After the window only the archive holds the key (recovery by the officers).
- ``simplereenroll`` is authenticated by possession of the current signing key, shown by the
  request's own signature; the renewal rules and issuance are `Renewal`'s own, so the new
  encryption pair is delivered by e-mail exactly as for the update request of the client.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import (
    BadCSR,
    EncryptedKeyUnsupported,
    MailkmsError,
    Malformed,
    NoKeyToCollect,
    NonceRequired,
    NotCurrentCertificate,
    Revoked,
    StaleRequest,
    TokenExpired,
    TokenInvalid,
)
from mailkms.pki import (
    PrivateKey,
    PublicKey,
    RequestView,
    certs_only,
    check_csr,
    inspect_csr,
    open_with_secret,
    public_key_of,
    same_public_key,
    seal_with_secret,
    verify_signed_data,
)
from mailkms.services._audit import AuditLog
from mailkms.services._batching import GroupCommit
from mailkms.services._ca import CAContext
from mailkms.services._enrolment import HELD_A_TOKEN
from mailkms.services._issuance import IssuedPair, PairIssuer, serial_hex
from mailkms.services._lifecycle import UserState
from mailkms.services._nonces import Nonces
from mailkms.services._refusals import Refusals
from mailkms.services._renewal import Renewal
from mailkms.services._tokens import find_token, redeem_token
from mailkms.services._users import current_signing, normalise_mailbox, state_of
from mailkms.store import Certificate, Database, IssuanceRequest, KeyHandover, Token, User

HANDOVER_WINDOW = dt.timedelta(hours=1)


@dataclass(frozen=True)
class ServerKey:
    private_key_der: bytes  # PKCS#8 PrivateKeyInfo
    certificate: x509.Certificate


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _handover_context(mailbox: str, serial: str) -> bytes:
    return f"mailkms-est|{mailbox}|{serial}".encode()


class EST:
    def __init__(
        self,
        db: Database,
        ca: CAContext,
        issuer: PairIssuer,
        renewal: Renewal,
        nonces: Nonces,
        settings: Settings,
        clock: Clock,
        audit: AuditLog,
        refusals: Refusals,
        commits: GroupCommit | None = None,
    ) -> None:
        self._db = db
        self._commits = commits or GroupCommit(db, 1)  # batched with other requests, answered once durable
        self._refusals = refusals
        self._ca = ca
        self._issuer = issuer
        self._renewal = renewal
        self._nonces = nonces
        self._settings = settings
        self._clock = clock
        self._audit = audit
        self._cacerts: tuple[tuple[x509.Certificate, ...], bytes] | None = None

    def cacerts(self) -> bytes:
        """certs-only with the issuing CA (the current key's, then the replaced keys') and the root:
        every certificate a client needs to build the path from what this CA issued to the trust
        anchor (RFC 7030 §4.1.3). Follows a CA reload (rekey, ceremony import)."""
        certs = (*self._ca.issuing_certificates(self._clock.now()), self._ca.root)
        cached = self._cacerts
        if cached is None or cached[0] != certs:
            cached = self._cacerts = (certs, certs_only(certs))
        return cached[1]

    # -- enrolment -----------------------------------------------------------------------------
    def simpleenroll(self, username: str, token: str, csr: bytes) -> x509.Certificate:
        """Spend the token, issue the pair; return the signing certificate (the CSR's key)."""
        mailbox = _basic_mailbox(username)
        redeemed: list[bool] = []  # set by the unit of work once the token is accepted
        try:
            now = self._clock.now()
            key = self._issuer.key_for_token(self._db, mailbox, token)  # made with no lock held
            # a refusal rolls back: the token stays unspent (and the key made in advance goes to the pool)

            def work(session: Session) -> IssuedPair:
                session.execute(delete(KeyHandover).where(KeyHandover.expires_at < now))
                user = _user(session, mailbox)
                row = redeem_token(session, user, token, now)  # authentication first
                redeemed.append(True)
                assert user is not None
                checked = check_csr(csr)
                _check_names(inspect_csr(csr), mailbox)
                return self.issue_with_token(
                    session, user, row, token, checked.public_key, via="est", encryption_key=key
                )

            with self._issuer.keep_unused(key) as served:
                served.append(self._commits.run(work))
            pair: IssuedPair = served[0]
        except MailkmsError as exc:
            held = bool(redeemed) or isinstance(exc, HELD_A_TOKEN)
            self._refused(mailbox if held else "-", "enrolment.refused", exc, identified=bool(redeemed))
            raise
        return pair.signing

    def issue_with_token(
        self,
        session: Session,
        user: User,
        row: Token,
        token: str,
        signing_key: PublicKey,
        via: str,
        encryption_key: PrivateKey | None = None,
    ) -> IssuedPair:
        """The pair for a redeemed token (`row`), in the caller's transaction: the signing
        certificate for `signing_key`; the encryption key sealed under the token for serverkeygen
        (EST simpleenroll, and CMP ir/cr, whose encryption key is collected the same way)."""
        now = self._clock.now()
        mailbox = user.email
        self._audit.append(session, mailbox, "token.used", mailbox, purpose=row.purpose, via=via)
        kind = "recovery" if row.purpose == "recovery" else "enrolment"
        pair, enc_der = self._issuer.issue_pair_undelivered(
            session, user, kind, signing_key, actor=mailbox, encryption_key=encryption_key
        )
        serial = serial_hex(pair.encryption.serial_number)
        session.add(
            KeyHandover(
                user_id=user.id,
                token_id=row.id,
                certificate_serial=serial,
                sealed=seal_with_secret(token, enc_der, _handover_context(mailbox, serial)),
                created_at=now,
                expires_at=now + HANDOVER_WINDOW,
            )
        )
        self._audit.append(session, "system", "est.key-waiting", mailbox, serial=serial, until=(now + HANDOVER_WINDOW))
        return pair

    def serverkeygen(self, username: str, token: str, csr: bytes) -> ServerKey:
        """Hand over the encryption key that simpleenroll made with the same token.

        The CSR's key and signature are ignored (RFC 7030 §4.4.1); what it names must still be the
        mailbox, and a request for an encrypted key is refused (TLS-protected hand-over only)."""
        mailbox = _basic_mailbox(username)
        held = False  # a token of this mailbox, spent or not (so it stays one count per mailbox)
        expired = False  # a sealed key past its hour was found
        try:
            now = self._clock.now()
            with self._db.transaction() as session:
                user = _user(session, mailbox)
                row = find_token(session, user, token)  # authentication first
                held = True
                view = inspect_csr(csr)
                if view.wants_encrypted_key:
                    raise EncryptedKeyUnsupported(
                        "this server returns the key over TLS only (application/pkcs8); remove the "
                        "DecryptKeyIdentifier / AsymmetricDecryptKeyIdentifier attribute"
                    )
                _check_names(view, mailbox)
                assert user is not None
                if user.status == "revoked":
                    raise Revoked(
                        f"{mailbox} was revoked at {user.revoked_at:%Y-%m-%d %H:%M} UTC; the waiting key was "
                        "discarded: enrolment by an administrator is required"
                    )
                if row.used_at is None:
                    if now > row.expires_at:
                        raise TokenExpired(f"this enrolment token expired at {row.expires_at:%Y-%m-%d %H:%M} UTC")
                    raise NoKeyToCollect(
                        "the encryption key is made together with the signing certificate: "
                        "send /simpleenroll with these credentials first, then /serverkeygen"
                    )
                handover = session.execute(
                    select(KeyHandover).where(KeyHandover.token_id == row.id).with_for_update()
                ).scalar_one_or_none()
                if handover is None or now > handover.expires_at:
                    expired = handover is not None
                    raise NoKeyToCollect(
                        f"the encryption key could be collected for {HANDOVER_WINDOW} after /simpleenroll; "
                        "it is kept only in the archive now: ask an administrator"
                    )
                try:
                    key_der = open_with_secret(
                        token, handover.sealed, _handover_context(mailbox, handover.certificate_serial)
                    )
                except ValueError:
                    raise TokenInvalid("these credentials do not open the waiting key") from None
                cert_row = session.execute(
                    select(Certificate).where(Certificate.serial == handover.certificate_serial)
                ).scalar_one()
                if cert_row.revoked_at is not None:
                    raise Revoked(
                        f"the encryption certificate {cert_row.serial} was revoked; its key is not handed over"
                    )
                repeat = handover.collected_at is not None
                handover.collected_at = now
                self._audit.append(
                    session, mailbox, "est.key-handed-over", mailbox, serial=handover.certificate_serial, repeat=repeat
                )
        except MailkmsError as exc:
            self._refused(mailbox if held else "-", "est.serverkeygen.refused", exc)
            if expired:  # the refusal rolled back: delete the sealed key whose hour has ended now
                self.purge()
            raise
        return ServerKey(key_der, x509.load_der_x509_certificate(cert_row.der))

    def purge(self) -> int:
        """Delete the sealed keys whose hand-over hour has ended (the archive copy stays)."""
        with self._db.transaction() as session:
            result = session.execute(delete(KeyHandover).where(KeyHandover.expires_at < self._clock.now()))
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    # -- re-enrolment ------------------------------------------------------------------------------
    def simplereenroll(self, csr: bytes) -> x509.Certificate:
        """Renew with the current key: a PKCS#10 for the key of the current signing certificate,
        whose own signature proves possession of that key (RFC 7030 §4.2.2 "renew"). Its
        challengePassword must be a fresh nonce of this server (`GET /api/v1/nonce`), spent here
        once the signature has proven the key: a captured request replayed later is refused."""
        mailbox = "unknown"
        try:
            checked = check_csr(csr)
            view = inspect_csr(csr)
            mailboxes = {m.lower() for m in view.mailboxes}
            if len(mailboxes) != 1:
                raise BadCSR(
                    "name your mailbox in the request's subject, as the current certificate does (RFC 7030 §4.2.2)"
                )
            mailbox = normalise_mailbox(mailboxes.pop())
            if not view.challenge_password:
                raise NonceRequired(
                    "a renewal request must carry a fresh server nonce as its challengePassword attribute "
                    "(the Replay-Nonce header of GET /api/v1/nonce), or come inside a CMS SignedData "
                    "(application/pkcs7-mime) with a current signingTime"
                )
            self._nonces.issued_at(view.challenge_password)  # forged or stale: refused without a write
            with self._db.transaction() as session:
                proof = self._certificate_for_key(session, mailbox, checked.public_key)
            self._nonces.consume(view.challenge_password)  # the one write; a replay is refused here
        except MailkmsError as exc:
            self._refused("-", "renewal.refused", exc)  # nothing proven yet: the mailbox is only claimed
            raise
        return self._renewed(proof, csr)

    def simplereenroll_signed(self, signed: bytes) -> x509.Certificate:
        """Rekey: a CMS SignedData made with the current signing key and certificate, holding the
        PKCS#10 of the new key (`openssl cms -sign -nodetach -binary`). Its signingTime must be
        within the nonce lifetime of the server's clock."""
        try:
            verified = verify_signed_data(signed)
            window = dt.timedelta(seconds=self._settings.policy.nonce_ttl_seconds)
            at = verified.signing_time
            if at is None or abs(self._clock.now() - at) > window:
                raise StaleRequest(f"the request must carry a signingTime within {window} of the server's clock")
        except MailkmsError as exc:
            self._refused("-", "renewal.refused", exc)
            raise
        return self._renewed(verified.signer, verified.content)

    def _certificate_for_key(self, session: Session, mailbox: str, key: PublicKey) -> x509.Certificate:
        """The signing certificate the CSR's key proves possession of: the current one, or, when the
        current pair came from a same-key renewal and is not due again, the one before it (so a
        repeat after a lost reply is answered with the pair already issued, never a second one)."""
        user = _user(session, mailbox)
        current = current_signing(session, user) if user is not None else None
        if user is None or current is None:
            raise NotCurrentCertificate(f"{mailbox} has no certificate to renew; enrol with /simpleenroll")
        cert = x509.load_der_x509_certificate(current.der)
        if not same_public_key(public_key_of(cert), key):
            raise NotCurrentCertificate(
                "the request must be signed by the key of your current signing certificate; to change keys, "
                "send the new request inside a CMS SignedData made with the current key (application/pkcs7-mime)"
            )
        state, _ = state_of(session, user, self._settings, self._clock.now())
        made_by = session.execute(
            select(IssuanceRequest).where(
                IssuanceRequest.user_id == user.id, IssuanceRequest.generation == user.generation
            )
        ).scalar_one_or_none()
        if state is UserState.ACTIVE and made_by is not None and made_by.kind == "renewal":
            before = session.execute(
                select(Certificate).where(
                    Certificate.user_id == user.id,
                    Certificate.kind == "signing",
                    Certificate.generation == user.generation - 1,
                )
            ).scalar_one_or_none()
            if before is not None:
                previous = x509.load_der_x509_certificate(before.der)
                if same_public_key(public_key_of(previous), key):
                    return previous
        return cert

    def _renewed(self, proof: x509.Certificate, csr: bytes) -> x509.Certificate:
        accepted = self._renewal.renew_proven(proof, csr)
        return self._renewal.signing_certificate(accepted)

    def _refused(self, mailbox: str, action: str, exc: MailkmsError, identified: bool = False) -> None:
        """Once the credentials were accepted: audited on their own (the failed transaction rolled
        back). Before: counted (`Refusals`), with the mailbox only when a token of it was shown."""
        if identified:
            self._refusals.identified(mailbox, action, mailbox, exc, via="est")
        else:
            self._refusals.anonymous(action, exc, mailbox)


def _basic_mailbox(username: str) -> str:
    try:
        return normalise_mailbox(username)
    except Malformed:
        raise TokenInvalid("the user name must be the mailbox the enrolment token was issued for") from None


def _user(session: Session, mailbox: str) -> User | None:
    return session.execute(select(User).where(User.email == mailbox)).scalar_one_or_none()


def _check_names(view: RequestView, mailbox: str) -> None:
    """Subject and SAN are built from the mailbox, never copied; a request naming another is refused."""
    others = sorted({m for m in view.mailboxes if m.lower() != mailbox})
    if others:
        raise BadCSR(f"the certificate request names {', '.join(others)}, not {mailbox}")


__all__ = ["EST", "HANDOVER_WINDOW", "ServerKey"]
