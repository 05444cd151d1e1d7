"""`make bench`: mailkms beside its peers, measured in the same run on this machine.

Prints ONE table and writes it, with the machine's description, to docs/PERFORMANCE.md.
Bounded loops on loopback only; the whole run (with the other bench scripts it calls) stays
under 15 minutes. `--quick` shrinks every loop (a smoke run, figures meaningless).

Other areas' scripts (bench/crl_ocsp.py, bench/smime.py, bench/est.py, bench/hsm.py ...) are run when present;
each prints its own rows as markdown table lines `| figure | mailkms | peer | goal | met |`,
which are appended to the one table (other lines become notes).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as dt
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cryptography  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509 import ocsp  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from bench._seed import seed_users  # noqa: E402
from mailkms.clock import FakeClock, SystemClock  # noqa: E402
from mailkms.config import load_settings  # noqa: E402
from mailkms.pki import (  # noqa: E402
    KeyType,
    PublicURLs,
    generate_key,
    load_private_key,
    sign_request,
)
from mailkms.services import (  # noqa: E402
    CAPaths,
    KeyPool,
    Services,
    generate_ders,
    init_ca,
    tls_hostnames,
)
from mailkms.store import Certificate, Database, User  # noqa: E402

PG_URL = os.environ.get("MAILKMS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PASS = os.environ.setdefault("MAILKMS_BENCH_PASS", "bench-passphrase-" + uuid.uuid4().hex)  # inherited by workers
OTHER_SCRIPTS = ("crl_ocsp.py", "smime.py", "est.py", "admin.py", "cmp.py", "hsm.py")
DJANGO_VENV = ROOT / "bench" / ".venv-django-ca"


@dataclass
class Row:
    figure: str
    mailkms: str
    peer: str = "—"
    goal: str = "—"
    met: str = ""
    # the 1-minute load average when the row was measured (made right after its measurement): the
    # machine has 2 cores and other sessions share it, so every row says how busy it was
    load: float = dataclasses.field(default_factory=lambda: os.getloadavg()[0])

    def line(self) -> str:
        return f"| {self.figure} (load {self.load:.1f}) | {self.mailkms} | {self.peer} | {self.goal} | {self.met} |"


ROWS: list[Row] = []
NOTES: list[str] = []
T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {text}", file=sys.stderr, flush=True)


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def fmt(r: float, unit: str = "/s") -> str:
    return f"{r:,.0f}{unit}" if r >= 100 else f"{r:,.1f}{unit}"


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


# --- machine --------------------------------------------------------------------------------------------
def machine() -> list[str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    openssl_cli = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    pg = "not reachable"
    try:
        import psycopg

        with psycopg.connect(PG_URL.replace("+psycopg", ""), connect_timeout=3) as conn:
            pg = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    except Exception as exc:
        pg = f"not reachable ({exc.__class__.__name__})"
    load = os.getloadavg()
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; RAM {mem}",
        f"- OS: {platform.platform()}; Python {platform.python_version()}",
        f"- cryptography {cryptography.__version__} ({ssl.OPENSSL_VERSION} in Python's ssl); CLI: {openssl_cli}",
        f"- SQLite {sqlite3.sqlite_version}; PostgreSQL {pg} on 127.0.0.1",
        f"- load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (other work on the machine skews figures)",
    ]


# --- CA and CSRs ----------------------------------------------------------------------------------------
def make_ca(folder: Path, key_type: KeyType) -> Path:
    init_ca(
        CAPaths(folder),
        passphrase_env=PASS,
        key_type=key_type,
        organization="mailkms bench",
        country=None,
        urls=PublicURLs("http://kms.example.org/"),
        hostnames=tls_hostnames("localhost"),
        mail_from="mailkms@kms.example.org",
        clock=SystemClock(),
        recovery_passphrase="bench-recovery",
    )
    return folder


def make_csrs(folder: Path, n: int) -> list[Path]:
    """P-256 subscriber CSRs (cheap to make): the CA key type is what the issuance figures compare."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, f"user{i}@example.org")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        path = folder / f"{i:05d}.csr"
        path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
        paths.append(path)
    return paths


def settings_for(data: Path, url: str, **extra: object):  # type: ignore[no-untyped-def]
    return load_settings(
        data,
        database_url=url,
        ca_passphrase=PASS,
        server={"hostname": "localhost", "public_url": "http://kms.example.org/"},
        **extra,
    )


