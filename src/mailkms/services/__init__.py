"""Lifecycle rules on an injected clock: enrolment, renewal, users, audit, the CA's files."""

from mailkms.services._audit import AuditCheckpoints, AuditLog, AuditReport, verify_chain
from mailkms.services._ca import PASSPHRASE_SOURCES, CAContext, CAPaths, InitResult, init_ca, tls_hostnames
from mailkms.services._cmp import CMP
from mailkms.services._container import Services, open_database, public_urls
from mailkms.services._directory import Directory, DirectoryEntry
from mailkms.services._doctor import Finding, health_checks, passphrase_source
from mailkms.services._enrolment import Enrolment, EnrolmentAccepted
from mailkms.services._est import EST, HANDOVER_WINDOW, ServerKey
from mailkms.services._issuance import KeySource, PairIssuer, queue_message, serial_hex
from mailkms.services._keypool import KeyPool, PoolKeyring, generate_ders
from mailkms.services._lifecycle import CertDates, UserState, renewal_state
from mailkms.services._nonces import Nonces
from mailkms.services._ocsp import OCSPAnswer, OCSPResponder
from mailkms.services._outbox import OutboxEntry, OutboxListing, OutboxQueue
from mailkms.services._recovery import (
    BOOTSTRAP_PASSPHRASE_FILE,
    CeremonyResult,
    CeremonyView,
    NewOfficer,
    Recovery,
    RecoveryResult,
    ShareInput,
    new_bootstrap_passphrase,
    write_secret_once,
)
from mailkms.services._refusals import Refusals, is_recorded
from mailkms.services._reminders import Composer, ReminderSweep, SweepReport
from mailkms.services._renewal import Renewal, RenewalAccepted
from mailkms.services._revocation import CRLView, Revocation, RevocationReport, parse_serial
from mailkms.services._tokens import new_token, token_hash
from mailkms.services._users import UserAdmin, UserView, normalise_mailbox

__all__ = [
    "BOOTSTRAP_PASSPHRASE_FILE",
    "CMP",
    "EST",
    "HANDOVER_WINDOW",
    "PASSPHRASE_SOURCES",
    "AuditCheckpoints",
    "AuditLog",
    "AuditReport",
    "CAContext",
    "CAPaths",
    "CRLView",
    "CeremonyResult",
    "CeremonyView",
    "CertDates",
    "Composer",
    "Directory",
    "DirectoryEntry",
    "Enrolment",
    "EnrolmentAccepted",
    "Finding",
    "InitResult",
    "KeyPool",
    "KeySource",
    "NewOfficer",
    "Nonces",
    "OCSPAnswer",
    "OCSPResponder",
    "OutboxEntry",
    "OutboxListing",
    "OutboxQueue",
    "PairIssuer",
    "PoolKeyring",
    "Recovery",
    "RecoveryResult",
    "Refusals",
    "ReminderSweep",
    "Renewal",
    "RenewalAccepted",
    "Revocation",
    "RevocationReport",
    "ServerKey",
    "Services",
    "ShareInput",
    "SweepReport",
    "UserAdmin",
    "UserState",
    "UserView",
    "generate_ders",
    "health_checks",
    "init_ca",
    "is_recorded",
    "new_bootstrap_passphrase",
    "new_token",
    "normalise_mailbox",
    "open_database",
    "parse_serial",
    "passphrase_source",
    "public_urls",
    "queue_message",
    "renewal_state",
    "serial_hex",
    "tls_hostnames",
    "token_hash",
    "verify_chain",
    "write_secret_once",
]
