"""Archive recovery by a cryptographic M-of-N quorum of recovery officers.

The archive (every archived encryption key) is enveloped to the certificate of the current
recovery ceremony. The ceremony's private key is stored only wrapped under a KEK that exists
nowhere: it is split into N Shamir shares, each sealed to one officer's passphrase and written
once to a share file, then forgotten. M officers bring their files and passphrases to rebuild
the KEK in memory for one action:

- `recover EMAIL`: open that user's archived keys (every generation) and hold them, sealed under a
  one-time recovery token, until the user enrols with the token;
- `replace_ceremony`: new officers, new key, the whole archive re-enveloped in one transaction;
- `export_archive`: the archive re-enveloped to a certificate the administrator names.

`mailkms init` makes a 1-of-1 "bootstrap" ceremony (its share file in DATA/recovery/, its
passphrase shown once), which the database adopts on first use, so a fresh server archives
without prompts; `mailkms recovery init` replaces it with real officers.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import delete, event, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import (
    BadKey,
    Conflict,
    Internal,
    MailkmsError,
    Malformed,
    NoRecoveryCeremony,
    NothingArchived,
    QuorumNotMet,
    ShareDuplicate,
    ShareFromEarlierCeremony,
    ShareTampered,
    TokenInvalid,
    UserNotFound,
)
from mailkms.pki import (
    KeyType,
    PrivateKey,
    SealedShare,
    ShareHeader,
    check_officer_name,
    check_officer_passphrase,
    decrypt,
    envelope,
    generate_key,
    make_archive_certificate,
    new_ceremony_id,
    new_kek,
    open_held_keys,
    open_share,
    public_half,
    read_share,
    same_public_key,
    seal_held_keys,
    seal_share,
    share_digest,
    unwrap_recovery_key,
    wipe,
    wrap_recovery_key,
)
from mailkms.pki._recovery import MAX_OFFICERS, SCRYPT_N
from mailkms.pki._shamir import combine_kek, split_kek
from mailkms.services._audit import AuditLog, lock_audit_head
from mailkms.services._tokens import issue_token, token_hash
from mailkms.services._users import normalise_mailbox
from mailkms.store import (
    ArchivedKey,
    Certificate,
    Database,
    RecoveryCeremony,
    RecoveryHead,
    RecoveryHold,
    Token,
    User,
)

BOOTSTRAP_FILE = "bootstrap-ceremony.json"
BOOTSTRAP_PASSPHRASE_FILE = "bootstrap-passphrase"  # only outside production, when init has no terminal
BOOTSTRAP_OFFICER = "bootstrap"
CEREMONY_SUBJECT = "recovery"  # audit subject of ceremony-wide actions
REWRAP_BATCH = 200
_HEAD_ID = 1


@dataclass(frozen=True)
class ShareInput:
    """One officer's contribution: the share file's bytes and the passphrase that opens it."""

    data: bytes
    passphrase: bytes = b""


@dataclass(frozen=True)
class NewOfficer:
    name: str
    passphrase: bytes


@dataclass(frozen=True)
class CeremonyView:
    id: str
    created_at: dt.datetime
    threshold: int
    officers: tuple[str, ...]
    previous_id: str | None
    archived_keys: int
    archived_under_current: int
    held_recoveries: int

    @property
    def is_bootstrap(self) -> bool:
        return self.officers == (BOOTSTRAP_OFFICER,)

    def to_dict(self) -> dict[str, object]:
        return {
            "ceremony_id": self.id,
            "created_at": self.created_at.isoformat(),
            "threshold": self.threshold,
            "officers": list(self.officers),
            "bootstrap": self.is_bootstrap,
            "previous_ceremony_id": self.previous_id,
            "archived_keys": self.archived_keys,
            "archived_under_current_key": self.archived_under_current,
            "held_recoveries": self.held_recoveries,
        }


@dataclass(frozen=True)
class CeremonyResult:
    ceremony_id: str
    previous_id: str
    threshold: int
    officers: tuple[str, ...]
    share_files: tuple[Path, ...]
    rewrapped: int
    authorised_by: tuple[str, ...]


@dataclass(frozen=True)
class RecoveryResult:
    mailbox: str
    token: str  # shown once
    expires_at: dt.datetime
    key_serials: tuple[str, ...]
    ceremony_id: str
    authorised_by: tuple[str, ...]


@dataclass(frozen=True)
class ArchiveExport:
    document: bytes  # JSON, see Recovery.export_archive
    count: int
    authorised_by: tuple[str, ...]


# --- making a ceremony -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _NewCeremony:
    row: RecoveryCeremony
    certificate: x509.Certificate
    files: tuple[tuple[str, bytes], ...]  # (file name, sealed share)


def share_file_name(ceremony_id: str, index: int, officer: str) -> str:
    return f"share-{ceremony_id[:8]}-{index}-{re.sub(r'[^A-Za-z0-9._-]', '_', officer)}.json"


def _check_officers(officers: Sequence[NewOfficer], threshold: int) -> None:
    if not 1 <= len(officers) <= MAX_OFFICERS:
        raise Malformed(f"there must be 1 to {MAX_OFFICERS} recovery officers")
    if not 1 <= threshold <= len(officers):
        raise Malformed(f"the threshold must be between 1 and the number of officers ({len(officers)})")
    seen: set[str] = set()
    for officer in officers:
        check_officer_name(officer.name)
        if officer.name.casefold() in seen:
            raise Malformed(f"officer {officer.name!r} is named twice")
        seen.add(officer.name.casefold())
        check_officer_passphrase(officer.name, officer.passphrase)


def _new_ceremony(
    now: dt.datetime, officers: Sequence[NewOfficer], threshold: int, scrypt_n: int, previous_id: str | None
) -> _NewCeremony:
    """Recovery key pair, KEK, wrapped key, N sealed shares; the KEK and shares are wiped here."""
    ceremony_id = new_ceremony_id()
    key = generate_key(KeyType.RSA3072)
    cert = make_archive_certificate(key, now)
    kek = new_kek()
    try:
        wrapped = wrap_recovery_key(key, kek, ceremony_id)
        shares = split_kek(kek, threshold, len(officers))
    finally:
        wipe(kek)
    files: list[tuple[str, bytes]] = []
    digests: dict[str, str] = {}
    try:
        for (index, share), officer in zip(shares, officers, strict=True):
            header = ShareHeader(ceremony_id, officer.name, index, threshold, len(officers), now.isoformat())
            files.append(
                (
                    share_file_name(ceremony_id, index, officer.name),
                    seal_share(header, share, officer.passphrase, scrypt_n=scrypt_n),
                )
            )
            digests[str(index)] = share_digest(ceremony_id, index, share)
    finally:
        for _, share in shares:
            wipe(share)
    der = cert.public_bytes(serialization.Encoding.DER)
    row = RecoveryCeremony(
        id=ceremony_id,
        created_at=now,
        threshold=threshold,
        officer_count=len(officers),
        officer_names=json.dumps([o.name for o in officers]),
        certificate=der,
        key_id=cert.fingerprint(hashes.SHA256()).hex(),
        wrapped_key=wrapped,
        share_digests=json.dumps(digests, sort_keys=True),
        previous_id=previous_id,
    )
    return _NewCeremony(row, cert, tuple(files))


def _write_new(path: Path, data: bytes) -> None:
    """Write once: never over an existing file; 0600; on disk before we go on."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_secret_once(path: Path, data: bytes) -> Path:
    """A new file, mode 0600; a Conflict if it exists (never overwritten)."""
    try:
        _write_new(path, data)
    except FileExistsError:
        raise Conflict(f"{path} already exists; it is never overwritten") from None
    return path


