"""Configuration: one TOML file in the data folder, every key overridable by environment.

`MAILKMS_DATA/mailkms.toml`, sections as below; an environment variable
`MAILKMS_<SECTION>__<KEY>` overrides a key (e.g. `MAILKMS_POLICY__LIFETIME_MONTHS=12`).
`MAILKMS_DATABASE_URL` and `MAILKMS_CA_PASSPHRASE` are read as they are. The CA passphrase may
also come from a file descriptor (`--passphrase-fd N` / `MAILKMS_CA_PASSPHRASE_FD`) or a systemd
credential (`$CREDENTIALS_DIRECTORY/mailkms-ca-passphrase`); see `external_ca_passphrase`.
Loaded at entry points only, validated once, frozen, and passed down.
"""

from __future__ import annotations

import contextvars
import os
import ssl
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from mailkms.errors import ConfigError, MailkmsError
from mailkms.pki import MAX_SUBSCRIBER_DAYS, KeyType
from mailkms.pki._pkcs11 import parse_key_store_uri

CONFIG_FILE = "mailkms.toml"
CA_PASSPHRASE_FD_ENV = "MAILKMS_CA_PASSPHRASE_FD"
CA_CREDENTIAL = "mailkms-ca-passphrase"  # the systemd credential's name (LoadCredential=, SetCredentialEncrypted=)
_toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("_toml_path", default=None)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GroupPolicy(_Frozen):
    lifetime_months: int | None = Field(default=None, ge=1)
    reminder_months: int | None = Field(default=None, ge=1)


class PolicyConfig(_Frozen):
    lifetime_months: int = Field(default=18, ge=1, description="certificate lifetime, calendar months")
    reminder_months: int = Field(default=12, ge=1, description="months after issue when the client asks")
    token_ttl_days: int = Field(default=7, ge=1, le=90)
    signing_key_types: tuple[KeyType, ...] = (KeyType.RSA2048, KeyType.RSA3072, KeyType.P256, KeyType.P384)
    encryption_key_type: KeyType = KeyType.RSA2048
    nonce_ttl_seconds: int = Field(default=600, ge=10)
    groups: dict[str, GroupPolicy] = Field(default_factory=dict)

    @field_validator("encryption_key_type")
    @classmethod
    def _rsa_encryption(cls, value: KeyType) -> KeyType:
        if not value.is_rsa:
            raise ValueError("encryption keys must be RSA (S/MIME key transport that every mail program reads)")
        return value

    @model_validator(mode="after")
    def _reminder_before_expiry(self) -> PolicyConfig:
        _check_lifetime(self.lifetime_months, self.reminder_months, "policy")
        for name, group in self.groups.items():
            lifetime = group.lifetime_months or self.lifetime_months
            reminder = group.reminder_months or self.reminder_months
            _check_lifetime(lifetime, reminder, f"policy.groups.{name}")
        return self

    def for_group(self, group: str | None) -> tuple[int, int]:
        """(lifetime_months, reminder_months) that apply to a user group."""
        g = self.groups.get(group or "")
        if g is None:
            return self.lifetime_months, self.reminder_months
        return g.lifetime_months or self.lifetime_months, g.reminder_months or self.reminder_months


def _check_lifetime(lifetime: int, reminder: int, where: str) -> None:
    if lifetime * 31 > MAX_SUBSCRIBER_DAYS + 31:
        raise ValueError(
            f"{where}: lifetime_months={lifetime} is longer than the S/MIME BR allow "
            f"(at most {MAX_SUBSCRIBER_DAYS} days, about 27 months)"
        )
    if reminder >= lifetime:
        raise ValueError(f"{where}: reminder_months ({reminder}) must be less than lifetime_months ({lifetime})")


