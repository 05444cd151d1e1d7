"""Passkeys (WebAuthn) as the console's second factor, verified with py_webauthn.

Registration: a logged-in administrator asks for creation options (a challenge kept in the
database under the SHA-256 of a handle the browser holds), the browser's authenticator answers,
the attestation is verified here and the credential id, COSE public key and counter are stored.
Log-in: the password first (`AdminAccounts.check_password`, counted towards the lock-out), then an
assertion from one of the administrator's credentials; its counter must be higher than the stored
one (py_webauthn refuses a counter that did not increase, unless the authenticator keeps none).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

import webauthn
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from webauthn.helpers import parse_authentication_credential_json
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from mailkms.clock import Clock
from mailkms.config import Settings
from mailkms.errors import Conflict, LoginFailed, Malformed, NotFound
from mailkms.services._admins import AdminAccounts, ConsoleSession, Principal
from mailkms.services._audit import AuditLog
from mailkms.store import Administrator, Database, WebAuthnChallenge, WebAuthnCredential

CHALLENGE_SECONDS = 300


@dataclass(frozen=True)
class PasskeyView:
    label: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    sign_count: int
    id: int = 0


@dataclass(frozen=True)
class Ceremony:
    """Options for the browser (JSON text) and the handle that names the stored challenge."""

    options: str
    handle: str


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Passkeys:
    def __init__(self, db: Database, settings: Settings, clock: Clock, audit: AuditLog, admins: AdminAccounts) -> None:
        self._db = db
        self._rp_id = settings.admin.webauthn_rp_id or settings.server.hostname
        self._rp_name = f"mailkms {settings.server.hostname}"
        self._clock = clock
        self._audit = audit
        self._admins = admins

    @property
    def rp_id(self) -> str:
        return self._rp_id

    def origin_ok(self, origin: str) -> bool:
        """The page's origin must be https on the relying party's host (any port)."""
        parts = urlsplit(origin)
        return parts.scheme == "https" and parts.hostname == self._rp_id

    # --- registration --------------------------------------------------------------------------------
    def list(self, name: str) -> list[PasskeyView]:
        with self._db.read_only() as session:
            rows = session.execute(
                select(WebAuthnCredential)
                .join(Administrator, Administrator.id == WebAuthnCredential.admin_id)
                .where(Administrator.name == name)
                .order_by(WebAuthnCredential.id)
            ).scalars()
            return [PasskeyView(r.label, r.created_at, r.last_used_at, r.sign_count, r.id) for r in rows]

    def delete(self, who: Principal, passkey_id: int) -> str:
        """One of the administrator's own passkeys (its label returned). Not the last one of an
        administrator who must log in with a passkey."""
        with self._db.transaction() as session:
            admin = self._named(session, who.name)
            rows = (
                session.execute(select(WebAuthnCredential).where(WebAuthnCredential.admin_id == admin.id))
                .scalars()
                .all()
            )
            row = next((r for r in rows if r.id == passkey_id), None)
            if row is None:
                raise NotFound(f"you have no passkey {passkey_id}")
            if admin.passkey_required and len(rows) == 1:
                raise Conflict("this is your last passkey and you must log in with one; register another first")
            session.delete(row)
            self._audit.append(session, who.actor, "admin.passkey.deleted", who.name, label=row.label)
            return row.label

    def begin_registration(self, who: Principal) -> Ceremony:
        with self._db.transaction() as session:
            admin = self._named(session, who.name)
            existing = session.execute(
                select(WebAuthnCredential.credential_id).where(WebAuthnCredential.admin_id == admin.id)
            ).scalars()
            options = webauthn.generate_registration_options(
                rp_id=self._rp_id,
                rp_name=self._rp_name,
                user_name=admin.name,
                user_id=f"mailkms-admin-{admin.id}".encode(),
                exclude_credentials=[PublicKeyCredentialDescriptor(id=c) for c in existing],
                authenticator_selection=AuthenticatorSelectionCriteria(
                    resident_key=ResidentKeyRequirement.DISCOURAGED,
                    user_verification=UserVerificationRequirement.PREFERRED,
                ),
            )
            handle = self._keep(session, admin.id, "register", options.challenge)
        return Ceremony(webauthn.options_to_json(options), handle)

    def finish_registration(self, who: Principal, handle: str, credential: str, origin: str, label: str) -> None:
        label = label.strip()[:64] or "passkey"
        expected_origin = self._origin(origin)
        refused: Malformed | None = None
        with self._db.transaction() as session:
            admin = self._named(session, who.name)
            challenge = self._take(session, handle, admin.id, "register")
            try:
                verified = webauthn.verify_registration_response(
                    credential=credential,
                    expected_challenge=challenge,
                    expected_rp_id=self._rp_id,
                    expected_origin=expected_origin,
                )
            except WebAuthnException as exc:
                refused = Malformed(f"the passkey was not accepted: {exc}")
                self._audit.append(session, who.actor, "admin.passkey.refused", admin.name, why=str(exc)[:80])
            else:
                session.add(
                    WebAuthnCredential(
                        admin_id=admin.id,
                        credential_id=verified.credential_id,
                        public_key=verified.credential_public_key,
                        sign_count=verified.sign_count,
                        label=label,
                        created_at=self._clock.now(),
                    )
                )
                self._audit.append(session, who.actor, "admin.passkey.registered", admin.name, label=label)
        if refused is not None:
            raise refused  # after the commit: the challenge stays used up

    # --- log-in --------------------------------------------------------------------------------------
    def begin_login(self, name: str, password: str) -> Ceremony:
        """After the right password: request options naming the administrator's credentials."""
        admin_id = self._admins.check_password(name, password)
        with self._db.transaction() as session:
            creds = list(
                session.execute(
                    select(WebAuthnCredential.credential_id).where(WebAuthnCredential.admin_id == admin_id)
                ).scalars()
            )
            if not creds:
                admin = session.get(Administrator, admin_id)
                assert admin is not None
                self._admins.refuse(session, admin, self._clock.now(), "no-passkey")
            else:
                options = webauthn.generate_authentication_options(
                    rp_id=self._rp_id,
                    allow_credentials=[PublicKeyCredentialDescriptor(id=c) for c in creds],
                    user_verification=UserVerificationRequirement.PREFERRED,
                )
                handle = self._keep(session, admin_id, "login", options.challenge)
                return Ceremony(webauthn.options_to_json(options), handle)
        raise LoginFailed()

    def finish_login(self, handle: str, credential: str, origin: str) -> ConsoleSession:
        now = self._clock.now()
        expected_origin = self._origin(origin)
        failure: LoginFailed | None = None
        with self._db.transaction() as session:
            row = session.get(WebAuthnChallenge, _sha256(handle)) if handle else None
            if row is None or row.purpose != "login" or row.expires_at <= now:
                raise LoginFailed()
            admin = session.get(Administrator, row.admin_id, with_for_update=True)
            assert admin is not None
            challenge = self._take(session, handle, admin.id, "login")
            try:
                raw_id = parse_authentication_credential_json(credential).raw_id
            except (WebAuthnException, ValueError, KeyError, TypeError):
                raw_id = b""  # not an assertion: no credential matches, refused and counted below
            stored = session.execute(
                select(WebAuthnCredential).where(
                    WebAuthnCredential.credential_id == raw_id, WebAuthnCredential.admin_id == admin.id
                )
            ).scalar_one_or_none()
            if admin.disabled_at is not None or (admin.locked_until is not None and admin.locked_until > now):
                failure = LoginFailed()
            elif stored is None:
                failure = self._admins.refuse(session, admin, now, "passkey-unknown")
            else:
                try:
                    verified = webauthn.verify_authentication_response(
                        credential=credential,
                        expected_challenge=challenge,
                        expected_rp_id=self._rp_id,
                        expected_origin=expected_origin,
                        credential_public_key=stored.public_key,
                        credential_current_sign_count=stored.sign_count,
                    )
                except WebAuthnException as exc:
                    failure = self._admins.refuse(session, admin, now, f"passkey: {str(exc)[:80]}")
                else:
                    stored.sign_count = verified.new_sign_count
                    stored.last_used_at = now
                    return self._admins.open_session(session, admin, now, "passkey")
        raise failure

    # --- helpers -------------------------------------------------------------------------------------
    def _origin(self, origin: str) -> str:
        if not self.origin_ok(origin):
            raise Malformed(f"passkeys work only from https://{self._rp_id}")
        return origin

    def _named(self, session: Session, name: str) -> Administrator:
        admin = session.execute(select(Administrator).where(Administrator.name == name)).scalar_one()
        return admin

    def _keep(self, session: Session, admin_id: int, purpose: str, challenge: bytes) -> str:
        now = self._clock.now()
        session.execute(delete(WebAuthnChallenge).where(WebAuthnChallenge.expires_at < now))
        handle = secrets.token_urlsafe(32)
        session.add(
            WebAuthnChallenge(
                handle_hash=_sha256(handle),
                admin_id=admin_id,
                purpose=purpose,
                challenge=challenge,
                expires_at=now + dt.timedelta(seconds=CHALLENGE_SECONDS),
            )
        )
        return handle

    def _take(self, session: Session, handle: str, admin_id: int, purpose: str) -> bytes:
        """The stored challenge, good once: deleted as it is read."""
        row = session.get(WebAuthnChallenge, _sha256(handle)) if handle else None
        if row is None or row.admin_id != admin_id or row.purpose != purpose or row.expires_at <= self._clock.now():
            raise Malformed("the passkey ceremony has expired; start again")
        session.delete(row)
        return row.challenge


def credential_text(body: object) -> str:
    """The browser's PublicKeyCredential (as JSON) as py_webauthn reads it."""
    if not isinstance(body, dict):
        raise Malformed("expected the credential as a JSON object")
    return json.dumps(body)
