"""The client's key store: a folder holding state.json and PKCS#8 keys encrypted with the
user's passphrase (openssl reads them: `openssl pkey -in key.pem -passin env:VAR`)."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from mailkms.errors import ClientStateError, WrongPassphrase
from mailkms.pki import PrivateKey, encrypt_private_key, load_private_key

STATE_FILE = "state.json"


@dataclass
class Generation:
    generation: int
    signing_serial: str
    encryption_serial: str
    signing_pem: str
    encryption_pem: str
    reminder_at: str
    not_before: str
    not_after: str
    installed_at: str
    request_id: str


@dataclass
class Pending:
    kind: str  # enrolment | renewal
    request_id: str
    signing_key_file: str
    sent_at: str


@dataclass
class ImapAccount:
    """Where deliveries arrive when the mailbox is on an IMAP server. The password is sealed with
    the key-store passphrase (`seal_secret`); the CA, if given, is kept as PEM text."""

    url: str  # imaps://user@host:port/FOLDER or imap://... (STARTTLS required)
    password: dict[str, str | int]  # seal_secret's envelope, never the password itself
    done_folder: str = "mailkms"
    ca_pem: str = ""  # trust this CA instead of the system's
    pin: str = ""  # sha256:HEX of the server's certificate, checked instead of the chain


@dataclass
class ClientState:
    server: str
    mailbox: str
    root_fingerprint: str
    root_pem: str
    mail_from: str
    maildir: str
    generations: list[Generation] = field(default_factory=list)
    # every encryption certificate ever installed, serial -> PEM; the keys stay in keys/
    encryption_history: dict[str, str] = field(default_factory=dict)
    pending: Pending | None = None
    transport_key_file: str = ""
    transport_cert_pem: str = ""
    processed: dict[str, str] = field(default_factory=dict)  # message file key -> outcome
    ca_chain_pem: list[str] = field(default_factory=list)  # issuing CA(s) then root, kept at install
    imap: ImapAccount | None = None  # when set, deliveries are read over IMAP, not from `maildir`
    # mail programs' key stores every new generation is also installed into: "nss:DIR", "gpgsm:GNUPGHOME"
    install_targets: list[str] = field(default_factory=list)

    @property
    def current(self) -> Generation | None:
        return max(self.generations, key=lambda g: g.generation) if self.generations else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClientState:
        data: dict[str, Any] = json.loads(text)
        data["generations"] = [Generation(**g) for g in data.get("generations", [])]
        pending = data.get("pending")
        data["pending"] = Pending(**pending) if pending else None
        imap = data.get("imap")
        data["imap"] = ImapAccount(**imap) if imap else None
        return cls(**data)


class KeyStore:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.keys_dir = home / "keys"

    @property
    def state_path(self) -> Path:
        return self.home / STATE_FILE

    def exists(self) -> bool:
        return self.state_path.exists()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One command at a time changes the store (two log-ons at once, a sync beside a log-on)."""
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.home / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def load(self) -> ClientState:
        if not self.exists():
            raise ClientStateError(f"no key store in {self.home}: run `mailkms-client enroll` first")
        try:
            return ClientState.from_json(self.state_path.read_text())
        except (ValueError, TypeError, KeyError) as exc:
            raise ClientStateError(f"{self.state_path} is damaged ({exc.__class__.__name__})") from None

    def save(self, state: ClientState) -> None:
        _atomic_write(self.state_path, state.to_json().encode(), 0o600)

    def write_key(self, name: str, key: PrivateKey, passphrase: bytes) -> str:
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _atomic_write(self.keys_dir / name, encrypt_private_key(key, passphrase), 0o600)
        return name

    def read_key(self, name: str, passphrase: bytes) -> PrivateKey:
        path = self.keys_dir / name
        if not path.exists():
            raise ClientStateError(f"the key file {path} is missing")
        try:
            return load_private_key(path.read_bytes(), passphrase)
        except (ValueError, TypeError):
            raise WrongPassphrase("the passphrase does not unlock the key store") from None

    def key_path(self, name: str) -> Path:
        return self.keys_dir / name


def signing_key_name(serial: str) -> str:
    return f"signing-{serial}.pem"


def encryption_key_name(serial: str) -> str:
    return f"encryption-{serial}.pem"


def cert_from_pem(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def cert_to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# --- small secrets (the IMAP password) sealed with the key-store passphrase --------------------------
SECRET_ITERATIONS = 600_000  # as the keys' PBES2 (OWASP 2023 for PBKDF2-HMAC-SHA256)
_SECRET_ALG = "pbkdf2-sha256+aes-256-gcm"


def _secret_key(passphrase: bytes, salt: bytes, iterations: int) -> AESGCM:
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=iterations)
    return AESGCM(kdf.derive(passphrase))


def seal_secret(
    secret: str, passphrase: bytes, purpose: str, iterations: int = SECRET_ITERATIONS
) -> dict[str, str | int]:
    """AES-256-GCM under a PBKDF2-HMAC-SHA256 key from the passphrase; `purpose` is bound as
    associated data, so a sealed value cannot be moved to another field unnoticed."""
    salt, nonce = os.urandom(16), os.urandom(12)
    sealed = _secret_key(passphrase, salt, iterations).encrypt(nonce, secret.encode(), purpose.encode())
    b64 = base64.b64encode
    return {
        "alg": _SECRET_ALG,
        "iterations": iterations,
        "salt": b64(salt).decode(),
        "nonce": b64(nonce).decode(),
        "ciphertext": b64(sealed).decode(),
    }


def open_secret(envelope: dict[str, str | int], passphrase: bytes, purpose: str) -> str:
    try:
        if envelope.get("alg") != _SECRET_ALG:
            raise ValueError(envelope.get("alg"))
        salt, nonce, sealed = (base64.b64decode(str(envelope[k])) for k in ("salt", "nonce", "ciphertext"))
        aead = _secret_key(passphrase, salt, int(envelope["iterations"]))
    except (KeyError, ValueError, TypeError):
        raise ClientStateError("the stored mailbox password is damaged: set it again (`mailbox set`)") from None
    try:
        return aead.decrypt(nonce, sealed, purpose.encode()).decode()
    except InvalidTag:
        raise WrongPassphrase("the passphrase does not unlock the key store") from None


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Whole or not at all: a temporary file of its own in the same folder (so two processes writing
    at once never share one), synced, then renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600, O_EXCL
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
