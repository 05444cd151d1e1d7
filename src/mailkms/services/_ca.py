"""The CA's files: made once by `mailkms init`, loaded once per process, never per request."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mailkms.clock import Clock
from mailkms.errors import ConfigError, Conflict, Internal, KeyStoreUnavailable
from mailkms.pki import (
    BR_MAX_ARL_VALIDITY,
    CASigner,
    CertKind,
    Issuer,
    KeyType,
    PrivateKey,
    PublicURLs,
    RevokedEntry,
    SoftSigner,
    build_crl,
    ca_key_id,
    crl_number,
    encrypt_private_key,
    fingerprint_sha256,
    generate_key,
    issued_by,
    key_type_of,
    load_private_key,
    make_infrastructure_ca,
    make_issuing_ca,
    make_root,
    make_tls_server,
    signer_key_id,
    subscriber_validity,
)
from mailkms.pki._pkcs11 import Token, TokenECKey, TokenKeyRef, TokenRSAKey, open_token_key
from mailkms.services._files import exclusive, write_atomically
from mailkms.services._offline_root import RootCeremony, create_offline_root
from mailkms.services._recovery import init_bootstrap_ceremony

log = logging.getLogger("mailkms.ca")

TLS_RENEW_BEFORE = dt.timedelta(days=30)
MAIL_SIGNER_RENEW_BEFORE = dt.timedelta(days=90)
MAIL_SIGNER_MONTHS = 12
OCSP_RESPONDER_RENEW_BEFORE = dt.timedelta(days=10)  # of a 30-day responder certificate
ROOT_CRL_VALIDITY = dt.timedelta(days=90)
# The infrastructure CA's CRL covers end-entity (TLS) certificates: at most 10 days (BR); re-signed
# at the daily check once less than INFRASTRUCTURE_CRL_RESIGN is left, so a missed day or two is harmless.
INFRASTRUCTURE_CRL_VALIDITY = dt.timedelta(days=7)
INFRASTRUCTURE_CRL_RESIGN = dt.timedelta(days=4)


@dataclass(frozen=True)
class CAPaths:
    data_dir: Path

    @property
    def ca_dir(self) -> Path:
        return self.data_dir / "ca"

    @property
    def root_cert(self) -> Path:
        return self.ca_dir / "root.crt.pem"

    @property
    def root_key(self) -> Path:
        return self.ca_dir / "root.key.pem"

    @property
    def issuing_cert(self) -> Path:
        return self.ca_dir / "issuing.crt.pem"

    @property
    def issuing_key(self) -> Path:
        return self.ca_dir / "issuing.key.pem"

    @property
    def infrastructure_cert(self) -> Path:
        return self.ca_dir / "infrastructure.crt.pem"  # issues the TLS certificate (not on installs from before)

    @property
    def infrastructure_key(self) -> Path:
        return self.ca_dir / "infrastructure.key.pem"

    @property
    def pending_dir(self) -> Path:
        return self.ca_dir / "pending"  # `mailkms ca request`: CSRs and new keys waiting for the root

    @property
    def retired_dir(self) -> Path:
        return self.ca_dir / "retired"  # intermediates replaced by `mailkms ca import`

    @property
    def previous_dir(self) -> Path:
        return self.ca_dir / "previous"  # issuing CA keys replaced by `mailkms ca rekey`, one folder per SKI

    @property
    def root_offline(self) -> bool:
        """No root key in the data folder: the root is at a ceremony's folder (`init --offline-root`)."""
        return not self.root_key.exists()

    @property
    def passphrase_file(self) -> Path:
        return self.ca_dir / "passphrase"

    @property
    def tls_cert(self) -> Path:
        return self.data_dir / "tls" / "server.crt.pem"

    @property
    def tls_key(self) -> Path:
        return self.data_dir / "tls" / "server.key.pem"

    @property
    def mail_cert(self) -> Path:
        return self.data_dir / "mail" / "signer.crt.pem"

    @property
    def mail_key(self) -> Path:
        return self.data_dir / "mail" / "signer.key.pem"

    @property
    def ocsp_cert(self) -> Path:
        return self.data_dir / "ocsp" / "responder.crt.pem"

    @property
    def ocsp_key(self) -> Path:
        return self.data_dir / "ocsp" / "responder.key.pem"

    @property
    def root_crl(self) -> Path:
        return self.data_dir / "crl" / "root.crl"

    @property
    def infrastructure_crl(self) -> Path:
        return self.data_dir / "crl" / "infrastructure.crl"  # the CDP of the TLS certificate

    @property
    def superseded_tls(self) -> Path:
        """TLS certificates the infrastructure CA replaced before they expired: listed on its CRL
        (superseded) until they expire."""
        return self.data_dir / "crl" / "infrastructure-superseded.json"

    @property
    def retired_token_keys(self) -> Path:
        """OCSP-responder and mail-signer keys replaced in the PKCS#11 token: destroyed there once
        their certificates have expired."""
        return self.ca_dir / "retired-token-keys.json"

    @property
    def audit_key(self) -> Path:
        return self.data_dir / "audit" / "checkpoint.key.pem"  # signs the audit checkpoints

    @property
    def audit_public_key(self) -> Path:
        return self.data_dir / "audit" / "checkpoint.pub.pem"

    @property
    def recovery_dir(self) -> Path:
        return self.data_dir / "recovery"  # the bootstrap ceremony (services/_recovery.py)

    def exists(self) -> bool:
        return self.root_cert.exists() and self.issuing_cert.exists()


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def token_ref_path(key_path: Path) -> Path:
    """Where a key that lives in the PKCS#11 token is named (URI without PIN, CKA_ID), beside the
    certificate, in place of the encrypted key file: `issuing.key.pem` -> `issuing.key.pkcs11`."""
    return key_path.with_suffix(".pkcs11")


