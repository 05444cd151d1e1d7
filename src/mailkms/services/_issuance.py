"""Issuing a user's pair: signing certificate from the client's key, encryption key made here,
archived, both certificates and the key delivered by e-mail. One transaction, one outbox row."""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import logging
import secrets
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailkms import metrics
from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import MailkmsError
from mailkms.pki import (
    CertKind,
    KeyType,
    Manifest,
    PrivateKey,
    PublicKey,
    SignJob,
    build_delivery,
    envelope,
    generate_key,
    private_key_der,
    reminder_point,
    signer_key_id,
    subscriber_validity,
)
from mailkms.services._audit import AuditLog
from mailkms.services._bulk import defer_insert
from mailkms.services._ca import CAContext
from mailkms.services._crl_partitions import CRLPartitions
from mailkms.services._recovery import archive_recipient
from mailkms.services._tokens import token_looks_usable
from mailkms.store import ArchivedKey, Certificate, Database, IssuanceRequest, OutboxMessage, User

log = logging.getLogger("mailkms.issuance")


def public_key_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def certificate_row(
    cert: x509.Certificate, user_id: int | None, kind: str, generation: int, crl_partition: int | None = None
) -> Certificate:
    """The store's row of an issued certificate (its CRL partition: the one its CDP names, if any)."""
    return Certificate(**certificate_values(cert, user_id, kind, generation, crl_partition))


def certificate_values(
    cert: x509.Certificate, user_id: int | None, kind: str, generation: int, crl_partition: int | None = None
) -> dict[str, Any]:
    """The columns of `certificate_row`, for a bulk INSERT."""
    return {
        "crl_partition": crl_partition,
        "serial": serial_hex(cert.serial_number),
        "user_id": user_id,
        "kind": kind,
        "generation": generation,
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
        "der": cert.public_bytes(serialization.Encoding.DER),
    }


@dataclass(frozen=True)
class IssuedPair:
    request_id: str
    generation: int
    signing: x509.Certificate
    encryption: x509.Certificate


@dataclass(frozen=True)
class PresignedPair:
    """A pair signed before its transaction opened, by the signer processes (`PairIssuer.presign`):
    used by the transaction only if it is still for the user's next generation, lifetime and request
    key, and the current issuing key signed it (its AKI, not what the server thought it held)."""

    mailbox: str
    generation: int
    signing: x509.Certificate
    encryption: x509.Certificate
    encryption_key: PrivateKey


class KeySource(Protocol):
    def take(self, session: Session, key_type: KeyType) -> PrivateKey | None: ...

    def claim(self, key_type: KeyType, count: int) -> list[PrivateKey]: ...

    def available(self, key_type: KeyType) -> bool: ...

    def store(self, ders: Sequence[bytes]) -> int: ...


class KeyMaker(Protocol):
    def make_key(self, key_type: KeyType) -> PrivateKey: ...


class BatchSigner(Protocol):
    processes: int

    def sign(self, jobs: Sequence[SignJob]) -> list[x509.Certificate]: ...


CLAIM_BATCH = 16  # pool keys a node takes out of the store at once for pre-signed pairs


