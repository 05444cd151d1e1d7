"""The user's secure e-mail: sign, verify, encrypt, decrypt, the directory, PKCS#12 export/import."""

from __future__ import annotations

import abc
import datetime as dt
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from mailkms.client._core import Client
from mailkms.client._http import Api
from mailkms.client._store import (
    ClientState,
    Generation,
    KeyStore,
    cert_from_pem,
    cert_to_pem,
    encryption_key_name,
    signing_key_name,
)
from mailkms.clock import Clock
from mailkms.errors import (
    BadSignature,
    ClientStateError,
    MailkmsError,
    NotInDirectory,
    ServerRefused,
    ServerUnreachable,
    UnknownIssuer,
    UntrustedCertificate,
)
from mailkms.pki import (
    KeyEntry,
    RevocationResult,
    RevocationStatus,
    add_months,
    build_pkcs12,
    ca_key_id,
    check_crl,
    crl_urls,
    decrypt_message,
    encrypt_message,
    fingerprint_sha256,
    issued_by,
    load_certs_only,
    load_crl,
    mailboxes_of,
    normalise_fingerprint,
    read_pkcs12,
    revoked_signature_problem,
    same_public_key,
    sign_detached,
    sign_opaque_message,
    signer_key_id,
    verify_email_chain,
    verify_message,
)

DIRECTORY_MAX_AGE = dt.timedelta(hours=24)
CLOCK_SKEW = dt.timedelta(minutes=5)


# --- revocation: pluggable --------------------------------------------------------------------
class RevocationChecker(abc.ABC):
    """Says whether a certificate is revoked. The default fetches the CRL at its distribution point."""

    @abc.abstractmethod
    def check(self, cert: x509.Certificate, issuer: x509.Certificate, now: dt.datetime) -> RevocationResult: ...


class NoRevocationCheck(RevocationChecker):
    def __init__(self, why: str = "switched off") -> None:
        self._why = why

    def check(self, cert: x509.Certificate, issuer: x509.Certificate, now: dt.datetime) -> RevocationResult:
        return RevocationResult(RevocationStatus.UNKNOWN, f"revocation not checked ({self._why})")


def http_fetch(url: str, timeout: float = 5.0) -> bytes:
    with httpx.Client(timeout=timeout, follow_redirects=False) as http:
        resp = http.get(url)
    if resp.status_code != 200:
        raise ServerUnreachable(f"HTTP {resp.status_code}")
    return resp.content


class CRLChecker(RevocationChecker):
    """The CRL at the certificate's CDP URL; "not checked" when none can be fetched or used."""

    def __init__(self, fetch: Callable[[str], bytes] = http_fetch) -> None:
        self._fetch = fetch

    def check(self, cert: x509.Certificate, issuer: x509.Certificate, now: dt.datetime) -> RevocationResult:
        urls = crl_urls(cert)
        if not urls:
            return RevocationResult(RevocationStatus.UNKNOWN, "revocation not checked (the certificate names no CRL)")
        reasons: list[str] = []
        for url in urls:
            try:
                crl = load_crl(self._fetch(url))
            except (MailkmsError, httpx.HTTPError, ValueError, OSError) as exc:
                detail = exc.detail if isinstance(exc, MailkmsError) else exc.__class__.__name__
                reasons.append(f"{url}: {detail}")
                continue
            result = check_crl(crl, cert, issuer, now, url)
            if result.status is not RevocationStatus.UNKNOWN:
                return result
            reasons.append(f"{url}: {result.detail}")
        return RevocationResult(RevocationStatus.UNKNOWN, "revocation not checked (" + "; ".join(reasons) + ")")


# --- what a verification found --------------------------------------------------------------------
@dataclass
class SignatureReport:
    trusted: bool
    signer: str  # the mailbox in the certificate
    signer_subject: str
    issuer: str
    serial: str
    signed_at: dt.datetime | None
    checked_at: dt.datetime
    revocation: RevocationResult
    sender: str | None
    message: bytes
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"Signed by {self.signer} (certificate {self.serial}, issued by {self.issuer})."]
        when = self.signed_at
        if when is not None:
            out.append(f"Signed on {when:%Y-%m-%d %H:%M:%S} UTC (the time the signer's program wrote in the message).")
        else:
            out.append("The message does not say when it was signed; the certificate was checked as of now.")
        out.append(f"Revocation: {self.revocation.detail}.")
        if self.trusted:
            out.append(
                "TRUSTED: the signature is intact and the certificate was issued by your organisation's CA"
                + (" and was valid when the message was signed." if when else " and is valid now.")
            )
            if self.revocation.status is RevocationStatus.UNKNOWN:
                out.append("Note: whether the certificate has been revoked could not be checked.")
            elif self.revocation.status is RevocationStatus.REVOKED:
                out.append(
                    "Note: the certificate was revoked after the time the message says it was signed, for a "
                    "reason that leaves its key sound; the signature counts as of that time."
                )
        else:
            out.append("NOT TRUSTED: " + " ".join(self.problems))
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "trusted": self.trusted,
            "signer": self.signer,
            "subject": self.signer_subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "signed_at": self.signed_at.isoformat() if self.signed_at else None,
            "revocation": self.revocation.status.value,
            "revocation_detail": self.revocation.detail,
            "revocation_reason": self.revocation.reason.name if self.revocation.reason else None,
            "sender": self.sender,
            "problems": self.problems,
        }