def new_bootstrap_passphrase() -> str:
    return secrets.token_urlsafe(24)  # 192 bits


def init_bootstrap_ceremony(
    recovery_dir: Path, now: dt.datetime, passphrase: bytes, *, scrypt_n: int = SCRYPT_N
) -> Path:
    """At `mailkms init`: a 1-of-1 ceremony kept as files (the database adopts it on first use).
    Returns the path of its single share file."""
    if (recovery_dir / BOOTSTRAP_FILE).exists():
        raise Conflict(f"{recovery_dir / BOOTSTRAP_FILE} already exists")
    made = _new_ceremony(now, [NewOfficer(BOOTSTRAP_OFFICER, passphrase)], 1, scrypt_n, None)
    name, data = made.files[0]
    share_path = recovery_dir / name
    _write_new(share_path, data)
    _write_new(recovery_dir / BOOTSTRAP_FILE, json.dumps(_ceremony_doc(made.row), indent=2).encode())
    return share_path


def _ceremony_doc(row: RecoveryCeremony) -> dict[str, Any]:
    assert row.wrapped_key is not None
    return {
        "format": "mailkms-recovery-bootstrap",
        "version": 1,
        "ceremony_id": row.id,
        "created_at": row.created_at.isoformat(),
        "threshold": row.threshold,
        "officers": json.loads(row.officer_names),
        "certificate": base64.b64encode(row.certificate).decode(),
        "wrapped_key": base64.b64encode(row.wrapped_key).decode(),
        "share_digests": json.loads(row.share_digests),
    }