class PairIssuer:
    def __init__(
        self,
        ca: CAContext,
        settings: Settings,
        clock: Clock,
        audit: AuditLog,
        keys: KeySource | None = None,
        maker: KeyMaker | None = None,
        partitions: CRLPartitions | None = None,
        signers: BatchSigner | None = None,
    ) -> None:
        self._ca = ca
        self._settings = settings
        self._clock = clock
        self._audit = audit
        self.keys = keys  # the key pool, when configured
        self._maker = maker  # the signer processes: keys made on both cores
        self.partitions = partitions  # CRL partitions, when configured
        self._signers = signers  # worker processes holding the issuing CA key
        self._claimed: collections.deque[PrivateKey] = collections.deque()  # pool keys taken in advance
        self._claim_lock = threading.Lock()

    def _make_key(self) -> PrivateKey:
        key_type = self._settings.policy.encryption_key_type
        return self._maker.make_key(key_type) if self._maker is not None else generate_key(key_type)

    def key_in_advance(self) -> PrivateKey | None:
        """The encryption key for a request about to be served, made before its transaction opens
        (so no lock is held while it is made, and in a signer process: on both cores). None when
        the pool has keys: one is then taken inside the transaction, as before."""
        if self.keys is not None and self.keys.available(self._settings.policy.encryption_key_type):
            return None
        return self._make_key()

    def presigns(self, session: Session) -> bool:
        """Whether `presign` may sign a pair now: there are signer processes, and the current key's
        certificates need no CRL partition (a partition is counted in the issuing transaction; then
        the transaction signs, as before). `session`: a read."""
        if self._signers is None or self._signers.processes == 0:
            return False
        return self.partitions is None or self.partitions.none_needed(session, self._ca.issuer.key_id)

    def presign(self, mailbox: str, group: str | None, generation: int, signing_key: PublicKey) -> PresignedPair | None:
        """The pair for `mailbox`'s `generation`, signed now by the signer processes, before the
        transaction that stores it: the server process's core (the GIL) is spared the two CA
        signatures. Only when `presigns` said so; the caller holds no lock and no transaction. None
        when the signer processes fail: the transaction then signs, as without them."""
        assert self._signers is not None
        policy = self._settings.policy
        lifetime, _ = policy.for_group(group)
        validity = subscriber_validity(self._clock.now(), lifetime)
        enc_key = self._claimed_key()
        if enc_key is None:
            metrics.POOL_FALLBACK.inc()
            enc_key = self._make_key()
        jobs = [
            SignJob(
                CertKind.SIGNING.value,
                mailbox,
                validity.not_before,
                validity.not_after,
                tuple(k.value for k in policy.signing_key_types),
                public_key_der=public_key_der(signing_key),
            ),
            SignJob(
                CertKind.ENCRYPTION.value,
                mailbox,
                validity.not_before,
                validity.not_after,
                (policy.encryption_key_type.value,),
                public_key_der=public_key_der(enc_key.public_key()),
            ),
        ]
        # Once submitted, the encryption key never goes back to the pool, even when the job fails:
        # the encryption certificate may have been signed before the failure, and a pool key is
        # handed out only if no certificate, stored or not, names it.
        try:
            signing, encryption = self._signers.sign(jobs)
        except MailkmsError:
            raise  # refused (the request's key)
        except Exception:
            log.warning("the signer processes failed; this pair is signed in the server process", exc_info=True)
            return None
        return PresignedPair(mailbox, generation, signing, encryption, enc_key)

    def _claimed_key(self) -> PrivateKey | None:
        """A pool key taken out of the store in advance, CLAIM_BATCH at a time; None: the pool is
        empty, or the store could not be read (the key is then made, as with an empty pool)."""
        if self.keys is None:
            return None
        with self._claim_lock:
            if not self._claimed:
                try:
                    self._claimed.extend(self.keys.claim(self._settings.policy.encryption_key_type, CLAIM_BATCH))
                except Exception:
                    log.warning("pool keys could not be claimed; this pair's key is made instead", exc_info=True)
            return self._claimed.popleft() if self._claimed else None

    def _presigned_fits(
        self, session: Session, presigned: PresignedPair, user: User, generation: int, signing_key: PublicKey
    ) -> bool:
        """Whether a pair signed before this transaction may be stored: still right for the user
        (`_still_right`), signed by the current issuing key, and that key's certificates still need no
        CRL partition (a `ca rekey` taken between the read and now changes both)."""
        key_id = self._ca.issuer.key_id
        lifetime, _ = self._settings.policy.for_group(user.group)
        return _still_right(presigned, user.email, generation, key_id, signing_key, lifetime) and (
            self.partitions is None or self.partitions.none_needed(session, key_id)
        )

    def key_for_token(self, db: Database, mailbox: str, token: str) -> PrivateKey | None:
        """`key_in_advance` for a request authenticated by a one-time token, only when the token
        looks usable: a wrong token costs no key."""
        with db.read_only() as session:
            usable = token_looks_usable(session, mailbox, token, self._clock.now())
        return self.key_in_advance() if usable else None

    def unused(self, key: PrivateKey | None) -> None:
        """A key made in advance for a request that was refused or a repeat: into the pool, if any."""
        if key is not None and self.keys is not None:
            self.keys.store([private_key_der(key)])

    @contextlib.contextmanager
    def keep_unused(self, key: PrivateKey | None) -> Iterator[list[Any]]:
        """Around a request served with `key` made in advance: the block appends its result; a
        refusal, or a result that issued nothing (`already_issued`), gives the key to the pool."""
        served: list[Any] = []
        try:
            yield served
        except BaseException:
            self.unused(key)
            raise
        if not served or getattr(served[0], "already_issued", False):
            self.unused(key)

    def issue_pair(
        self,
        session: Session,
        user: User,
        kind: str,
        signing_key: PublicKey,
        key_recipient: x509.Certificate,
        actor: str,
        extra_keys: Sequence[tuple[str, bytes]] = (),
        encryption_key: PrivateKey | None = None,
        presigned: PresignedPair | None = None,
    ) -> IssuedPair:
        """kind: enrolment | renewal | recovery. extra_keys: (serial, PKCS#8) recovered keys to add.
        encryption_key: made in advance (`key_in_advance`); else one from the pool, else made now.
        presigned: the pair signed before the transaction (`presign`), used if still right."""
        pair, request, enc_der = self._issue(session, user, kind, signing_key, actor, encryption_key, presigned)
        keys = [(serial_hex(pair.encryption.serial_number), enc_der, key_recipient)]
        keys += [(serial, der, key_recipient) for serial, der in extra_keys]
        _, reminder_months = self._settings.policy.for_group(user.group)
        history = _certificates(session, [serial for serial, _ in extra_keys])  # the client files each key
        outbox = self._queue_delivery(
            session,
            user,
            kind,
            request.id,
            pair.generation,
            pair.signing,
            pair.encryption,
            keys,
            reminder_months,
            history,
        )
        request.outbox = outbox
        return pair

    def issue_pair_undelivered(
        self,
        session: Session,
        user: User,
        kind: str,
        signing_key: PublicKey,
        actor: str,
        encryption_key: PrivateKey | None = None,
    ) -> tuple[IssuedPair, bytes]:
        """The same pair, archived the same way, but no delivery mail: the caller hands the
        encryption key (returned as PKCS#8 DER) over itself (EST serverkeygen)."""
        pair, _, enc_der = self._issue(session, user, kind, signing_key, actor, encryption_key)
        return pair, enc_der

    def _issue(
        self,
        session: Session,
        user: User,
        kind: str,
        signing_key: PublicKey,
        actor: str,
        encryption_key: PrivateKey | None = None,
        presigned: PresignedPair | None = None,
    ) -> tuple[IssuedPair, IssuanceRequest, bytes]:
        now = self._clock.now()
        generation = user.generation + 1
        request = IssuanceRequest(
            id=str(uuid.uuid4()), user_id=user.id, kind=kind, generation=generation, created_at=now
        )
        # Its (user, generation) unique constraint stops a second pair at the first flush (the next
        # query's autoflush, or the end of the unit): the IntegrityError that `_after_race` answers.
        session.add(request)

        if presigned is not None and self._presigned_fits(session, presigned, user, generation, signing_key):
            # Signed in the signer processes before this transaction, for this very generation by the
            # current key, whose certificates are on the whole-CA CRL (no partition to count).
            signing, encryption, enc_key = presigned.signing, presigned.encryption, presigned.encryption_key
            partitions: list[int | None] = [None, None]
        else:
            signing, encryption, enc_key, partitions = self._sign_here(session, user, signing_key, encryption_key)
        enc_der = private_key_der(enc_key)
        # The rows that cannot clash (fresh random serials, audit records) are deferred: written by
        # one multi-row INSERT per table at the end of the batch (services/_bulk.py).
        for cert, cert_kind, partition in (
            (signing, "signing", partitions[0]),
            (encryption, "encryption", partitions[1]),
        ):
            defer_insert(session, Certificate, certificate_values(cert, user.id, cert_kind, generation, partition))
            self._audit.append_deferred(
                session,
                actor,
                "certificate.issued",
                user.email,
                serial=serial_hex(cert.serial_number),
                kind=cert_kind,
                generation=generation,
                not_after=cert.not_valid_after_utc.isoformat(),
                request_id=request.id,
            )
        archive, archive_fp = archive_recipient(session, self._ca.paths.recovery_dir, self._audit)
        defer_insert(
            session,
            ArchivedKey,
            {
                "user_id": user.id,
                "certificate_serial": serial_hex(encryption.serial_number),
                "envelope": envelope(enc_der, [archive]),
                "archive_key_id": archive_fp,
                "created_at": now,
            },
        )
        self._audit.append_deferred(
            session,
            "system",
            "key.archived",
            user.email,
            serial=serial_hex(encryption.serial_number),
            archive=archive_fp,
        )
        user.generation = generation
        user.status = "enrolled"
        user.revoked_at = None
        return IssuedPair(request.id, generation, signing, encryption), request, enc_der

    def _sign_here(
        self, session: Session, user: User, signing_key: PublicKey, encryption_key: PrivateKey | None
    ) -> tuple[x509.Certificate, x509.Certificate, PrivateKey, list[int | None]]:
        """The pair signed in this transaction (and this process), its partitions counted here."""
        policy = self._settings.policy
        lifetime, _ = policy.for_group(user.group)
        validity = subscriber_validity(self._clock.now(), lifetime)
        issuer = self._ca.issuer
        partitions = [self.partitions.take(session, issuer.key_id) if self.partitions else None for _ in range(2)]
        signing = issuer.issue(
            issuer.prepare_subscriber(
                CertKind.SIGNING, user.email, signing_key, validity, policy.signing_key_types, partitions[0]
            )
        )
        enc_key = encryption_key
        if enc_key is None and self.keys is not None:
            enc_key = self.keys.take(session, policy.encryption_key_type)
        if enc_key is None or enc_key is encryption_key:
            metrics.POOL_FALLBACK.inc()  # not from the pool
        if enc_key is None:
            enc_key = self._make_key()  # the pool ran dry since key_in_advance looked
        encryption = issuer.issue(
            issuer.prepare_subscriber(
                CertKind.ENCRYPTION,
                user.email,
                enc_key.public_key(),
                validity,
                (policy.encryption_key_type,),
                partitions[1],
            )
        )
        return signing, encryption, enc_key, partitions

    def _queue_delivery(
        self,
        session: Session,
        user: User,
        kind: str,
        request_id: str,
        generation: int,
        signing: x509.Certificate,
        encryption: x509.Certificate,
        keys: list[tuple[str, bytes, x509.Certificate]],
        reminder_months: int,
        history: Sequence[x509.Certificate] = (),
    ) -> OutboxMessage:
        now = self._clock.now()
        manifest = Manifest(
            kind=kind,
            mailbox=user.email,
            request_id=request_id,
            generation=generation,
            signing_serial=serial_hex(signing.serial_number),
            encryption_serial=serial_hex(encryption.serial_number),
            key_serials=tuple(k[0] for k in keys),
            issued_at=now.isoformat(),
            reminder_at=reminder_point(signing.not_valid_before_utc, reminder_months).isoformat(),
        )
        message_id = f"<{request_id}@{self._mail_domain}>"
        return queue_message(
            session,
            self._audit,
            now,
            message_id=message_id,
            sender=self._settings.server.effective_mail_from,
            recipient=user.email,
            body=self.delivery_bytes(manifest, [signing, encryption, *history], keys, message_id),
            purpose=f"delivery:{kind}",
            fresh=True,  # the Message-ID holds the new request's own id: no row can have it yet
        )

    @property
    def _mail_domain(self) -> str:
        return self._settings.server.effective_mail_from.rsplit("@", 1)[-1]

    def delivery_bytes(
        self,
        manifest: Manifest,
        certs: list[x509.Certificate],
        keys: list[tuple[str, bytes, x509.Certificate]],
        message_id: str,
    ) -> bytes:
        signer = self._ca.require_mail_signer()
        return build_delivery(
            manifest,
            [*certs, *self._ca.issuing_certificates(self._clock.now()), self._ca.root],
            keys,
            sender=self._settings.server.effective_mail_from,
            signer_cert=signer.certificate,
            signer_key=signer.private_key,
            signer_chain=list(self._ca.chain),
            message_id=message_id,
            date=self._clock.now(),
        )

    def requeue(self, session: Session, request: IssuanceRequest, user: User, actor: str) -> OutboxMessage:
        """Resync: send the stored reply of `request` again under a new Message-ID. Issues nothing."""
        original = session.get(OutboxMessage, request.outbox_id) if request.outbox_id else None
        if original is None:
            raise LookupError("no stored reply")
        now = self._clock.now()
        message_id = f"<resync-{secrets.token_hex(8)}.{request.id}@{self._mail_domain}>"
        body = original.body.replace(
            f"Message-ID: {original.message_id}".encode(), f"Message-ID: {message_id}".encode(), 1
        )
        msg = queue_message(
            session,
            self._audit,
            now,
            message_id=message_id,
            sender=original.sender,
            recipient=user.email,
            body=body,
            purpose="delivery:resync",
        )
        self._audit.append(session, actor, "delivery.resent", user.email, request_id=request.id)
        return msg


