"""Wiring: builds every service from settings and a clock (entry points call this once)."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailkms import metrics
from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.pki import CertKind, PublicURLs, crl_number, crl_partition_of
from mailkms.services._acme import ACME
from mailkms.services._admins import AdminAccounts
from mailkms.services._approvals import Approvals
from mailkms.services._audit import AuditCheckpoints, AuditEntry, AuditLog, AuditReport, search_records, verify_chain
from mailkms.services._batching import GroupCommit
from mailkms.services._ca import CAContext, CAPaths, tls_hostnames
from mailkms.services._cmp import CMP
from mailkms.services._crl_partitions import CRLPartitions
from mailkms.services._dashboard import Dashboard
from mailkms.services._directory import Directory
from mailkms.services._enrolment import Enrolment
from mailkms.services._est import EST
from mailkms.services._imports import UserImports
from mailkms.services._issuance import PairIssuer, serial_hex
from mailkms.services._keypool import KeyPool, PoolKeyring
from mailkms.services._nonces import Nonces
from mailkms.services._ocsp import OCSPResponder
from mailkms.services._outbox import OutboxQueue
from mailkms.services._passkeys import Passkeys
from mailkms.services._recovery import Recovery
from mailkms.services._refusals import Refusals
from mailkms.services._renewal import Renewal
from mailkms.services._revocation import Revocation
from mailkms.services._signers import SignerPool
from mailkms.services._signing import CertificateIssuance
from mailkms.services._status import ConsoleStatus
from mailkms.services._token_mail import OutboxSealer
from mailkms.services._tokens import TokenSealer
from mailkms.services._users import UserAdmin
from mailkms.store import Certificate, Database

log = logging.getLogger("mailkms.ca")


def public_urls(settings: Settings) -> PublicURLs:
    return PublicURLs(settings.server.effective_public_url)


def open_database(settings: Settings) -> Database:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.effective_database_url)
    db.migrate()
    return db


@dataclass
class Services:
    settings: Settings
    clock: Clock
    db: Database
    ca: CAContext
    audit: AuditLog
    users: UserAdmin
    enrolment: Enrolment
    nonces: Nonces
    renewal: Renewal
    issuer: PairIssuer
    directory: Directory
    est: EST
    recovery: Recovery
    revocation: Revocation
    ocsp: OCSPResponder
    outbox: OutboxQueue
    checkpoints: AuditCheckpoints
    pool_keyring: PoolKeyring
    outbox_sealer: OutboxSealer
    refusals: Refusals
    commits: GroupCommit
    signers: SignerPool
    issuance: CertificateIssuance
    admins: AdminAccounts
    passkeys: Passkeys
    approvals: Approvals
    dashboard: Dashboard
    cmp: CMP
    acme: ACME
    imports: UserImports
    status: ConsoleStatus
    key_pool: KeyPool | None = None
    # the daily check and the CA-file watcher of serve (two threads) never change the CA files at once
    _identity_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @classmethod
    def build(cls, settings: Settings, clock: Clock, db: Database | None = None) -> Services:
        db = db or open_database(settings)
        ca = CAContext.load(
            CAPaths(settings.data_dir),
            passphrase_env=settings.ca_passphrase,
            urls=public_urls(settings),
            production=settings.ca.production,
            key_store=settings.ca.key_store,
        )
        audit = AuditLog(clock, observers=[metrics.observe_audit])
        keyring = PoolKeyring(db, ca.at_rest_passphrase, clock)
        admins = AdminAccounts(db, settings, clock, audit, keyring)
        recovery = Recovery(db, ca.paths.recovery_dir, settings, clock, audit)
        pool = None
        if settings.pool.size > 0:
            pool = KeyPool(db, keyring, clock, settings.policy.encryption_key_type, settings.pool.size)
        batching = settings.issuance
        signers = SignerPool(
            ca.issuing, ca.urls, batching.signer_processes, batching.signer_chunk, ca.issuer.ca_issuers
        )
        partitions = CRLPartitions(
            ca, settings.ca.crl_partition_size, dt.timedelta(days=settings.revocation.crl_validity_days), clock, audit
        )
        ca.server_partition = functools.partial(partitions.take_alone, db)
        issuer = PairIssuer(
            ca, settings, clock, audit, keys=pool, maker=signers, partitions=partitions, signers=signers
        )
        # one writer per process: issuance, enrolment, renewal, EST and nonces share its batches
        commits = GroupCommit(db, batching.batch_size, batching.max_wait_ms / 1000)
        nonces = Nonces(db, clock, dt.timedelta(seconds=settings.policy.nonce_ttl_seconds), commits)
        refusals = Refusals(db, audit, clock)
        renewal = Renewal(db, ca, issuer, nonces, settings, clock, audit, refusals, commits)
        ocsp = OCSPResponder(db, ca, settings, clock)
        sealer = TokenSealer(keyring)
        est = EST(db, ca, issuer, renewal, nonces, settings, clock, audit, refusals, commits)
        revocation = Revocation(db, ca, settings, clock, audit, on_revoked=[ocsp.forget])
        users = UserAdmin(db, settings, clock, audit, sealer)
        return cls(
            settings=settings,
            clock=clock,
            db=db,
            ca=ca,
            audit=audit,
            users=users,
            enrolment=Enrolment(db, issuer, clock, audit, settings.server.effective_mail_from, refusals, commits),
            nonces=nonces,
            renewal=renewal,
            issuer=issuer,
            directory=Directory(db, ca, settings, clock),
            key_pool=pool,
            est=est,
            recovery=recovery,
            revocation=revocation,
            ocsp=ocsp,
            outbox=OutboxQueue(db, clock, audit),
            checkpoints=AuditCheckpoints(
                db, settings.checkpoints_path, ca.paths.audit_public_key, clock, ca.audit_signer
            ),
            pool_keyring=keyring,
            outbox_sealer=OutboxSealer(keyring),
            refusals=refusals,
            commits=commits,
            signers=signers,
            issuance=CertificateIssuance(signers, commits, settings, clock, audit),
            admins=admins,
            passkeys=Passkeys(db, settings, clock, audit, admins),
            approvals=Approvals(db, clock, audit, admins, recovery, revocation, settings),
            dashboard=Dashboard(db, clock),
            cmp=CMP(db, ca, est, renewal, revocation, sealer, settings, clock, audit, refusals),
            acme=ACME(db, ca, issuer, nonces, settings, clock, audit, refusals, revocation),
            imports=UserImports(users, clock, settings.policy.token_ttl_days),
            status=ConsoleStatus(db, settings, clock),
        )

    def close(self) -> None:
        """Stop the signer processes and the writer thread, then the database's connections."""
        self.issuance.close()
        self.db.dispose()

    def ensure_server_identities(self) -> list[str]:
        with self._identity_lock:
            return self._ensure_server_identities()

    def _ensure_server_identities(self) -> list[str]:
        names = tls_hostnames(self.settings.server.hostname, self.settings.server.extra_tls_names)
        renewed = self.ca.ensure_server_identities(
            names,
            self.settings.server.effective_mail_from,
            self.clock,
            root_crl_validity=dt.timedelta(days=self.settings.revocation.root_crl_validity_days),
        )
        with self.db.transaction() as session:
            for what in renewed:
                if what == "root-crl" and self.ca.root_crl is not None:
                    number = crl_number(self.ca.root_crl)
                    self.audit.append(session, "system", "crl.published", "root", number=number, entries=0)
                elif what.endswith("-key-destroyed"):  # a retired token key whose certificate expired
                    self.audit.append(session, "system", "key.destroyed", what.removesuffix("-key-destroyed"))
                elif what == "infrastructure-crl" and self.ca.infrastructure_crl is not None:
                    crl = self.ca.infrastructure_crl
                    self.audit.append(
                        session, "system", "crl.published", "infrastructure", number=crl_number(crl), entries=len(crl)
                    )
                else:
                    self.audit.append(session, "system", "server-identity.renewed", what)
            self._register_server_certificates(session)
        self.watch_root_crl()
        return renewed

    def reload_ca(self) -> list[str]:
        """Take what `mailkms ca import` wrote (serve: when the CA files change, or on SIGHUP) without
        a restart: the new issuing CA certificate for the chains served and the signer processes, a
        new infrastructure CA (a new TLS certificate and CRL follow), a newer root CRL."""
        with self._identity_lock:
            return self._reload_ca()

    def _reload_ca(self) -> list[str]:
        changed = self.ca.reload_from_files()
        if "issuing-ca" in changed:
            self.signers.use(self.ca.issuing, self.ca.issuer.ca_issuers)
        if changed:
            with self.db.transaction() as session:
                for what in changed:
                    self.audit.append(session, "system", "ca.reloaded", what)
        return changed + self.ensure_server_identities() if changed else []

    def watch_root_crl(self) -> dt.timedelta | None:
        """Time left before the root CRL's nextUpdate, on /metrics; with the root offline nothing here
        can sign the next one, so a warning from [revocation] root_crl_warn_days before (doctor too)."""
        crl = self.ca.root_crl
        if crl is None or crl.next_update_utc is None:
            return None
        left = crl.next_update_utc - self.clock.now()
        metrics.ROOT_CRL_REMAINING.set(left.total_seconds())
        due = self.ca.paths.root_offline and left < dt.timedelta(days=self.settings.revocation.root_crl_warn_days)
        metrics.ROOT_CRL_DUE.set(1 if due else 0)
        if due:
            log.warning(
                "the root CRL (number %d) %s at %s UTC and the root is offline: sign a new one at a root ceremony "
                "(mailkms ca root-ceremony sign-crl) and import it (mailkms ca import)",
                crl_number(crl),
                "expired" if left <= dt.timedelta(0) else "expires",
                f"{crl.next_update_utc:%Y-%m-%d %H:%M}",
            )
        return left

    def _register_server_certificates(self, session: Session) -> None:
        """The mail signer and the OCSP responder are issued by the issuing CA: OCSP answers
        "good" for them only if the store knows them."""
        for kind, signer in (
            (CertKind.MAIL_SIGNER, self.ca.mail_signer),
            (CertKind.OCSP_RESPONDER, self.ca.ocsp_responder),
        ):
            if signer is None:
                continue
            cert = signer.certificate
            serial = serial_hex(cert.serial_number)
            if session.execute(select(Certificate.id).where(Certificate.serial == serial)).first() is None:
                session.add(
                    Certificate(
                        serial=serial,
                        user_id=None,
                        kind=kind.value,
                        generation=0,
                        not_before=cert.not_valid_before_utc,
                        not_after=cert.not_valid_after_utc,
                        der=cert.public_bytes(serialization.Encoding.DER),
                        crl_partition=crl_partition_of(cert),
                    )
                )

    def verify_audit(self, checkpoints_file: Path | None = None) -> AuditReport:
        """The hash chain, then every signed checkpoint against it (`checkpoints_file` or the configured one)."""
        with self.db.read_only() as session:
            chain = verify_chain(session)
            count, problems = self.checkpoints.verify(session, checkpoints_file)
        return AuditReport(chain.records, chain.problems + tuple(problems), count)

    def audit_records(
        self,
        *,
        actor: str | None = None,
        subject: str | None = None,
        action: str | None = None,
        before_seq: int | None = None,
        limit: int = 50,
    ) -> list[AuditEntry]:
        """Audit records newest first, filtered (the console's and the admin API's audit view)."""
        with self.db.read_only() as session:
            return search_records(
                session, actor=actor, subject=subject, action=action, before_seq=before_seq, limit=limit
            )

    def write_audit_checkpoint(self, *, force: bool = False) -> bool:
        """Sign and append the chain's head to the checkpoints file (if it moved); True when written."""
        return self.checkpoints.write(force=force) is not None