def key_exists(key_path: Path) -> bool:
    return key_path.exists() or token_ref_path(key_path).exists()


def load_key_at(key_path: Path, passphrase: bytes) -> PrivateKey:
    """The key of a server identity: from the token when a reference file is there, else the
    encrypted PKCS#8 file. Loaded once per process (or per renewal), never per request."""
    ref = token_ref_path(key_path)
    if ref.exists():
        return open_token_key(read_token_ref(ref))
    return load_private_key(key_path.read_bytes(), passphrase)


def read_token_ref(ref: Path) -> TokenKeyRef:
    data = json.loads(ref.read_text())
    return TokenKeyRef(str(data["uri"]), bytes.fromhex(str(data["id"])))


class KeyMaker:
    """Makes the keys of the issuing CA, the OCSP responder and the mail signer: inside the PKCS#11
    token when a key store is configured (`ca.key_store`), else in memory and saved encrypted."""

    def __init__(self, passphrase: bytes, key_store: str) -> None:
        self._passphrase = passphrase
        self._token = Token.for_uri(key_store) if key_store else None

    def new(self, kind: KeyType, role: str, reuse: bool = False) -> PrivateKey:
        """A new key (in the token: labelled LABEL for the issuing CA, LABEL-ROLE for the others; with
        `reuse`, a key of that label already there). Saved by `save`, once its certificate is made."""
        token = self._token
        if token is None:
            return generate_key(kind)
        label = token.uri.object if role == "issuing" else f"{token.uri.object}-{role}"
        made = token.find_label(label) if reuse else None
        if made is not None and key_type_of(made) != kind:
            raise ConfigError(f"the token's key {label!r} is {key_type_of(made)}, not {kind}")
        if made is None:
            made = token.generate(kind, os.urandom(16), label)
        return made

    def save(self, key: PrivateKey, key_path: Path) -> None:
        if isinstance(key, TokenRSAKey | TokenECKey):
            ref = key.reference
            text = json.dumps({"uri": ref.uri, "id": ref.key_id.hex()})
            write_atomically(token_ref_path(key_path), (text + "\n").encode())
        else:
            write_atomically(key_path, encrypt_private_key(key, self._passphrase), 0o600)
            token_ref_path(key_path).unlink(missing_ok=True)  # the key store was switched off


PASSPHRASE_SOURCES = (
    "--passphrase-fd N (or MAILKMS_CA_PASSPHRASE_FD), the systemd credential mailkms-ca-passphrase, "
    "or MAILKMS_CA_PASSPHRASE"
)


def ca_passphrase(paths: CAPaths, from_env: str, create: bool, production: bool = False) -> bytes:
    """The passphrase given (file descriptor, systemd credential or MAILKMS_CA_PASSPHRASE, already
    resolved into `from_env` by config.load_settings), else the 0600 file DATA/ca/passphrase
    (created at init) -- which production refuses: a copy of DATA/ would then be the whole CA."""
    if production and paths.passphrase_file.exists():
        raise ConfigError(
            f"production: {paths.passphrase_file} keeps the CA passphrase beside the CA keys, so any copy of "
            f"the data folder is the whole CA. Give the passphrase by {PASSPHRASE_SOURCES}, then delete the file"
        )
    if from_env:
        return from_env.encode()
    if paths.passphrase_file.exists():
        mode = paths.passphrase_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"{paths.passphrase_file} must not be readable by others (chmod 600)")
        return bytes(paths.passphrase_file.read_bytes().strip())
    if production:
        raise ConfigError(f"production: no CA passphrase given; give it by {PASSPHRASE_SOURCES}")
    if not create:
        raise ConfigError(f"no CA passphrase: give it by {PASSPHRASE_SOURCES}, or keep DATA/ca/passphrase")
    value = secrets.token_urlsafe(32).encode()
    write_atomically(paths.passphrase_file, value + b"\n", 0o600)
    return value