def _ceremony_from_doc(doc: dict[str, Any]) -> RecoveryCeremony:
    cert_der = base64.b64decode(doc["certificate"])
    cert = x509.load_der_x509_certificate(cert_der)
    return RecoveryCeremony(
        id=str(doc["ceremony_id"]),
        created_at=dt.datetime.fromisoformat(doc["created_at"]),
        threshold=int(doc["threshold"]),
        officer_count=len(doc["officers"]),
        officer_names=json.dumps(doc["officers"]),
        certificate=cert_der,
        key_id=cert.fingerprint(hashes.SHA256()).hex(),
        wrapped_key=base64.b64decode(doc["wrapped_key"]),
        share_digests=json.dumps(doc["share_digests"], sort_keys=True),
        previous_id=None,
    )


# --- the current ceremony ----------------------------------------------------------------------------
def current_ceremony(
    session: Session, recovery_dir: Path, audit: AuditLog, lock: Literal["share", "update"] | None = None
) -> RecoveryCeremony:
    """The ceremony the archive is enveloped to; adopts the bootstrap ceremony on a fresh database.

    lock="share": issuers (several at once) -- a re-wrap waits for them and they wait for it.
    lock="update": a re-wrap or other change of the ceremony."""
    head = _head(session, lock)
    if head is None:
        _adopt_bootstrap(session, recovery_dir, audit)
        head = _head(session, lock)
        assert head is not None
    ceremony = session.get(RecoveryCeremony, head.ceremony_id)
    assert ceremony is not None
    return ceremony


def _head(session: Session, lock: Literal["share", "update"] | None) -> RecoveryHead | None:
    query = select(RecoveryHead).where(RecoveryHead.id == _HEAD_ID).execution_options(populate_existing=True)
    if lock is not None:
        query = query.with_for_update(read=lock == "share")
    return session.execute(query).scalar_one_or_none()


def _adopt_bootstrap(session: Session, recovery_dir: Path, audit: AuditLog) -> None:
    path = recovery_dir / BOOTSTRAP_FILE
    if not path.exists():
        raise NoRecoveryCeremony(f"no recovery key: {path} is missing and the database holds no recovery ceremony")
    try:
        row = _ceremony_from_doc(json.loads(path.read_bytes()))
    except (ValueError, KeyError, TypeError):
        raise NoRecoveryCeremony(f"{path} is damaged") from None
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
            session.add(RecoveryHead(id=_HEAD_ID, ceremony_id=row.id))
            session.flush()
            audit.append(session, "system", "recovery.ceremony.adopted", CEREMONY_SUBJECT, ceremony=row.id, threshold=1)
    except IntegrityError:
        pass  # another process adopted it at the same moment: theirs is the same ceremony


