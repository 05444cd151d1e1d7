"""The user's advanced security: enrolment, installing deliveries, the log-on check, renewal."""

from __future__ import annotations

import datetime as dt
import enum
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from mailkms.client._http import Api, fetch_pinned_root
from mailkms.client._mailbox import ImapSettings, Mailbox, check_imap, open_mailbox
from mailkms.client._mailstores import InstallTargets
from mailkms.client._store import (
    ClientState,
    Generation,
    KeyStore,
    Pending,
    cert_from_pem,
    cert_to_pem,
    encryption_key_name,
    signing_key_name,
)
from mailkms.clock import Clock
from mailkms.errors import (
    BadMessage,
    ClientStateError,
    DeliveryRefused,
    MailboxError,
    MailkmsError,
    ServerUnreachable,
)
from mailkms.pki import (
    KeyType,
    Manifest,
    PrivateKey,
    decrypt,
    fingerprint_sha256,
    generate_key,
    issuing_cas_under,
    load_private_key_der,
    mailboxes_of,
    open_delivery,
    parse_message,
    public_key_of,
    same_public_key,
    sign_request,
    signature_hash_for,
    verify_email_chain,
)
from mailkms.pki import (
    decrypt_message as decrypt_smime,
)

log = logging.getLogger("mailkms.client")

PROMPT = (
    "Your security certificates are approaching expiration.\n"
    "Do you want to send a certificate update request to the\n"
    "Key Management Server?"
)


class LogonState(enum.StrEnum):
    ACTIVE = "ACTIVE"
    DUE = "DUE"
    EXPIRED = "EXPIRED"
    NOT_ENROLLED = "NOT_ENROLLED"


def logon_state(current: Generation | None, now: dt.datetime) -> LogonState:
    """The client's own view, from the installed certificates and the reminder point the server set."""
    if current is None:
        return LogonState.NOT_ENROLLED
    if now > dt.datetime.fromisoformat(current.not_after):
        return LogonState.EXPIRED
    if now >= dt.datetime.fromisoformat(current.reminder_at):
        return LogonState.DUE
    return LogonState.ACTIVE


def _csr(key: PrivateKey, mailbox: str) -> bytes:
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, mailbox)]))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(mailbox)]), critical=False)
    )
    return builder.sign(key, signature_hash_for(key)).public_bytes(serialization.Encoding.PEM)