class ServerConfig(_Frozen):
    hostname: str = "localhost"
    public_url: str = ""  # default http://<hostname>/
    bind: str = "127.0.0.1"
    https_port: int = Field(default=8443, ge=1, le=65535)
    http_port: int = Field(default=8080, ge=0, le=65535, description="plain http for CRL/OCSP/CA; 0 = off")
    mail_from: str = ""  # default mailkms@<host of public_url>
    extra_tls_names: tuple[str, ...] = ()
    log_format: Literal["json", "text"] = "json"  # `mailkms serve` logs: one JSON object a line, or text
    metrics_on_http: bool = False  # also answer /metrics on the plain-http port (unless [metrics] listen is set)

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value:
            parts = urlsplit(value)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError("public_url must be an http:// URL with a host name (S/MIME BR: CDP and AIA are http)")
            if not value.endswith("/"):
                value += "/"
        return value

    @field_validator("mail_from")
    @classmethod
    def _ascii_mailbox(cls, value: str) -> str:
        # The mail signer's certificate names this mailbox in an rfc822Name (IA5String, RFC 5280),
        # and the delivery mail's headers are 7-bit: an internationalized address (SMTPUTF8) fits
        # neither, so it is refused here rather than failing at the first delivery.
        if value and (not value.isascii() or value.count("@") != 1 or any(c.isspace() or c in '<>"' for c in value)):
            raise ValueError(
                "mail_from must be a bare ASCII mailbox such as mailkms@example.org (an internationalized "
                "domain in its xn-- form; no display name, no non-ASCII local part)"
            )
        return value

    @property
    def effective_public_url(self) -> str:
        return self.public_url or f"http://{self.hostname}/"

    @property
    def effective_mail_from(self) -> str:
        host = urlsplit(self.effective_public_url).hostname or self.hostname
        return self.mail_from or f"mailkms@{host}"


class CAConfig(_Frozen):
    key_type: KeyType = KeyType.RSA3072
    organization: str = "mailkms"
    country: str | None = None
    # Production: the CA passphrase must come from a file descriptor, a systemd credential or the
    # environment, never from DATA/ca/passphrase; `init` writes no bootstrap passphrase file.
    production: bool = False
    # CRL partitions (README, Revocation): each new certificate's CDP names the partition it was
    # issued into, at most this many certificates each, so no CRL ever lists more. 0: one CRL.
    crl_partition_size: int = Field(default=0, ge=0, le=10_000_000)
    # CA keys in a PKCS#11 token (README, Keys in an HSM): an RFC 7512 URI with module-path and
    # pin-source=file:..., never the PIN. Empty: the keys are encrypted files under DATA/.
    key_store: str = ""
    # A running `mailkms serve` looks this often whether `mailkms ca import` changed the CA files
    # (issuing or infrastructure CA certificate, root CRL) and takes them without a restart; SIGHUP: at once.
    reload_check_seconds: float = Field(default=5.0, gt=0, le=86400)

    @field_validator("key_store")
    @classmethod
    def _key_store(cls, value: str) -> str:
        if value:
            try:
                parse_key_store_uri(value)
            except MailkmsError as exc:
                raise ValueError(exc.detail) from None
        return value

    @field_validator("key_type")
    @classmethod
    def _ca_keys(cls, value: KeyType) -> KeyType:
        if value not in (KeyType.RSA3072, KeyType.RSA4096, KeyType.P256, KeyType.P384):
            raise ValueError("CA keys are rsa3072 (default), rsa4096, p256 or p384")
        return value

    @field_validator("country")
    @classmethod
    def _country(cls, value: str | None) -> str | None:
        if value is not None and (len(value) != 2 or not value.isalpha() or not value.isupper()):
            raise ValueError("country is a two-letter ISO 3166 code in capitals, e.g. DE")
        return value