_RECIPIENT = "mailkms_archive_recipient"  # read (and locked FOR SHARE) once per transaction


def _forget_recipient(session: Session, *_: object) -> None:
    session.info.pop(_RECIPIENT, None)


def _forget_recipient_at_commit(session: Session) -> None:
    if not session.in_nested_transaction():  # a savepoint released: the transaction and its lock go on
        session.info.pop(_RECIPIENT, None)


event.listen(Session, "after_commit", _forget_recipient_at_commit)
event.listen(Session, "after_rollback", _forget_recipient)
# A savepoint rolled back may have taken the FOR SHARE lock with it: read (and lock) it again.
event.listen(Session, "after_soft_rollback", _forget_recipient)


def archive_recipient(session: Session, recovery_dir: Path, audit: AuditLog) -> tuple[x509.Certificate, str]:
    """For PairIssuer: the certificate to envelope a new archived key to, and its key id.

    Reads the current ceremony FOR SHARE, so the key is archived before or after a re-wrap,
    never to a recovery key that a concurrent re-wrap is replacing. The lock holds to the end of
    the transaction, so later issuances of the same transaction (group commit) reuse the answer."""
    cached: tuple[x509.Certificate, str] | None = session.info.get(_RECIPIENT)
    if cached is not None:
        return cached
    ceremony = current_ceremony(session, recovery_dir, audit, lock="share")
    found = (x509.load_der_x509_certificate(ceremony.certificate), ceremony.key_id)
    session.info[_RECIPIENT] = found
    return found


def _hold_context(user_id: int, token_id: int) -> bytes:
    return f"mailkms recovery hold|user={user_id}|token={token_id}".encode()


def take_recovery_hold(session: Session, token_row: Token, token: str) -> list[tuple[str, bytes]]:
    """At enrolment with a recovery token: the held keys (serial, PKCS#8 DER); the hold is deleted
    in the caller's transaction, so it survives only if the enrolment fails."""
    hold = session.execute(select(RecoveryHold).where(RecoveryHold.token_id == token_row.id)).scalar_one_or_none()
    if hold is None:
        raise TokenInvalid("this recovery token holds no recovered keys any more; ask for a new recovery")
    try:
        keys = open_held_keys(hold.sealed, token, _hold_context(hold.user_id, token_row.id))
    except ValueError:
        raise Internal("the held recovered keys cannot be opened with this token") from None
    session.delete(hold)
    return keys