def _still_right(
    presigned: PresignedPair, mailbox: str, generation: int, key_id: str, signing_key: PublicKey, lifetime: int
) -> bool:
    """A pair signed before the transaction is stored only if nothing it was signed for has changed:
    the mailbox, the generation, the request's key, the lifetime (the user's group), and the issuing
    key that signed both certificates (read from their AKI)."""
    signing, encryption = presigned.signing, presigned.encryption
    return (
        presigned.mailbox == mailbox
        and presigned.generation == generation
        and signer_key_id(signing) == key_id
        and signer_key_id(encryption) == key_id
        and subscriber_validity(signing.not_valid_before_utc, lifetime).not_after == signing.not_valid_after_utc
        and public_key_der(signing.public_key()) == public_key_der(signing_key)
    )


def _certificates(session: Session, serials: Sequence[str]) -> list[x509.Certificate]:
    if not serials:
        return []
    rows = session.execute(select(Certificate).where(Certificate.serial.in_(serials))).scalars()
    return [x509.load_der_x509_certificate(row.der) for row in rows]


def queue_message(
    session: Session,
    audit: AuditLog,
    now: dt.datetime,
    *,
    message_id: str,
    sender: str,
    recipient: str,
    body: bytes,
    purpose: str,
    fresh: bool = False,
) -> OutboxMessage:
    """The outbox row of a message; a Message-ID already queued gives that row, unless the caller
    knows the id is new (`fresh`: one read fewer; the unique index still stands guard)."""
    if not fresh:
        existing = session.execute(
            select(OutboxMessage).where(OutboxMessage.message_id == message_id)
        ).scalar_one_or_none()
        if existing is not None:
            return existing
    row = OutboxMessage(
        message_id=message_id,
        sender=sender,
        recipient=recipient,
        body=body,
        purpose=purpose,
        created_at=now,
        next_attempt_at=now,
        attempts=0,
    )
    session.add(row)
    if not fresh:
        session.flush()  # the row's id, for callers that keep it (a fresh one is linked by the ORM)
    # A fresh delivery is a pair's: its other records are deferred already (`_issue`), this one joins them.
    record = audit.append_deferred if fresh else audit.append
    record(session, "system", "mail.queued", recipient, message_id=message_id, purpose=purpose)
    return row