class SMTPConfig(_Frozen):
    """How mail leaves: the embedded sink (tests, `make serve`) or the organisation's relay.

    With a relay, TLS is on and verified by default: STARTTLS on the submission port (587), or
    `implicit_tls` (port 465). `verify` checks the relay's certificate against `ca_file` (or the
    system store) AND its name against `relay_host`. The password comes from `password`
    (`MAILKMS_SMTP__PASSWORD`) or `password_file` (read at start, mode 0600 or stricter).
    """

    mode: Literal["sink", "relay"] = "sink"
    sink_port: int = Field(default=2525, ge=1, le=65535)
    relay_host: str = ""
    relay_port: int = Field(default=587, ge=1, le=65535)
    starttls: bool = True
    implicit_tls: bool = False  # TLS from the first byte (SMTPS, port 465); starttls is then not used
    ca_file: Path | None = None  # PEM bundle the relay's certificate must chain to; default: system store
    verify: bool = True  # certificate and host name; false only for tests, with a loud warning at start
    helo_name: str = ""  # the name said in EHLO; default this machine's FQDN
    username: str = ""
    password: str = Field(default="", repr=False)
    password_file: Path | None = None  # a file holding the password (mode 0600); not with `password`
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    timeout_seconds: float = Field(default=10.0, gt=0)
    _password_from_file: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _relay_settings(self) -> SMTPConfig:
        if self.mode == "relay" and not self.relay_host:
            raise ValueError("smtp.mode = 'relay' needs smtp.relay_host")
        if self.password and self.password_file is not None:
            raise ValueError("smtp.password and smtp.password_file exclude each other: choose one")
        if self.mode == "relay" and self.username and not (self.starttls or self.implicit_tls):
            raise ValueError(
                "smtp.username is set but neither smtp.starttls nor smtp.implicit_tls: "
                "the password would cross the network in clear"
            )
        if self.ca_file is not None:
            _check_ca_file(self.ca_file)
        if self.password_file is not None:
            self._password_from_file = _read_password_file(self.password_file)
        return self

    @property
    def effective_password(self) -> str:
        """`password`, or what `password_file` held when the settings were loaded."""
        return self.password or self._password_from_file

    @property
    def uses_tls(self) -> bool:
        return self.implicit_tls or self.starttls


def _check_ca_file(path: Path) -> None:
    try:
        ssl.create_default_context(cafile=str(path))
    except FileNotFoundError:
        raise ValueError(f"smtp.ca_file: {path} does not exist") from None
    except PermissionError:
        raise ValueError(f"smtp.ca_file: {path} cannot be read (permission denied)") from None
    except IsADirectoryError:
        raise ValueError(f"smtp.ca_file: {path} is a folder; name a PEM file of CA certificates") from None
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"smtp.ca_file: {path} holds no PEM CA certificate ({exc})") from None


def _read_password_file(path: Path) -> str:
    """The first line of the file; refused unless only its owner may read it (0600 or 0400)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ValueError(f"smtp.password_file: {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"smtp.password_file: {path} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"smtp.password_file: {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ValueError(
            f"smtp.password_file: {path} has mode {stat.S_IMODE(st.st_mode):04o}; others may read it: chmod 600 {path}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"smtp.password_file: {path} cannot be read ({exc.__class__.__name__})") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ValueError(f"smtp.password_file: {path} is empty")
    return password


class OutboxConfig(_Frozen):
    """The outbox worker: rows are leased through the database, so several nodes share the work."""

    lease_seconds: float = Field(default=120.0, gt=0, description="a claimed row returns to the queue after this")
    batch_size: int = Field(default=50, ge=1, le=1000)
    poll_seconds: float = Field(default=0.5, gt=0)


class RemindersConfig(_Frozen):
    """Reminder mails from the server (besides the client's log-on question)."""

    enabled: bool = True
    final_notice_days: int = Field(default=30, ge=0, description="last notice this many days before expiry; 0 = off")
    sweep_interval_seconds: float = Field(default=3600.0, gt=0)
    admins: tuple[str, ...] = ()  # addresses that get the daily summary of who is due, renewed, expired
    batch_size: int = Field(default=500, ge=1)


class PoolConfig(_Frozen):
    """Pre-generated encryption keys, so bursts of enrolment or renewal do not wait on RSA key generation."""

    size: int = Field(default=32, ge=0, description="keys kept ready; 0 = off (generate inline)")
    refill_batch: int = Field(default=8, ge=1)
    refill_seconds: float = Field(default=2.0, gt=0)
    refill_processes: int = Field(
        default=2, ge=1, le=64, description="low-priority processes that make pool keys (one per core)"
    )


class IssuanceConfig(_Frozen):
    """Group commit and signer processes (`[issuance]`): certificates are signed by worker processes
    that hold the issuing CA key (loaded once each), and stored by one writer per process that commits
    the requests waiting at that moment in one transaction (each certificate still its own audit
    record). Nobody is answered before the transaction holding their certificate has committed."""

    batch_size: int = Field(default=256, ge=1, le=10000, description="units of work per transaction at most")
    max_wait_ms: float = Field(
        default=0.0, ge=0, le=1000, description="how long the writer lingers for more work once one arrived"
    )
    signer_processes: int = Field(default=2, ge=0, le=64, description="worker processes that sign; 0 = in process")
    signer_chunk: int = Field(default=32, ge=1, le=1024, description="certificates sent to a signer process at once")


def _host_port(value: str, key: str) -> str:
    if value:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f'{key} must be "host:port", e.g. "127.0.0.1:9464"')
    return value