def _sender(message: bytes) -> str | None:
    head = message.split(b"\r\n\r\n", 1)[0]
    match = re.search(rb"(?im)^from:(.*(?:\r\n[ \t].*)*)", head)
    if not match:
        return None
    text = match.group(1).decode("utf-8", "replace")
    addr = re.search(r"<([^>]+)>", text)
    value = addr.group(1) if addr else text.strip()
    return value.strip().lower() or None


def _common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(values[0].value) if values else name.rfc4514_string()


def _has_key_usage(cert: x509.Certificate, attr: str) -> bool:
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return bool(getattr(ku, attr))


def _own_issuing(
    cert: x509.Certificate, chain: Sequence[x509.Certificate], root: x509.Certificate
) -> list[x509.Certificate]:
    """The issuing CA that signed `cert` (by its AKI), the one certificate a receiver needs besides
    its own trust in the root: after `ca rekey` the client knows several, and a signed mail carries
    only the signer's. Every one this client knows when none matches (a chain it has not learnt yet)."""
    issuing = [c for c in chain if c != root]
    own = [c for c in issuing if ca_key_id(c) == signer_key_id(cert)]
    return own or issuing


def check_recipient_certificate(
    cert: x509.Certificate,
    address: str,
    root: x509.Certificate,
    candidates: Sequence[x509.Certificate],
    now: dt.datetime,
) -> x509.Certificate:
    """A colleague's encryption certificate: chains to the pinned CA, valid now, theirs, for encryption."""
    verify_email_chain(cert, candidates, root, now)
    if address.lower() not in mailboxes_of(cert):
        raise UntrustedCertificate(f"the certificate published for {address} is for {', '.join(mailboxes_of(cert))}")
    if not isinstance(cert.public_key(), rsa.RSAPublicKey) or not _has_key_usage(cert, "key_encipherment"):
        raise UntrustedCertificate(f"the certificate published for {address} is not an encryption certificate")
    return cert


# --- the directory, cached in the client home -------------------------------------------------------
class DirectoryClient:
    def __init__(self, home: Path, api: Api, root: x509.Certificate, clock: Clock, chain: Sequence[x509.Certificate]):
        self._dir = home / "directory"
        self._api = api
        self._root = root
        self._clock = clock
        self._chain = list(chain)
        self.notes: list[str] = []

    def _paths(self, address: str) -> tuple[Path, Path]:
        safe = re.sub(r"[^a-z0-9@._+-]", "_", address.lower())
        return self._dir / f"{safe}.pem", self._dir / f"{safe}.json"

    def _cached(self, address: str) -> tuple[list[x509.Certificate], dt.datetime] | None:
        pem_path, meta_path = self._paths(address)
        if not pem_path.exists() or not meta_path.exists():
            return None
        try:
            certs = x509.load_pem_x509_certificates(pem_path.read_bytes())
            fetched = dt.datetime.fromisoformat(json.loads(meta_path.read_text())["fetched_at"])
        except (ValueError, KeyError, OSError):
            return None
        return certs, fetched

    def _check(self, certs: Sequence[x509.Certificate], address: str) -> x509.Certificate:
        leaves = [c for c in certs if address.lower() in mailboxes_of(c)]
        if not leaves:
            raise UntrustedCertificate(f"the directory gave no certificate for {address}")
        return check_recipient_certificate(leaves[0], address, self._root, [*certs, *self._chain], self._clock.now())

    def _forget(self, address: str) -> None:
        for path in self._paths(address):
            path.unlink(missing_ok=True)

    def lookup(self, address: str, refresh: bool = False) -> x509.Certificate:
        address = address.strip().lower()
        now = self._clock.now()
        cached = self._cached(address)
        if cached is not None and not refresh and now - cached[1] < DIRECTORY_MAX_AGE:
            try:
                return self._check(cached[0], address)  # re-checked on every use
            except MailkmsError:
                self._forget(address)
        try:
            der = self._api.directory(address)
        except ServerRefused as exc:
            if exc.status == 404:
                self._forget(address)
                raise NotInDirectory(
                    f"{address} has no valid encryption certificate in the directory "
                    "(not enrolled, expired or revoked): the message was not encrypted"
                ) from None
            raise
        except ServerUnreachable:
            if cached is None:
                raise
            cert = self._check(cached[0], address)
            self.notes.append(f"the server is unreachable: used the cached certificate of {address}")
            return cert
        certs = load_certs_only(der)
        cert = self._check(certs, address)
        pem_path, meta_path = self._paths(address)
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem_path.write_text("".join(cert_to_pem(c) for c in certs))
        meta_path.write_text(json.dumps({"fetched_at": now.isoformat(), "serial": format(cert.serial_number, "x")}))
        return cert


