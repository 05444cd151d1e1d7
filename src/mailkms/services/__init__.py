"""Lifecycle rules on an injected clock: enrolment, renewal, users, audit, the CA's files."""

from mailkms.services._acme import ACME, AccountView, AuthzView, ChallengeView, OrderView, Verified
from mailkms.services._admins import (
    ROLE_PERMISSIONS,
    AdminAccounts,
    AdminView,
    ConsoleSession,
    Permission,
    Principal,
    Role,
    parse_role,
)
from mailkms.services._approvals import ApprovalKind, Approvals, ApprovalView, Approved
from mailkms.services._audit import AuditCheckpoints, AuditEntry, AuditLog, AuditReport, search_records, verify_chain
from mailkms.services._batching import Batcher, GroupCommit
from mailkms.services._ca import (
    PASSPHRASE_SOURCES,
    CAContext,
    CAPaths,
    InitResult,
    ca_passphrase,
    init_ca,
    tls_hostnames,
)
from mailkms.services._ca_import import Imported, import_signed, request_intermediate, take_root_offline
from mailkms.services._ca_rekey import Rekeyed, rekey_issuing_ca
from mailkms.services._cmp import CMP
from mailkms.services._container import Services, open_database, public_urls
from mailkms.services._crl_partitions import ISSUING_SCOPE, CRLJob, CRLPartitions, CRLWorkers, partition_scope
from mailkms.services._dashboard import Dashboard, Series
from mailkms.services._directory import Directory, DirectoryEntry
from mailkms.services._doctor import Finding, health_checks, passphrase_source
from mailkms.services._enrolment import Enrolment, EnrolmentAccepted
from mailkms.services._est import EST, HANDOVER_WINDOW, ServerKey
from mailkms.services._imports import ImportJob, Issued, Refused, UserImports, names_by_mailbox, parse_users_csv
from mailkms.services._issuance import KeySource, PairIssuer, queue_message, serial_hex
from mailkms.services._key_migration import (
    Migrated,
    migrate_keys_to_token,
    migrate_root_key_to_token,
    set_key_store_in_config,
)
from mailkms.services._keypool import KeyPool, PoolKeyring, generate_ders
from mailkms.services._lifecycle import CertDates, UserState, renewal_state
from mailkms.services._nonces import Nonces
from mailkms.services._ocsp import FileResponderKeys, OCSPAnswer, OCSPResponder, ResponderKeys
from mailkms.services._offline_root import OFFLINE_ROOT_CRL_VALIDITY, RootCeremony, RootFolder
from mailkms.services._outbox import OutboxEntry, OutboxListing, OutboxQueue
from mailkms.services._passkeys import Ceremony, Passkeys, PasskeyView, credential_text
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
from mailkms.services._signers import SignerPool
from mailkms.services._signing import CertificateIssuance
from mailkms.services._status import ConsoleStatus, CRLScope, NextReminder, PoolStatus, ReminderStatus
from mailkms.services._token_mail import (
    SEALED_MAGIC,
    TOKEN_MAIL_PURPOSE,
    OutboxSealer,
    SealedBodyError,
    TokenMail,
    TokenMailer,
    is_sealed,
)
from mailkms.services._tokens import new_token, token_hash
from mailkms.services._users import UserAdmin, UserPage, UserView, normalise_mailbox

__all__ = [
    "ACME",
    "BOOTSTRAP_PASSPHRASE_FILE",
    "CMP",
    "EST",
    "HANDOVER_WINDOW",
    "ISSUING_SCOPE",
    "OFFLINE_ROOT_CRL_VALIDITY",
    "PASSPHRASE_SOURCES",
    "ROLE_PERMISSIONS",
    "SEALED_MAGIC",
    "TOKEN_MAIL_PURPOSE",
    "AccountView",
    "AdminAccounts",
    "AdminView",
    "ApprovalKind",
    "ApprovalView",
    "Approvals",
    "Approved",
    "AuditCheckpoints",
    "AuditEntry",
    "AuditLog",
    "AuditReport",
    "AuthzView",
    "Batcher",
    "CAContext",
    "CAPaths",
    "CRLJob",
    "CRLPartitions",
    "CRLScope",
    "CRLView",
    "CRLWorkers",
    "Ceremony",
    "CeremonyResult",
    "CeremonyView",
    "CertDates",
    "CertificateIssuance",
    "ChallengeView",
    "Composer",
    "ConsoleSession",
    "ConsoleStatus",
    "Dashboard",
    "Directory",
    "DirectoryEntry",
    "Enrolment",
    "EnrolmentAccepted",
    "FileResponderKeys",
    "Finding",
    "GroupCommit",
    "ImportJob",
    "Imported",
    "InitResult",
    "Issued",
    "KeyPool",
    "KeySource",
    "Migrated",
    "NewOfficer",
    "NextReminder",
    "Nonces",
    "OCSPAnswer",
    "OCSPResponder",
    "OrderView",
    "OutboxEntry",
    "OutboxListing",
    "OutboxQueue",
    "OutboxSealer",
    "PairIssuer",
    "PasskeyView",
    "Passkeys",
    "Permission",
    "PoolKeyring",
    "PoolStatus",
    "Principal",
    "Recovery",
    "RecoveryResult",
    "Refusals",
    "Refused",
    "Rekeyed",
    "ReminderStatus",
    "ReminderSweep",
    "Renewal",
    "RenewalAccepted",
    "ResponderKeys",
    "Revocation",
    "RevocationReport",
    "Role",
    "RootCeremony",
    "RootFolder",
    "SealedBodyError",
    "Series",
    "ServerKey",
    "Services",
    "ShareInput",
    "SignerPool",
    "SweepReport",
    "TokenMail",
    "TokenMailer",
    "UserAdmin",
    "UserImports",
    "UserPage",
    "UserState",
    "UserView",
    "Verified",
    "ca_passphrase",
    "credential_text",
    "generate_ders",
    "health_checks",
    "import_signed",
    "init_ca",
    "is_recorded",
    "is_sealed",
    "migrate_keys_to_token",
    "migrate_root_key_to_token",
    "names_by_mailbox",
    "new_bootstrap_passphrase",
    "new_token",
    "normalise_mailbox",
    "open_database",
    "parse_role",
    "parse_serial",
    "parse_users_csv",
    "partition_scope",
    "passphrase_source",
    "public_urls",
    "queue_message",
    "rekey_issuing_ca",
    "renewal_state",
    "request_intermediate",
    "search_records",
    "serial_hex",
    "set_key_store_in_config",
    "take_root_offline",
    "tls_hostnames",
    "token_hash",
    "verify_chain",
    "write_secret_once",
]