def _address(value: str) -> tuple[str, int] | None:
    if not value:
        return None
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class RevocationConfig(_Frozen):
    """CRL and OCSP timing (BR 4.9.7, 4.9.10): published well inside their limits."""

    crl_validity_days: int = Field(default=7, ge=1, le=10, description="nextUpdate - thisUpdate of the CRL")
    crl_refresh_hours: float = Field(default=24.0, gt=0, description="a new CRL at least this often")
    root_crl_validity_days: int = Field(default=90, ge=2, le=365, description="the root's CRL (ARL)")
    root_crl_warn_days: int = Field(
        default=30,
        ge=1,
        le=364,
        description="offline root: warn (log, /metrics, doctor) this long before its CRL's nextUpdate",
    )
    ocsp_validity_hours: int = Field(default=168, ge=8, le=239, description="nextUpdate - thisUpdate of OCSP answers")
    ocsp_refresh_hours: float = Field(default=24.0, gt=0, le=96, description="re-sign a cached answer this often")
    ocsp_cache_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=64 * 1024,
        description="signed OCSP answers kept in memory per process, bytes (LRU)",
    )
    ocsp_cache_size: int = Field(default=200_000, ge=100, description="and at most this many answers")
    ocsp_sign_threads: int = Field(default=2, ge=1, le=32, description="threads that look up and sign OCSP answers")
    crl_workers: int = Field(
        default=1, ge=0, le=8, description="processes that build CRLs for `serve` (0: in the server's own threads)"
    )
    ocsp_sign_queue: int = Field(
        default=64, ge=0, description="requests waiting for a signing thread; beyond that OCSP answers tryLater"
    )
    poll_seconds: float = Field(default=2.0, gt=0, description="how often a node looks for new revocations")
    ocsp_listen: str = Field(
        default="", description='"host:port" of an OCSP-only listener served by ocsp_processes processes ("": none)'
    )
    ocsp_processes: int = Field(default=2, ge=1, le=64, description="processes of the OCSP-only listener")

    @field_validator("ocsp_listen")
    @classmethod
    def _ocsp_host_port(cls, value: str) -> str:
        return _host_port(value, "ocsp_listen")

    @property
    def ocsp_address(self) -> tuple[str, int] | None:
        return _address(self.ocsp_listen)

    @model_validator(mode="after")
    def _refresh_inside_validity(self) -> RevocationConfig:
        if self.crl_refresh_hours >= self.crl_validity_days * 24:
            raise ValueError("crl_refresh_hours must be shorter than crl_validity_days")
        if self.ocsp_refresh_hours > self.ocsp_validity_hours - 8:
            raise ValueError("ocsp_refresh_hours must end at least 8 hours before an answer expires (BR 4.9.10)")
        return self