@dataclass(frozen=True)
class InitResult:
    root_fingerprint: str
    recovery_passphrase: str | None  # shown once when generated
    recovery_share: str | None = None  # the bootstrap ceremony's share file


def init_ca(
    paths: CAPaths,
    *,
    passphrase_env: str,
    key_type: KeyType,
    organization: str,
    country: str | None,
    urls: PublicURLs,
    hostnames: list[str],
    mail_from: str,
    clock: Clock,
    recovery_passphrase: str | None = None,
    production: bool = False,
    key_store: str = "",
    offline_root: Path | None = None,
    root_passphrase: bytes | None = None,
) -> InitResult:
    """With `offline_root` the root key is written only there (under `root_passphrase`); it signs
    both intermediates and a first root CRL here, in memory, and the data folder never holds it."""
    if paths.exists():
        raise Conflict(f"a CA already exists in {paths.ca_dir}")
    now = clock.now()
    passphrase = ca_passphrase(paths, passphrase_env, create=True, production=production)
    if offline_root is not None:
        if not root_passphrase:
            raise ConfigError("an offline root needs a root passphrase of its own")
        root_signer = create_offline_root(
            offline_root,
            root_passphrase,
            key_type=key_type,
            organization=organization,
            country=country,
            urls=urls,
            now=now,
        )
        root = root_signer.certificate
    else:
        root_key = generate_key(key_type)
        root = make_root(root_key, organization, country, now)
        root_signer = SoftSigner(root, root_key)
        write_atomically(paths.root_key, encrypt_private_key(root_key, passphrase), 0o600)
    # The keys used per request are made in the token when there is one (an existing one reused);
    # the infrastructure CA key (TLS only) stays an encrypted file.
    keys = KeyMaker(passphrase, key_store)
    issuing_key = keys.new(key_type, "issuing", reuse=True)
    issuing = make_issuing_ca(root_signer, issuing_key, organization, country, urls, now)
    keys.save(issuing_key, paths.issuing_key)
    infrastructure_key = generate_key(key_type)
    infrastructure = make_infrastructure_ca(root_signer, infrastructure_key, organization, country, urls, now)
    write_atomically(paths.infrastructure_key, encrypt_private_key(infrastructure_key, passphrase), 0o600)
    write_atomically(paths.root_cert, _pem(root))
    write_atomically(paths.issuing_cert, _pem(issuing))
    write_atomically(paths.infrastructure_cert, _pem(infrastructure))
    if offline_root is not None:  # the first root CRL, signed now: the server cannot sign the next one
        crl = RootCeremony.opened(offline_root, root_signer).sign_crl(now)
        write_atomically(paths.root_crl, crl.public_bytes(serialization.Encoding.DER))
    del root_signer

    # The archive is enveloped to a recovery key whose private half is wrapped under a KEK held
    # only as shares: here a 1-of-1 bootstrap ceremony, until `mailkms recovery init` names officers.
    shown = None
    if not recovery_passphrase:
        recovery_passphrase = shown = secrets.token_urlsafe(24)
    share = init_bootstrap_ceremony(paths.recovery_dir, now, recovery_passphrase.encode())

    ctx = CAContext.load(paths, passphrase_env=passphrase_env, urls=urls, production=production, key_store=key_store)
    ctx.ensure_server_identities(hostnames, mail_from, clock)
    ctx.audit_signer()  # made now, so the checkpoint key exists from the first day
    return InitResult(fingerprint_sha256(root), shown, str(share))


