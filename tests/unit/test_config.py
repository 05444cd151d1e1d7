"""Configuration: defaults, TOML file, environment overrides, and one clear ConfigError per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mailkms.config import CONFIG_FILE, CONFIG_TEMPLATE, Settings, load_settings
from mailkms.errors import ConfigError
from mailkms.pki import KeyType


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MAILKMS_* variable of the machine running the tests leaks into these."""
    import os

    for name in list(os.environ):
        if name.startswith("MAILKMS_"):
            monkeypatch.delenv(name)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path


def write(data: Path, text: str) -> None:
    (data / CONFIG_FILE).write_text(text, encoding="utf-8")


# --- defaults --------------------------------------------------------------------------------------------
def test_defaults(data: Path) -> None:
    s = load_settings(data)
    assert (s.policy.lifetime_months, s.policy.reminder_months) == (18, 12)
    assert s.policy.token_ttl_days == 7
    assert s.policy.encryption_key_type is KeyType.RSA2048
    assert s.policy.signing_key_types == (KeyType.RSA2048, KeyType.RSA3072, KeyType.P256, KeyType.P384)
    assert s.ca.key_type is KeyType.RSA3072
    assert s.ca.country is None
    assert s.smtp.mode == "sink"
    assert s.server.effective_public_url == "http://localhost/"
    assert s.server.effective_mail_from == "mailkms@localhost"
    assert s.effective_database_url == f"sqlite:///{(data / 'mailkms.db').resolve()}"
    assert s.data_dir == data


def test_the_written_template_is_valid_and_means_the_defaults(data: Path) -> None:
    write(data, CONFIG_TEMPLATE.format(hostname="kms.example.org", public_url="http://kms.example.org/"))
    s = load_settings(data)
    defaults = load_settings(data / "elsewhere")
    assert s.policy == defaults.policy
    assert s.ca == defaults.ca
    assert s.smtp == defaults.smtp
    assert s.audit == defaults.audit
    assert s.server.hostname == "kms.example.org"
    assert s.server.effective_mail_from == "mailkms@kms.example.org"


def test_settings_are_frozen(data: Path) -> None:
    s = load_settings(data)
    with pytest.raises(ValidationError):
        s.policy.lifetime_months = 12  # type: ignore[misc]


# --- sources and their precedence: arguments > environment > TOML > defaults ----------------------------------
def test_toml_file(data: Path) -> None:
    write(data, "[policy]\nlifetime_months = 12\nreminder_months = 6\n[ca]\nkey_type = 'p384'\ncountry = 'DE'\n")
    s = load_settings(data)
    assert (s.policy.lifetime_months, s.policy.reminder_months) == (12, 6)
    assert (s.ca.key_type, s.ca.country) == (KeyType.P384, "DE")