class MetricsConfig(_Frozen):
    """Who may read /metrics: by default anyone who reaches the HTTPS port (README, Metrics)."""

    listen: str = Field(
        default="", description='"host:port": serve /metrics only there (plain http), not on the API ports'
    )
    token: str = Field(default="", repr=False, description="require Authorization: Bearer <token>")
    token_file: str = Field(default="", description="read the token from the first line of this file")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        return _host_port(value, "listen")

    @property
    def listen_address(self) -> tuple[str, int] | None:
        return _address(self.listen)

    def bearer_token(self) -> str:
        """The configured token ("" = none); token_file wins over token."""
        if self.token_file:
            try:
                lines = Path(self.token_file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError(f"{self.token_file}: cannot be read: {exc.strerror}") from None
            token = lines[0].strip() if lines else ""
            if not token:
                raise ConfigError(f"{self.token_file}: the metrics token file is empty")
            return token
        return self.token


class AuditConfig(_Frozen):
    """Signed checkpoints of the audit chain's head, kept outside the database."""

    checkpoints_file: str = Field(default="", description="default DATA/audit/checkpoints.jsonl")
    checkpoint_seconds: float = Field(default=3600.0, gt=0, le=3600.0, description="at least hourly")


class CMPConfig(_Frozen):
    """CMP (RFC 9483) at /.well-known/cmp. Tokens made while it is on are also kept sealed under
    the key pool's wrapping key, since CMP's MAC is computed from the token itself."""

    enabled: bool = True
    transaction_seconds: float = Field(
        default=600.0, ge=30, le=86400, description="an ir/cr/kur waits this long for its certConf"
    )


class ACMEConfig(_Frozen):
    """ACME (RFC 8555) at /acme/ with RFC 8823's `email` identifier and `email-reply-00` challenge.

    The challenge mail goes out through the outbox from `challenge_from`; the reply comes back to
    that address. With the embedded sink the sink files it under DATA/mailboxes/<challenge_from>;
    with a relay, point `reply_maildir` at the Maildir the organisation's MTA delivers that address
    into. Replies are trusted as the relay delivered them (From, In-Reply-To, Subject and the
    response are checked), and with `require_dkim` must also carry a valid DKIM signature of the
    From domain (dkimpy, keys from DNS)."""

    enabled: bool = False
    allowed_domains: tuple[str, ...] = ()  # mailbox domains that may enrol this way; empty: none
    # true: a signing certificate only (encryption keys stay server-made and archived); false: a CSR
    # asking for keyEncipherment (RSA) / keyAgreement (EC) only gets an encryption certificate for
    # the client's own key, which the server never holds and so never archives
    signing_only: bool = True
    challenge_from: str = ""  # default acme-challenge@<host of public_url>
    reply_maildir: Path | None = None  # default DATA/mailboxes/<challenge_from> (the embedded sink)
    require_dkim: bool = False  # a reply must carry a valid DKIM signature of its From domain (looked up in DNS)
    order_ttl_seconds: int = Field(
        default=7 * 86400, ge=300, description="an order and its authorization live this long"
    )
    pending_orders_per_account: int = Field(default=20, ge=1, description="open orders one account may hold")

    @field_validator("allowed_domains")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(d.strip().lower().lstrip("@") for d in value if d.strip())


class LimitsConfig(_Frozen):
    """What one client, one request and one connection may cost the server (`[limits]`).

    Rate limits are token buckets kept in memory per process, keyed by client IP address and
    endpoint group (token: enrolment and EST simpleenroll/serverkeygen; signed: renewals, resync,
    status, EST simplereenroll; est: the other EST operations). With several nodes each
    counts on its own. Behind a reverse proxy, list it in `trusted_proxies` so that the client's
    address comes from X-Forwarded-For; otherwise every client shares the proxy's bucket.
    """

    max_body_bytes: int = Field(default=64 * 1024, ge=1024, description="largest request body; 413 past it")
    body_timeout_seconds: float = Field(default=30.0, gt=0, description="a body must arrive whole within this; 408")
    max_concurrency: int = Field(default=256, ge=1, description="connections + tasks per listener; 503 past it")
    keep_alive_seconds: float = Field(default=5.0, gt=0, description="idle keep-alive connections close after this")
    max_header_bytes: int = Field(default=16 * 1024, ge=4096, description="request head size (h11 parser)")
    rate_per_minute: float = Field(default=120.0, ge=0, description="requests per client IP and group; 0 = no limit")
    rate_burst: int = Field(default=60, ge=1, description="requests a client may make at once before the rate applies")
    rate_clients: int = Field(default=65536, ge=16, description="client buckets kept per process (oldest dropped)")
    trusted_proxies: tuple[str, ...] = ()  # addresses whose X-Forwarded-For is believed
    refusal_flush_seconds: float = Field(
        default=300.0, gt=0, description="anonymous refusals reach the audit chain as one count per period"
    )


class AdminConfig(_Frozen):
    """The web console and the admin API (`[admin]`): sessions, log-in lock-out, paging."""

    session_minutes: int = Field(default=15, ge=1, le=720, description="a console session ends this long after log-in")
    max_failed_logins: int = Field(default=5, ge=1, description="failed log-ins in a row before the account locks")
    lockout_minutes: int = Field(default=15, ge=1, description="how long a locked account stays locked")
    page_size: int = Field(default=50, ge=1, le=500, description="users per page in the console and the API")
    webauthn_rp_id: str = Field(default="", description="the passkeys' relying-party ID (default: server.hostname)")
    bulk_revoke_approval_threshold: int = Field(
        default=10,
        ge=1,
        description="revoking more users than this at once (admin API, console) waits for approvals",
    )
    bulk_revoke_approvals: int = Field(
        default=1, ge=1, le=20, description="approvals a bulk revoke needs, from administrators other than its starter"
    )


class Settings(BaseSettings):
    """Everything a server process needs to know; frozen after validation."""

    model_config = SettingsConfigDict(env_prefix="MAILKMS_", env_nested_delimiter="__", frozen=True, extra="forbid")

    data_dir: Path = Path("./mailkms-data")
    database_url: str = ""  # default sqlite in the data folder
    ca_passphrase: str = Field(default="", repr=False)
    server: ServerConfig = ServerConfig()
    policy: PolicyConfig = PolicyConfig()
    ca: CAConfig = CAConfig()
    smtp: SMTPConfig = SMTPConfig()
    outbox: OutboxConfig = OutboxConfig()
    reminders: RemindersConfig = RemindersConfig()
    pool: PoolConfig = PoolConfig()
    issuance: IssuanceConfig = IssuanceConfig()
    revocation: RevocationConfig = RevocationConfig()
    audit: AuditConfig = AuditConfig()
    metrics: MetricsConfig = MetricsConfig()
    limits: LimitsConfig = LimitsConfig()
    admin: AdminConfig = AdminConfig()
    cmp: CMPConfig = CMPConfig()
    acme: ACMEConfig = ACMEConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments (command-line options) > environment > the TOML file.
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_toml_path.get())
        return (init_settings, env_settings, toml)

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'mailkms.db').resolve()}"

    @property
    def acme_challenge_from(self) -> str:
        host = urlsplit(self.server.effective_public_url).hostname or self.server.hostname
        return self.acme.challenge_from or f"acme-challenge@{host}"

    @property
    def acme_reply_maildir(self) -> Path:
        return self.acme.reply_maildir or self.data_dir / "mailboxes" / self.acme_challenge_from.lower()

    @property
    def checkpoints_path(self) -> Path:
        return (
            Path(self.audit.checkpoints_file)
            if self.audit.checkpoints_file
            else self.data_dir / "audit" / "checkpoints.jsonl"
        )


