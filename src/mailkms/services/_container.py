"""Wiring: builds every service from settings and a clock (entry points call this once)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from mailkms import metrics
from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.pki import PublicURLs
from mailkms.services._audit import AuditLog, AuditReport, verify_chain
from mailkms.services._ca import CAContext, CAPaths, tls_hostnames
from mailkms.services._directory import Directory
from mailkms.services._enrolment import Enrolment
from mailkms.services._est import EST
from mailkms.services._issuance import PairIssuer
from mailkms.services._keypool import KeyPool
from mailkms.services._recovery import Recovery
from mailkms.services._renewal import Nonces, Renewal
from mailkms.services._users import UserAdmin
from mailkms.store import Database


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
    key_pool: KeyPool | None = None

    @classmethod
    def build(cls, settings: Settings, clock: Clock, db: Database | None = None) -> Services:
        db = db or open_database(settings)
        ca = CAContext.load(
            CAPaths(settings.data_dir), passphrase_env=settings.ca_passphrase, urls=public_urls(settings)
        )
        audit = AuditLog(clock, observers=[metrics.observe_audit])
        pool = None
        if settings.pool.size > 0:
            wrapping = ca.derive_key("key pool")
            pool = KeyPool(db, wrapping, clock, settings.policy.encryption_key_type, settings.pool.size)
        issuer = PairIssuer(ca, settings, clock, audit, keys=pool)
        nonces = Nonces(db, clock, dt.timedelta(seconds=settings.policy.nonce_ttl_seconds))
        renewal = Renewal(db, ca, issuer, nonces, settings, clock, audit)
        return cls(
            settings=settings,
            clock=clock,
            db=db,
            ca=ca,
            audit=audit,
            users=UserAdmin(db, settings, clock, audit),
            enrolment=Enrolment(db, issuer, clock, audit, settings.server.effective_mail_from),
            nonces=nonces,
            renewal=renewal,
            issuer=issuer,
            directory=Directory(db, ca, settings, clock),
            key_pool=pool,
            est=EST(db, ca, issuer, renewal, settings, clock, audit),
            recovery=Recovery(db, ca.paths.recovery_dir, settings, clock, audit),
        )

    def ensure_server_identities(self) -> list[str]:
        names = tls_hostnames(self.settings.server.hostname, self.settings.server.extra_tls_names)
        renewed = self.ca.ensure_server_identities(names, self.settings.server.effective_mail_from, self.clock)
        if renewed:
            with self.db.transaction() as session:
                for what in renewed:
                    self.audit.append(session, "system", "server-identity.renewed", what)
        return renewed

    def verify_audit(self) -> AuditReport:
        with self.db.transaction() as session:
            return verify_chain(session)
