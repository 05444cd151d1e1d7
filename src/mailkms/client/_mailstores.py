"""The user's keys in the mail program's own key store.

- `NSSStore`: an NSS `sql:` database (Thunderbird, Evolution). `certutil` adds the CA chain (the root
  trusted as a CA for e-mail only, trust `,C,`), `pk12util` imports one PKCS#12 per key (AES-256,
  PBES2, a random one-time password) from a temporary file of mode 0600 deleted right after.
- `GpgsmStore`: gpgsm's key box and gpg-agent (KMail, mutt through gpgme, Claws). gpgsm 2.2 reads only
  the legacy PKCS#12 (3DES, SHA-1 MAC, a random one-time password), so that is what it gets, through a
  pipe on its standard input (no file is written); gpg-agent's PASSWD then protects the key with the
  user's passphrase. The root goes into the agent's `trustlist.txt` with the `S` flag.

Passwords reach the tools through pipes (`/dev/fd/N`, `--passphrase-fd N`), never on a command line;
keys leave this process only inside an encrypted PKCS#12. Installing is idempotent: what is there
already (found by key and certificate, not by name) is not installed again.

`InstallTargets.after_install` is the one hook `Client.sync` calls after it installed a generation:
it installs into every store recorded with `enroll --install-into` or `install --remember`, and a
store that cannot be written is a note for the user, never a failed sync.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from mailkms.client._store import ClientState, KeyStore, cert_from_pem, encryption_key_name, signing_key_name
from mailkms.errors import (
    ClientStateError,
    MailkmsError,
    MailStoreError,
    MailStorePassword,
    MailStoreToolMissing,
    Malformed,
)
from mailkms.pki import PrivateKey

NSS_ENV = "MAILKMS_NSS_PASSWORD"
GPGSM_ENV = "MAILKMS_GPGSM_PASSPHRASE"
TIMEOUT = 120  # seconds for one tool run
PACKAGES = {
    "certutil": "libnss3-tools",
    "pk12util": "libnss3-tools",
    "gpgsm": "gpgsm",
    "gpgconf": "gpgconf",
    "gpg-connect-agent": "gpgconf",
}
# NSS trust "SSL,S/MIME,code signing": the root is a trusted CA for e-mail only (it also issues the
# server's TLS certificate, but a mail program has no business trusting it for web sites).
ROOT_TRUST = ",C,"
CA_TRUST = ",,"  # the issuing CA: known, its trust derives from the root
GPGSM_ATTEMPTS = 5  # gpgsm 2.2.40 refuses ~2 % of well-formed 3DES PKCS#12 files (salt-dependent): make a fresh one


# --- what gets installed -----------------------------------------------------------------------
@dataclass(frozen=True)
class KeyItem:
    role: str  # signing | encryption
    serial: str
    certificate: x509.Certificate
    load_key: Callable[[], PrivateKey]  # unlocked only when it has to be installed

    @property
    def label(self) -> str:
        return f"{self.role} key {self.serial[:12]} (from {self.certificate.not_valid_before_utc:%Y-%m-%d})"


@dataclass(frozen=True)
class Bundle:
    mailbox: str
    items: tuple[KeyItem, ...]
    chain: tuple[x509.Certificate, ...]  # issuing CA(s), then the root

    @property
    def root(self) -> x509.Certificate:
        return self.chain[-1]


def bundle_of(store: KeyStore, state: ClientState, passphrase: Callable[[], bytes]) -> Bundle:
    """The current signing key and every encryption key ever held, with their certificates and the chain."""
    current = state.current
    if current is None:
        raise ClientStateError("no certificates installed yet: run `mailkms-client sync` first")

    def loader(name: str) -> Callable[[], PrivateKey]:
        return lambda: store.read_key(name, passphrase())

    items = [
        KeyItem(
            "signing",
            current.signing_serial,
            cert_from_pem(current.signing_pem),
            loader(signing_key_name(current.signing_serial)),
        )
    ]
    for serial, pem in sorted(
        state.encryption_history.items(), key=lambda kv: cert_from_pem(kv[1]).not_valid_before_utc
    ):
        items.append(KeyItem("encryption", serial, cert_from_pem(pem), loader(encryption_key_name(serial))))
    chain = [cert_from_pem(p) for p in state.ca_chain_pem] or [cert_from_pem(state.root_pem)]
    return Bundle(state.mailbox, tuple(items), tuple(chain))


@dataclass
class InstallReport:
    target: str
    installed: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        head = f"{self.target}: {len(self.installed)} key(s) installed, {len(self.present)} already there."
        return [head, *(f"  installed {name}" for name in self.installed), *(f"  note: {n}" for n in self.notes)]


# --- passwords ------------------------------------------------------------------------------------
class Secrets:
    """The stores' passwords: the environment first; a prompt only when interactive (never at sync)."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        interactive: bool = False,
        ask: Callable[[str], str] = getpass.getpass,
    ) -> None:
        self._env = os.environ if env is None else env
        self._interactive = interactive
        self._ask = ask

    def _get(self, name: str, prompt: str, confirm: bool) -> str | None:
        if name in self._env:
            return _one_line(self._env[name], name)
        if not self._interactive:
            return None
        first = self._ask(prompt)
        if confirm and self._ask("Repeat it: ") != first:
            raise MailStorePassword("the passwords differ")
        return _one_line(first, "the password")

    def nss(self, new: bool) -> str | None:
        prompt = "Password for the new NSS database: " if new else "Password of the NSS database: "
        return self._get(NSS_ENV, prompt, confirm=new)

    def gpgsm(self) -> str | None:
        return self._get(GPGSM_ENV, "Passphrase to protect your keys in gpgsm: ", confirm=True)


