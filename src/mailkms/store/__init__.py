"""Storage: SQLAlchemy models, the database and its migrations."""

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
    Token,
    User,
)

__all__ = [
    "ArchivedKey",
    "AuditHead",
    "AuditRecord",
    "Base",
    "Certificate",
    "Database",
    "IssuanceRequest",
    "KeyHandover",
    "Nonce",
    "OutboxMessage",
    "Token",
    "User",
    "make_engine",
    "migrate",
]