# --- the service ---------------------------------------------------------------------------------
class Recovery:
    def __init__(
        self,
        db: Database,
        recovery_dir: Path,
        settings: Settings,
        clock: Clock,
        audit: AuditLog,
        *,
        scrypt_n: int = SCRYPT_N,
    ) -> None:
        self._db = db
        self._dir = recovery_dir
        self._settings = settings
        self._clock = clock
        self._audit = audit
        self.scrypt_n = scrypt_n  # cost of new share files; files carry their own

    # -- reading ----------------------------------------------------------------------------------
    def status(self) -> CeremonyView:
        with self._db.transaction() as session:
            ceremony = current_ceremony(session, self._dir, self._audit)
            total = session.execute(select(func.count(ArchivedKey.id))).scalar_one()
            current = session.execute(
                select(func.count(ArchivedKey.id)).where(ArchivedKey.archive_key_id == ceremony.key_id)
            ).scalar_one()
            held = session.execute(select(func.count(RecoveryHold.id))).scalar_one()
            return CeremonyView(
                ceremony.id,
                ceremony.created_at,
                ceremony.threshold,
                tuple(json.loads(ceremony.officer_names)),
                ceremony.previous_id,
                int(total),
                int(current),
                int(held),
            )

    def archived_count(self, email: str) -> int:
        """How many keys `recover EMAIL` would return (checked before officers are asked)."""
        mailbox = normalise_mailbox(email)
        with self._db.transaction() as session:
            user = _user(session, mailbox)
            count = session.execute(
                select(func.count(ArchivedKey.id)).where(ArchivedKey.user_id == user.id)
            ).scalar_one()
        if not count:
            raise NothingArchived(f"no encryption key of {mailbox} is archived")
        return int(count)

    # -- the quorum -------------------------------------------------------------------------------
    def _quorum_key(self, quorum: Sequence[ShareInput]) -> tuple[str, PrivateKey]:
        """(ceremony id, recovery private key) from at least M shares of the current ceremony.

        The structural checks read the store; the slow part (scrypt per share, then Shamir and
        AES-GCM) runs outside any transaction, so routine work is not held up meanwhile."""
        with self._db.transaction() as session:
            ceremony = current_ceremony(session, self._dir, self._audit)
            sealed = _check_quorum(session, ceremony, quorum)
        return ceremony.id, _open_quorum(ceremony, sealed)

    def _locked(self, session: Session, unlocked_id: str, lock: Literal["share", "update"]) -> RecoveryCeremony:
        """Locks in the one order every writer takes them -- the audit head (which an issuance
        holds from its first audit record on), then the recovery head -- so that a re-wrap, a
        recovery and an issuance never wait for each other in a cycle. The ceremony the shares
        opened must still be the current one."""
        lock_audit_head(session)
        ceremony = current_ceremony(session, self._dir, self._audit, lock=lock)
        if ceremony.id != unlocked_id:
            raise ShareFromEarlierCeremony("the recovery ceremony was replaced while the shares were being checked")
        return ceremony

    @contextmanager
    def _refusals_audited(
        self, actor: str, operation: str, subject: str, quorum: Sequence[ShareInput]
    ) -> Iterator[None]:
        try:
            yield
        except MailkmsError as exc:
            with self._db.transaction() as session:
                self._audit.append(
                    session,
                    actor,
                    "recovery.refused",
                    subject,
                    operation=operation,
                    reason=exc.code,
                    officers=_officers_named(quorum),
                    given=len(quorum),
                )
            raise

    # -- replacing the officers (and the recovery key) ------------------------------------------------------
    def replace_ceremony(
        self,
        officers: Sequence[NewOfficer],
        threshold: int,
        quorum: Sequence[ShareInput],
        out_dir: Path,
        actor: str,
    ) -> CeremonyResult:
        """New officers and recovery key, authorised by M shares of the current ceremony; the whole
        archive is re-enveloped to the new key in one transaction. Share files are written (once,
        0600) before the commit and removed again if it fails."""
        _check_officers(officers, threshold)
        written: list[Path] = []
        now = self._clock.now()
        authorised = _officers_named(quorum)
        try:
            with self._refusals_audited(actor, "recovery-init", CEREMONY_SUBJECT, quorum):
                old_id, old_key = self._quorum_key(quorum)
                made = _new_ceremony(now, officers, threshold, self.scrypt_n, old_id)  # RSA-3072, N x scrypt
                with self._db.transaction() as session:
                    old = self._locked(session, old_id, "update")
                    rewrapped = self._rewrap(session, old, old_key, made)
                    del old_key
                    session.add(made.row)
                    session.flush()
                    head = _head(session, "update")
                    assert head is not None
                    head.ceremony_id = made.row.id
                    old.retired_at = now
                    old.wrapped_key = None  # the earlier shares now open nothing
                    self._audit.append(
                        session,
                        actor,
                        "recovery.ceremony.replaced",
                        CEREMONY_SUBJECT,
                        ceremony=made.row.id,
                        previous=old.id,
                        threshold=threshold,
                        officers=[o.name for o in officers],
                        authorised_by=authorised,
                        rewrapped=rewrapped,
                    )
                    session.flush()
                    for name, data in made.files:
                        _write_new(out_dir / name, data)  # O_EXCL: never over an existing file
                        written.append(out_dir / name)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return CeremonyResult(
            made.row.id,
            old_id,
            threshold,
            tuple(o.name for o in officers),
            tuple(written),
            rewrapped,
            tuple(authorised),
        )

    def _rewrap(self, session: Session, old: RecoveryCeremony, old_key: PrivateKey, made: _NewCeremony) -> int:
        old_cert = x509.load_der_x509_certificate(old.certificate)
        ids = session.execute(select(ArchivedKey.id).order_by(ArchivedKey.id)).scalars().all()
        for start in range(0, len(ids), REWRAP_BATCH):
            batch = ids[start : start + REWRAP_BATCH]
            for row in session.execute(select(ArchivedKey).where(ArchivedKey.id.in_(batch))).scalars():
                if row.archive_key_id != old.key_id:
                    raise Internal(
                        f"archived key {row.certificate_serial} is enveloped to an unknown key; nothing was changed"
                    )
                row.envelope = envelope(decrypt(row.envelope, old_cert, old_key), [made.certificate])
                row.archive_key_id = made.row.key_id
            session.flush()
        return len(ids)

    # -- recovering a user's keys -------------------------------------------------------------------------
    def recover(self, email: str, quorum: Sequence[ShareInput], actor: str) -> RecoveryResult:
        """Open every archived key of EMAIL and hold them, sealed under a new one-time recovery
        token, for the user's enrolment with that token."""
        mailbox = normalise_mailbox(email)
        now = self._clock.now()
        ttl = dt.timedelta(days=self._settings.policy.token_ttl_days)
        authorised = _officers_named(quorum)
        with self._refusals_audited(actor, "recover", mailbox, quorum):
            self.archived_count(mailbox)  # no such user, or nothing archived: before the officers' work
            ceremony_id, key = self._quorum_key(quorum)
            with self._db.transaction() as session:
                ceremony = self._locked(session, ceremony_id, "share")
                user = _user(session, mailbox)
                rows = (
                    session.execute(select(ArchivedKey).where(ArchivedKey.user_id == user.id).order_by(ArchivedKey.id))
                    .scalars()
                    .all()
                )
                keys = self._open_rows(session, ceremony, key, rows)
                del key
                self._purge(session, now)
                token = issue_token(session, user, "recovery", now, ttl)
                token_row = session.execute(select(Token).where(Token.token_hash == token_hash(token))).scalar_one()
                serials = [serial for serial, _ in keys]
                session.add(
                    RecoveryHold(
                        user_id=user.id,
                        token_id=token_row.id,
                        ceremony_id=ceremony.id,
                        key_serials=json.dumps(serials),
                        sealed=seal_held_keys(keys, token, _hold_context(user.id, token_row.id)),
                        created_at=now,
                        expires_at=token_row.expires_at,
                    )
                )
                del keys
                self._audit.append(
                    session,
                    actor,
                    "key.recovered",
                    mailbox,
                    serials=serials,
                    ceremony=ceremony.id,
                    authorised_by=authorised,
                )
                self._audit.append(
                    session, actor, "token.issued", mailbox, purpose="recovery", expires_in_days=ttl.days
                )
                return RecoveryResult(
                    mailbox, token, token_row.expires_at, tuple(serials), ceremony.id, tuple(authorised)
                )

    def _open_rows(
        self, session: Session, ceremony: RecoveryCeremony, key: PrivateKey, rows: Sequence[ArchivedKey]
    ) -> list[tuple[str, bytes]]:
        """(serial, PKCS#8 DER) of each row, each checked against its certificate."""
        recovery_cert = x509.load_der_x509_certificate(ceremony.certificate)
        out: list[tuple[str, bytes]] = []
        for row in rows:
            if row.archive_key_id != ceremony.key_id:
                raise Internal(f"archived key {row.certificate_serial} is not enveloped to the current recovery key")
            der = decrypt(row.envelope, recovery_cert, key)
            cert = _certificate(session, row.certificate_serial)
            if not same_public_key(public_half(der), cert.public_key()):
                raise Internal(f"archived key {row.certificate_serial} does not match its certificate")
            out.append((row.certificate_serial, der))
        return out

    # -- exporting the archive ------------------------------------------------------------------------------
    def export_archive(
        self, recipient: x509.Certificate, quorum: Sequence[ShareInput], actor: str, email: str | None = None
    ) -> ArchiveExport:
        """The archive (or one user's part) re-enveloped to `recipient` (RSA), as JSON:
        {"format": "mailkms-archive-export", "keys": [{"mailbox", "serial", "generation",
        "certificate" (PEM), "envelope" (base64 DER CMS EnvelopedData of the PKCS#8 key)}]}."""
        public = recipient.public_key()
        if not isinstance(public, rsa.RSAPublicKey) or public.key_size < 2048:
            raise BadKey("the export recipient must be an RSA certificate of at least 2048 bits")
        mailbox = normalise_mailbox(email) if email else None
        now = self._clock.now()
        subject = mailbox or CEREMONY_SUBJECT
        authorised = _officers_named(quorum)
        recipient_fp = recipient.fingerprint(hashes.SHA256()).hex()
        with self._refusals_audited(actor, "export-archive", subject, quorum):
            if mailbox is not None:
                self.archived_count(mailbox)
            ceremony_id, key = self._quorum_key(quorum)
            with self._db.transaction() as session:
                ceremony = self._locked(session, ceremony_id, "share")
                query = (
                    select(ArchivedKey, User.email, Certificate)
                    .join(User, User.id == ArchivedKey.user_id)
                    .join(Certificate, Certificate.serial == ArchivedKey.certificate_serial)
                    .order_by(ArchivedKey.id)
                )
                if mailbox is not None:
                    query = query.where(User.email == mailbox)
                rows = session.execute(query).all()
                opened = self._open_rows(session, ceremony, key, [row for row, _, _ in rows])
                del key
                entries = [
                    {
                        "mailbox": owner,
                        "serial": serial,
                        "generation": cert_row.generation,
                        "certificate": x509.load_der_x509_certificate(cert_row.der)
                        .public_bytes(serialization.Encoding.PEM)
                        .decode(),
                        "envelope": base64.b64encode(envelope(der, [recipient])).decode(),
                    }
                    for (_, owner, cert_row), (serial, der) in zip(rows, opened, strict=True)
                ]
                del opened
                self._audit.append(
                    session,
                    actor,
                    "archive.exported",
                    subject,
                    count=len(entries),
                    recipient_sha256=recipient_fp,
                    ceremony=ceremony.id,
                    authorised_by=authorised,
                )
        document = {
            "format": "mailkms-archive-export",
            "version": 1,
            "created_at": now.isoformat(),
            "recipient_sha256": recipient_fp,
            "keys": entries,
        }
        return ArchiveExport(json.dumps(document, indent=2).encode(), len(entries), tuple(authorised))

    # -- housekeeping -------------------------------------------------------------------------------------
    def purge(self) -> int:
        """Delete held recoveries whose token was spent, replaced or has expired."""
        with self._db.transaction() as session:
            return self._purge(session, self._clock.now())

    @staticmethod
    def _purge(session: Session, now: dt.datetime) -> int:
        dead = select(Token.id).where(or_(Token.used_at.is_not(None), Token.revoked_at.is_not(None)))
        result = session.execute(
            delete(RecoveryHold).where(or_(RecoveryHold.expires_at < now, RecoveryHold.token_id.in_(dead)))
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _check_quorum(
    session: Session, ceremony: RecoveryCeremony, quorum: Sequence[ShareInput]
) -> list[tuple[SealedShare, bytes]]:
    """The checks that need no passphrase: readable files, this ceremony, no share twice, headers
    as the ceremony recorded them, at least M. Nothing is decrypted before all of them pass."""
    sealed = [(read_share(item.data), item.passphrase) for item in quorum]
    for share, _ in sealed:
        if share.header.ceremony_id != ceremony.id:
            earlier = session.get(RecoveryCeremony, share.header.ceremony_id)
            when = f", replaced {earlier.retired_at:%Y-%m-%d %H:%M} UTC" if earlier and earlier.retired_at else ""
            raise ShareFromEarlierCeremony(
                f"the share of {share.header.describe()} is from an earlier recovery ceremony{when}"
                if earlier
                else f"the share of {share.header.describe()} is from no recovery ceremony of this server",
                ceremony=ceremony.id,
            )
    indexes: set[int] = set()
    for share, _ in sealed:
        if share.header.index in indexes:
            raise ShareDuplicate(f"the share of {share.header.describe()} was given twice; each counts once")
        indexes.add(share.header.index)
    names = json.loads(ceremony.officer_names)
    for share, _ in sealed:
        h = share.header
        recorded = names[h.index - 1] if h.index <= len(names) else None
        if (h.threshold, h.officers, recorded) != (ceremony.threshold, ceremony.officer_count, h.officer):
            raise ShareTampered(f"the share file of {h.describe()} does not match the ceremony's record")
    if len(sealed) < ceremony.threshold:
        raise QuorumNotMet(
            f"{len(sealed)} share(s) given, {ceremony.threshold} of the {ceremony.officer_count} officers are needed"
        )
    return sealed


def _open_quorum(ceremony: RecoveryCeremony, sealed: Sequence[tuple[SealedShare, bytes]]) -> PrivateKey:
    """Open each share (wrong passphrase, tampering and re-sealing each named), rebuild the KEK,
    unwrap the recovery key; the shares and the KEK are wiped on the way out."""
    digests: dict[str, str] = json.loads(ceremony.share_digests)
    opened: list[tuple[int, bytearray]] = []
    try:
        for share, passphrase in sealed:
            value = open_share(share, passphrase)
            opened.append((share.header.index, value))
            if share_digest(ceremony.id, share.header.index, value) != digests.get(str(share.header.index)):
                raise ShareTampered(
                    f"the share of {share.header.describe()} is not the one written at the ceremony"
                    " (re-sealed by someone who knows its passphrase)"
                )
        if ceremony.wrapped_key is None:
            raise ShareFromEarlierCeremony("this recovery ceremony has been retired")
        kek = combine_kek(opened)
        try:
            return unwrap_recovery_key(ceremony.wrapped_key, kek, ceremony.id)
        finally:
            wipe(kek)
    finally:
        for _, value in opened:
            wipe(value)


def _user(session: Session, mailbox: str) -> User:
    user = session.execute(select(User).where(User.email == mailbox)).scalar_one_or_none()
    if user is None:
        raise UserNotFound(f"no user {mailbox}")
    return user


def _certificate(session: Session, serial: str) -> x509.Certificate:
    row = session.execute(select(Certificate).where(Certificate.serial == serial)).scalar_one()
    return x509.load_der_x509_certificate(row.der)


def _officers_named(quorum: Sequence[ShareInput]) -> list[str]:
    """Who took part, as their share files name them (never anything secret)."""
    names = []
    for item in quorum:
        try:
            share: SealedShare = read_share(item.data)
        except MailkmsError:
            names.append("(unreadable file)")
            continue
        names.append(f"{share.header.officer}#{share.header.index}@{share.header.ceremony_id[:8]}")
    return names
