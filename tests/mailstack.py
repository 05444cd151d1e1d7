"""A real mail path for the tests: Postfix (submission with STARTTLS + SASL) delivering over LMTP
into Dovecot, which serves IMAP (implicit TLS and STARTTLS). Both are Debian's packages
(scripts/system-deps.sh), started here as root without systemd, each with its own config, ports
and folders, and stopped at the end.

Postfix authenticates submission through Dovecot's auth service (SASL over a loopback port), as
most real sites do. Mail is stored as the `mail` user (Dovecot refuses uid 0 for mail).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MAIL_UID = 8  # Debian's `mail` user: Dovecot stores mail as it
MAIL_GID = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process exited ({proc.returncode}) before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass(frozen=True)
class TLSFiles:
    """A CA of the test's own and a server certificate for `localhost` (and 127.0.0.1) it issued."""

    ca_pem: Path
    cert_pem: Path
    key_pem: Path

    @classmethod
    def make(cls, folder: Path, name: str = "localhost", ca_name: str = "mailstack test CA") -> TLSFiles:
        folder.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_subject)
            .issuer_name(ca_subject)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        import ipaddress

        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            # long enough for tests that move the clock of whole processes 19 months ahead
            .not_valid_after(now + dt.timedelta(days=3000))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        files = cls(folder / "ca.pem", folder / "server.pem", folder / "server.key")
        files.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        # servers read the chain from one file: leaf then CA
        files.cert_pem.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
        )
        files.key_pem.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        os.chmod(files.key_pem, 0o600)
        return files


