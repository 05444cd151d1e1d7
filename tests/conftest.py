"""Shared fixtures: a CA made once per session, a fake clock, SQLite and PostgreSQL stores."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from mailkms.clock import UTC, FakeClock
from mailkms.pki import KeyType, PrivateKey, generate_key, signature_hash_for

START = dt.datetime(2026, 1, 15, 9, 30, 0, tzinfo=UTC)
PUBLIC_URL = "http://kms.example.org/"
PG_URL = os.environ.get("MAILKMS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CA_PASSPHRASE = "test-ca-passphrase-made-at-run-time"


def make_csr(mailbox: str, key: PrivateKey | None = None, *, cn: str | None = None) -> tuple[bytes, PrivateKey]:
    key = key or generate_key(KeyType.RSA2048)
    name = [x509.NameAttribute(NameOID.EMAIL_ADDRESS, mailbox)]
    if cn:
        name.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(name)).sign(key, signature_hash_for(key))
    return csr.public_bytes(serialization.Encoding.PEM), key


def transport_pem(mailbox: str = "t@example.org") -> tuple[str, PrivateKey, x509.Certificate]:
    from mailkms.client._core import _transport_certificate

    key = generate_key(KeyType.RSA2048)
    cert = _transport_certificate(key, mailbox, START)
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key, cert


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture(scope="session")
def ca_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete data folder (CA, TLS, mail signer, archive) made once; tests copy it."""
    from mailkms.pki import PublicURLs
    from mailkms.services import CAPaths, init_ca, tls_hostnames

    data = tmp_path_factory.mktemp("ca-template")
    init_ca(
        CAPaths(data),
        passphrase_env=CA_PASSPHRASE,
        key_type=KeyType.RSA3072,
        organization="mailkms test",
        country=None,
        urls=PublicURLs(PUBLIC_URL),
        hostnames=tls_hostnames("localhost"),
        mail_from="mailkms@kms.example.org",
        clock=FakeClock(START - dt.timedelta(days=30)),
        recovery_passphrase="test-recovery-passphrase",
    )
    return data


@pytest.fixture
def data_dir(ca_template: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(ca_template, target)
    return target


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_URL.replace("+psycopg", ""), connect_timeout=3):
            return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_schema_url() -> Iterator[str]:
    """A schema of its own in the PostgreSQL test database, dropped at the end."""
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG_URL}; CI must run the store tests on it")
        pytest.skip("PostgreSQL not reachable")
    with pg_schema("mk") as url:
        yield url


@contextlib.contextmanager
def pg_schema(prefix: str) -> Iterator[str]:
    """A new, empty schema in the PostgreSQL test database (its URL), dropped on leaving."""
    import psycopg

    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    raw = PG_URL.replace("+psycopg", "")
    with psycopg.connect(raw, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(raw, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("pg_schema_url")
    from sqlalchemy import text

    from mailkms.store import Base, Database

    db = Database(url)
    db.migrate()
    with db.engine.begin() as conn:
        names = ", ".join(t.name for t in Base.metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    db.dispose()
    return url


def store_settings(data_dir: Path, db_url: str, **overrides: object):  # type: ignore[no-untyped-def]
    """The tests' settings on this store and CA, with sections overridden (policy=..., pool=...)."""
    from mailkms.config import load_settings

    return load_settings(
        data_dir,
        database_url=db_url,
        ca_passphrase=CA_PASSPHRASE,
        server={"hostname": "localhost", "public_url": PUBLIC_URL},
        **overrides,
    )


@pytest.fixture
def settings(data_dir: Path, db_url: str):  # type: ignore[no-untyped-def]
    return store_settings(data_dir, db_url)


@pytest.fixture
def services(settings, clock):  # type: ignore[no-untyped-def]
    from mailkms.services import Services

    svc = Services.build(settings, clock)
    yield svc
    svc.close()


@pytest.fixture
def cli_env(settings, monkeypatch):  # type: ignore[no-untyped-def]
    """The environment the in-process admin CLI (typer's CliRunner) reads: this test's store and CA."""
    for name, value in {
        "MAILKMS_DATA": str(settings.data_dir),
        "MAILKMS_DATABASE_URL": settings.effective_database_url,
        "MAILKMS_CA_PASSPHRASE": CA_PASSPHRASE,
        "MAILKMS_SERVER__HOSTNAME": "localhost",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="session")
def smime_pki(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A small real PKI (root, issuing CA, identities on demand) for the S/MIME tests."""
    from tests.smime_support import make_pki

    return make_pki(tmp_path_factory.mktemp("smime-pki"))


@pytest.fixture
def gnupg_home() -> Iterator[Path]:
    """A GnuPG home for gpgsm; short on purpose (gpg-agent's socket path limit), agents killed after."""
    folder = Path(tempfile.mkdtemp(prefix="mk-g"))
    try:
        yield folder
    finally:
        subprocess.run(["gpgconf", "--homedir", str(folder), "--kill", "all"], capture_output=True, check=False)
        shutil.rmtree(folder, ignore_errors=True)