class PGSchema:
    """A throw-away schema in the PostgreSQL test database."""

    def __init__(self) -> None:
        import psycopg

        self.name = f"bench_{uuid.uuid4().hex[:8]}"
        self.raw = PG_URL.replace("+psycopg", "")
        with psycopg.connect(self.raw, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {self.name}")
        sep = "&" if "?" in PG_URL else "?"
        self.url = f"{PG_URL}{sep}options=-csearch_path%3D{self.name}"

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(self.raw, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {self.name} CASCADE")


def pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_URL.replace("+psycopg", ""), connect_timeout=3):
            return True
    except Exception:
        return False


# --- 1. signing-certificate issuance -------------------------------------------------------------------------
CALLERS = 64  # concurrent callers, as a server's request threads would be


def issue_signing_certificates(services: Services, csrs: list[bytes], offset: int = 0) -> float:
    """CSR in -> checked, signed, stored and audited, through the service (`CertificateIssuance`:
    signer processes + group commit), by CALLERS concurrent callers. Returns certs/s."""

    def one(i: int) -> None:
        services.issuance.issue_signing(csrs[i], f"user{offset + i}@example.org", "bench")

    with concurrent.futures.ThreadPoolExecutor(CALLERS) as pool:
        start = time.perf_counter()
        list(pool.map(one, range(len(csrs))))
        return rate(len(csrs), time.perf_counter() - start)


OPENSSL_CNF = """\
[ ca ]
default_ca = bench
[ bench ]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/certs
serial = $dir/serial
certificate = {cert}
private_key = {key}
default_md = sha256
default_days = 547
policy = anything
unique_subject = no
copy_extensions = none
x509_extensions = smime
[ anything ]
emailAddress = optional
commonName = optional
[ smime ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = emailProtection
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = email:copy
certificatePolicies = 2.23.140.1.5.1.3
crlDistributionPoints = URI:http://kms.example.org/crl/issuing.crl
authorityInfoAccess = caIssuers;URI:http://kms.example.org/ca/issuing.crt
"""


def openssl_ca(data: Path, work: Path, csrs: list[Path], per_call: int) -> tuple[float, float]:
    """`openssl ca` on the same CSRs: one process per CSR (first `per_call`), then all with -infiles."""
    work.mkdir(parents=True, exist_ok=True)
    key = load_private_key((data / "ca" / "issuing.key.pem").read_bytes(), PASS.encode())
    key_path = work / "issuing.key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PASS.encode()),
        )
    )
    os.chmod(key_path, 0o600)

    def fresh(name: str) -> Path:
        d = work / name
        (d / "certs").mkdir(parents=True)
        (d / "index.txt").write_text("")
        (d / "serial").write_text(uuid.uuid4().hex[:16] + "\n")
        cnf = d / "openssl.cnf"
        cnf.write_text(OPENSSL_CNF.format(dir=d, cert=data / "ca" / "issuing.crt.pem", key=key_path))
        return cnf

    env = {**os.environ, "BENCH_PASS": PASS}

    def openssl_ca_run(cnf: Path, *args: str) -> None:
        base = ["openssl", "ca", "-batch", "-config", str(cnf), "-passin", "env:BENCH_PASS", "-notext"]
        subprocess.run([*base, *args], env=env, check=True, capture_output=True)

    cnf = fresh("single")
    start = time.perf_counter()
    for csr in csrs[:per_call]:
        openssl_ca_run(cnf, "-in", str(csr), "-out", str(csr.with_suffix(".pem")))
    single = rate(per_call, time.perf_counter() - start)
    cnf = fresh("infiles")
    start = time.perf_counter()
    openssl_ca_run(cnf, "-out", str(work / "all.pem"), "-infiles", *map(str, csrs))
    infiles = rate(len(csrs), time.perf_counter() - start)
    return single, infiles