def test_environment_overrides_the_file(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(data, "[policy]\nlifetime_months = 12\nreminder_months = 6\n")
    monkeypatch.setenv("MAILKMS_POLICY__LIFETIME_MONTHS", "10")
    s = load_settings(data)
    assert (s.policy.lifetime_months, s.policy.reminder_months) == (10, 6)  # merged key by key


def test_arguments_override_the_environment(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(data, "[policy]\nlifetime_months = 12\nreminder_months = 6\n")
    monkeypatch.setenv("MAILKMS_POLICY__LIFETIME_MONTHS", "10")
    s = load_settings(data, policy={"lifetime_months": 9})
    assert s.policy.lifetime_months == 9


@pytest.mark.parametrize(
    ("variable", "value", "read"),
    [
        ("MAILKMS_POLICY__REMINDER_MONTHS", "11", lambda s: s.policy.reminder_months == 11),
        ("MAILKMS_POLICY__TOKEN_TTL_DAYS", "3", lambda s: s.policy.token_ttl_days == 3),
        ("MAILKMS_POLICY__SIGNING_KEY_TYPES", '["p256"]', lambda s: s.policy.signing_key_types == (KeyType.P256,)),
        ("MAILKMS_CA__KEY_TYPE", "p256", lambda s: s.ca.key_type is KeyType.P256),
        (
            "MAILKMS_SERVER__PUBLIC_URL",
            "http://pki.example.org",
            lambda s: s.server.public_url == "http://pki.example.org/",
        ),
        ("MAILKMS_SMTP__STARTTLS", "false", lambda s: s.smtp.starttls is False),
        (
            "MAILKMS_DATABASE_URL",
            "postgresql+psycopg://db/x",
            lambda s: s.effective_database_url == "postgresql+psycopg://db/x",
        ),
        ("MAILKMS_CA_PASSPHRASE", "from-env", lambda s: s.ca_passphrase == "from-env"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("MAILKMS") else "",
)
def test_every_key_has_an_environment_variable(
    data: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    read,  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv(variable, value)
    assert read(load_settings(data))


def test_other_mailkms_variables_are_not_configuration_mistakes(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MAILKMS_DATA and the client's variables live beside the server's settings."""
    for name in ("MAILKMS_DATA", "MAILKMS_CLIENT_HOME", "MAILKMS_CLIENT_PASSPHRASE", "MAILKMS_TEST_PG_URL"):
        monkeypatch.setenv(name, "x")
    assert load_settings(data).policy.lifetime_months == 18


def test_the_passphrase_is_not_in_the_repr(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILKMS_CA_PASSPHRASE", "s3cret-passphrase")
    assert "s3cret-passphrase" not in repr(load_settings(data))


def test_public_url_gets_a_trailing_slash_and_names_the_mail_domain(data: Path) -> None:
    write(data, "[server]\nhostname = 'localhost'\npublic_url = 'http://pki.example.org/mailkms'\n")
    s = load_settings(data)
    assert s.server.effective_public_url == "http://pki.example.org/mailkms/"
    assert s.server.effective_mail_from == "mailkms@pki.example.org"


def test_groups(data: Path) -> None:
    write(data, "[policy.groups.contractors]\nlifetime_months = 6\nreminder_months = 4\n[policy.groups.staff]\n")
    policy = load_settings(data).policy
    assert policy.for_group("contractors") == (6, 4)
    assert policy.for_group("staff") == (18, 12)
    assert policy.for_group(None) == (18, 12)
    assert policy.for_group("unknown") == (18, 12)


# --- mistakes: a ConfigError that names the key --------------------------------------------------------------
MISTAKES = [
    ("reminder-equals-lifetime", "[policy]\nlifetime_months = 12\nreminder_months = 12\n", {}, "reminder_months"),
    ("reminder-after-lifetime", "[policy]\nreminder_months = 19\n", {}, "reminder_months"),
    ("reminder-via-env", "", {"MAILKMS_POLICY__REMINDER_MONTHS": "18"}, "reminder_months"),
    ("lifetime-28-months", "[policy]\nlifetime_months = 28\n", {}, "lifetime_months=28"),
    ("lifetime-zero", "[policy]\nlifetime_months = 0\n", {}, "policy.lifetime_months"),
    ("lifetime-not-a-number", "[policy]\nlifetime_months = 'long'\n", {}, "policy.lifetime_months"),
    ("lifetime-env-not-a-number", "", {"MAILKMS_POLICY__LIFETIME_MONTHS": "abc"}, "policy.lifetime_months"),
    ("group-reminder-after-lifetime", "[policy.groups.c]\nlifetime_months = 6\n", {}, "policy.groups.c"),
    ("token-ttl-zero", "[policy]\ntoken_ttl_days = 0\n", {}, "policy.token_ttl_days"),
    ("public-url-https", "[server]\npublic_url = 'https://kms.example.org/'\n", {}, "server.public_url"),
    ("public-url-no-scheme", "[server]\npublic_url = 'kms.example.org'\n", {}, "server.public_url"),
    ("public-url-no-host", "[server]\npublic_url = 'http:///crl'\n", {}, "server.public_url"),
    ("mail-from-non-ascii", "[server]\nmail_from = 'schlüssel@example.org'\n", {}, "server.mail_from"),
    ("mail-from-display-name", "[server]\nmail_from = 'KMS <kms@example.org>'\n", {}, "server.mail_from"),
    ("unknown-key", "[server]\nhostnmae = 'kms.example.org'\n", {}, "server.hostnmae"),
    ("unknown-section", "[polcy]\nlifetime_months = 12\n", {}, "polcy"),
    ("unknown-env-key", "", {"MAILKMS_POLICY__LIFETIME": "12"}, "policy.lifetime"),
    ("ca-key-type-unknown", "[ca]\nkey_type = 'rsa1024'\n", {}, "ca.key_type"),
    ("ca-key-type-too-small", "[ca]\nkey_type = 'rsa2048'\n", {}, "ca.key_type"),
    ("signing-key-type-unknown", "[policy]\nsigning_key_types = ['ed25519']\n", {}, "policy.signing_key_types"),
    ("ec-encryption-key", "[policy]\nencryption_key_type = 'p256'\n", {}, "policy.encryption_key_type"),
    ("country-name", "[ca]\ncountry = 'Germany'\n", {}, "ca.country"),
    ("country-lower-case", "[ca]\ncountry = 'de'\n", {}, "ca.country"),
    ("relay-without-host", "[smtp]\nmode = 'relay'\n", {}, "relay_host"),
    ("smtp-mode-unknown", "[smtp]\nmode = 'carrier-pigeon'\n", {}, "smtp.mode"),
    ("port-out-of-range", "[server]\nhttps_port = 70000\n", {}, "server.https_port"),
    ("section-not-a-table", "policy = 5\n", {}, "policy"),
]


@pytest.mark.parametrize(("toml", "env", "names"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_each_mistake_is_a_config_error_naming_the_key(
    data: Path, monkeypatch: pytest.MonkeyPatch, toml: str, env: dict[str, str], names: str
) -> None:
    write(data, toml)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(data)
    assert names in caught.value.detail
    assert str(data / CONFIG_FILE) in caught.value.detail
    assert caught.value.exit_code == 78


@pytest.mark.parametrize(
    "content",
    [b"[policy\nlifetime_months = 12\n", b"lifetime_months = = 12\n", b"[policy]\nlifetime_months = 12 # \xff\n"],
    ids=["unclosed-table", "double-equals", "not-utf-8"],
)
def test_a_broken_toml_file_is_a_config_error(data: Path, content: bytes) -> None:
    (data / CONFIG_FILE).write_bytes(content)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(data)


def test_utf8_values_are_read_whatever_the_locale(data: Path) -> None:
    write(data, "[ca]\norganization = 'Müller & Söhne GmbH'\n")
    assert load_settings(data).ca.organization == "Müller & Söhne GmbH"


def test_an_unreadable_config_is_a_config_error(data: Path) -> None:
    (data / CONFIG_FILE).mkdir()
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(data)


def test_lifetime_27_months_is_allowed(data: Path) -> None:
    write(data, "[policy]\nlifetime_months = 27\nreminder_months = 26\n")
    assert load_settings(data).policy.lifetime_months == 27


def test_settings_can_be_built_without_a_file(data: Path) -> None:
    assert isinstance(load_settings(data / "does-not-exist"), Settings)


# --- the SMTP relay: TLS trust, the password file ------------------------------------------------------------
RELAY = "[smtp]\nmode = 'relay'\nrelay_host = 'smtp.example.org'\nusername = 'mailkms'\n"


def _ca_pem(path: Path) -> Path:
    from tests.mailstack import TLSFiles

    return TLSFiles.make(path).ca_pem


def _password_file(path: Path, mode: int, text: str = "relay-pass-from-file\n") -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_relay_defaults_verify_with_the_system_store(data: Path) -> None:
    write(data, RELAY)
    smtp = load_settings(data).smtp
    assert (smtp.starttls, smtp.implicit_tls, smtp.verify, smtp.ca_file, smtp.helo_name) == (
        True,
        False,
        True,
        None,
        "",
    )
    assert smtp.uses_tls


def test_relay_keys_from_the_file_and_the_environment(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = _ca_pem(data / "tls")
    pw = _password_file(data / "smtp-password", 0o600)
    write(data, RELAY + f"ca_file = '{ca}'\nhelo_name = 'kms.example.org'\nimplicit_tls = true\nrelay_port = 465\n")
    monkeypatch.setenv("MAILKMS_SMTP__PASSWORD_FILE", str(pw))
    smtp = load_settings(data).smtp
    assert smtp.ca_file == ca and smtp.helo_name == "kms.example.org" and smtp.implicit_tls
    assert smtp.effective_password == "relay-pass-from-file"  # the first line, without its newline
    assert "relay-pass-from-file" not in repr(load_settings(data))


def test_the_relay_password_from_the_environment_is_not_in_the_repr(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(data, RELAY)
    monkeypatch.setenv("MAILKMS_SMTP__PASSWORD", "relay-pass-from-env")
    s = load_settings(data)
    assert s.smtp.effective_password == "relay-pass-from-env"
    assert "relay-pass-from-env" not in repr(s)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_password_file_only_its_owner_reads_is_taken(data: Path, mode: int) -> None:
    pw = _password_file(data / "pw", mode)
    write(data, RELAY + f"password_file = '{pw}'\n")
    assert load_settings(data).smtp.effective_password == "relay-pass-from-file"


RELAY_MISTAKES = [
    ("password-file-0644", 0o644, "never-shown-secret\n", "mode 0644"),
    ("password-file-0640", 0o640, "never-shown-secret\n", "chmod 600"),
    ("password-file-empty", 0o600, "", "is empty"),
]


@pytest.mark.parametrize(("mode", "text", "says"), [m[1:] for m in RELAY_MISTAKES], ids=[m[0] for m in RELAY_MISTAKES])
def test_a_password_file_others_may_read_is_refused_at_start(data: Path, mode: int, text: str, says: str) -> None:
    pw = _password_file(data / "pw", mode, text)
    write(data, RELAY + f"password_file = '{pw}'\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(data)
    assert "smtp.password_file" in caught.value.detail and says in caught.value.detail
    assert caught.value.exit_code == 78
    assert "never-shown-secret" not in caught.value.detail


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (
            "password_file = '/nonexistent/smtp-password'\n",
            "smtp.password_file: /nonexistent/smtp-password does not exist",
        ),
        ("ca_file = '/nonexistent/relay-ca.pem'\n", "smtp.ca_file: /nonexistent/relay-ca.pem does not exist"),
        ("ca_file = '{data}'\n", "is a folder"),
        ("ca_file = '{data}/mailkms.toml'\n", "holds no PEM CA certificate"),
        ("password = 'p'\npassword_file = '{data}/mailkms.toml'\n", "exclude each other"),
        ("starttls = false\n", "in clear"),
    ],
    ids=["password-file-missing", "ca-file-missing", "ca-file-folder", "ca-file-not-pem", "both-passwords", "no-tls"],
)
def test_relay_mistakes_are_config_errors_naming_the_key(data: Path, extra: str, says: str) -> None:
    write(data, RELAY + extra.format(data=data))
    with pytest.raises(ConfigError) as caught:
        load_settings(data)
    assert says in caught.value.detail
    assert caught.value.exit_code == 78


def test_a_password_file_is_read_at_start_not_later(data: Path) -> None:
    pw = _password_file(data / "pw", 0o600)
    write(data, RELAY + f"password_file = '{pw}'\n")
    smtp = load_settings(data).smtp
    pw.write_text("changed\n")
    assert smtp.effective_password == "relay-pass-from-file"


# --- where the CA passphrase comes from: fd > systemd credential > MAILKMS_CA_PASSPHRASE ------------------------
def _pipe(text: bytes) -> int:
    import os

    read_end, write_end = os.pipe()
    os.write(write_end, text)
    os.close(write_end)
    return read_end


def test_ca_passphrase_from_a_file_descriptor(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILKMS_CA_PASSPHRASE", "from-the-environment")
    fd = _pipe(b"from-a-pipe\n")
    assert load_settings(data, passphrase_fd=fd).ca_passphrase == "from-a-pipe"  # the option wins
    assert load_settings(data, passphrase_fd=fd).ca_passphrase == "from-a-pipe"  # read once per process
    fd = _pipe(b"from-the-fd-variable")
    monkeypatch.setenv("MAILKMS_CA_PASSPHRASE_FD", str(fd))
    assert load_settings(data).ca_passphrase == "from-the-fd-variable"


@pytest.mark.parametrize("value", ["three", "-1"])
def test_a_bad_fd_variable_is_a_config_error(data: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MAILKMS_CA_PASSPHRASE_FD", value)
    with pytest.raises(ConfigError, match="MAILKMS_CA_PASSPHRASE_FD"):
        load_settings(data)


def test_an_empty_or_closed_fd_is_a_config_error(data: Path) -> None:
    with pytest.raises(ConfigError, match="empty"):
        load_settings(data, passphrase_fd=_pipe(b""))
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(data, passphrase_fd=987)


def test_ca_passphrase_from_a_systemd_credential(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mailkms-ca-passphrase").write_text("from-systemd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("MAILKMS_CA_PASSPHRASE", "from-the-environment")
    assert load_settings(data).ca_passphrase == "from-systemd"
    assert load_settings(data, passphrase_fd=_pipe(b"fd")).ca_passphrase == "fd"
    (creds / "mailkms-ca-passphrase").unlink()
    assert load_settings(data).ca_passphrase == "from-the-environment"


def test_production_from_the_file_or_the_environment(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(data).ca.production is False
    write(data, "[ca]\nproduction = true\n")
    assert load_settings(data).ca.production is True
    write(data, "")
    monkeypatch.setenv("MAILKMS_CA__PRODUCTION", "1")
    assert load_settings(data).ca.production is True