def data_dir_from_env() -> Path:
    return Path(os.environ.get("MAILKMS_DATA", "./mailkms-data"))


_fd_passphrases: dict[tuple[int, int, int], str] = {}


def read_passphrase_fd(fd: int) -> str:
    """The whole of file descriptor `fd` (a pipe or a file), read once per process (it is left
    open, so its number is not reused for something else); one trailing newline is dropped."""
    try:
        stat = os.fstat(fd)
    except OSError as exc:
        raise ConfigError(f"cannot read the CA passphrase from file descriptor {fd}: {exc.strerror}") from None
    identity = (fd, stat.st_dev, stat.st_ino)
    if identity in _fd_passphrases:
        return _fd_passphrases[identity]
    chunks: list[bytes] = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read the CA passphrase from file descriptor {fd}: {exc.strerror}") from None
    try:
        value = b"".join(chunks).decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise ConfigError(f"the CA passphrase on file descriptor {fd} is not UTF-8") from None
    if not value:
        raise ConfigError(f"file descriptor {fd} gave an empty CA passphrase")
    _fd_passphrases[identity] = value
    return value


def external_ca_passphrase(passphrase_fd: int | None = None) -> tuple[str, str] | None:
    """(passphrase, source) from, in this order: `passphrase_fd` or MAILKMS_CA_PASSPHRASE_FD, the
    systemd credential `mailkms-ca-passphrase` in $CREDENTIALS_DIRECTORY; None when neither is
    given (then MAILKMS_CA_PASSPHRASE, then DATA/ca/passphrase outside production)."""
    if passphrase_fd is None and os.environ.get(CA_PASSPHRASE_FD_ENV):
        text = os.environ[CA_PASSPHRASE_FD_ENV].strip()
        if not text.isdigit():
            raise ConfigError(f"{CA_PASSPHRASE_FD_ENV} must be a file descriptor number, not {text!r}")
        passphrase_fd = int(text)
    if passphrase_fd is not None:
        return read_passphrase_fd(passphrase_fd), f"file descriptor {passphrase_fd}"
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        path = Path(directory) / CA_CREDENTIAL
        if path.is_file():
            try:
                value = path.read_bytes().decode("utf-8").removesuffix("\n").removesuffix("\r")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"the systemd credential {path} cannot be read: {exc}") from None
            if not value:
                raise ConfigError(f"the systemd credential {path} is empty")
            return value, "systemd credential"
    return None