def django_ca_peer(data: Path, csr_dir: Path, n: int, skip: bool) -> tuple[float | None, str]:
    """django-ca's Python API in a venv of its own (bench/.venv-django-ca), never in mailkms's."""
    if skip:
        return None, "skipped (--skip-django-ca)"
    python = DJANGO_VENV / "bin" / "python"
    if not python.exists():
        uv = ROOT / ".tools" / "bin" / "uv"
        try:
            subprocess.run(
                [str(uv), "venv", "-q", "-p", sys.executable, str(DJANGO_VENV)],
                check=True,
                timeout=120,
                capture_output=True,
            )
            subprocess.run(
                [str(uv), "pip", "install", "-q", "--python", str(python), "django-ca"],
                check=True,
                timeout=300,
                capture_output=True,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            shutil.rmtree(DJANGO_VENV, ignore_errors=True)
            return None, f"django-ca did not install into a bench venv ({exc.__class__.__name__})"
    work = Path(tempfile.mkdtemp(prefix="djca-"))
    key = load_private_key((data / "ca" / "issuing.key.pem").read_bytes(), PASS.encode())
    key_path = work / "ca-key.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(key_path, 0o600)
    cert_path = data / "ca" / "issuing.crt.pem"
    try:
        done = subprocess.run(
            [
                str(python),
                str(ROOT / "bench" / "_django_ca_peer.py"),
                str(work / "dj"),
                str(key_path),
                str(cert_path),
                str(csr_dir),
                str(n),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            return None, "django-ca run failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return float(result["rate"]), f"django-ca {result['version']}, {result['n']} certs, SQLite"
    except (subprocess.SubprocessError, ValueError) as exc:
        return None, f"django-ca run failed ({exc.__class__.__name__})"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_issuance(tmp: Path, quick: bool, skip_django: bool) -> None:
    n, per_call = (40, 5) if quick else (1000, 60)
    csr_paths = make_csrs(tmp / "csrs", n + 50)
    csrs = [p.read_bytes() for p in csr_paths]
    goals = {KeyType.RSA3072: 1000, KeyType.P256: 3000}
    for key_type in (KeyType.RSA3072, KeyType.P256):
        data = make_ca(tmp / f"ca-{key_type}", key_type)
        say(f"issuance, {key_type} CA")
        figures: dict[str, float | None] = {}
        batches: dict[str, str] = {}
        for store in ("SQLite", "PostgreSQL"):
            schema = None
            if store == "SQLite":
                url = f"sqlite:///{tmp / f'issue-{key_type}.db'}"
            elif pg_available():
                schema = PGSchema()
                url = schema.url
            else:
                figures[store] = None
                continue
            services = Services.build(settings_for(data, url, pool={"size": 0}), SystemClock())
            try:
                services.signers.start()  # the signer processes start with the server, not timed
                issue_signing_certificates(services, csrs[n:], offset=n)  # warm up
                before = (services.commits.batches, services.commits.units)
                load = os.getloadavg()[0]
                figures[store] = issue_signing_certificates(services, csrs[:n])
                count = services.commits.units - before[1]
                batches[store] = (
                    f"{count} certificates in {services.commits.batches - before[0]} transactions, "
                    f"load average {load:.2f} → {os.getloadavg()[0]:.2f}"
                )
                with services.db.read_only() as session:
                    stored = session.execute(select(func.count(Certificate.id))).scalar_one()
                report = services.verify_audit()
                if stored != n + 50 or not report.ok:
                    raise RuntimeError(f"issuance bench: {stored} stored of {n + 50}, audit {report.problems[:3]}")
            finally:
                services.close()
                if schema:
                    schema.drop()
        load = os.getloadavg()[0]
        single, infiles = openssl_ca(data, tmp / f"openssl-{key_type}", csr_paths[:n], per_call)
        dj_n = 10 if quick else (30 if key_type is KeyType.RSA3072 else 200)
        dj_rate, dj_note = django_ca_peer(data, tmp / "csrs", dj_n, skip_django)
        peer = f"openssl ca: {fmt(single)} one call per CSR, {fmt(infiles)} with -infiles ({n} CSRs)"
        peer += f"; django-ca: {fmt(dj_rate)} ({dj_note})" if dj_rate else f"; django-ca: {dj_note}"
        NOTES.append(
            f"Issuance {key_type.value}: {CALLERS} concurrent callers of `CertificateIssuance.issue_signing`, "
            f"{services.signers.processes} signer processes; "
            + "; ".join(f"{k}: {v}" for k, v in batches.items())
            + f"; openssl ca ran at load average {load:.2f}."
        )
        for store, value in figures.items():
            ratio = f" ({value / infiles:.2f}× openssl -infiles)" if value else ""
            ROWS.append(
                Row(
                    f"signing-certificate issuance, CSR in → stored + audited, {key_type.value} issuing CA, {store}",
                    (fmt(value) + ratio) if value else "not run (PostgreSQL not reachable)",
                    peer,
                    f"≥ {goals[key_type]:,}/s, at least 2.5× openssl ca -infiles",
                    f"{met(bool(value and value >= goals[key_type]))} (rate); "
                    f"{met(bool(value and value >= 2.5 * infiles))} (2.5× the peer in this run)",
                )
            )


# --- 2. renewal with and without the pool ----------------------------------------------------------------------
def _pool_keys(n: int) -> list[bytes]:
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as ex:
        halves = [n // 2, n - n // 2]
        return [d for part in ex.map(generate_ders, [KeyType.RSA2048] * 2, halves) for d in part]


RENEW_URL = "https://localhost:8443/api/v1/renewals"
UserForRenewal = tuple[str, bytes, bytes, bytes]  # mailbox, signing key PEM, signing cert DER, new CSR PEM


def _csr_for(mailbox: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, mailbox)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def _enrol_for_renewal(services: Services, prefix: str, count: int, now: dt.datetime) -> list[UserForRenewal]:
    """Enrol `count` users (keys from the pool, not timed); each with a fresh CSR ready for renewal."""
    from mailkms.client._core import _transport_certificate

    transport = _transport_certificate(generate_key(KeyType.RSA2048), "t@example.org", now)
    transport_pem = transport.public_bytes(serialization.Encoding.PEM).decode()
    users = []
    for i in range(count):
        mailbox = f"{prefix}{i}@example.org"
        key, csr = _csr_for(mailbox)
        token = services.users.add(mailbox, "", None, "bench")
        services.enrolment.enrol(mailbox, token, csr, transport_pem)
        with services.db.transaction() as session:
            der = session.execute(
                select(Certificate.der)
                .join(User, User.id == Certificate.user_id)
                .where(User.email == mailbox, Certificate.kind == "signing")
            ).scalar_one()
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        users.append((mailbox, key_pem, der, _csr_for(mailbox)[1]))
    return users


RENEW_CALLERS = 8  # concurrent update requests, as a server's request threads would serve them


def _renew(services: Services, users: list[UserForRenewal]) -> None:
    def one(user: UserForRenewal) -> None:
        mailbox, key_pem, der, csr = user
        key = serialization.load_pem_private_key(key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        nonce = services.nonces.new()
        jws = sign_request(
            key, [x509.load_der_x509_certificate(der)], nonce, RENEW_URL, {"mailbox": mailbox, "csr": csr.decode()}
        )
        accepted = services.renewal.renew(jws, RENEW_URL)
        assert not accepted.already_issued

    with concurrent.futures.ThreadPoolExecutor(RENEW_CALLERS) as pool:
        list(pool.map(one, users))


def _renew_worker(data: str, url: str, when: str, users: list[UserForRenewal], go: float) -> tuple[float, float]:
    """One server process's share of renewals (no pool), started at wall time `go`; returns (start, end)."""
    services = Services.build(
        settings_for(Path(data), url, pool={"size": 0}), FakeClock(dt.datetime.fromisoformat(when))
    )
    services.signers.start()  # the server's signer processes, started before the clock starts
    while time.time() < go:
        time.sleep(0.01)
    start = time.time()
    _renew(services, users)
    end = time.time()
    services.close()
    return start, end


def _renewal_two_processes(data: Path, clock: FakeClock, n: int) -> float | None:
    """Renewal without the pool by two processes on one PostgreSQL: the 2-core sustained figure."""
    if not pg_available():
        return None
    schema = PGSchema()
    try:
        settings = settings_for(data, schema.url, pool={"size": 0})
        services = Services.build(settings, FakeClock(clock.now() - dt.timedelta(days=366)))
        pool = KeyPool(services.db, services.pool_keyring, services.clock, KeyType.RSA2048, size=2 * n)
        pool.store(_pool_keys(2 * n))
        services.issuer.keys = pool
        users = _enrol_for_renewal(services, "pg", 2 * n, services.clock.now())
        services.db.dispose()
        go = time.time() + 8
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = [
                ex.submit(_renew_worker, str(data), schema.url, clock.now().isoformat(), users[i::2], go)
                for i in range(2)
            ]
            spans = [f.result() for f in futures]
        return rate(len(users), max(e for _, e in spans) - min(s for s, _ in spans))
    finally:
        schema.drop()


def bench_renewal(tmp: Path, quick: bool) -> None:
    n = 6 if quick else 60
    data = make_ca(tmp / "ca-renewal", KeyType.RSA3072)
    now = dt.datetime.now(dt.UTC)
    clock = FakeClock(now)
    settings = settings_for(data, f"sqlite:///{tmp / 'renewal.db'}", pool={"size": 0})
    services = Services.build(settings, clock)
    pool = KeyPool(services.db, services.pool_keyring, clock, KeyType.RSA2048, size=10 * n + 10)
    say(f"renewal: generating {3 * n} pool keys for setup (2 processes, not timed)")
    pool.store(_pool_keys(3 * n))
    services.issuer.keys = pool
    say(f"renewal: enrolling {2 * n} users (setup, not timed)")
    users = _enrol_for_renewal(services, "renew", 2 * n, now)
    clock.advance(dt.timedelta(days=366))  # everyone past the reminder point

    def renew_all(batch: list[UserForRenewal]) -> float:
        start = time.perf_counter()
        _renew(services, batch)
        return rate(len(batch), time.perf_counter() - start)

    load_start = os.getloadavg()[0]
    say("renewal without the pool")
    services.issuer.keys = None
    services.signers.start()
    without = renew_all(users[:n])
    say("renewal from the pool")
    services.issuer.keys = pool
    assert pool.size() >= n
    with_pool = renew_all(users[n:])
    services.close()
    say("renewal without the pool, two processes on PostgreSQL")
    two = _renewal_two_processes(data, clock, n // 2 if not quick else 3)
    say("RSA-2048 key generation alone")
    keys = 10 if quick else 40
    start = time.perf_counter()
    generate_ders(KeyType.RSA2048, keys)
    keygen = rate(keys, time.perf_counter() - start)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as ex:
        list(ex.map(generate_ders, [KeyType.RSA2048] * 2, [1, 1]))  # start the workers first (not timed)
        start = time.perf_counter()
        list(ex.map(generate_ders, [KeyType.RSA2048] * 2, [keys, keys]))
        keygen2 = rate(keys * 2, time.perf_counter() - start)
    peer = f"RSA-2048 key generation alone: {fmt(keygen)} on one core, {fmt(keygen2)} on 2 processes"
    ROWS.append(
        Row(
            f"full renewal (JWS checked, new pair, archive, outbox, audit), no pool, one process "
            f"({RENEW_CALLERS} concurrent requests, keys made by its 2 signer processes), SQLite",
            fmt(without),
            peer,
            "≥ 40/s sustained on 2 cores",
            met(without >= 40),
        )
    )
    ROWS.append(
        Row(
            f"full renewal, no pool, two server processes on one PostgreSQL (2 cores, {RENEW_CALLERS} "
            "concurrent requests each)",
            fmt(two) if two else "not run (PostgreSQL not reachable)",
            peer,
            "≥ 40/s sustained on 2 cores",
            met(bool(two and two >= 40)),
        )
    )
    ROWS.append(
        Row(
            f"full renewal, keys from the pool (burst), one process ({RENEW_CALLERS} concurrent requests), SQLite",
            fmt(with_pool),
            peer,
            "≥ 500/s burst",
            met(with_pool >= 500),
        )
    )
    NOTES.append(
        f"Renewal: {n} renewals per single-process mode, {2 * (n // 2)} in the two-process run (time from the first "
        f"start to the last end, setup and process start not timed), {RENEW_CALLERS} concurrent requests per process. "
        "Without the pool a renewal waits for one RSA-2048 key (made before its transaction, by a signer process, "
        "no lock held); with it, for two signatures, two envelopes, the signed delivery mail and the store. Both "
        "store by group commit (concurrent renewals share a transaction, each in its own savepoint, answered once "
        "it is committed); the signatures and the mail are made on the writer thread, in the server process. "
        f"Load average {load_start:.2f} at the start of the renewal rows, "
        f"{os.getloadavg()[0]:.2f} at their end (2 cores; other work on the machine skews figures)."
    )


# --- 3. reminder sweep --------------------------------------------------------------------------------------
def bench_sweep(tmp: Path, quick: bool) -> Path | None:
    from mailkms.mail import reminder_sweep

    n = 2000 if quick else 1_000_000
    data = make_ca(tmp / "ca-sweep", KeyType.P256)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    span = dt.timedelta(days=366)
    sqlite_path = None
    for store in ("SQLite", "PostgreSQL"):
        schema = None
        if store == "SQLite":
            sqlite_path = tmp / "sweep.db"
            url = f"sqlite:///{sqlite_path}"
        elif pg_available():
            schema = PGSchema()
            url = schema.url
        else:
            ROWS.append(Row(f"reminder sweep over 1M users, {store}", "not run (PostgreSQL not reachable)"))
            continue
        try:
            db = Database(url)
            db.migrate()
            say(f"sweep: seeding {n:,} users into {store}")
            start = time.perf_counter()
            # User i's certificate started span*(1 - i/n) ago: about n/366 users crossed the 12-month point today.
            seed_users(db, n, lambda i: now - span + span * i / n, dt.timedelta(days=548))
            seeded = time.perf_counter() - start
            db.dispose()
            settings = settings_for(data, url, pool={"size": 0}, reminders={"final_notice_days": 30})
            services = Services.build(settings, FakeClock(now))
            sweep = reminder_sweep(services, node="bench")
            say(f"sweep: first sweep on {store}")
            start = time.perf_counter()
            first = sweep.sweep()
            t_first = time.perf_counter() - start
            start = time.perf_counter()
            second = sweep.sweep()
            t_second = time.perf_counter() - start
            services.db.dispose()
            mails = first.due_sent + first.final_sent
            per_mail = t_first / mails if mails else 0.0
            ROWS.append(
                Row(
                    f"reminder sweep over {n:,} users, measured (a day's share due: {mails:,} signed reminders "
                    f"queued), {store}",
                    f"{t_first:.2f} s; re-sweep with nothing new {t_second:.2f} s",
                    "—",
                    "1M users ≤ 20 s",
                    met(t_first <= 20 and n >= 1_000_000),
                )
            )
            NOTES.append(
                f"Sweep on {store}: seeding {n:,} users took {seeded:.1f} s (not timed); composing + signing + "
                f"queueing costs about {per_mail * 1000:.1f} ms per reminder ({second.due_sent} sent by the "
                f"re-sweep). Load average after the sweep: {os.getloadavg()[0]:.2f}."
            )
        finally:
            if schema:
                schema.drop()
    return sqlite_path


def _rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {line.split(":")[0]: line.split(":")[1].strip() for line in status.splitlines() if ":" in line}
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _descendants(pid: int) -> list[int]:
    """The process and every process below it (CRL workers, signer processes, OCSP listeners)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _tree_rss_mib(pid: int) -> tuple[float, int]:
    """Summed VmRSS of a process and its descendants (MiB), and how many processes that is."""
    total, count = 0.0, 0
    for member in _descendants(pid):
        try:
            total += _rss_mib(member)[0]
            count += 1
        except (OSError, KeyError):
            continue  # gone meanwhile, or a zombie
    return total, count


# --- 4. server RSS ---------------------------------------------------------------------------------------------
def bench_rss(tmp: Path, sqlite_path: Path | None, quick: bool) -> None:
    if sqlite_path is None:
        return
    import socket

    import httpx

    data = tmp / "ca-sweep"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "MAILKMS_DATA": str(data),
        "MAILKMS_DATABASE_URL": f"sqlite:///{sqlite_path}",
        "MAILKMS_CA_PASSPHRASE": PASS,
        "MAILKMS_POOL__SIZE": "0",
        "MAILKMS_SMTP__MODE": "relay",
        "MAILKMS_SMTP__RELAY_HOST": "127.0.0.1",
        "MAILKMS_SMTP__RELAY_PORT": "9",
        "MAILKMS_SMTP__STARTTLS": "false",
        "MAILKMS_SERVER__PUBLIC_URL": "http://kms.example.org/",
    }
    with sqlite3.connect(sqlite_path) as conn:
        certs = conn.execute("SELECT count(*) FROM certificates").fetchone()[0]
    n_ocsp = 200 if quick else 5000
    log = open(tmp / "rss-server.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mailkms"), "serve", "--port", str(port), "--http-port", "0"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        ctx = ssl.create_default_context(cafile=str(data / "ca" / "root.crt.pem"))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"https://localhost:{port}/healthz", verify=ctx, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        # While serving: /metrics, and OCSP for certificates of the store (each a look-up, a
        # signature and a cache entry), with RSS sampled throughout.
        issuing = x509.load_pem_x509_certificate((data / "ca" / "issuing.crt.pem").read_bytes())
        with sqlite3.connect(sqlite_path) as conn:
            serials = [int(r[0], 16) for r in conn.execute("SELECT serial FROM certificates LIMIT ?", (n_ocsp,))]
        name_hash = hashlib.sha1(issuing.subject.public_bytes()).digest()  # RFC 6960 CertID, as openssl sends it
        key_hash = x509.SubjectKeyIdentifier.from_public_key(issuing.public_key()).digest  # SHA-1 of the BIT STRING
        hwm = 0.0
        tree_peak, tree_count = 0.0, 1
        answered = 0
        with httpx.Client(verify=ctx, timeout=10) as client:
            for i, serial in enumerate(serials):
                req = (
                    ocsp.OCSPRequestBuilder()
                    .add_certificate_by_hash(name_hash, key_hash, serial, hashes.SHA1())
                    .build()
                    .public_bytes(serialization.Encoding.DER)
                )
                reply = client.post(
                    f"https://localhost:{port}/ocsp", content=req, headers={"Content-Type": "application/ocsp-request"}
                )
                if reply.status_code == 200 and ocsp.load_der_ocsp_response(reply.content).response_status.value == 0:
                    answered += 1
                if i % 10 == 0:
                    client.get(f"https://localhost:{port}/metrics")
                if i % 200 == 0:
                    hwm = max(hwm, _rss_mib(proc.pid)[1])
                    tree, members = _tree_rss_mib(proc.pid)
                    if tree > tree_peak:
                        tree_peak, tree_count = tree, members
        time.sleep(4)  # the background reminder sweep runs over the whole store
        rss, peak = _rss_mib(proc.pid)
        hwm = max(hwm, peak)
        tree, members = _tree_rss_mib(proc.pid)
        if tree > tree_peak:
            tree_peak, tree_count = tree, members
    finally:
        proc.terminate()
        proc.wait(20)
    NOTES.append(
        f"Server RSS: while it answered {len(serials):,} OCSP requests for certificates of the store "
        f"({answered:,} successful answers) and {len(serials) // 10:,} /metrics, with its reminder sweep."
    )
    ROWS.append(
        Row(
            f"server RSS with {certs:,} certificate rows in the store while serving OCSP and /metrics (SQLite)",
            f"server process {rss:.0f} MB (peak {hwm:.0f} MB); with its {tree_count - 1} worker processes "
            f"{tree_peak:.0f} MB summed at the highest sample",
            "—",
            "1M certificates ≤ 300 MB",
            met(tree_peak <= 300) + " (judged on the sum over the process tree; the store is never loaded whole)",
        )
    )


# --- 5. user import ---------------------------------------------------------------------------------------------
def bench_import(tmp: Path, quick: bool) -> None:
    """`mailkms user import` of 100,000 users as an administrator runs it: a real process, SQLite."""
    n = 2000 if quick else 100_000
    data = make_ca(tmp / "ca-import", KeyType.P256)
    users = tmp / "import.csv"
    users.write_text("email,name\n" + "".join(f"person{i}@example.org,Person {i}\n" for i in range(n)))
    tokens = tmp / "import-tokens.csv"
    env = {
        **os.environ,
        "MAILKMS_DATA": str(data),
        "MAILKMS_DATABASE_URL": f"sqlite:///{tmp / 'import.db'}",
        "MAILKMS_CA_PASSPHRASE": PASS,
        "MAILKMS_SERVER__PUBLIC_URL": "http://kms.example.org/",
    }
    mailkms = str(Path(sys.executable).parent / "mailkms")
    db = Database(env["MAILKMS_DATABASE_URL"])
    db.migrate()  # not timed
    db.dispose()
    start = time.perf_counter()
    done = subprocess.run(
        [mailkms, "user", "import", str(users), "--tokens-out", str(tokens), "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"user import exited {done.returncode}: {done.stderr[-300:]}")
    added = json.loads(done.stdout)["added"]
    progress = [line for line in done.stderr.splitlines() if line.startswith("import: ")]
    with sqlite3.connect(tmp / "import.db") as conn:
        stored = conn.execute("SELECT count(*) FROM users").fetchone()[0]
    ROWS.append(
        Row(
            f"`mailkms user import` of {n:,} users (one token each, audited), SQLite, whole process",
            f"{seconds:.1f} s = {fmt(rate(added, seconds))}",
            "—",
            "100,000 users with progress shown",
            met(added == stored == n >= 100_000 and len(progress) >= 10),
        )
    )
    NOTES.append(
        f"user import: {added:,} added, {stored:,} rows in the store, {len(progress)} progress lines on stderr "
        f"(a bar on a terminal); 500 users per transaction; load average {os.getloadavg()[0]:.2f}."
    )


# --- 6. other areas' scripts -----------------------------------------------------------------------------------
def other_scripts(quick: bool, budget: float) -> list[str]:
    extra_out: list[str] = []
    for name in OTHER_SCRIPTS:
        path = ROOT / "bench" / name
        if not path.exists():
            NOTES.append(f"bench/{name} is not in this tree: its figures are missing.")
            continue
        left = budget - (time.monotonic() - T0)
        if left < 30:
            NOTES.append(f"bench/{name} skipped: the 15-minute budget was spent")
            continue
        say(f"running bench/{name}")
        try:
            done = subprocess.run(
                [sys.executable, str(path), *(["--quick"] if quick and "--quick" in path.read_text() else [])],
                capture_output=True,
                text=True,
                timeout=left,
                cwd=ROOT,
            )
        except subprocess.TimeoutExpired:
            NOTES.append(f"bench/{name} did not finish within the budget")
            continue
        for line in done.stdout.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            is_row = line.lstrip().startswith("|") and len(cells) == 5  # | figure | mailkms | peer | goal | met |
            if is_row and not set("".join(cells)) <= set("-: ") and cells[0] != "figure":
                extra_out.append(line.strip())
            elif line.strip():
                NOTES.append(f"bench/{name}: {line.strip()}")
        if done.returncode != 0:
            NOTES.append(f"bench/{name} exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return extra_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny loops: checks the bench runs, figures meaningless")
    parser.add_argument("--skip-django-ca", action="store_true")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where the figures are written (default: docs/PERFORMANCE.md after a full run; a --quick or "
        "--only run only prints them unless --out is given). The file's own sections after the generated "
        "Notes (hand-written analyses) are kept.",
    )
    parser.add_argument("--budget", type=float, default=14 * 60, help="seconds for the whole run")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated sections (issuance, renewal, sweep, rss, import, others); default all",
    )
    args = parser.parse_args()
    desc = machine()
    tmp = Path(tempfile.mkdtemp(prefix="mailkms-bench-"))
    steps: list[tuple[str, Callable[[], object]]] = [
        ("issuance", lambda: bench_issuance(tmp, args.quick, args.skip_django_ca)),
        ("renewal", lambda: bench_renewal(tmp, args.quick)),
    ]
    sweep_db: list[Path | None] = [None]
    steps.append(("sweep", lambda: sweep_db.__setitem__(0, bench_sweep(tmp, args.quick))))
    steps.append(("rss", lambda: bench_rss(tmp, sweep_db[0], args.quick)))
    steps.append(("import", lambda: bench_import(tmp, args.quick)))
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    steps = [(name, step) for name, step in steps if not only or name in only]
    try:
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # a failed section is reported, the others still run
                NOTES.append(f"the {name} section failed: {exc.__class__.__name__}: {exc}")
                say(f"{name} failed: {exc!r}")
        extra = other_scripts(args.quick, args.budget) if not only or "others" in only else []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    header = "| figure | mailkms | peer in the same run | goal | met |\n|---|---|---|---|---|"
    table = "\n".join([header, *(r.line() for r in ROWS), *extra])
    elapsed = time.monotonic() - T0
    print(table)
    for note in NOTES:
        print(f"- {note}")
    print(f"(whole run: {elapsed:.0f} s)")
    when = SystemClock().now().strftime("%Y-%m-%d %H:%M UTC")
    doc = [
        "# mailkms performance",
        "",
        f"Measured by `make bench` (bench/run.py) on {when}{' — QUICK run, figures meaningless' if args.quick else ''}.",
        "Every figure stands beside its peer measured in the same run on the same machine; compare those, "
        "not figures from other machines.",
        "",
        "## Machine",
        "",
        *desc,
        "",
        "## Figures",
        "",
        table,
        "",
        "## Notes",
        "",
        *(f"- {n}" for n in NOTES),
        f"- The whole run took {elapsed:.0f} s.",
        "",
    ]
    out = args.out or (None if args.quick or only else ROOT / "docs" / "PERFORMANCE.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(doc) + analyses_after_notes(out))
        print(f"written to {out}")
    return 0


def analyses_after_notes(path: Path) -> str:
    """The sections a file holds after the generated "## Notes" (analyses written by hand): kept."""
    if not path.exists():
        return ""
    lines = path.read_text().splitlines()
    notes = next((i for i, line in enumerate(lines) if line == "## Notes"), None)
    if notes is None:
        return ""
    later = next((i for i in range(notes + 1, len(lines)) if lines[i].startswith("## ")), None)
    return "" if later is None else "\n" + "\n".join(lines[later:]) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
