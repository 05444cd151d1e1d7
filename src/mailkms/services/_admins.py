"""Administrators: accounts and roles, argon2id passwords, TOTP, API tokens, console sessions.

Who may do what is decided here (`Role`, `Permission`, `Principal.require`), never only in the
pages: the admin API and the console both ask `require` before calling a use case.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import (
    AccountLocked,
    AdminAuthRequired,
    AdminExists,
    AdminNotFound,
    ConfigError,
    LoginFailed,
    Malformed,
    PasskeyRequired,
    RoleForbidden,
)
from mailkms.services._audit import AuditLog
from mailkms.services._keypool import PoolKeyring
from mailkms.store import Administrator, AdminSession, AdminToken, Database, WebAuthnCredential

_NAME = re.compile(r"^[a-z][a-z0-9._-]{1,63}$")
MIN_PASSWORD = 12
TOTP_CONTEXT = "mailkms-admin-totp"
_SEALED_VERSION = b"v1"


class Role(enum.StrEnum):
    AUDITOR = "auditor"  # reads everything, changes nothing
    OPERATOR = "operator"  # users, tokens, revocation
    OFFICER = "officer"  # recovery share holder
    SUPERUSER = "superuser"


class Permission(enum.StrEnum):
    READ = "read"
    USERS = "users"  # add, re-enrol, revoke
    RECOVERY = "recovery"
    ADMINS = "admins"


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.AUDITOR: frozenset({Permission.READ}),
    Role.OPERATOR: frozenset({Permission.READ, Permission.USERS}),
    Role.OFFICER: frozenset({Permission.READ, Permission.RECOVERY}),
    Role.SUPERUSER: frozenset(Permission),
}


def parse_role(text: str) -> Role:
    try:
        return Role(text.strip().lower())
    except ValueError:
        raise Malformed(f"{text!r} is not a role; roles: {', '.join(r.value for r in Role)}") from None


@dataclass(frozen=True)
class Principal:
    """An authenticated administrator, as the surfaces see them."""

    name: str
    role: Role

    @property
    def actor(self) -> str:
        """The name in the audit chain."""
        return f"admin:{self.name}"

    def may(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]

    def require(self, permission: Permission) -> None:
        if not self.may(permission):
            raise RoleForbidden(f"the {self.role.value} role does not allow this ({permission.value})")


@dataclass(frozen=True)
class AdminView:
    name: str
    role: Role
    totp: bool
    disabled: bool
    locked_until: dt.datetime | None
    created_at: dt.datetime
    passkey_required: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "role": self.role.value,
            "totp": self.totp,
            "disabled": self.disabled,
            "locked_until": self.locked_until.isoformat() if self.locked_until else None,
            "created_at": self.created_at.isoformat(),
            "passkey_required": self.passkey_required,
        }


@dataclass(frozen=True)
class ConsoleSession:
    """A live console session: `cookie` is the secret the browser holds (given once, at log-in)."""

    principal: Principal
    csrf: str
    expires_at: dt.datetime
    cookie: str = ""


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def new_password() -> str:
    """A one-time initial password: 128 bits, URL-safe."""
    return secrets.token_urlsafe(16)


class AdminAccounts:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        clock: Clock,
        audit: AuditLog,
        keyring: PoolKeyring,
        hasher: PasswordHasher | None = None,
    ) -> None:
        self._db = db
        self._cfg = settings.admin
        self._issuer = f"mailkms {settings.server.hostname}"
        self._clock = clock
        self._audit = audit
        self._keyring = keyring
        self._hasher = hasher or PasswordHasher()  # argon2id, RFC 9106 low-memory defaults
        self._dummy: str | None = None  # made on the first log-in for an unknown name, not per process

    # --- accounts ----------------------------------------------------------------------------------
    def add(self, name: str, role: Role, password: str | None, actor: str) -> str:
        """A new administrator; returns the initial password (the given one, or a generated one)."""
        if not _NAME.match(name):
            raise Malformed("an administrator's name is 2-64 characters: a-z first, then a-z 0-9 . _ -")
        chosen = self._checked_password(password)
        hashed = self._hasher.hash(chosen)
        with self._db.transaction() as session:
            if session.execute(select(Administrator.id).where(Administrator.name == name)).first():
                raise AdminExists(f"administrator {name} already exists")
            session.add(
                Administrator(
                    name=name, role=role.value, password_hash=hashed, failed_logins=0, created_at=self._clock.now()
                )
            )
            self._audit.append(session, actor, "admin.added", name, role=role.value)
        return chosen

    def set_password(self, name: str, password: str | None, actor: str) -> str:
        """A new password (the given one, or a generated one, returned); clears a lock-out and ends
        the administrator's console sessions."""
        chosen = self._checked_password(password)
        hashed = self._hasher.hash(chosen)
        with self._db.transaction() as session:
            admin = self._admin(session, name)
            admin.password_hash = hashed
            admin.failed_logins = 0
            admin.locked_until = None
            session.execute(delete(AdminSession).where(AdminSession.admin_id == admin.id))
            self._audit.append(session, actor, "admin.password.set", name)
        return chosen

    def _checked_password(self, password: str | None) -> str:
        chosen = password if password is not None else new_password()
        if len(chosen) < MIN_PASSWORD:
            raise Malformed(f"the password must have at least {MIN_PASSWORD} characters")
        return chosen

    def list(self) -> list[AdminView]:
        with self._db.read_only() as session:
            rows = session.execute(select(Administrator).order_by(Administrator.name)).scalars().all()
            return [self._view(a) for a in rows]

    def show(self, name: str) -> AdminView:
        with self._db.read_only() as session:
            return self._view(self._admin(session, name))

    def disable(self, name: str, actor: str) -> None:
        """No more log-ins; the tokens and sessions of the administrator end at once."""
        now = self._clock.now()
        with self._db.transaction() as session:
            admin = self._admin(session, name)
            admin.disabled_at = admin.disabled_at or now
            session.execute(
                update(AdminToken)
                .where(AdminToken.admin_id == admin.id, AdminToken.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            session.execute(delete(AdminSession).where(AdminSession.admin_id == admin.id))
            self._audit.append(session, actor, "admin.disabled", name)

    def enable(self, name: str, actor: str) -> None:
        """Log-ins again (API tokens ended by `disable` stay ended: issue a new one)."""
        with self._db.transaction() as session:
            admin = self._admin(session, name)
            admin.disabled_at = None
            admin.failed_logins = 0
            admin.locked_until = None
            self._audit.append(session, actor, "admin.enabled", name)

    def set_role(self, name: str, role: Role, actor: str) -> None:
        """A new role; the administrator's console sessions end (the next log-in has the new role)."""
        with self._db.transaction() as session:
            admin = self._admin(session, name)
            before = admin.role
            admin.role = role.value
            session.execute(delete(AdminSession).where(AdminSession.admin_id == admin.id))
            self._audit.append(session, actor, "admin.role.changed", name, role=role.value, before=before)

    def unlock(self, name: str, actor: str) -> None:
        """Ends a lock-out after repeated failed log-ins (the failure count starts again)."""
        with self._db.transaction() as session:
            admin = self._admin(session, name)
            admin.failed_logins = 0
            admin.locked_until = None
            self._audit.append(session, actor, "admin.unlocked", name)

    def require_passkey(self, name: str, required: bool, actor: str) -> None:
        """With `required`, a password and a TOTP code no longer log this administrator in: only a
        passkey does. Refused while they have no passkey (they could not log in at all)."""
        with self._db.transaction() as session:
            admin = self._admin(session, name)
            if (
                required
                and not session.execute(
                    select(WebAuthnCredential.id).where(WebAuthnCredential.admin_id == admin.id)
                ).first()
            ):
                raise Malformed(f"{name} has no passkey yet: register one at /admin/passkeys first")
            admin.passkey_required = required
            self._audit.append(session, actor, "admin.passkey.required", name, required=required)

    def enrol_totp(self, name: str, actor: str) -> str:
        """A new TOTP secret (RFC 6238, SHA-1, 6 digits, 30 s): returns the otpauth:// URI, shown once."""
        secret = pyotp.random_base32(32)
        sealed = self._seal(name, secret)
        with self._db.transaction() as session:
            admin = self._admin(session, name)
            admin.totp_sealed = sealed
            admin.totp_enabled_at = self._clock.now()
            admin.totp_last_step = None
            self._audit.append(session, actor, "admin.totp.enrolled", name)
        return pyotp.TOTP(secret).provisioning_uri(name=name, issuer_name=self._issuer)

    def new_api_token(self, name: str, actor: str) -> str:
        """A Bearer token for the admin API, shown once; the store keeps its SHA-256."""
        token = "mka_" + secrets.token_urlsafe(32)
        with self._db.transaction() as session:
            admin = self._admin(session, name)
            if admin.disabled_at is not None:
                raise AdminNotFound(f"administrator {name} is disabled")
            session.add(AdminToken(admin_id=admin.id, token_hash=_sha256(token), created_at=self._clock.now()))
            self._audit.append(session, actor, "admin.api-key.issued", name)
        return token

    # --- authentication ----------------------------------------------------------------------------
    def authenticate_token(self, token: str) -> Principal:
        with self._db.read_only() as session:
            row = session.execute(
                select(Administrator)
                .join(AdminToken, AdminToken.admin_id == Administrator.id)
                .where(AdminToken.token_hash == _sha256(token), AdminToken.revoked_at.is_(None))
            ).scalar_one_or_none()
            if row is None or row.disabled_at is not None:
                raise AdminAuthRequired("the API token is not valid")
            return Principal(row.name, Role(row.role))

    def login(self, name: str, password: str, code: str) -> ConsoleSession:
        """Password and TOTP code; a console session. Failures count towards the lock-out."""
        cipher = self._cipher()  # before the transaction (it may write the wrapping key)
        return self._login(name, lambda admin, now: self._check(admin, password, code, now, cipher), password)

    def check_password(self, name: str, password: str) -> int:
        """The first factor alone, before a passkey: the administrator's id. A wrong password counts
        towards the lock-out like any failed log-in; the session comes with `passkey_session`."""
        found: list[int] = []

        def first(admin: Administrator, now: dt.datetime) -> str | None:
            if not self._verify(admin.password_hash, password):
                return "password"
            found.append(admin.id)
            return None

        self._login(name, first, password, open_session=False)
        return found[0]

    def _login(
        self,
        name: str,
        check: Callable[[Administrator, dt.datetime], str | None],
        password: str,
        *,
        open_session: bool = True,
    ) -> ConsoleSession:
        now = self._clock.now()
        failure: LoginFailed | AccountLocked | None = None
        with self._db.transaction() as session:
            admin = session.execute(
                select(Administrator).where(Administrator.name == name).with_for_update()
            ).scalar_one_or_none()
            if admin is None or admin.disabled_at is not None:
                if self._dummy is None:
                    self._dummy = self._hasher.hash(secrets.token_urlsafe(16))
                self._verify(self._dummy, password)  # the same time as for a real account
                self._audit.append(session, "anonymous", "admin.login.failed", name[:64], why="unknown")
                failure = LoginFailed()
            elif admin.locked_until is not None and admin.locked_until > now:
                self._audit.append(session, "anonymous", "admin.login.failed", name, why="locked")
                failure = AccountLocked(f"locked until {admin.locked_until:%H:%M:%S} UTC")
            else:
                why = check(admin, now)
                if why is None:
                    if not open_session:
                        return ConsoleSession(Principal(admin.name, Role(admin.role)), "", now)
                    return self.open_session(session, admin, now, "totp")
                failure = self.refuse(session, admin, now, why)
                if why == "passkey-required":  # the password was right: say what is missing
                    failure = PasskeyRequired("this administrator logs in with a passkey: /admin/login/passkey")
        raise failure

    def refuse(self, session: Session, admin: Administrator, now: dt.datetime, why: str) -> LoginFailed:
        """A failed log-in of a known administrator: counted, locked at the limit, audited."""
        admin.failed_logins += 1
        locked = admin.failed_logins >= self._cfg.max_failed_logins
        if locked:
            admin.locked_until = now + dt.timedelta(minutes=self._cfg.lockout_minutes)
            admin.failed_logins = 0
        self._audit.append(session, "anonymous", "admin.login.failed", admin.name, why=why, locked=locked)
        return LoginFailed()

    def open_session(self, session: Session, admin: Administrator, now: dt.datetime, factor: str) -> ConsoleSession:
        """Both factors passed: a new console session (in the caller's transaction)."""
        admin.failed_logins = 0
        admin.locked_until = None
        cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        expires = now + dt.timedelta(minutes=self._cfg.session_minutes)
        session.add(
            AdminSession(id_hash=_sha256(cookie), admin_id=admin.id, csrf=csrf, created_at=now, expires_at=expires)
        )
        session.execute(delete(AdminSession).where(AdminSession.expires_at < now))
        self._audit.append(session, f"admin:{admin.name}", "admin.login", admin.name, factor=factor)
        return ConsoleSession(Principal(admin.name, Role(admin.role)), csrf, expires, cookie)

    def _check(self, admin: Administrator, password: str, code: str, now: dt.datetime, cipher: _Cipher) -> str | None:
        """None when the password and the code are right, else which was wrong (for the audit only)."""
        if not self._verify(admin.password_hash, password):
            return "password"
        if admin.passkey_required:
            return "passkey-required"  # `mailkms admin require-passkey`: TOTP is not enough
        if admin.totp_sealed is None:
            return "no-second-factor"
        totp = pyotp.TOTP(cipher.open(admin.name, admin.totp_sealed))
        step = totp.timecode(now)
        for candidate in (step, step - 1, step + 1):  # one step of clock drift either way
            if admin.totp_last_step is not None and candidate <= admin.totp_last_step:
                continue  # a code is good once
            if secrets.compare_digest(totp.generate_otp(candidate), code.strip()):
                admin.totp_last_step = candidate
                return None
        return "code"

    def _verify(self, hashed: str, password: str) -> bool:
        try:
            return self._hasher.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            return False

    def session(self, cookie: str) -> ConsoleSession:
        now = self._clock.now()
        with self._db.read_only() as session:
            found = session.execute(
                select(AdminSession, Administrator)
                .join(Administrator, Administrator.id == AdminSession.admin_id)
                .where(AdminSession.id_hash == _sha256(cookie))
            ).first()
            if found is None:
                raise AdminAuthRequired("not logged in")
            row, admin = found
            if row.expires_at <= now or admin.disabled_at is not None:
                raise AdminAuthRequired("the session has ended; log in again")
            return ConsoleSession(Principal(admin.name, Role(admin.role)), row.csrf, row.expires_at)

    def logout(self, cookie: str) -> None:
        with self._db.transaction() as session:
            row = session.get(AdminSession, _sha256(cookie))
            if row is not None:
                admin = session.get(Administrator, row.admin_id)
                session.delete(row)
                self._audit.append(session, f"admin:{admin.name if admin else '?'}", "admin.logout", "-")

    # --- helpers -----------------------------------------------------------------------------------
    def _admin(self, session: Session, name: str) -> Administrator:
        admin = session.execute(select(Administrator).where(Administrator.name == name)).scalar_one_or_none()
        if admin is None:
            raise AdminNotFound(f"no administrator {name}")
        return admin

    def _view(self, admin: Administrator) -> AdminView:
        return AdminView(
            admin.name,
            Role(admin.role),
            admin.totp_sealed is not None,
            admin.disabled_at is not None,
            admin.locked_until,
            admin.created_at,
            bool(admin.passkey_required),
        )

    def _cipher(self) -> _Cipher:
        opened = self._keyring.open()
        if opened is None:
            raise ConfigError("the CA passphrase does not open the server's at-rest key; TOTP secrets cannot be read")
        return _Cipher(*opened)

    def _seal(self, name: str, secret: str) -> bytes:
        return self._cipher().seal(name, secret)

    def seal_secret(self, context: str, secret: str) -> bytes:
        """Another secret kept between requests (an officer's share awaiting the quorum), under the
        same at-rest key, bound to CONTEXT."""
        return self._cipher().seal(context, secret)

    def open_secret(self, context: str, sealed: bytes) -> str:
        return self._cipher().open(context, sealed)


class _Cipher:
    """TOTP secrets under the server's at-rest key (the key pool's wrapping key: AES-256-GCM, itself
    sealed by scrypt under the CA passphrase), bound to the administrator's name."""

    def __init__(self, key_id: str, aead: AESGCM) -> None:
        self._key_id = key_id
        self._aead = aead

    def _aad(self, name: str) -> bytes:
        return f"{TOTP_CONTEXT}|{name}|{self._key_id}".encode()

    def seal(self, name: str, secret: str) -> bytes:
        nonce = secrets.token_bytes(12)
        return (
            b":".join([_SEALED_VERSION, self._key_id.encode(), nonce.hex().encode()])
            + b":"
            + (self._aead.encrypt(nonce, secret.encode(), self._aad(name)))
        )

    def open(self, name: str, sealed: bytes) -> str:
        version, key_id, nonce_hex, body = sealed.split(b":", 3)
        if version != _SEALED_VERSION or key_id.decode() != self._key_id:
            raise ConfigError("a TOTP secret was sealed under another key")
        try:
            return self._aead.decrypt(bytes.fromhex(nonce_hex.decode()), body, self._aad(name)).decode()
        except InvalidTag:  # altered, or copied from another administrator's row
            raise ConfigError(f"the stored TOTP secret of {name} does not open; enrol it again") from None


__all__ = [
    "ROLE_PERMISSIONS",
    "AdminAccounts",
    "AdminView",
    "ConsoleSession",
    "Permission",
    "Principal",
    "Role",
    "new_password",
    "parse_role",
]