# --- the operations ---------------------------------------------------------------------------
class SecureMail:
    """The mail operations over a client's key store."""

    def __init__(self, client: Client, clock: Clock, revocation: RevocationChecker | None = None) -> None:
        self._client = client
        self._clock = clock
        self._revocation = revocation or CRLChecker()

    @property
    def store(self) -> KeyStore:
        return self._client.store

    def _state(self) -> ClientState:
        return self._client.state()

    def _current(self, state: ClientState) -> Generation:
        current = state.current
        if current is None:
            raise ClientStateError("no certificates installed yet: enrol and run `mailkms-client sync` first")
        return current

    def chain(self, state: ClientState) -> list[x509.Certificate]:
        """Issuing CA(s) then root: kept at install, else fetched from the server (pinned TLS)."""
        if state.ca_chain_pem:
            return [cert_from_pem(p) for p in state.ca_chain_pem]
        root = cert_from_pem(state.root_pem)
        if not state.server:
            return [root]
        pem = self._client.api(state).ca_chain()
        certs = x509.load_pem_x509_certificates(pem)
        if root not in certs:
            certs.append(root)
        return certs

    # signing ---------------------------------------------------------------------------------
    def sign(self, raw: bytes, opaque: bool = False) -> bytes:
        state = self._state()
        current = self._current(state)
        now = self._clock.now()
        if now > dt.datetime.fromisoformat(current.not_after):
            raise ClientStateError("your signing certificate has expired: renew or re-enrol before signing")
        key = self.store.read_key(signing_key_name(current.signing_serial), self._client.passphrase())
        cert = cert_from_pem(current.signing_pem)
        signer = sign_opaque_message if opaque else sign_detached
        return signer(raw, cert, key, _own_issuing(cert, self.chain(state), cert_from_pem(state.root_pem)))

    # verifying ---------------------------------------------------------------------------------
    def verify(self, raw: bytes) -> SignatureReport:
        verified = verify_message(raw)  # the CMS signature itself: raises on tampering
        state = self._state()
        root = cert_from_pem(state.root_pem)
        signer = verified.signed.signer
        now = self._clock.now()
        signed_at = verified.signed.signing_time
        problems: list[str] = []
        at = now
        if signed_at is not None:
            if signed_at > now + CLOCK_SKEW:
                problems.append(f"the message claims to be signed in the future ({signed_at:%Y-%m-%d %H:%M} UTC).")
            else:
                at = signed_at
        candidates = [*verified.signed.certificates, *self._known_chain(state)]
        issuing: x509.Certificate | None = None
        try:
            issuing = self._issuing_of(state, signer, candidates, root, at)
        except UnknownIssuer:
            problems.append("the signer's certificate was not issued by your organisation's CA.")
        except BadSignature as exc:
            problems.append(exc.detail[0].upper() + exc.detail[1:] + ".")
        if not (_has_key_usage(signer, "digital_signature") or _has_key_usage(signer, "content_commitment")):
            problems.append("the certificate is not meant for signatures.")
        mailboxes = mailboxes_of(signer)
        sender = _sender(verified.message)
        if sender is not None and sender not in mailboxes:
            problems.append(
                f"the message says it is from {sender}, but it was signed by {', '.join(mailboxes) or '?'}."
            )
        if issuing is not None:
            revocation = self._revocation.check(signer, issuing, now)
        else:
            revocation = RevocationResult(RevocationStatus.UNKNOWN, "revocation not checked (no trusted issuer)")
        revoked = revoked_signature_problem(revocation, signed_at)  # keyCompromise: whatever time is claimed
        if revoked is not None:
            problems.append(revoked[0].upper() + revoked[1:])
        return SignatureReport(
            trusted=not problems,
            signer=", ".join(mailboxes) or signer.subject.rfc4514_string(),
            signer_subject=signer.subject.rfc4514_string(),
            issuer=_common_name(signer.issuer),
            serial=format(signer.serial_number, "x"),
            signed_at=signed_at,
            checked_at=at,
            revocation=revocation,
            sender=sender,
            message=verified.message,
            problems=problems,
        )

    def _known_chain(self, state: ClientState) -> list[x509.Certificate]:
        return [cert_from_pem(p) for p in state.ca_chain_pem]

    def _issuing_of(
        self,
        state: ClientState,
        signer: x509.Certificate,
        candidates: Sequence[x509.Certificate],
        root: x509.Certificate,
        at: dt.datetime,
    ) -> x509.Certificate:
        """The signer's issuing CA, from the mail's certificates or those this client knows; else
        fetched from the server (pinned TLS) by the key id the signer's AKI names: after `mailkms ca
        rekey`, a client with no delivery since has never seen the new key's CA, and many mail
        programs send the signer's certificate alone. The fetched CA counts, and is kept for next
        time, only if the pinned root signed it (verify_email_chain)."""
        try:
            return verify_email_chain(signer, candidates, root, at)
        except UnknownIssuer:
            fetched = self._fetch_issuing(state, signer)
            if fetched is None:
                raise
        issuing = verify_email_chain(signer, [fetched], root, at)
        self._remember_issuing(issuing)
        return issuing

    def _fetch_issuing(self, state: ClientState, signer: x509.Certificate) -> x509.Certificate | None:
        key_id = signer_key_id(signer)
        if not state.server or key_id is None or not re.fullmatch(r"[0-9a-f]{2,128}", key_id):
            return None
        try:
            return x509.load_der_x509_certificate(self._client.api(state).issuing_ca(key_id))
        except (MailkmsError, ValueError):
            return None  # offline, or not a key of this server: the signer stays untrusted

    def _remember_issuing(self, issuing: x509.Certificate) -> None:
        with self.store.locked():
            fresh = self.store.load()
            pem = cert_to_pem(issuing)
            if pem not in fresh.ca_chain_pem:
                fresh.ca_chain_pem = [pem, *fresh.ca_chain_pem]  # the root stays last
                self.store.save(fresh)

    # encrypting --------------------------------------------------------------------------------
    def directory(self, state: ClientState) -> DirectoryClient:
        root = cert_from_pem(state.root_pem)
        return DirectoryClient(self.store.home, self._client.api(state), root, self._clock, self._known_chain(state))

    def encrypt(
        self, raw: bytes, to: Sequence[str], sign: bool = False, refresh: bool = False
    ) -> tuple[bytes, list[str]]:
        """Encrypt to every recipient's directory certificate and to the sender's own."""
        if not to:
            raise ClientStateError("give at least one recipient with --to")
        state = self._state()
        current = self._current(state)
        own = cert_from_pem(current.encryption_pem)
        if self._clock.now() > own.not_valid_after_utc:
            raise ClientStateError("your encryption certificate has expired: renew or re-enrol first")
        directory = self.directory(state)
        recipients = [directory.lookup(address, refresh) for address in dict.fromkeys(a.lower() for a in to)]
        if not any(same_public_key(own.public_key(), r.public_key()) for r in recipients):
            recipients.append(own)  # so that sent mail stays readable
        message = self.sign(raw) if sign else raw
        return encrypt_message(message, recipients), directory.notes

    # decrypting --------------------------------------------------------------------------------
    def decrypt(self, raw: bytes) -> tuple[bytes, x509.Certificate]:
        opened = decrypt_message(raw, self._client.encryption_keys(self._state()))
        return opened.message, opened.recipient

    # PKCS#12 -----------------------------------------------------------------------------------
    def export(self, password: str) -> tuple[bytes, list[str]]:
        state = self._state()
        current = self._current(state)
        passphrase = self._client.passphrase()
        entries: list[KeyEntry] = []
        names: set[str] = set()

        def name_for(cert: x509.Certificate, what: str, old: bool) -> str:
            base = f"{state.mailbox} {what} {cert.not_valid_before_utc:%Y-%m}" + (" (old)" if old else "")
            name = base if base not in names else f"{base} #{format(cert.serial_number, 'x')[:8]}"
            names.add(name)
            return name

        signing = cert_from_pem(current.signing_pem)
        key = self.store.read_key(signing_key_name(current.signing_serial), passphrase)
        entries.append(KeyEntry(key, signing, name_for(signing, "signing", False)))
        for serial, pem in sorted(
            state.encryption_history.items(), key=lambda item: cert_from_pem(item[1]).not_valid_before_utc, reverse=True
        ):
            cert = cert_from_pem(pem)
            key = self.store.read_key(encryption_key_name(serial), passphrase)
            entries.append(KeyEntry(key, cert, name_for(cert, "encryption", serial != current.encryption_serial)))
        data = build_pkcs12(entries, self.chain(state), password)
        return data, [e.friendly_name for e in entries]


