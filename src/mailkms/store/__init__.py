"""Storage: SQLAlchemy models, the database and its migrations."""

from mailkms.store._acme import ACMEAccount, ACMEAuthorization, ACMEOrder
from mailkms.store._admins import (
    Administrator,
    AdminSession,
    AdminToken,
    ApprovalRequest,
    ApprovalVote,
    WebAuthnChallenge,
    WebAuthnCredential,
)
from mailkms.store._cmp import CMPNonce, CMPTransaction
from mailkms.store._db import Database, make_engine, migrate
from mailkms.store._est import KeyHandover
from mailkms.store._models import (
    ArchivedKey,
    AuditHead,
    AuditRecord,
    Base,
    Certificate,
    IssuanceRequest,
    Nonce,
    OutboxMessage,
    PublishedCRL,
    Token,
    User,
)
from mailkms.store._models_scale import JobClaim, PooledKey, PoolWrapping, Reminder
from mailkms.store._recovery import RecoveryCeremony, RecoveryHead, RecoveryHold
from mailkms.store._server_keys import NONCE_KEY, ServerKey

__all__ = [
    "NONCE_KEY",
    "ACMEAccount",
    "ACMEAuthorization",
    "ACMEOrder",
    "AdminSession",
    "AdminToken",
    "Administrator",
    "ApprovalRequest",
    "ApprovalVote",
    "ArchivedKey",
    "AuditHead",
    "AuditRecord",
    "Base",
    "CMPNonce",
    "CMPTransaction",
    "Certificate",
    "Database",
    "IssuanceRequest",
    "JobClaim",
    "KeyHandover",
    "Nonce",
    "OutboxMessage",
    "PoolWrapping",
    "PooledKey",
    "PublishedCRL",
    "RecoveryCeremony",
    "RecoveryHead",
    "RecoveryHold",
    "Reminder",
    "ServerKey",
    "Token",
    "User",
    "WebAuthnChallenge",
    "WebAuthnCredential",
    "make_engine",
    "migrate",
]