class CAContext:
    """Everything the server signs with, loaded once per process."""

    def __init__(
        self,
        paths: CAPaths,
        passphrase: bytes,
        root: x509.Certificate,
        issuing: SoftSigner,
        urls: PublicURLs,
        key_store: str = "",
    ) -> None:
        self.paths = paths
        self._keys = KeyMaker(passphrase, key_store)
        self._passphrase = passphrase
        self.root = root
        self.issuing = issuing
        self.urls = urls
        self.mail_signer: SoftSigner | None = None
        self.tls_cert: x509.Certificate | None = None
        self.ocsp_responder: SoftSigner | None = None
        self.root_crl: x509.CertificateRevocationList | None = None
        self.infrastructure: SoftSigner | None = None  # None on installs from before: TLS from the root
        self.infrastructure_crl: x509.CertificateRevocationList | None = None
        # Issuing CA certificates of keys replaced by `mailkms ca rekey` (DATA/ca/previous/*/): what
        # they issued is still this CA's (renewal, chains); no key of theirs is loaded.
        self.previous_issuing: list[x509.Certificate] = _previous_issuing(paths)
        self.previous_signers: list[SoftSigner] = previous_issuing_signers(paths, passphrase)
        self.issuer = self._issuer_of(issuing)
        # The OCSP responder's key certified by each replaced key (DATA/ca/previous/<SKI>/ocsp.crt.pem):
        # a delegated responder per key, so no process that answers OCSP needs a CA key (RFC 6960 §4.2.2.2).
        self.previous_responders: dict[str, SoftSigner] = {}
        self._audit_key: ec.EllipticCurvePrivateKey | None = None
        # The CRL partition a server certificate (the mail signer) of a given issuing key joins; set by
        # the services (it needs the store). None: the whole-CA CRL, right while the CA has one key.
        self.server_partition: Callable[[str], int | None] | None = None

    @classmethod
    def load(
        cls, paths: CAPaths, *, passphrase_env: str, urls: PublicURLs, production: bool = False, key_store: str = ""
    ) -> CAContext:
        if not paths.exists():
            raise ConfigError(f"no CA in {paths.ca_dir}: run `mailkms init` first")
        passphrase = ca_passphrase(paths, passphrase_env, create=False, production=production)
        try:
            issuing_key = load_key_at(paths.issuing_key, passphrase)
        except ValueError:
            raise ConfigError("the CA passphrase does not open the issuing CA key") from None
        ctx = cls(
            paths,
            passphrase,
            _load_cert(paths.root_cert),
            SoftSigner(_load_cert(paths.issuing_cert), issuing_key),
            urls,
            key_store,
        )
        if paths.mail_cert.exists() and key_exists(paths.mail_key):
            ctx.mail_signer = SoftSigner(_load_cert(paths.mail_cert), load_key_at(paths.mail_key, passphrase))
        if paths.tls_cert.exists():
            ctx.tls_cert = _load_cert(paths.tls_cert)
        if paths.ocsp_cert.exists() and key_exists(paths.ocsp_key):
            ctx.ocsp_responder = SoftSigner(_load_cert(paths.ocsp_cert), load_key_at(paths.ocsp_key, passphrase))
        if paths.root_crl.exists():
            ctx.root_crl = x509.load_der_x509_crl(paths.root_crl.read_bytes())
        if paths.infrastructure_crl.exists():
            ctx.infrastructure_crl = x509.load_der_x509_crl(paths.infrastructure_crl.read_bytes())
        if paths.infrastructure_cert.exists() and paths.infrastructure_key.exists():
            ctx.infrastructure = SoftSigner(
                _load_cert(paths.infrastructure_cert),
                load_private_key(paths.infrastructure_key.read_bytes(), passphrase),
            )
        return ctx

    @property
    def issuing_certificate(self) -> x509.Certificate:
        return self.issuing.certificate

    def previous_issuers(self) -> list[SoftSigner]:
        return self.previous_signers

    def answering_for_previous(self) -> list[tuple[x509.Certificate, CASigner]]:
        """Each replaced key's CA certificate and who answers OCSP for what it issued: the delegated
        responder it certified, or (before `ensure_server_identities` made one) the old CA key itself."""
        return [
            (old.certificate, self.previous_responders.get(ca_key_id(old.certificate), old))
            for old in self.previous_signers
        ]

    def _issuer_of(self, signer: SoftSigner) -> Issuer:
        """The first key's certificates name /ca/issuing.crt in their AIA; a later key's, its own URL."""
        key_id = ca_key_id(signer.certificate)
        first = ca_key_id((*self.previous_issuing, signer.certificate)[0])
        return Issuer(signer, self.urls, None if key_id == first else self.urls.issuing_cert_of(key_id))

    @property
    def first_key_issuing_certificate(self) -> x509.Certificate:
        """What /ca/issuing.crt serves: the certificate of the key whose certificates name that URL."""
        return (*self.previous_issuing, self.issuing.certificate)[0]

    @property
    def first_key_id(self) -> str:
        """The oldest issuing CA key: the one whose certificates the whole-CA CRL lists, signed or not yet."""
        return ca_key_id(self.first_key_issuing_certificate)

    def signer_for_key(self, key_id: str) -> SoftSigner | None:
        """The issuing CA key with this identifier (the current one or one `ca rekey` replaced), from
        memory; None when this server no longer holds it."""
        for signer in (self.issuing, *self.previous_signers):
            if ca_key_id(signer.certificate) == key_id:
                return signer
        return None

    def require_ocsp_responder(self) -> SoftSigner:
        if self.ocsp_responder is None:
            raise Internal("the server has no OCSP responder certificate")
        return self.ocsp_responder

    @property
    def chain(self) -> tuple[x509.Certificate, x509.Certificate]:
        """Issuing then root."""
        return (self.issuing.certificate, self.root)

    def chain_of(self, cert: x509.Certificate) -> tuple[x509.Certificate, x509.Certificate]:
        """The issuing CA certificate of the key that signed `cert` (its AKI: the current key or one
        `ca rekey` replaced), then the root: what a certificate issued before a rekey is handed
        back with, on a repeated request or a later download. The current chain when none matches."""
        key_id = signer_key_id(cert)
        for issuing in (self.issuing.certificate, *self.previous_issuing):
            if ca_key_id(issuing) == key_id:
                return (issuing, self.root)
        return self.chain

    def issuing_certificates(self, now: dt.datetime) -> tuple[x509.Certificate, ...]:
        """The current issuing CA certificate, then those of the keys `ca rekey` replaced that are still
        valid at `now`, newest first: what a relying party needs for any live certificate this CA
        issued (EST cacerts, CMP caCerts, the delivery mail). A replaced CA that has expired is left
        out: every certificate it issued expired with it (none outlives its issuer)."""
        kept = (c for c in reversed(self.previous_issuing) if c.not_valid_after_utc >= now)
        return (self.issuing.certificate, *kept)

    @property
    def tls_key_password(self) -> str:
        return self._passphrase.decode()

    @property
    def at_rest_passphrase(self) -> bytes:
        """What the server's own secrets at rest are sealed to, always behind a slow KDF (PBKDF2 600,000
        for key files, scrypt for the key pool's wrapping key): never derive keys from it cheaply."""
        return self._passphrase

    def audit_signer(self) -> ec.EllipticCurvePrivateKey:
        """The P-256 key that signs audit checkpoints: a file encrypted like the CA keys, so whoever
        can write the database cannot sign. Made on first use (at init, or on a server from before)."""
        if self._audit_key is not None:
            return self._audit_key
        path = self.paths.audit_key
        if path.exists():
            key = load_private_key(path.read_bytes(), self._passphrase)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ConfigError(f"{path} is not an EC key")
        else:
            made = generate_key(KeyType.P256)
            assert isinstance(made, ec.EllipticCurvePrivateKey)
            key = made
            write_atomically(path, encrypt_private_key(key, self._passphrase), 0o600)
            public = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            write_atomically(self.paths.audit_public_key, public)
        self._audit_key = key
        return key

    def issued_here(self, cert: x509.Certificate) -> bool:
        """Signed by the issuing CA's current key or by one `mailkms ca rekey` replaced."""
        return any(issued_by(cert, ca) for ca in (self.issuing.certificate, *self.previous_issuing))

    def _root_signer(self) -> SoftSigner:
        # The root key is opened only for the root CRL (and the TLS certificate of installs from
        # before the infrastructure CA), never per request; an offline root is never opened here.
        if self.paths.root_offline:
            raise Internal("the root key is offline: sign at a root ceremony (`mailkms ca root-ceremony`)")
        key = load_private_key(self.paths.root_key.read_bytes(), self._passphrase)
        return SoftSigner(self.root, key)

    def ensure_server_identities(
        self,
        hostnames: list[str],
        mail_from: str,
        clock: Clock,
        root_crl_validity: dt.timedelta = ROOT_CRL_VALIDITY,
    ) -> list[str]:
        """Renew the TLS, mail-signing and OCSP responder certificates and the root's CRL when
        close to expiry (at start and daily)."""
        now = clock.now()
        renewed: list[str] = []
        self._ensure_root_crl(now, root_crl_validity, renewed)
        self._ensure_ocsp_responder(now, renewed)
        tls = self.tls_cert
        infra = self.infrastructure
        tls_issuer = infra.certificate if infra is not None else self.root
        if (
            tls is None
            or tls.not_valid_after_utc - now < TLS_RENEW_BEFORE
            or _tls_names(tls) != set(hostnames)
            or not issued_by(tls, tls_issuer)
            or (infra is not None and not _has_cdp(tls))  # made before the infrastructure CA published a CRL
        ):
            key = generate_key(KeyType.P256)
            urls = self.urls if infra is not None else None
            cert = make_tls_server(infra or self._root_signer(), key.public_key(), hostnames, now, urls)
            chain = _pem(cert) + (_pem(infra.certificate) if infra else b"")
            write_atomically(self.paths.tls_key, encrypt_private_key(key, self._passphrase), 0o600)
            write_atomically(self.paths.tls_cert, chain)  # the leaf, then the infrastructure CA
            if tls is not None and infra is not None and issued_by(tls, infra.certificate):
                self._supersede_tls(tls, infra.certificate, now)  # its key is gone from the data folder
            self.tls_cert = cert
            renewed.append("tls")
        self._ensure_infrastructure_crl(now, renewed, force="tls" in renewed)
        signer = self.mail_signer
        if (
            signer is None
            or signer.certificate.not_valid_after_utc - now < MAIL_SIGNER_RENEW_BEFORE
            or mail_from.lower() not in [m.lower() for m in _mailboxes(signer.certificate)]
            or not issued_by(signer.certificate, self.issuing.certificate)  # `ca rekey`: chains to the new key
        ):
            validity = subscriber_validity(now, MAIL_SIGNER_MONTHS)
            if validity.not_after > self.issuing.certificate.not_valid_after_utc:
                raise Internal("the issuing CA expires within a year; renew the CA")
            key = self._keys.new(KeyType.RSA2048, "mail")  # RSA: every mail program verifies it
            # after a rekey the whole-CA CRL is the old key's: the new key's certificates name a partition of their own
            partition = self.server_partition(self.issuer.key_id) if self.server_partition else None
            prepared = self.issuer.prepare_subscriber(
                CertKind.MAIL_SIGNER, mail_from.lower(), key.public_key(), validity, list(KeyType), partition
            )
            cert = self.issuer.issue(prepared)
            self._keys.save(key, self.paths.mail_key)
            write_atomically(self.paths.mail_cert, _pem(cert))
            if signer is not None:
                self._retire_token_key(signer, "mail")
            self.mail_signer = SoftSigner(cert, key)
            renewed.append("mail-signer")
        self._destroy_expired_token_keys(now, renewed)
        return renewed

    def _ensure_ocsp_responder(self, now: dt.datetime, renewed: list[str]) -> None:
        current = self.ocsp_responder
        if (
            current is not None
            and current.certificate.not_valid_after_utc - now >= OCSP_RESPONDER_RENEW_BEFORE
            and issued_by(current.certificate, self.issuing.certificate)  # a new issuing key: a new responder
        ):
            self._certify_by_previous(current.private_key, now, renewed, every=False)
            return
        # Same family as the CA, so a relying party that verifies the CA verifies the responder.
        kind = KeyType.RSA2048 if key_type_of(self.issuing.private_key).is_rsa else KeyType.P256
        key = self._keys.new(kind, "ocsp")
        cert = self.issuer.issue(self.issuer.prepare_ocsp_responder(key.public_key(), now))
        self._keys.save(key, self.paths.ocsp_key)
        # the replaced keys certify the new responder key before its certificate is written: an OCSP-only
        # process that reloads on that file then finds every key's responder for the new key
        self._certify_by_previous(key, now, renewed, every=True)
        write_atomically(self.paths.ocsp_cert, _pem(cert))
        if current is not None:
            self._retire_token_key(current, "ocsp")
        self.ocsp_responder = SoftSigner(cert, key)
        renewed.append("ocsp-responder")

    def _certify_by_previous(self, key: PrivateKey, now: dt.datetime, renewed: list[str], every: bool) -> None:
        """The responder key `key` certified by each replaced issuing key whose certificate is still valid:
        all of them (`every`, a new responder key) or those whose certificate is missing or expiring."""
        made: dict[str, SoftSigner] = {}
        for old in self.previous_signers:
            if old.certificate.not_valid_after_utc <= now:
                continue  # nothing it issued is valid any more
            key_id = ca_key_id(old.certificate)
            path = self.paths.previous_dir / key_id / "ocsp.crt.pem"
            cert = _load_cert(path) if path.exists() else None
            if (
                every
                or cert is None
                or cert.public_key() != key.public_key()
                or cert.not_valid_after_utc - now < OCSP_RESPONDER_RENEW_BEFORE
                or not issued_by(cert, old.certificate)
            ):
                issuer = Issuer(old, self.urls)
                cert = issuer.issue(issuer.prepare_ocsp_responder(key.public_key(), now))
                write_atomically(path, _pem(cert))
                renewed.append(f"ocsp-responder:{key_id}")
            made[key_id] = SoftSigner(cert, key)
        self.previous_responders = made

    def _ensure_root_crl(self, now: dt.datetime, validity: dt.timedelta, renewed: list[str]) -> None:
        """The root's CRL (ARL) covers the issuing CA; refreshed when a third of its life is left.
        With the root offline it is only read again from the file `mailkms ca import` writes (the
        caller watches its nextUpdate: services.Services.ensure_server_identities)."""
        if self.paths.root_offline:
            self._reload_root_crl()
            return
        current = self.root_crl
        if current is not None and current.next_update_utc is not None:
            if current.next_update_utc - now > validity / 3 and current.issuer == self.root.subject:
                return
        number = crl_number(current) + 1 if current is not None else 1
        this_update = now.replace(microsecond=0)
        crl = build_crl(
            self._root_signer(),
            [],
            number=number,
            this_update=this_update,
            next_update=this_update + validity,
            max_validity=BR_MAX_ARL_VALIDITY,
        )
        write_atomically(self.paths.root_crl, crl.public_bytes(serialization.Encoding.DER))
        self.root_crl = crl
        renewed.append("root-crl")

    def files_stamp(self) -> tuple[tuple[int, int], ...]:
        """Changes when `mailkms ca import` (or another node) replaced a CA file this process loaded."""
        paths = self.paths
        watched = [paths.issuing_cert, paths.issuing_key, token_ref_path(paths.issuing_key)]
        watched += [paths.infrastructure_cert, paths.root_crl]
        stamps = []
        for path in watched:
            try:
                st = path.stat()
            except FileNotFoundError:
                stamps.append((0, 0))
            else:
                stamps.append((st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def reload_from_files(self) -> list[str]:
        """What `mailkms ca import` wrote, taken by a running server: a new issuing CA certificate
        (with its key when the key changed), a new infrastructure CA, a newer root CRL. Returns what
        changed; the caller re-checks the server identities (TLS from a new infrastructure CA)."""
        changed = []
        issuing: SoftSigner | None = None  # both read and checked before either is taken
        cert = _load_cert(self.paths.issuing_cert)
        if cert != self.issuing.certificate:
            key = self.issuing.private_key
            if cert.public_key() != key.public_key():
                key = load_key_at(self.paths.issuing_key, self._passphrase)
            issuing = SoftSigner(cert, key)
        infra: SoftSigner | None = None
        if self.paths.infrastructure_cert.exists() and self.paths.infrastructure_key.exists():
            cert = _load_cert(self.paths.infrastructure_cert)
            if self.infrastructure is None or cert != self.infrastructure.certificate:
                infra = SoftSigner(cert, load_private_key(self.paths.infrastructure_key.read_bytes(), self._passphrase))
        for signer, path in ((issuing, self.paths.issuing_cert), (infra, self.paths.infrastructure_cert)):
            if signer is not None and signer.certificate.public_key() != signer.private_key.public_key():
                raise ConfigError(f"{path} is not the certificate of the key beside it; nothing was taken")
        if issuing is not None:
            # the replaced keys are opened before the new key is taken: requests meanwhile see the old set whole
            previous_issuing = _previous_issuing(self.paths)
            previous_signers = previous_issuing_signers(self.paths, self._passphrase)
            self.previous_issuing, self.previous_signers = previous_issuing, previous_signers
            self.issuing, self.issuer = issuing, self._issuer_of(issuing)
            changed.append("issuing-ca")
        if infra is not None:
            self.infrastructure = infra
            changed.append("infrastructure-ca")
        before = self.root_crl
        self._reload_root_crl()
        if self.root_crl is not before:
            changed.append("root-crl")
        return changed

    def _retire_token_key(self, old: SoftSigner, role: str) -> None:
        """A replaced OCSP-responder or mail-signer key that lives in the token: noted, to be destroyed
        there once its certificate has expired (until then an answer or mail it signed still verifies)."""
        key = old.private_key
        if not isinstance(key, TokenRSAKey | TokenECKey):
            return  # a key file is simply overwritten
        listed = self._retired_keys()
        listed.append(
            {
                "uri": key.reference.uri,
                "id": key.reference.key_id.hex(),
                "role": role,
                "not_after": old.certificate.not_valid_after_utc.isoformat(),
            }
        )
        write_atomically(self.paths.retired_token_keys, json.dumps(listed, indent=2).encode())

    def _retired_keys(self) -> list[dict[str, str]]:
        path = self.paths.retired_token_keys
        return list(json.loads(path.read_text())) if path.exists() else []

    def _destroy_expired_token_keys(self, now: dt.datetime, renewed: list[str]) -> None:
        """At start and daily. A token that is away now is tried again at the next check."""
        listed = self._retired_keys()
        due = [e for e in listed if dt.datetime.fromisoformat(e["not_after"]) <= now]
        if not due:
            return
        kept = [e for e in listed if e not in due]
        for entry in due:
            try:
                Token.for_uri(entry["uri"]).destroy(bytes.fromhex(entry["id"]))
            except KeyStoreUnavailable:
                kept.append(entry)
                log.warning("a retired %s key could not be destroyed now: the token is unavailable", entry["role"])
                continue
            renewed.append(f"{entry['role']}-key-destroyed")
        write_atomically(self.paths.retired_token_keys, json.dumps(kept, indent=2).encode())

    def _supersede_tls(self, old: x509.Certificate, issuer: x509.Certificate, now: dt.datetime) -> None:
        """Kept until the old certificate expires, tagged with its CA's key (a new infrastructure key
        from a ceremony starts a CRL of its own)."""
        listed = [e for e in self._superseded() if dt.datetime.fromisoformat(e["not_after"]) > now]
        if old.not_valid_after_utc > now:
            listed.append(
                {
                    "serial": f"{old.serial_number:x}",
                    "at": now.replace(microsecond=0).isoformat(),
                    "not_after": old.not_valid_after_utc.isoformat(),
                    "issuer_key": _key_id(issuer),
                }
            )
        write_atomically(self.paths.superseded_tls, json.dumps(listed, indent=2).encode())

    def _superseded(self) -> list[dict[str, str]]:
        path = self.paths.superseded_tls
        return list(json.loads(path.read_text())) if path.exists() else []

    def _ensure_infrastructure_crl(self, now: dt.datetime, renewed: list[str], force: bool = False) -> None:
        """The infrastructure CA's CRL (the TLS certificate's CDP): the replaced TLS certificates still
        within their validity, as superseded; re-signed at start after a new TLS certificate, once
        less than INFRASTRUCTURE_CRL_RESIGN is left, or when the infrastructure CA changed (import)."""
        infra = self.infrastructure
        if infra is None:
            return
        path = self.paths.infrastructure_crl
        # Read, number, sign and write under one lock: two server processes on this data folder
        # never sign two different CRLs with the same number.
        with exclusive(path.with_name(f".{path.name}.lock")):
            self._sign_infrastructure_crl(infra, path, now, renewed, force)

    def _sign_infrastructure_crl(
        self, infra: SoftSigner, path: Path, now: dt.datetime, renewed: list[str], force: bool
    ) -> None:
        current = x509.load_der_x509_crl(path.read_bytes()) if path.exists() else None
        if (  # another node on the same data folder may have signed it: taken as it is
            not force
            and current is not None
            and current.next_update_utc is not None
            and current.next_update_utc - now > INFRASTRUCTURE_CRL_RESIGN
            and current.issuer == infra.certificate.subject
            and current.is_signature_valid(infra.certificate.public_key())  # type: ignore[arg-type]
        ):
            self.infrastructure_crl = current
            return
        entries = [
            RevokedEntry(int(e["serial"], 16), dt.datetime.fromisoformat(e["at"]), x509.ReasonFlags.superseded)
            for e in self._superseded()
            if dt.datetime.fromisoformat(e["not_after"]) > now and e.get("issuer_key") == _key_id(infra.certificate)
        ]
        this_update = now.replace(microsecond=0)
        crl = build_crl(
            infra,
            entries,
            number=crl_number(current) + 1 if current is not None else 1,
            this_update=this_update,
            next_update=this_update + INFRASTRUCTURE_CRL_VALIDITY,
        )
        write_atomically(path, crl.public_bytes(serialization.Encoding.DER))
        self.infrastructure_crl = crl
        renewed.append("infrastructure-crl")

    def _reload_root_crl(self) -> None:
        if not self.paths.root_crl.exists():
            return
        crl = x509.load_der_x509_crl(self.paths.root_crl.read_bytes())
        if self.root_crl is None or crl_number(crl) > crl_number(self.root_crl):
            self.root_crl = crl

    def require_mail_signer(self) -> SoftSigner:
        if self.mail_signer is None:
            raise Internal("the server has no mail-signing certificate")
        return self.mail_signer


def _previous_issuing(paths: CAPaths) -> list[x509.Certificate]:
    """The issuing CA certificates `mailkms ca rekey` kept (DATA/ca/previous/<SKI>/), oldest first."""
    folder = paths.previous_dir
    certs = [_load_cert(p) for p in folder.glob("*/issuing.crt.pem")] if folder.exists() else []
    return sorted(certs, key=lambda c: c.not_valid_before_utc)


def previous_responder_certificates(paths: CAPaths) -> list[tuple[x509.Certificate, x509.Certificate]]:
    """(replaced issuing CA certificate, the OCSP responder certificate it issued) for each replaced key
    that has one: what an OCSP-only process answers with, holding no CA key."""
    folder = paths.previous_dir
    found = []
    for cert_path in sorted(folder.glob("*/issuing.crt.pem")) if folder.exists() else []:
        responder = cert_path.with_name("ocsp.crt.pem")
        if responder.exists():
            found.append((_load_cert(cert_path), _load_cert(responder)))
    return found


def previous_issuing_signers(paths: CAPaths, passphrase: bytes) -> list[SoftSigner]:
    """The keys `mailkms ca rekey` replaced, with their certificates, while these are valid: they sign
    the OCSP answers for what they issued (RFC 6960 §4.2.2.2: the CA that issued the certificate).
    Loaded once per process (and at a reload), never per request."""
    folder = paths.previous_dir
    signers = []
    for cert_path in sorted(folder.glob("*/issuing.crt.pem")) if folder.exists() else []:
        cert = _load_cert(cert_path)
        key_path = cert_path.with_name("issuing.key.pem")
        if key_exists(key_path):
            signers.append(SoftSigner(cert, load_key_at(key_path, passphrase)))
    return sorted(signers, key=lambda s: s.certificate.not_valid_before_utc)


def _tls_names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }


def _key_id(ca: x509.Certificate) -> str:
    return x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest.hex()


def _has_cdp(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    except x509.ExtensionNotFound:
        return False
    return True


def _mailboxes(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.RFC822Name))


def tls_hostnames(hostname: str, extra: tuple[str, ...] = ()) -> list[str]:
    names = [hostname, *extra]
    if hostname == "localhost":
        names += ["127.0.0.1", "::1"]
    return list(dict.fromkeys(names))


def load_private_key_file(path: Path, passphrase: bytes) -> PrivateKey:
    return load_key_at(path, passphrase)