def load_settings(data_dir: Path | None = None, *, passphrase_fd: int | None = None, **overrides: Any) -> Settings:
    """Command-line overrides, then environment, then the TOML file; a ConfigError names each mistake."""
    data_dir = data_dir or data_dir_from_env()
    if "ca_passphrase" not in overrides:
        external = external_ca_passphrase(passphrase_fd)
        if external is not None:
            overrides["ca_passphrase"] = external[0]
    path = data_dir / CONFIG_FILE
    if path.exists():
        try:
            tomllib.loads(path.read_bytes().decode("utf-8"))  # TOML is UTF-8 whatever the locale says
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    token = _toml_path.set(path if path.exists() else None)
    try:
        return Settings(data_dir=data_dir, **overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top)"
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError(
            f"the configuration is not valid ({path}, MAILKMS_* variables):\n" + "\n".join(lines)
        ) from None
    finally:
        _toml_path.reset(token)


CONFIG_TEMPLATE = """\
# mailkms configuration. Every key can be overridden by an environment variable
# MAILKMS_<SECTION>__<KEY>, e.g. MAILKMS_POLICY__LIFETIME_MONTHS=12.

[server]
hostname = "{hostname}"            # the name in the server's TLS certificate
public_url = "{public_url}"        # http base of CRL/OCSP/CA links written into certificates
bind = "127.0.0.1"
https_port = 8443                   # the HTTPS API (mailkms serve --port)
http_port = 8080                    # plain http for CRL, OCSP, CA certificates; 0 = off
mail_from = ""                      # default mailkms@<host of public_url>; a bare ASCII mailbox

[policy]
lifetime_months = 18                # calendar months; capped at 824 days (S/MIME BR)
reminder_months = 12                # months after issue when the client asks at log-on
token_ttl_days = 7
signing_key_types = ["rsa2048", "rsa3072", "p256", "p384"]
encryption_key_type = "rsa2048"
nonce_ttl_seconds = 600
# [policy.groups.contractors]
# lifetime_months = 6
# reminder_months = 4

[ca]
key_type = "rsa3072"                # rsa3072, rsa4096, p256, p384
organization = "mailkms"
# country = "DE"
production = false                  # true: the CA passphrase never from DATA/ca/passphrase (README, Security)
crl_partition_size = 0              # e.g. 100000: new certificates go into CRL partitions of at most this many (README, Revocation)
reload_check_seconds = 5            # a running server takes what `mailkms ca import` wrote within this (SIGHUP: at once)

[audit]
checkpoints_file = ""               # signed checkpoints of the audit chain; default DATA/audit/checkpoints.jsonl
checkpoint_seconds = 3600           # at least hourly, and at every stop of `mailkms serve`

[smtp]
mode = "sink"                       # "sink": local Maildir sink; "relay": send to relay_host
sink_port = 2525
relay_host = ""                     # the organisation's submission relay, e.g. "smtp.example.org"
relay_port = 587                    # 587 with STARTTLS; 465 with implicit_tls
starttls = true                     # STARTTLS, required: a relay that does not offer it is not used
implicit_tls = false                # TLS from the first byte (port 465); starttls is then not used
# ca_file = "/etc/mailkms/relay-ca.pem"   # PEM CA bundle for the relay's certificate; default: system store
verify = true                       # check the relay's certificate and its name (relay_host); false only to test
helo_name = ""                      # the name said in EHLO; default this machine's FQDN
username = ""
password = ""                       # better MAILKMS_SMTP__PASSWORD or password_file
# password_file = "/etc/mailkms/smtp-password"   # first line; mode 0600, read at start
retry_base_seconds = 2              # first retry after this, doubling per attempt ...
retry_max_seconds = 300             # ... up to this
timeout_seconds = 10

[outbox]
lease_seconds = 120                 # a row claimed by a node that died returns to the queue after this
batch_size = 50
poll_seconds = 0.5

[reminders]
enabled = true                      # mail users at the reminder point and before expiry
final_notice_days = 30              # the last notice, this many days before expiry (0 = off)
sweep_interval_seconds = 3600
admins = []                         # e.g. ["pki-admins@example.org"]: daily summary of due, renewed, expired

[pool]
size = 32                           # pre-generated encryption keys (0 = off, generate inline)
refill_batch = 8
refill_processes = 2                # low-priority key-making processes (nice 10), one per core

[issuance]
batch_size = 256                    # group commit: certificates stored in one transaction at most
max_wait_ms = 0                     # the writer lingers this long for more work (0: batches form under load)
signer_processes = 2                # processes that hold the issuing CA key and sign (0 = in the server process)
signer_chunk = 32                   # certificates handed to a signer process at once

[revocation]
crl_validity_days = 7               # nextUpdate of the CRL (BR limit 10)
crl_refresh_hours = 24              # a fresh CRL at least this often, and at every revocation
ocsp_validity_hours = 168           # OCSP answers valid 7 days (BR: 8 hours to 10 days)
ocsp_refresh_hours = 24             # cached OCSP answers are re-signed after this
ocsp_cache_bytes = 67108864         # signed answers kept in memory (64 MiB, LRU); never-issued serials take none
ocsp_sign_threads = 2               # OCSP look-ups and signatures run on their own threads ...
ocsp_sign_queue = 64                # ... with this many waiting at most; more get tryLater at once
crl_workers = 1                     # processes that build the CRLs for `serve` (0 = in its own threads)
ocsp_listen = ""                    # e.g. "0.0.0.0:8081": an OCSP-only listener (README, Scale and operations) ...
ocsp_processes = 2                  # ... served by this many processes on that one port (SO_REUSEPORT)

[metrics]
listen = ""                         # e.g. "127.0.0.1:9464": /metrics only there, not on the API ports
token = ""                          # require "Authorization: Bearer <token>" (better MAILKMS_METRICS__TOKEN or token_file)
# token_file = "/etc/mailkms/metrics-token"

[cmp]
enabled = true                      # CMP at /.well-known/cmp; tokens are then also sealed for its MAC
transaction_seconds = 600           # an ir/cr/kur waits this long for its certConf

[acme]
enabled = false                     # ACME (RFC 8555 + RFC 8823 email-reply-00) at /acme/ (README, ACME for S/MIME)
allowed_domains = []                # mailbox domains that may get a signing certificate this way
signing_only = true                 # false: a CSR asking for keyEncipherment/keyAgreement only gets an encryption certificate (client's key, not archived)
challenge_from = ""                 # default acme-challenge@<host of public_url>; replies go to it
# reply_maildir = "/var/vmail/example.org/acme-challenge/Maildir"  # default DATA/mailboxes/<challenge_from> (the sink)
require_dkim = false                # replies must carry a valid DKIM signature of the From domain (keys from DNS)
order_ttl_seconds = 604800          # an order and its authorization live this long
pending_orders_per_account = 20

[limits]
max_body_bytes = 65536              # larger request bodies get 413 before they are read
body_timeout_seconds = 30           # a body must arrive whole within this (408)
max_concurrency = 256               # open connections per listener; 503 beyond
keep_alive_seconds = 5
rate_per_minute = 120               # per client IP and endpoint group (token, signed, est); 0 = off
rate_burst = 60
trusted_proxies = []                # reverse proxies whose X-Forwarded-For names the client
refusal_flush_seconds = 300         # anonymous refusals are audited as one count per code and period

[admin]                             # the web console (/admin/) and the admin API (/api/v1/admin)
session_minutes = 15                # a console session ends this long after log-in
max_failed_logins = 5               # failed log-ins in a row before the account locks
lockout_minutes = 15
page_size = 50                      # users per page
webauthn_rp_id = ""                 # passkeys' relying-party ID; empty = server.hostname
"""