# --- import into a new key store -------------------------------------------------------------------
@dataclass(frozen=True)
class ImportReport:
    mailbox: str
    root_fingerprint: str
    signing: str
    encryption: list[str]


def import_pkcs12(
    home: Path,
    data: bytes,
    password: str,
    passphrase: bytes,
    clock: Clock,
    *,
    fingerprint: str | None = None,
    server: str = "",
    maildir: str = "",
    mail_from: str = "",
    reminder_months: int = 12,
) -> ImportReport:
    """Moving to a new machine: a PKCS#12 export becomes a key store (never over an existing one)."""
    store = KeyStore(home)
    if store.exists():
        raise ClientStateError(f"{home} already holds a key store: import into a new --home")
    bundle = read_pkcs12(data, password)
    roots = [c for c in bundle.chain if c.issuer == c.subject and issued_by(c, c)]
    if len(roots) != 1:
        raise UntrustedCertificate("the file must carry exactly one root CA certificate (export it with its chain)")
    root = roots[0]
    if fingerprint is not None and fingerprint_sha256(root) != normalise_fingerprint(fingerprint):
        raise UntrustedCertificate("the root CA in the file does not match the fingerprint you gave: not imported")
    chain = [c for c in bundle.chain if c != root]
    signing = [e for e in bundle.entries if _has_key_usage(e.certificate, "digital_signature")]
    encryption = [e for e in bundle.entries if _has_key_usage(e.certificate, "key_encipherment")]
    if not signing or not encryption:
        raise ClientStateError("the file lacks a signing or an encryption key")
    current_sig = max(signing, key=lambda e: e.certificate.not_valid_before_utc)
    current_enc = max(encryption, key=lambda e: e.certificate.not_valid_before_utc)
    mailboxes = mailboxes_of(current_sig.certificate)
    if not mailboxes:
        raise ClientStateError("the signing certificate names no e-mail address")
    mailbox = mailboxes[0]
    for entry in (current_sig, *encryption):
        if mailbox not in mailboxes_of(entry.certificate):
            raise UntrustedCertificate("the keys in the file belong to different addresses")
        # each was valid when issued, under this root (old ones may have expired since)
        at = entry.certificate.not_valid_before_utc + dt.timedelta(seconds=1)
        verify_email_chain(entry.certificate, [*chain, *bundle.chain], root, at)
    for entry in bundle.entries:
        if not same_public_key(entry.key.public_key(), entry.certificate.public_key()):
            raise ClientStateError("a key in the file does not match its certificate")
    now = clock.now()
    state = ClientState(
        server=server.rstrip("/"),
        mailbox=mailbox,
        root_fingerprint=fingerprint_sha256(root),
        root_pem=cert_to_pem(root),
        mail_from=mail_from,
        maildir=maildir,
    )
    with store.locked():
        sig_serial = format(current_sig.certificate.serial_number, "x")
        enc_serial = format(current_enc.certificate.serial_number, "x")
        store.write_key(signing_key_name(sig_serial), current_sig.key, passphrase)
        for entry in sorted(encryption, key=lambda e: e.certificate.not_valid_before_utc):
            serial = format(entry.certificate.serial_number, "x")
            store.write_key(encryption_key_name(serial), entry.key, passphrase)
            state.encryption_history[serial] = cert_to_pem(entry.certificate)
        cert = current_sig.certificate
        state.generations.append(
            Generation(
                generation=1,
                signing_serial=sig_serial,
                encryption_serial=enc_serial,
                signing_pem=cert_to_pem(cert),
                encryption_pem=cert_to_pem(current_enc.certificate),
                reminder_at=add_months(cert.not_valid_before_utc, reminder_months).isoformat(),
                not_before=cert.not_valid_before_utc.isoformat(),
                not_after=cert.not_valid_after_utc.isoformat(),
                installed_at=now.isoformat(),
                request_id="imported",
            )
        )
        state.ca_chain_pem = [*(cert_to_pem(c) for c in chain), cert_to_pem(root)]
        store.save(state)
    return ImportReport(mailbox, fingerprint_sha256(root), sig_serial, list(state.encryption_history))