def _one_line(value: str, what: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:
        raise MailStorePassword(f"{what} must be one line")
    return value


# --- running the tools -------------------------------------------------------------------------
@contextlib.contextmanager
def _secret_fds(*values: str, newline: bool = True) -> Iterator[list[int]]:
    """Each value in a pipe the child reads as a file (`/dev/fd/N`) or an fd; never in argv or env."""
    fds: list[int] = []
    try:
        for value in values:
            read, write = os.pipe()
            fds.append(read)
            try:
                os.write(write, value.encode() + (b"\n" if newline else b""))
            finally:
                os.close(write)
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        packages = " ".join(dict.fromkeys(PACKAGES.get(t, t) for t in missing))
        raise MailStoreToolMissing(f"{', '.join(missing)} not found: install {packages} (apt-get install {packages})")


@dataclass(frozen=True)
class _Run:
    code: int
    out: str
    err: str

    def last_error(self) -> str:
        lines = [line.strip() for line in (self.out + self.err).splitlines() if line.strip()]
        return lines[-1] if lines else f"exit {self.code}"


def _run(cmd: Sequence[str], *, fds: Sequence[int] = (), data: bytes | None = None) -> _Run:
    # the tools (and the gpg-agent gpgsm starts, which outlives us) get no MAILKMS_* variable: those
    # hold the key store's passphrase and the stores' passwords, which reach the tools by pipes only
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKMS_")} | {"LC_ALL": "C", "LANGUAGE": "C"}
    try:
        proc = subprocess.run(
            list(cmd), input=data, capture_output=True, pass_fds=tuple(fds), timeout=TIMEOUT, env=env, check=False
        )
    except FileNotFoundError:
        require_tools(cmd[0])
        raise
    except subprocess.TimeoutExpired:
        raise MailStoreError(f"{cmd[0]} did not finish within {TIMEOUT} s") from None
    return _Run(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


# --- NSS ------------------------------------------------------------------------------------------
def nss_key_id(cert: x509.Certificate) -> str | None:
    """The CKA_ID NSS gives an imported key (what `certutil -K` prints): SHA-1 of the RSA modulus or of
    the EC point."""
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        n = key.public_numbers().n
        return hashlib.sha1(n.to_bytes((n.bit_length() + 7) // 8, "big"), usedforsecurity=False).hexdigest()
    if isinstance(key, ec.EllipticCurvePublicKey):
        point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        return hashlib.sha1(point, usedforsecurity=False).hexdigest()
    return None


_KEY_LINE = re.compile(r"^<\s*\d+>\s+\S+\s+([0-9a-f]+)\s+(.*)$")
_TRUST = re.compile(r"^[A-Za-z]*,[A-Za-z]*,[A-Za-z]*$")


class NSSStore:
    """An NSS `sql:` database, written only through `certutil` and `pk12util`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.expanduser().resolve()
        self.db = f"sql:{self.directory}"

    @property
    def target(self) -> str:
        return f"nss:{self.directory}"

    def exists(self) -> bool:
        # cert8.db: an old dbm database, which NSS moves to sql: when it opens it that way
        return (self.directory / "cert9.db").exists() or (self.directory / "cert8.db").exists()

    def _keys(self, password: str) -> tuple[_Run, dict[str, str]]:
        with _secret_fds(password) as (fd,):
            run = _run(["certutil", "-K", "-d", self.db, "-f", f"/dev/fd/{fd}"], fds=[fd])
        keys: dict[str, str] = {}
        for line in run.out.splitlines():
            match = _KEY_LINE.match(line.strip())
            if match:
                keys[match.group(1)] = match.group(2).strip()
        return run, keys

    def needs_password(self) -> bool:
        """An empty password never reaches a database without one (Thunderbird's default profile)."""
        run, _ = self._keys("")
        return "SEC_ERROR_BAD_PASSWORD" in run.err

    def create(self, password: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _secret_fds(password) as (fd,):
            run = _run(["certutil", "-N", "-d", self.db, "-f", f"/dev/fd/{fd}"], fds=[fd])
        if run.code != 0:
            raise MailStoreError(f"certutil could not create an NSS database in {self.directory}: {run.last_error()}")

    def key_ids(self, password: str) -> dict[str, str]:
        """CKA_ID -> nickname of every private key; refuses a wrong password before anything changes."""
        run, keys = self._keys(password)
        if "SEC_ERROR_BAD_PASSWORD" in run.err:
            raise MailStorePassword(f"the password ({NSS_ENV}) does not open the NSS database {self.directory}")
        if run.code != 0 and "no keys found" not in run.out + run.err:
            raise MailStoreError(f"certutil cannot read the NSS database {self.directory}: {run.last_error()}")
        return keys

    def listing(self) -> list[tuple[str, str]]:
        """(nickname, trust) of each certificate, as `certutil -L` prints them."""
        run = _run(["certutil", "-L", "-d", self.db])
        if run.code != 0:
            raise MailStoreError(f"certutil cannot list the NSS database {self.directory}: {run.last_error()}")
        rows = []
        for line in run.out.splitlines():
            parts = line.rstrip().rsplit(None, 1)
            if len(parts) == 2 and _TRUST.match(parts[1]):
                rows.append((parts[0].strip(), parts[1]))
        return rows

    def certificates(self, nickname: str) -> list[x509.Certificate]:
        """Every certificate under a nickname (NSS gives all certificates of one subject one nickname)."""
        run = _run(["certutil", "-L", "-d", self.db, "-n", nickname, "-a"])
        if run.code != 0 or "BEGIN CERTIFICATE" not in run.out:
            return []
        return x509.load_pem_x509_certificates(run.out.encode())

    def _find(self, cert: x509.Certificate, rows: list[tuple[str, str]], first: str) -> tuple[str, str] | None:
        names = dict(rows)
        order = [first] if first in names else []
        order += [n for n in names if n != first and "u" not in names[n]]  # user certificates are not CAs
        for nickname in order:
            if cert in self.certificates(nickname):
                return nickname, names[nickname]
        return None

    def _add_ca(self, cert: x509.Certificate, is_root: bool, password: str, rows: list[tuple[str, str]]) -> str | None:
        nickname = _common_name(cert)
        found = self._find(cert, rows, nickname)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        with _secret_fds(password) as (fd,):
            if found is None:
                trust = ROOT_TRUST if is_root else CA_TRUST
                run = _run(
                    ["certutil", "-A", "-d", self.db, "-n", nickname, "-t", trust, "-f", f"/dev/fd/{fd}"],
                    fds=[fd],
                    data=pem,
                )
                if run.code != 0:
                    raise MailStoreError(f"certutil could not add the CA certificate {nickname}: {run.last_error()}")
                return None
            if not is_root:
                return None
            name, trust = found
            ssl, email, code = trust.split(",")
            if "p" in email:
                return f"the root {name} is marked as not trusted for e-mail in {self.directory}; left as it is"
            if "C" in email:
                return None
            merged = f"{ssl},{email.replace('c', '')}C,{code}"  # keep what the user set for SSL and code
            run = _run(["certutil", "-M", "-d", self.db, "-n", name, "-t", merged, "-f", f"/dev/fd/{fd}"], fds=[fd])
            if run.code != 0:
                raise MailStoreError(f"certutil could not trust the root {name} for e-mail: {run.last_error()}")
        return None

    def _import(self, item: KeyItem, nickname: str, password: str) -> None:
        one_time = secrets.token_urlsafe(32)
        encryption = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(10_000)  # the password is 256 random bits: the rounds add nothing
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
            .build(one_time.encode())
        )
        data = pkcs12.serialize_key_and_certificates(
            nickname.encode(), item.load_key(), item.certificate, None, encryption
        )
        folder = tempfile.mkdtemp(prefix="mailkms-p12-")  # mode 0700
        path = Path(folder) / "key.p12"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            with _secret_fds(password, one_time) as (db_fd, p12_fd):
                run = _run(
                    [
                        "pk12util",
                        "-i",
                        str(path),
                        "-d",
                        self.db,
                        "-k",
                        f"/dev/fd/{db_fd}",
                        "-w",
                        f"/dev/fd/{p12_fd}",
                    ],
                    fds=[db_fd, p12_fd],
                )
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            os.rmdir(folder)
        if "SEC_ERROR_BAD_PASSWORD" in run.err and "slot" in run.err:
            raise MailStorePassword(f"the password ({NSS_ENV}) does not open the NSS database {self.directory}")
        if run.code != 0:
            raise MailStoreError(f"pk12util could not import your {item.label}: {run.last_error()}")

    def install(self, bundle: Bundle, secrets_: Secrets) -> InstallReport:
        require_tools("certutil", "pk12util")
        report = InstallReport(self.target)
        if not self.exists():
            password = secrets_.nss(new=True)
            if not password:
                raise MailStorePassword(
                    f"{self.directory} holds no NSS database; a new one needs a password: set {NSS_ENV} "
                    "(or run in a terminal), or point --nss at your mail program's profile"
                )
            self.create(password)
            report.notes.append(f"created a new NSS database in {self.directory}")
        elif self.needs_password():
            password = secrets_.nss(new=False)
            if password is None:
                raise MailStorePassword(
                    f"the NSS database {self.directory} is protected by a password: set {NSS_ENV} or run in a terminal"
                )
        else:
            password = ""  # no primary password set: NSS never asks for one
        keys = self.key_ids(password)  # a wrong password stops here, before anything is written
        rows = self.listing()
        for cert in bundle.chain:
            note = self._add_ca(cert, cert is bundle.root, password, rows)
            if note:
                report.notes.append(note)
        for item in bundle.items:
            nickname = keys.get(nss_key_id(item.certificate) or "")
            if nickname is not None and item.certificate in self.certificates(nickname):
                report.present.append(item.label)
                continue
            # NSS names every certificate of one subject alike: the first one's nickname wins
            self._import(item, bundle.mailbox, password)
            report.installed.append(item.label)
        if report.installed:
            after = self.key_ids(password)
            lost = [i.label for i in bundle.items if nss_key_id(i.certificate) not in after]
            if lost:
                raise MailStoreError(f"pk12util reported success but these keys are not in the database: {lost}")
        return report


# --- gpgsm ----------------------------------------------------------------------------------------
def default_gnupg_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env["GNUPGHOME"]) if env.get("GNUPGHOME") else Path.home() / ".gnupg"


def sha1_fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 - gpgsm names certificates by SHA-1


class GpgsmStore:
    """gpgsm's key box and gpg-agent in a GnuPG home, written only through `gpgsm`."""

    def __init__(self, home: Path) -> None:
        self.home = home.expanduser().resolve()

    @property
    def target(self) -> str:
        return f"gpgsm:{self.home}"

    def _gpgsm(self, *args: str) -> list[str]:
        # --disable-dirmngr: an import needs no network look-up of issuers (and would take seconds)
        return ["gpgsm", "--homedir", str(self.home), "--batch", "--disable-dirmngr", *args]

    def version(self) -> tuple[int, ...]:
        match = re.search(r"gpgsm \(GnuPG\) (\d+)\.(\d+)\.(\d+)", _run(["gpgsm", "--version"]).out)
        return tuple(int(n) for n in match.groups()) if match else ()

    def secret_fingerprints(self) -> set[str]:
        run = _run(self._gpgsm("--with-colons", "--list-secret-keys"))
        if run.code != 0:
            raise MailStoreError(f"gpgsm cannot list the keys in {self.home}: {run.last_error()}")
        found = set()
        record = ""
        for line in run.out.splitlines():
            fields = line.split(":")
            if fields[0] in ("crt", "crs"):
                record = fields[0]
            elif fields[0] == "fpr" and record == "crs" and len(fields) > 9:
                found.add(fields[9].upper())
                record = ""
        return found

    def _import_chain(self, chain: Sequence[x509.Certificate]) -> None:
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        run = _run(self._gpgsm("--import"), data=pem)
        if run.code != 0:
            raise MailStoreError(f"gpgsm could not import the CA certificates: {run.last_error()}")

    def _trust_root(self, root: x509.Certificate) -> str | None:
        """The root in gpg-agent's trustlist.txt with the S (S/MIME) flag, unless the user disabled it."""
        path = self.home / "trustlist.txt"
        fpr = sha1_fingerprint(root)
        text = path.read_text() if path.exists() else ""
        for line in text.splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            disabled = stripped.startswith("!")
            token = stripped.lstrip("!").split()[0].replace(":", "").upper()
            if token == fpr:
                if disabled:
                    return f"the root is disabled (!) in {path}; left as it is"
                return None
        colons = ":".join(fpr[i : i + 2] for i in range(0, len(fpr), 2))
        entry = f"# {root.subject.rfc4514_string()} (added by mailkms-client install)\n{colons} S\n"
        prefix = "" if not text or text.endswith("\n") else "\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(prefix + entry)
        if shutil.which("gpgconf"):
            _run(["gpgconf", "--homedir", str(self.home), "--reload", "gpg-agent"])  # reads the list again
        return None

    def _import(self, item: KeyItem, nickname: str, passphrase: str) -> None:
        """gpgsm opens the PKCS#12 with, and gpg-agent first protects the key with, the one passphrase
        gpgsm is given; gpgsm 2.2 reads at most 31 bytes of it. So the file gets a random one-time
        password, and gpg-agent's PASSWD then puts the user's passphrase (any length) on the key."""
        key = item.load_key()
        last = ""
        for _ in range(GPGSM_ATTEMPTS):
            one_time = secrets.token_urlsafe(18)  # 24 characters, 144 bits
            encryption = (
                serialization.PrivateFormat.PKCS12.encryption_builder()
                .kdf_rounds(10_000)
                .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)  # the kind gpgsm 2.2 reads
                .hmac_hash(hashes.SHA1())  # noqa: S303 - the MAC gpgsm 2.2 reads
                .build(one_time.encode())
            )
            data = pkcs12.serialize_key_and_certificates(nickname.encode(), key, item.certificate, None, encryption)
            with _secret_fds(one_time) as (fd,):
                run = _run(
                    self._gpgsm("--pinentry-mode", "loopback", "--passphrase-fd", str(fd), "--import"),
                    fds=[fd],
                    data=data,  # standard input: the PKCS#12 never touches the disk
                )
            if run.code == 0 and "secret keys read: 1" in run.err:
                self._protect(item, one_time, passphrase)
                return
            last = run.last_error()
            if "error parsing or decrypting the PKCS#12" not in run.err:
                break
        raise MailStoreError(f"gpgsm could not import your {item.label}: {last}")

    def _keygrip(self, cert: x509.Certificate) -> str:
        run = _run(self._gpgsm("--with-colons", "--with-keygrip", "--list-secret-keys", f"0x{sha1_fingerprint(cert)}"))
        for line in run.out.splitlines():
            fields = line.split(":")
            if fields[0] == "grp" and len(fields) > 9 and fields[9]:
                return fields[9]
        raise MailStoreError(f"gpgsm lists no secret key for the certificate {sha1_fingerprint(cert)}")

    def _agent(self, *commands: str, fds: Sequence[int] = ()) -> _Run:
        return _run(["gpg-connect-agent", "--homedir", str(self.home), *commands, "/bye"], fds=fds)

    def _protect(self, item: KeyItem, one_time: str, passphrase: str) -> None:
        grip = self._keygrip(item.certificate)
        with _secret_fds(one_time, passphrase, newline=False) as (old_fd, new_fd):
            run = self._agent(
                "OPTION pinentry-mode=loopback",
                f"/definqfile PASSPHRASE /dev/fd/{old_fd}",
                f"/definqfile NEW_PASSPHRASE /dev/fd/{new_fd}",
                f"PASSWD {grip}",
                fds=[old_fd, new_fd],
            )
        if run.code != 0 or any(line.startswith("ERR") for line in run.out.splitlines()):
            # locked by a password nobody knows any more: take the key out, a later install puts it back
            self._agent(f"DELETE_KEY --force {grip}")
            raise MailStoreError(
                f"gpg-agent could not protect your {item.label} with your passphrase: {run.last_error()}"
            )

    def install(self, bundle: Bundle, secrets_: Secrets) -> InstallReport:
        require_tools("gpgsm", "gpg-connect-agent")
        report = InstallReport(self.target)
        if not self.home.exists():
            self.home.mkdir(parents=True, mode=0o700)
            report.notes.append(f"created the GnuPG home {self.home}")
        have = self.secret_fingerprints()
        todo = [i for i in bundle.items if sha1_fingerprint(i.certificate) not in have]
        report.present = [i.label for i in bundle.items if i not in todo]
        if self.version()[:2] == (2, 2):
            for item in [i for i in todo if isinstance(i.certificate.public_key(), ec.EllipticCurvePublicKey)]:
                # gpgsm 2.2.40 dies with a segmentation fault on an EC key in a PKCS#12 (measured)
                todo.remove(item)
                report.notes.append(
                    f"your {item.label} is an EC key, which gpgsm 2.2 cannot import from PKCS#12: not installed "
                    "into gpgsm (an RSA signing key, `enroll --key-type rsa2048`, works with it)"
                )
        passphrase = secrets_.gpgsm() if todo else ""
        if todo and not passphrase:
            raise MailStorePassword(
                f"gpgsm protects each imported key with a passphrase: set {GPGSM_ENV} or run in a terminal"
            )
        self._import_chain(bundle.chain)
        note = self._trust_root(bundle.root)
        if note:
            report.notes.append(note)
        for item in todo:
            self._import(item, bundle.mailbox, passphrase or "")
            report.installed.append(item.label)
        if todo:
            missing = [i.label for i in todo if sha1_fingerprint(i.certificate) not in self.secret_fingerprints()]
            if missing:
                raise MailStoreError(f"gpgsm reported success but these keys are not in {self.home}: {missing}")
        return report


# --- targets ----------------------------------------------------------------------------------------
def parse_target(spec: str, env: Mapping[str, str] | None = None) -> str:
    """`nss:DIR`, `gpgsm` or `gpgsm:GNUPGHOME` -> the canonical form kept in state.json (absolute paths)."""
    kind, _, rest = spec.partition(":")
    if kind == "nss" and rest:
        return NSSStore(Path(rest.removeprefix("sql:"))).target
    if kind == "gpgsm":
        return GpgsmStore(Path(rest) if rest else default_gnupg_home(env)).target
    raise Malformed(f"unknown install target {spec!r}: use nss:DIR, gpgsm or gpgsm:GNUPGHOME")


def store_for(target: str) -> NSSStore | GpgsmStore:
    kind, _, rest = target.partition(":")
    return NSSStore(Path(rest)) if kind == "nss" else GpgsmStore(Path(rest))


def command_for(target: str) -> str:
    kind, _, rest = target.partition(":")
    if kind == "nss":
        return f"{NSS_ENV}=... mailkms-client install --nss {rest}"
    return f"{GPGSM_ENV}=... mailkms-client install --gpgsm --gnupg-home {rest}"


def remember(store: KeyStore, targets: Sequence[str]) -> list[str]:
    """Record targets (canonical form) in the key store; returns the full list."""
    with store.locked():
        state = store.load()
        for target in targets:
            if target not in state.install_targets:
                state.install_targets.append(target)
        store.save(state)
        return list(state.install_targets)


class InstallTargets:
    """The hook `Client.sync` calls after it installed a new generation and saved the state."""

    def __init__(self, store: KeyStore, passphrase: Callable[[], bytes], secrets_: Secrets | None = None) -> None:
        self._store = store
        self._passphrase = passphrase
        self._secrets = secrets_ or Secrets(interactive=False)  # sync runs from scripts: environment only

    def after_install(self, state: ClientState) -> list[str]:
        """Install into each recorded store; a store that fails is a note, never a failed sync."""
        notes: list[str] = []
        if not state.install_targets or state.current is None:
            return notes
        bundle = bundle_of(self._store, state, self._passphrase)
        for target in state.install_targets:
            try:
                report = store_for(target).install(bundle, self._secrets)
            except Exception as exc:  # noqa: BLE001 - the keys are safe in mailkms's own store whatever happens here
                detail = exc.detail if isinstance(exc, MailkmsError) else f"{exc.__class__.__name__}: {exc}"
                notes.append(
                    f"Your mail program's key store {target} was not updated: {detail}. "
                    f"The new keys are safe in mailkms; to install them there run: {command_for(target)}"
                )
                continue
            notes.extend(report.lines())
        return notes


def interactive() -> bool:
    return sys.stdin.isatty()
