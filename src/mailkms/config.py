"""Configuration: one TOML file in the data folder, every key overridable by environment.

`MAILKMS_DATA/mailkms.toml`, sections as below; an environment variable
`MAILKMS_<SECTION>__<KEY>` overrides a key (e.g. `MAILKMS_POLICY__LIFETIME_MONTHS=12`).
`MAILKMS_DATABASE_URL` and `MAILKMS_CA_PASSPHRASE` are read as they are.
Loaded at entry points only, validated once, frozen, and passed down.
"""

from __future__ import annotations

import contextvars
import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from mailkms.errors import ConfigError
from mailkms.pki import MAX_SUBSCRIBER_DAYS, KeyType

CONFIG_FILE = "mailkms.toml"
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
    metrics_on_http: bool = False  # also answer /metrics on the plain-http port (it is always on https)

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
    mode: Literal["sink", "relay"] = "sink"
    sink_port: int = Field(default=2525, ge=1, le=65535)
    relay_host: str = ""
    relay_port: int = Field(default=587, ge=1, le=65535)
    starttls: bool = True
    username: str = ""
    password: str = ""
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    timeout_seconds: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _relay_needs_host(self) -> SMTPConfig:
        if self.mode == "relay" and not self.relay_host:
            raise ValueError("smtp.mode = 'relay' needs smtp.relay_host")
        return self


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


class RevocationConfig(_Frozen):
    """CRL and OCSP timing (BR 4.9.7, 4.9.10): published well inside their limits."""

    crl_validity_days: int = Field(default=7, ge=1, le=10, description="nextUpdate - thisUpdate of the CRL")
    crl_refresh_hours: float = Field(default=24.0, gt=0, description="a new CRL at least this often")
    root_crl_validity_days: int = Field(default=90, ge=2, le=365, description="the root's CRL (ARL)")
    ocsp_validity_hours: int = Field(default=168, ge=8, le=239, description="nextUpdate - thisUpdate of OCSP answers")
    ocsp_refresh_hours: float = Field(default=24.0, gt=0, le=96, description="re-sign a cached answer this often")
    ocsp_cache_size: int = Field(default=200_000, ge=100, description="cached OCSP answers per process")
    poll_seconds: float = Field(default=2.0, gt=0, description="how often a node looks for new revocations")

    @model_validator(mode="after")
    def _refresh_inside_validity(self) -> RevocationConfig:
        if self.crl_refresh_hours >= self.crl_validity_days * 24:
            raise ValueError("crl_refresh_hours must be shorter than crl_validity_days")
        if self.ocsp_refresh_hours > self.ocsp_validity_hours - 8:
            raise ValueError("ocsp_refresh_hours must end at least 8 hours before an answer expires (BR 4.9.10)")
        return self


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
    revocation: RevocationConfig = RevocationConfig()
    limits: LimitsConfig = LimitsConfig()

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


def data_dir_from_env() -> Path:
    return Path(os.environ.get("MAILKMS_DATA", "./mailkms-data"))


def load_settings(data_dir: Path | None = None, **overrides: Any) -> Settings:
    """Command-line overrides, then environment, then the TOML file; a ConfigError names each mistake."""
    data_dir = data_dir or data_dir_from_env()
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
mail_from = ""                      # default mailkms@<host of public_url>

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

[smtp]
mode = "sink"                       # "sink": local Maildir sink; "relay": send to relay_host
sink_port = 2525
relay_host = ""
relay_port = 587
starttls = true
username = ""
password = ""

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

[revocation]
crl_validity_days = 7               # nextUpdate of the CRL (BR limit 10)
crl_refresh_hours = 24              # a fresh CRL at least this often, and at every revocation
ocsp_validity_hours = 168           # OCSP answers valid 7 days (BR: 8 hours to 10 days)
ocsp_refresh_hours = 24             # cached OCSP answers are re-signed after this

[limits]
max_body_bytes = 65536              # larger request bodies get 413 before they are read
body_timeout_seconds = 30           # a body must arrive whole within this (408)
max_concurrency = 256               # open connections per listener; 503 beyond
keep_alive_seconds = 5
rate_per_minute = 120               # per client IP and endpoint group (token, signed, est); 0 = off
rate_burst = 60
trusted_proxies = []                # reverse proxies whose X-Forwarded-For names the client
refusal_flush_seconds = 300         # anonymous refusals are audited as one count per code and period
"""