def _transport_certificate(key: PrivateKey, mailbox: str, now: dt.datetime) -> x509.Certificate:
    """Self-signed: it only carries the transport public key to the server."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mailkms transport key for {mailbox}")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.KeyUsage(False, False, True, False, False, False, False, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )


@dataclass(frozen=True)
class _Checked:
    """A delivery that passed every check, with what _write_delivery stores."""

    manifest: Manifest
    signing: x509.Certificate
    encryption: x509.Certificate
    signing_key: PrivateKey
    recovered: dict[str, PrivateKey]
    by_serial: dict[str, x509.Certificate]
    chain: list[x509.Certificate]


@dataclass(frozen=True)
class SyncReport:
    installed: list[str]
    refused: list[str]
    already: int
    notes: list[str] = field(default_factory=list)  # the mail programs' key stores (InstallTargets)


class Client:
    def __init__(self, home: Path, clock: Clock, passphrase: Callable[[], bytes]) -> None:
        self.store = KeyStore(home)
        self._clock = clock
        self._passphrase_source = passphrase
        self._passphrase: bytes | None = None

    def passphrase(self) -> bytes:
        if self._passphrase is None:
            self._passphrase = self._passphrase_source()
        return self._passphrase

    def state(self) -> ClientState:
        return self.store.load()

    def api(self, state: ClientState) -> Api:
        return Api(state.server, cert_from_pem(state.root_pem))

    # --- unlocking ---------------------------------------------------------------------------
    def unlock(self) -> ClientState:
        """Open the key store with the passphrase (log-on to advanced security)."""
        state = self.store.load()
        self._check_passphrase(state)
        return state

    def _check_passphrase(self, state: ClientState) -> None:
        current = state.current
        name = (
            signing_key_name(current.signing_serial)
            if current
            else (state.pending.signing_key_file if state.pending else state.transport_key_file)
        )
        if name:
            self.store.read_key(name, self.passphrase())

    # --- enrolment ---------------------------------------------------------------------------------
    def enroll(
        self, server: str, fingerprint: str, mailbox: str, token: str, inbox: Path | ImapSettings, key_type: KeyType
    ) -> dict[str, object]:
        """`inbox`: the Maildir, or the IMAP account (checked here, before the token is spent)."""
        with self.store.locked():
            previous = self.store.load() if self.store.exists() else None
            if previous is not None and previous.mailbox != mailbox.strip().lower():
                raise ClientStateError(f"this key store belongs to {previous.mailbox}; use another --home")
            if isinstance(inbox, ImapSettings):
                check_imap(inbox)
            maildir = "" if isinstance(inbox, ImapSettings) else str(inbox)
            root, _chain = fetch_pinned_root(server, fingerprint)
            api = Api(server, root)
            info = api.server_info()
            now = self._clock.now()
            passphrase = self.passphrase()
            signing_key = generate_key(key_type)
            transport_key = generate_key(KeyType.RSA2048)
            transport_cert = _transport_certificate(transport_key, mailbox, now)
            accepted = api.enrol(
                {
                    "mailbox": mailbox,
                    "token": token,
                    "csr": _csr(signing_key, mailbox).decode(),
                    "transport_certificate": cert_to_pem(transport_cert),
                }
            )
            request_id = str(accepted["request_id"])
            pending_name = self.store.write_key(f"signing-pending-{request_id}.pem", signing_key, passphrase)
            transport_name = self.store.write_key(f"transport-{request_id}.pem", transport_key, passphrase)
            state = previous or ClientState(
                server=server.rstrip("/"),
                mailbox=str(accepted["mailbox"]),
                root_fingerprint=fingerprint_sha256(root),
                root_pem=cert_to_pem(root),
                mail_from=str(info["mail_from"]),
                maildir=maildir,
            )
            state.server = server.rstrip("/")
            state.maildir = maildir
            state.imap = inbox.sealed(passphrase) if isinstance(inbox, ImapSettings) else None
            state.mail_from = str(info["mail_from"])
            state.root_pem = cert_to_pem(root)
            state.root_fingerprint = fingerprint_sha256(root)
            state.pending = Pending("enrolment", request_id, pending_name, now.isoformat())
            state.transport_key_file = transport_name
            state.transport_cert_pem = cert_to_pem(transport_cert)
            self.store.save(state)
            return accepted

    # --- installing deliveries -------------------------------------------------------------------
    def sync(self) -> SyncReport:
        with self.store.locked():
            state = self.store.load()
            installed: list[str] = []
            refused: list[str] = []
            filing: list[str] = []
            already = 0

            def settle(box: Mailbox, key: str, refused: bool) -> None:
                # Filing a decided mail (IMAP: flag, move) failing must not stop the sync: the decision
                # is saved, the next sync files it again, and later deliveries are still read.
                try:
                    box.settle(key, refused=refused)
                except MailboxError as exc:
                    filing.append(
                        f"A delivery could not be filed in the mailbox ({exc.detail}); it is tried again next time."
                    )

            with open_mailbox(state, self.passphrase) as box:
                # only delivery mails come out of the mailbox: ordinary mail is none of our business
                for found in box.deliveries(state.processed):
                    key = found.key
                    if key in state.processed:
                        already += 1
                        # filing it may have been cut short last time (IMAP); a Maildir does nothing
                        settle(box, key, refused=state.processed[key].startswith("refused"))
                        continue
                    raw = found.fetch()
                    headers = parse_message(raw)
                    try:
                        outcome = self._install(state, raw)
                    except ClientStateError:
                        raise  # this machine's key store (a wrong passphrase, a missing key), not the mail
                    except MailkmsError as exc:
                        state.processed[key] = f"refused: {exc.detail}"
                        refused.append(f"{_describe(headers)}: {exc.detail}")
                        self.store.save(state)
                        settle(box, key, refused=True)
                        continue
                    state.processed[key] = outcome
                    if outcome.startswith("installed"):
                        installed.append(outcome)
                    else:
                        already += 1
                    self.store.save(state)
                    settle(box, key, refused=False)
            notes = InstallTargets(self.store, self.passphrase).after_install(state) if installed else []
            return SyncReport(installed, refused, already, [*filing, *notes])

    def set_mailbox(self, inbox: Path | ImapSettings) -> None:
        """Read deliveries from another Maildir or IMAP account from now on (a new password too)."""
        with self.store.locked():
            state = self.store.load()
            if isinstance(inbox, ImapSettings):
                check_imap(inbox)
                self._check_passphrase(state)  # the password is sealed with the key store's passphrase
                state.imap, state.maildir = inbox.sealed(self.passphrase()), ""
            else:
                state.imap, state.maildir = None, str(inbox)
            self.store.save(state)

    def _install(self, state: ClientState, raw: bytes) -> str:
        """Check everything first, then write: keys first, state last, so nothing is half-installed.
        Raises only mailkms errors for whatever the message holds (see _read_delivery)."""
        checked = self._read_delivery(state, raw)
        if isinstance(checked, str):
            return checked
        return self._write_delivery(state, checked)

    def _read_delivery(self, state: ClientState, raw: bytes) -> _Checked | str:
        """The safety net for one message: the pki functions turn what their libraries raise into
        mailkms errors; anything they did not foresee still refuses only this message, named by its
        class alone (the message is anyone's: none of its content goes into the reason or the log).
        OSError is the machine's trouble (an unreadable key file), not the message's: it goes on up."""
        try:
            return self._check_delivery(state, raw)
        except (MailkmsError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - turned into a refusal of this one message
            name = exc.__class__.__name__
            log.warning("a delivery mail could not be read (%s)", name)
            raise DeliveryRefused(f"the message could not be read ({name})") from None

    def _check_delivery(self, state: ClientState, raw: bytes) -> _Checked | str:
        """Every check, nothing written: the checked delivery, or why it needs nothing (a string)."""
        now = self._clock.now()
        root = cert_from_pem(state.root_pem)
        content = open_delivery(raw)  # the CMS signature itself
        verify_email_chain(content.signer, content.signed_certificates, root, now)
        if state.mail_from.lower() not in mailboxes_of(content.signer):
            raise DeliveryRefused(f"the mail was not signed by the server's mail identity {state.mail_from}")
        manifest = content.manifest
        if manifest.mailbox.lower() != state.mailbox:
            raise DeliveryRefused(f"the delivery is for {manifest.mailbox}, not for {state.mailbox}")
        current = state.current
        if current is not None and manifest.generation <= current.generation:
            return f"already installed (generation {manifest.generation})"
        by_serial = {format(c.serial_number, "x"): c for c in content.certificates}
        signing = by_serial.get(manifest.signing_serial)
        encryption = by_serial.get(manifest.encryption_serial)
        if signing is None or encryption is None:
            raise DeliveryRefused("the delivery lacks its certificates")
        chain: list[x509.Certificate] = []
        for cert in (signing, encryption):
            issuing = verify_email_chain(cert, content.certificates, root, now)
            if issuing not in chain:
                chain.append(issuing)
            if state.mailbox not in mailboxes_of(cert):
                raise DeliveryRefused("a delivered certificate is for another mailbox")
        # after `ca rekey` the delivery also carries the replaced keys' CA certificates: kept, so mail
        # signed with a colleague's certificate of the old key still verifies without its chain
        chain += [c for c in issuing_cas_under(content.certificates, root) if c not in chain]
        passphrase = self.passphrase()
        pending = state.pending
        if pending is None or pending.request_id != manifest.request_id:
            raise DeliveryRefused("this delivery answers no request made from this key store")
        signing_key = self.store.read_key(pending.signing_key_file, passphrase)
        if not same_public_key(signing_key.public_key(), public_key_of(signing)):
            raise DeliveryRefused("the signing certificate does not match the key this client made")
        # keys the envelopes may be addressed to: the transport key, then every encryption key held
        candidates: list[tuple[x509.Certificate, PrivateKey]] = []
        if state.transport_key_file and state.transport_cert_pem:
            transport = self.store.read_key(state.transport_key_file, passphrase)
            candidates.append((cert_from_pem(state.transport_cert_pem), transport))
        for serial, pem in state.encryption_history.items():
            candidates.append((cert_from_pem(pem), self.store.read_key(encryption_key_name(serial), passphrase)))
        recovered: dict[str, PrivateKey] = {}
        for enveloped in content.keys:
            der = _open_envelope(enveloped.der, candidates)
            recovered[enveloped.serial] = load_private_key_der(der)
        enc_key = recovered.get(manifest.encryption_serial)
        if enc_key is None or not same_public_key(enc_key.public_key(), public_key_of(encryption)):
            raise DeliveryRefused("the delivered encryption key does not match the encryption certificate")
        _check_history(recovered, by_serial, manifest.encryption_serial, state.mailbox)
        return _Checked(manifest, signing, encryption, signing_key, recovered, by_serial, chain)

    def _write_delivery(self, state: ClientState, checked: _Checked) -> str:
        """Everything checked: now write. Keys first, state last (atomic), so nothing is half-installed."""
        manifest, signing, encryption = checked.manifest, checked.signing, checked.encryption
        passphrase = self.passphrase()
        sig_serial = manifest.signing_serial
        self.store.write_key(signing_key_name(sig_serial), checked.signing_key, passphrase)
        for serial, key in checked.recovered.items():
            self.store.write_key(encryption_key_name(serial), key, passphrase)
            if serial == manifest.encryption_serial:
                state.encryption_history[serial] = cert_to_pem(encryption)
            elif serial not in state.encryption_history:
                match = checked.by_serial.get(serial)
                if match is not None:
                    state.encryption_history[serial] = cert_to_pem(match)
        state.generations.append(
            Generation(
                generation=manifest.generation,
                signing_serial=sig_serial,
                encryption_serial=manifest.encryption_serial,
                signing_pem=cert_to_pem(signing),
                encryption_pem=cert_to_pem(encryption),
                reminder_at=manifest.reminder_at,
                not_before=signing.not_valid_before_utc.isoformat(),
                not_after=signing.not_valid_after_utc.isoformat(),
                installed_at=self._clock.now().isoformat(),
                request_id=manifest.request_id,
            )
        )
        known = [cert_to_pem(c) for c in checked.chain]
        known += [p for p in state.ca_chain_pem if p not in known and p != state.root_pem]  # never forgotten
        state.ca_chain_pem = [*known, state.root_pem]
        state.pending = None
        return f"installed generation {manifest.generation} ({manifest.kind}), valid until {signing.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"

    # --- renewal -----------------------------------------------------------------------------------
    def _signed_post(self, state: ClientState, path: str, payload: dict[str, object]) -> dict[str, object]:
        current = state.current
        if current is None:
            raise ClientStateError("no certificates installed yet")
        api = self.api(state)
        key = self.store.read_key(signing_key_name(current.signing_serial), self.passphrase())
        cert = cert_from_pem(current.signing_pem)
        chain = [cert]
        nonce = api.nonce()
        jws = sign_request(key, chain, nonce, api.url(path), {"mailbox": state.mailbox, **payload})
        return api.post_signed(path, jws)

    def send_update_request(self) -> dict[str, object]:
        with self.store.locked():
            state = self.store.load()
            passphrase = self.passphrase()
            pending = state.pending if state.pending and state.pending.kind == "renewal" else None
            if pending is not None:
                key = self.store.read_key(pending.signing_key_file, passphrase)
            else:
                current = state.current
                assert current is not None
                key = generate_key(KeyType.P256 if _is_ec(current.signing_pem) else KeyType.RSA2048)
            result = self._signed_post(state, "/api/v1/renewals", {"csr": _csr(key, state.mailbox).decode()})
            if pending is None:
                name = self.store.write_key(f"signing-pending-{result['request_id']}.pem", key, passphrase)
                state.pending = Pending("renewal", str(result["request_id"]), name, self._clock.now().isoformat())
                self.store.save(state)
            return result

    def server_state(self) -> str | None:
        """What the server says of this user (REVOKED, EXPIRED, DUE, ACTIVE); None when offline."""
        state = self.store.load()
        if state.current is None:
            return None
        try:
            answer = self._signed_post(state, "/api/v1/status", {"action": "status"})
        except ServerUnreachable:
            return None
        return str(answer.get("state"))

    def resync(self) -> dict[str, object]:
        with self.store.locked():
            state = self.store.load()
            return self._signed_post(state, "/api/v1/resync", {"action": "resync"})

    # --- reading mail ----------------------------------------------------------------------------
    def encryption_keys(self, state: ClientState) -> list[tuple[x509.Certificate, Callable[[], PrivateKey]]]:
        """Every encryption key ever installed, newest first, with its certificate; each key is
        unlocked only when asked for (unlocking costs a slow key derivation)."""
        passphrase = self.passphrase()
        keys: list[tuple[x509.Certificate, Callable[[], PrivateKey]]] = [
            (cert_from_pem(pem), functools.partial(self.store.read_key, encryption_key_name(serial), passphrase))
            for serial, pem in reversed(list(state.encryption_history.items()))
        ]
        if not keys:
            raise ClientStateError("no encryption keys installed yet")
        return keys

    def decrypt_message(self, raw: bytes) -> bytes:
        """Open an S/MIME encrypted message (EnvelopedData or AuthEnvelopedData, RSA PKCS#1 v1.5 or
        OAEP) with whichever key of the history it is addressed to (old mail stays readable)."""
        return decrypt_smime(raw, self.encryption_keys(self.store.load())).message


def _is_ec(pem: str) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ec

    return isinstance(cert_from_pem(pem).public_key(), ec.EllipticCurvePublicKey)


def _open_envelope(der: bytes, candidates: list[tuple[x509.Certificate, PrivateKey]]) -> bytes:
    for cert, key in candidates:
        try:
            return decrypt(der, cert, key)
        except BadMessage:
            continue
    raise DeliveryRefused("no key of this client opens the delivered key (it was addressed to someone else)")


def _check_history(
    recovered: dict[str, PrivateKey], by_serial: dict[str, x509.Certificate], current: str, mailbox: str
) -> None:
    """Earlier keys (a recovery delivery): each needs its own certificate in the certs-only part, for
    this mailbox, holding that key's public half. The signed delivery vouches for them; they may be
    expired or revoked by now, which is why their dates are not checked (old mail still opens)."""
    for serial, key in recovered.items():
        if serial == current:
            continue
        cert = by_serial.get(serial)
        if cert is None:
            raise DeliveryRefused(f"the delivery lacks the certificate of the earlier key {serial}")
        if mailbox not in mailboxes_of(cert):
            raise DeliveryRefused(f"the certificate of the earlier key {serial} is for another mailbox")
        if not same_public_key(key.public_key(), public_key_of(cert)):
            raise DeliveryRefused(f"the earlier key {serial} does not match its certificate")


def _describe(headers: Message) -> str:
    """Which mail, for the user: its Message-ID and From, cut short and printable only (anyone may
    have written them; a header the email package cannot parse is shown as "?")."""
    return f"mail {_header(headers, 'Message-ID')} from {_header(headers, 'From')}"


def _header(headers: Message, name: str) -> str:
    try:
        value = str(headers.get(name, "?"))
    except Exception:  # noqa: BLE001 - the header parser's own failure: show nothing of it
        return "?"
    shown = "".join(c if c.isprintable() else "?" for c in value)
    return shown[:120] + ("..." if len(shown) > 120 else "")