@dataclass
class Dovecot:
    """Dovecot serving IMAP (993-style implicit TLS and 143-style STARTTLS), LMTP and SASL auth."""

    root: Path
    tls: TLSFiles
    users: dict[str, str] = field(default_factory=dict)  # address -> password
    imaps_port: int = field(default_factory=free_port)
    imap_port: int = field(default_factory=free_port)
    lmtp_port: int = field(default_factory=free_port)
    auth_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def mail_root(self) -> Path:
        return self.root / "mail"

    def maildir(self, address: str) -> Path:
        return self.mail_root / address / "Maildir"

    def add_user(self, address: str, password: str) -> None:
        self.users[address] = password
        self._write_passwd()

    def _write_passwd(self) -> None:
        # {PLAIN} keeps the test readable; Dovecot hashes nothing it does not have to
        lines = [f"{addr}:{{PLAIN}}{pw}::::::" for addr, pw in self.users.items()]
        path = self.root / "passwd"
        path.write_text("\n".join(lines) + "\n")
        os.chmod(path, 0o600)
        os.chown(path, _uid("dovecot"), _gid("dovecot"))  # read by the auth service, which runs as dovecot

    def _config(self) -> str:
        run = self.root / "run"
        return f"""
protocols = imap lmtp
listen = 127.0.0.1
base_dir = {run}
state_dir = {self.root / "state"}
instance_name = dovecot-{self.imap_port}
log_path = {self.root / "dovecot.log"}
info_log_path = {self.root / "dovecot.log"}
ssl = yes
ssl_cert = <{self.tls.cert_pem}
ssl_key = <{self.tls.key_pem}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login
mail_location = maildir:{self.mail_root}/%u/Maildir
mail_uid = {MAIL_UID}
mail_gid = {MAIL_GID}
first_valid_uid = {MAIL_UID}
last_valid_uid = {MAIL_UID}
first_valid_gid = {MAIL_GID}
default_internal_user = dovecot
default_login_user = dovenull
lda_mailbox_autocreate = yes
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.root / "passwd"}
}}
userdb {{
  driver = static
  args = uid={MAIL_UID} gid={MAIL_GID} home={self.mail_root}/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
}}
service auth {{
  inet_listener auth {{
    address = 127.0.0.1
    port = {self.auth_port}
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@example.org
}}
"""

    def start(self) -> None:
        assert self.proc is None
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.mail_root.mkdir(exist_ok=True)
        os.chown(self.mail_root, MAIL_UID, MAIL_GID)
        self._write_passwd()
        conf = self.root / "dovecot.conf"
        conf.write_text(self._config())
        self.proc = subprocess.Popen(
            ["dovecot", "-F", "-c", str(conf)],
            stdout=open(self.root / "dovecot.stdout", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for port in (self.imaps_port, self.imap_port, self.lmtp_port, self.auth_port):
            try:
                wait_for_port(port, proc=self.proc)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"Dovecot did not start: {exc}\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        _reap(self.proc, timeout=10)
        self.proc = None

    def log(self) -> str:
        text = ""
        for name in ("dovecot.stdout", "dovecot.log"):
            path = self.root / name
            if path.exists():
                text += path.read_text(errors="replace")
        return text


@dataclass
class Postfix:
    """Postfix as the organisation's relay: submission on a loopback port with STARTTLS required
    and SASL login through Dovecot, delivering every example.org address into Dovecot over LMTP."""

    root: Path
    tls: TLSFiles
    dovecot: Dovecot
    submission_port: int = field(default_factory=free_port)
    domains: tuple[str, ...] = ("example.org",)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    def _main_cf(self) -> str:
        return f"""
compatibility_level = 3.6
queue_directory = {self.root / "spool"}
data_directory = {self.root / "data"}
mail_owner = postfix
setgid_group = postdrop
myhostname = relay.example.org
mydomain = example.org
myorigin = example.org
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
maillog_file = {self.maillog}
maillog_file_prefixes = {self.root}
smtp_dns_support_level = disabled
lmtp_host_lookup = native
smtp_host_lookup = native
disable_dns_lookups = yes
alias_maps =
alias_database =
local_recipient_maps =
virtual_mailbox_domains = {" ".join(self.domains)}
virtual_transport = lmtp:inet:127.0.0.1:{self.dovecot.lmtp_port}
smtpd_tls_cert_file = {self.tls.cert_pem}
smtpd_tls_key_file = {self.tls.key_pem}
smtpd_tls_security_level = may
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
biff = no
# retry quickly: the tests wait for delivery, not for Postfix's default backoff
queue_run_delay = 2s
minimal_backoff_time = 2s
maximal_backoff_time = 10s
"""

    def _master_cf(self) -> str:
        submission = (
            f"127.0.0.1:{self.submission_port} inet n - n - - smtpd\n"
            "  -o syslog_name=postfix/submission\n"
            "  -o smtpd_tls_security_level=encrypt\n"
            "  -o smtpd_sasl_auth_enable=yes\n"
            "  -o smtpd_sasl_type=dovecot\n"
            f"  -o smtpd_sasl_path=inet:127.0.0.1:{self.dovecot.auth_port}\n"
            "  -o smtpd_tls_auth_only=yes\n"
            "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject\n"
        )
        services = [
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "lmtp unix - - n - - lmtp",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        return submission + "\n".join(services) + "\n"

    def start(self) -> None:
        assert self.proc is None
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.config_dir.mkdir(exist_ok=True)
        (self.config_dir / "main.cf").write_text(self._main_cf())
        (self.config_dir / "master.cf").write_text(self._master_cf())
        for folder in ("spool", "data"):
            (self.root / folder).mkdir(exist_ok=True)
        os.chown(self.root / "data", _uid("postfix"), _gid("postfix"))
        conf = ["-c", str(self.config_dir)]
        prepared = subprocess.run(["postfix", *conf, "set-permissions"], capture_output=True, text=True)
        if prepared.returncode != 0:
            raise RuntimeError(f"postfix set-permissions: {prepared.stderr}{prepared.stdout}")
        checked = subprocess.run(["postfix", *conf, "check"], capture_output=True, text=True)
        if checked.returncode != 0:
            raise RuntimeError(f"postfix check: {checked.stderr}")
        self.proc = subprocess.Popen(
            ["postfix", *conf, "start-fg"],
            stdout=open(self.root / "postfix.stdout", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_port(self.submission_port, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"Postfix did not start: {exc}\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc is None:
            return
        subprocess.run(["postfix", "-c", str(self.config_dir), "stop"], capture_output=True, timeout=30)
        _reap(self.proc, timeout=15)
        self.proc = None

    def log(self) -> str:
        text = ""
        for path in (self.root / "postfix.stdout", self.maillog):
            if path.exists():
                text += path.read_text(errors="replace")
        return text

    def accepted(self, message_id: str | None = None) -> list[str]:
        """Postfix queue ids of the messages the relay accepted (cleanup's message-id= lines):
        counted at the relay, so a message sent twice shows twice whatever the mailbox does."""
        return [queue_id for queue_id, mid in self._cleanup_lines() if message_id is None or mid == message_id]

    def accepted_message_ids(self) -> list[str]:
        """The Message-ID of every message the relay accepted, once per acceptance."""
        return [mid for _queue_id, mid in self._cleanup_lines()]

    def _cleanup_lines(self) -> list[tuple[str, str]]:
        if not self.maillog.exists():
            return []
        found = []
        for line in self.maillog.read_text(errors="replace").splitlines():
            match = re.search(r"postfix/cleanup\[\d+\]: ([0-9A-F]+): message-id=(<[^>]*>)", line)
            if match:
                found.append((match.group(1), match.group(2)))
        return found

    def delivered(self) -> int:
        """Deliveries into Dovecot that LMTP confirmed."""
        if not self.maillog.exists():
            return 0
        return sum(
            1
            for line in self.maillog.read_text(errors="replace").splitlines()
            if "postfix/lmtp[" in line and "status=sent" in line
        )


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for a daemon asked to stop; past `timeout`, kill its whole process group."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    import grp

    return grp.getgrnam(name).gr_gid


def mail_tools_missing() -> list[str]:
    return [tool for tool in ("dovecot", "postfix") if shutil.which(tool) is None]


@contextlib.contextmanager
def mail_stack(log_dir: Path, users: dict[str, str]) -> Iterator[tuple[Postfix, Dovecot, TLSFiles]]:
    """Postfix -> LMTP -> Dovecot -> IMAP, with the given mail users, stopped on exit.

    The daemons drop to their own users (postfix, mail, dovenull), which cannot enter pytest's
    0700 temporary folders: the stack lives in a folder of its own under /tmp, removed at the
    end; its logs are copied into `log_dir` first."""
    base = Path(tempfile.mkdtemp(prefix="mailkms-mailstack-"))
    os.chmod(base, 0o711)
    tls = TLSFiles.make(base / "tls")
    os.chmod(base / "tls", 0o755)
    dovecot = Dovecot(base / "dovecot", tls, dict(users))
    postfix = Postfix(base / "postfix", tls, dovecot)
    try:
        dovecot.start()
        postfix.start()
        yield postfix, dovecot, tls
    finally:
        postfix.stop()
        dovecot.stop()
        log_dir.mkdir(parents=True, exist_ok=True)
        for log in (postfix.maillog, dovecot.root / "dovecot.log", postfix.root / "postfix.stdout"):
            if log.exists():
                shutil.copy(log, log_dir / f"{log.parent.name}-{log.name}")
        shutil.rmtree(base, ignore_errors=True)
