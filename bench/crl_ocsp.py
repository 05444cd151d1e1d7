"""CRL generation and OCSP throughput, beside `openssl ca -gencrl` and `openssl ocsp` in the same run.

    .venv/bin/python bench/crl_ocsp.py [--quick] [--seconds 10] [--connections 16]

CRL: the same N revoked entries (random 159-bit serials, 9 in 10 keyCompromise, 1 in 10
superseded, revocation times spread over a year) go three ways, each in a child process of its
own so that its peak RSS (the child's ru_maxrss from wait4) is that measurement's alone:
  - `mailkms.pki.build_crl` signed with an RSA-3072 CA key (the core: one CRL, entries already in
    memory);
  - `Revocation.publish_crl(force=True)` on a SQLite store seeded with N revoked rows in CRL
    partitions of PARTITION (`[ca] crl_partition_size`), built as `serve` builds them: by 1 (or
    `--crl-workers 1,2`: 1, then 2) `CRLWorkers` processes (end to end: read, build, sign, store, audit, every partition re-signed).
    Its peak is the server process's VmHWM plus each worker's (summed: an upper bound of the tree);
  - `openssl ca -gencrl` with the same CA key and the same entries in its index.txt (one CRL).
Every CRL is loaded back: valid signature, N entries in all (and no partition above PARTITION).

OCSP: a real `mailkms serve` (RSA-3072 CA, delegated RSA-2048 responder; its plain-http port, one
process, and its OCSP-only listener, `--ocsp-processes` processes on one port) and an
`openssl ocsp -multi 2` responder on an RSA-3072 CA, each knowing the same certificates (1 in 10
revoked), driven by the same load generator: a separate process with a fixed number of
connections POSTing single-CertID SHA-1 requests for a fixed time; a response counts when it is
HTTP 200 and parses as SUCCESSFUL. openssl ocsp speaks HTTP/1.0 and closes after each answer, so
mailkms is measured both with keep-alive and with one connection per request. The machine has
2 cores: the load generator and the server share them (the rows say so, with the load average).
A few of the listener's answers (good and revoked) are judged by `openssl ocsp -respin`.

Rows are printed as `| figure | mailkms | peer | goal | met |` (bench/run.py collects them);
other lines are notes. `--quick` shrinks every loop to seconds (a smoke run, figures meaningless).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import json
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

BIN = Path(sys.executable).parent
SEED = 20240601
REASONS = ("keyCompromise", "superseded")  # index 1 for every 10th entry
YEAR = 365 * 24 * 3600
CHILD_TIMEOUT = 600  # a hung child must not hang `make bench`
PARTITION = 100_000  # [ca] crl_partition_size for the end-to-end CRL rows


T0 = time.monotonic()


def log(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {text}", file=sys.stderr, flush=True)


def clean_env(**extra: str) -> dict[str, str]:
    # The caller's MAILKMS_* (a passphrase, a database URL) must not leak into the bench's own data dir.
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MAILKMS_")}, **extra}


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def row(figure: str, mailkms: str, peer: str, goal: str, ok: bool) -> None:
    print(f"| {figure} | {mailkms} | {peer} | {goal} | {met(ok)} |", flush=True)


def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


# --- the shared inputs -------------------------------------------------------------------------------
def revocations(n: int, base: int) -> Iterator[tuple[int, int, str]]:
    """(serial, revoked at as epoch seconds, reason) for entry 0..n-1; the same for every consumer."""
    rng = random.Random(SEED)
    for i in range(n):
        yield rng.getrandbits(159) or 1, base - rng.randrange(YEAR), REASONS[i % 10 == 0]


def utc(epoch: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


def asn1_time(epoch: int) -> str:
    return utc(epoch).strftime("%y%m%d%H%M%SZ")


def sql_time(epoch: int) -> str:
    # The text SQLAlchemy's DateTime writes on SQLite; the CRL query compares these strings.
    return utc(epoch).strftime("%Y-%m-%d %H:%M:%S.%f")


def openssl_serial(serial: int) -> str:
    text = format(serial, "X")
    return "0" + text if len(text) % 2 else text  # openssl writes whole octets


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """An RSA-3072 self-signed CA (key unencrypted, in the temp dir): one key for mailkms's core CRL
    and openssl, so the signature costs the same on both sides."""
    key = rsa.generate_private_key(65537, 3072)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = folder / "ca.key", folder / "ca.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


# --- measured children -------------------------------------------------------------------------------
@dataclass
class Measured:
    seconds: float  # wall time seen by the parent (process start included)
    peak_mib: float  # the child's ru_maxrss
    report: dict[str, float]  # what a Python child printed as JSON on its last line


def hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_measured(cmd: list[str], folder: Path, env: dict[str, str] | None = None) -> Measured:
    """Run one child and reap it with wait4: its rusage, unlike RUSAGE_CHILDREN, is its own."""
    out, err = folder / "child.out", folder / "child.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env)
        watchdog = threading.Timer(CHILD_TIMEOUT, proc.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} exited {proc.returncode}: {err.read_text()[-800:]}")
    lines = out.read_text().strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return Measured(seconds, usage.ru_maxrss / 1024, report)


def child_command(kind: str, args: dict[str, object], folder: Path) -> list[str]:
    # Arguments go through a file: one argv string may not exceed 128 KiB on Linux.
    path = folder / f"{kind}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(args))
    return [sys.executable, __file__, "--child", kind, str(path)]


def python_child(kind: str, args: dict[str, object], folder: Path) -> Measured:
    return run_measured(child_command(kind, args, folder), folder, clean_env())


def child_crl_core(args: dict[str, object]) -> dict[str, float]:
    from mailkms.pki import RevokedEntry, SoftSigner, build_crl

    baseline = hwm_mib()
    key = serialization.load_pem_private_key(Path(str(args["key"])).read_bytes(), None)
    cert = x509.load_pem_x509_certificate(Path(str(args["cert"])).read_bytes())
    flags = {"keyCompromise": x509.ReasonFlags.key_compromise, "superseded": x509.ReasonFlags.superseded}
    entries = [
        RevokedEntry(serial, utc(at), flags[reason])
        for serial, at, reason in revocations(int(str(args["n"])), int(str(args["base"])))
    ]
    with_entries = hwm_mib()
    now = dt.datetime.now(dt.UTC)
    start = time.perf_counter()
    crl = build_crl(
        SoftSigner(cert, key),  # type: ignore[arg-type]
        entries,
        number=1,
        this_update=now,
        next_update=now + dt.timedelta(days=7),
    )
    Path(str(args["out"])).write_bytes(crl.public_bytes(serialization.Encoding.DER))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "baseline_mib": baseline, "with_entries_mib": with_entries}


def worker_hwm_mib(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


def child_crl_store(args: dict[str, object]) -> dict[str, float]:
    """`publish_crl(force=True)` as `serve` runs it: CRLs built by `workers` processes (0: in this one)."""
    from sqlalchemy import select

    from mailkms.clock import SystemClock
    from mailkms.config import load_settings
    from mailkms.services import CRLWorkers, Services

    workers = int(str(args["workers"]))
    settings = load_settings(
        Path(str(args["data"])),
        database_url=str(args["url"]),
        pool={"size": 0},
        ca={"crl_partition_size": int(str(args["partition"]))},
        revocation={"crl_workers": workers},
    )
    services = Services.build(settings, SystemClock())
    pool = CRLWorkers(settings.effective_database_url, services.ca, workers) if workers else None
    if pool is not None:
        services.revocation.builder = pool
        worker_pids = pool.start()  # the workers are up (and have opened the key) before timing
    baseline = hwm_mib()
    start = time.perf_counter()
    services.revocation.publish_crl("bench", force=True)
    seconds = time.perf_counter() - start
    services.revocation.refresh_latest()
    workers_mib = worker_hwm_mib(worker_pids) if pool is not None else 0.0
    parent_mib = hwm_mib()
    crls = 0
    entries = 0
    from mailkms.store import PublishedCRL

    with services.db.read_only() as session:
        scopes = list(session.execute(select(PublishedCRL.scope)).scalars())
    with open(str(args["out"]), "wb") as out:  # every partition's CRL, length-prefixed, for the parent's check
        for scope in scopes:
            view = services.revocation.current_crl(-1, scope)
            assert view is not None
            out.write(len(view.der).to_bytes(4, "big") + view.der)
            crls += 1
            entries += view.entries
    if pool is not None:
        pool.close()
    services.db.dispose()
    return {
        "seconds": seconds,
        "baseline_mib": baseline,
        "parent_mib": parent_mib,
        "workers_mib": workers_mib,
        "tree_mib": parent_mib + workers_mib,
        "entries": entries,
        "crls": crls,
    }


# --- CRL ---------------------------------------------------------------------------------------------
OPENSSL_CNF = """\
[ ca ]
default_ca = peer
[ peer ]
dir = {dir}
database = $dir/index.txt
crlnumber = $dir/crlnumber
certificate = {cert}
private_key = {key}
default_md = sha256
default_crl_days = 7
unique_subject = no
crl_extensions = crl_ext
[ crl_ext ]
authorityKeyIdentifier = keyid:always
"""


def index_line(serial: int, expiry: int, revoked: tuple[int, str] | None = None) -> str:
    """One index.txt line: status, expiry, revocation "time,reason" (empty when valid), serial, file, DN."""
    status, when = ("R", f"{asn1_time(revoked[0])},{revoked[1]}") if revoked else ("V", "")
    hex_serial = openssl_serial(serial)
    # A DN per certificate: `openssl ocsp` indexes names as unique (index.txt.attr defaults).
    return f"{status}\t{asn1_time(expiry)}\t{when}\t{hex_serial}\tunknown\t/CN={hex_serial}\n"


def openssl_gencrl(folder: Path, key: Path, cert: Path, n: int, base: int) -> tuple[Measured, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "index.txt", "w") as fh:
        fh.writelines(index_line(serial, base + YEAR, (at, reason)) for serial, at, reason in revocations(n, base))
    (folder / "crlnumber").write_text("01\n")
    cnf = folder / "openssl.cnf"
    cnf.write_text(OPENSSL_CNF.format(dir=folder, cert=cert, key=key))
    out = folder / "crl.pem"
    measured = run_measured(["openssl", "ca", "-gencrl", "-config", str(cnf), "-out", str(out)], folder)
    return measured, out


def check_crl(crl: x509.CertificateRevocationList, n: int, issuer: x509.Certificate, who: str) -> None:
    if len(crl) != n or not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise RuntimeError(f"{who}: CRL has {len(crl)} entries (wanted {n}) or a bad signature")


def seed_revoked(url_path: Path, n: int, base: int, partition: int = 0) -> None:
    """N revoked certificate rows, bulk-inserted with sqlite3 (the ORM would take minutes at 1M); with
    `partition`, in partitions of that many as issuance assigns them, each with its published_crls row."""
    from mailkms.store import Database

    db = Database(f"sqlite:///{url_path}")
    db.migrate()
    db.dispose()
    not_before, not_after = sql_time(base - YEAR), sql_time(base + YEAR)
    rows = (
        (format(serial, "x"), None, "signing", 0, not_before, not_after, b"dummy", sql_time(at), reason,
         i // partition + 1 if partition else None)
        for i, (serial, at, reason) in enumerate(revocations(n, base))
    )  # fmt: skip
    with sqlite3.connect(url_path) as conn:
        # Random serials land all over the unique index: a big page cache keeps 1M rows under a minute.
        conn.execute("PRAGMA cache_size = -1048576")
        conn.execute("PRAGMA synchronous = OFF")
        conn.executemany(
            "INSERT INTO certificates (serial, user_id, kind, generation, not_before, not_after, der,"
            " revoked_at, revocation_reason, crl_partition) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        if partition:
            parts = range(1, (n + partition - 1) // partition + 1)
            conn.executemany(
                "INSERT INTO published_crls (scope, number, entries, partition, assigned, revision)"
                " VALUES (?, 0, 0, ?, ?, 0)",
                [(f"issuing-{p}", p, min(partition, n - (p - 1) * partition)) for p in parts],
            )
    conn.close()


def mailkms_init(data: Path) -> None:
    subprocess.run(
        [str(BIN / "mailkms"), "init", "--hostname", "localhost", "--public-url", "http://kms.example.org/"],
        env=clean_env(MAILKMS_DATA=str(data)),
        check=True,
        capture_output=True,
        timeout=300,
    )


def bench_crl(tmp: Path, data: Path, quick: bool, crl_workers: tuple[int, ...] = (1,)) -> None:
    sizes = (1_000, 10_000) if quick else (10_000, 100_000, 1_000_000)
    store_sizes = (10_000,) if quick else (1_000_000,)
    partition = 2_000 if quick else PARTITION
    base = int(time.time()) - 60
    key, cert_path = make_ca(tmp / "crl-ca", "mailkms bench CRL CA")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    issuing = x509.load_pem_x509_certificate((data / "ca" / "issuing.crt.pem").read_bytes())
    goal = "≤ openssl's time and ≤ ½ its peak RSS"
    peers: dict[int, Measured] = {}
    notes = []
    for n in sizes:
        work = tmp / f"crl-{n}"
        work.mkdir()
        log(f"CRL core, {n:,} entries")
        out = work / "mailkms.der"
        core = python_child(
            "crl-core", {"n": n, "base": base, "key": str(key), "cert": str(cert_path), "out": str(out)}, work
        )
        check_crl(x509.load_der_x509_crl(out.read_bytes()), n, cert, "mailkms")
        log(f"openssl ca -gencrl, {n:,} entries")
        peer, peer_out = openssl_gencrl(work / "openssl", key, cert_path, n, base)
        check_crl(x509.load_pem_x509_crl(peer_out.read_bytes()), n, cert, "openssl")
        peers[n] = peer
        secs = core.report["seconds"]
        row(
            f"CRL with {label(n)} revoked entries, build + sign + DER (core `build_crl`, RSA-3072), s / peak RSS",
            f"{secs:.2f} s / {core.peak_mib:.0f} MiB",
            f"openssl ca -gencrl {peer.seconds:.2f} s / {peer.peak_mib:.0f} MiB",
            goal,
            secs <= peer.seconds and core.peak_mib <= peer.peak_mib / 2,
        )
        notes.append(
            f"{label(n)}: child RSS {core.report['baseline_mib']:.0f} MiB after imports,"
            f" {core.report['with_entries_mib']:.0f} MiB with the entries in memory, whole child {core.seconds:.1f} s"
        )
        shutil.rmtree(work)
    print(
        "CRL core: the time is build_crl + DER + write, with the entries already in memory (openssl's "
        "figure is the whole process: read index.txt, build, sign, write PEM). " + "; ".join(notes) + "."
    )
    for n in store_sizes:
        work = tmp / f"crl-store-{n}"
        work.mkdir()
        db_path = work / "store.db"
        log(f"seeding {n:,} revoked rows into SQLite, partitions of {partition:,}")
        started = time.perf_counter()
        seed_revoked(db_path, n, base, partition)
        seeded = time.perf_counter() - started
        peer = peers.get(n)
        if peer is None:  # the --quick sizes differ; never compare against another N
            log(f"openssl ca -gencrl, {n:,} entries")
            peer, _ = openssl_gencrl(work / "openssl", key, cert_path, n, base)
        for workers in crl_workers:
            log(f"publish_crl(force=True), {n:,} entries, {workers} worker process(es)")
            out = work / "mailkms.crls"
            load_before = os.getloadavg()[0]
            e2e = python_child(
                "crl-store",
                {"data": str(data), "url": f"sqlite:///{db_path}", "out": str(out), "partition": partition,
                 "workers": workers},
                work,
            )  # fmt: skip
            blob, total, crls = out.read_bytes(), 0, 0
            while blob:
                size = int.from_bytes(blob[:4], "big")
                crl = x509.load_der_x509_crl(blob[4 : 4 + size])
                blob = blob[4 + size :]
                if not crl.is_signature_valid(issuing.public_key()):  # type: ignore[arg-type]
                    raise RuntimeError("mailkms publish_crl: a CRL with a bad signature")
                if len(crl) > partition:
                    raise RuntimeError(f"mailkms publish_crl: a partition CRL with {len(crl)} entries")
                total += len(crl)
                crls += 1
            if total != n:
                raise RuntimeError(f"mailkms publish_crl: {total} entries in {crls} CRLs, wanted {n}")
            secs = e2e.report["seconds"]
            tree = e2e.report["tree_mib"]
            row(
                f"CRL with {label(n)} revoked entries, end to end from SQLite, {crls - 1} partition CRLs of ≤ "
                f"{label(partition)} (`publish_crl(force=True)`, {workers} worker process{'es' if workers > 1 else ''};"
                f" load {load_before:.1f}), s / peak RSS of server + workers",
                f"{secs:.2f} s / {tree:.0f} MiB",
                f"openssl ca -gencrl {peer.seconds:.2f} s / {peer.peak_mib:.0f} MiB (one CRL)",
                "≤ openssl's time and ≤ 300 MB",
                secs <= peer.seconds and tree * 1.048576 <= 300,
            )
            print(
                f"CRL end to end {label(n)}, {workers} worker(s): seeding the rows took {seeded:.1f} s (not timed); "
                f"the server process held {e2e.report['baseline_mib']:.0f} MiB before publishing and "
                f"{e2e.report['parent_mib']:.0f} MiB at its peak, the workers {e2e.report['workers_mib']:.0f} MiB "
                f"at theirs (summed); every CRL checked: signature, ≤ {partition:,} entries, {total:,} in all."
            )
        shutil.rmtree(work)


# --- OCSP --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha1_certid_hashes(ca: x509.Certificate) -> tuple[bytes, bytes]:
    """issuerNameHash and issuerKeyHash (RFC 6960 4.1.1) as openssl computes them by default."""
    digest = hashes.Hash(hashes.SHA1())
    digest.update(ca.subject.public_bytes())
    name_hash = digest.finalize()
    digest = hashes.Hash(hashes.SHA1())
    # For RSA the subjectPublicKey BIT STRING holds exactly the PKCS#1 RSAPublicKey.
    digest.update(ca.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1))
    return name_hash, digest.finalize()


def http_request(der: bytes, keep_alive: bool) -> bytes:
    version = "HTTP/1.1" if keep_alive else "HTTP/1.0"  # 1.0 without keep-alive: the server closes after one
    head = (
        f"POST /ocsp {version}\r\nHost: 127.0.0.1\r\nContent-Type: application/ocsp-request\r\n"
        f"Content-Length: {len(der)}\r\n\r\n"
    )
    return head.encode() + der


def ocsp_requests(ca: x509.Certificate, serials: list[int]) -> list[bytes]:
    name_hash, key_hash = sha1_certid_hashes(ca)
    return [
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(name_hash, key_hash, serial, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
        for serial in serials
    ]


def one_shot(port: int, der: bytes) -> ocsp.OCSPResponse | None:
    """One request on its own connection; None unless HTTP 200 with an OCSP response."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(http_request(der, keep_alive=False))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        return None
    return ocsp.load_der_ocsp_response(body)


async def drive(port: int, payloads: list[bytes], keep_alive: bool, conns: int, seconds: float) -> dict[str, float]:
    """`conns` connections, each sending its next request as soon as the previous answer is in."""
    loop = asyncio.get_running_loop()
    counts = {"ok": 0, "failed": 0}
    # Each distinct answer body is parsed by cryptography once; the same bytes again are the same
    # answer (cached answers are byte-identical): the load generator's CPU goes to the connections.
    checked: set[bytes] = set()

    def successful(body: bytes) -> bool:
        if ocsp.load_der_ocsp_response(body).response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
            return False
        checked.add(body)
        return True

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> bytes:
        writer.write(payload)
        if not keep_alive:
            return await reader.read()  # to EOF: HTTP/1.0, the server closes
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        return head + await reader.readexactly(length)

    async def worker(first: int, deadline: float) -> None:
        i = first
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while loop.time() < deadline:
            payload = payloads[i % len(payloads)]
            i += conns
            try:
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", port)
                data = await exchange(*conn, payload)
                head, _, body = data.partition(b"\r\n\r\n")
                good = b" 200 " in head.split(b"\r\n", 1)[0] and (body in checked or successful(body))
            except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration):
                good = False
            counts["ok" if good else "failed"] += 1
            if conn is not None and (not keep_alive or not good):
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    start = loop.time()
    await asyncio.gather(*(worker(k, start + seconds) for k in range(conns)))
    return {"ok": counts["ok"], "failed": counts["failed"], "elapsed": loop.time() - start}


def child_load(args: dict[str, object]) -> dict[str, float]:
    payloads = [http_request(bytes.fromhex(h), bool(args["keep_alive"])) for h in args["requests"]]  # type: ignore[attr-defined]
    go = float(str(args["go"]))
    while time.time() < go:  # every load process starts together
        time.sleep(0.005)
    import uvloop  # the load generator on the same event loop as the servers: its CPU is half the machine

    result = uvloop.run(
        drive(
            int(str(args["port"])),
            payloads,
            bool(args["keep_alive"]),
            int(str(args["conns"])),
            float(str(args["seconds"])),
        )
    )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu"] = usage.ru_utime + usage.ru_stime
    return result


def cpu_seconds(pid: int, tree: bool = False) -> float:
    """CPU time of a process and its direct children (openssl's -multi workers); with `tree`, of its
    whole process group (serve's OCSP listener processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid or (tree and int(fields[2]) == pid):
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


@dataclass
class Load:
    rate: float
    failed: int
    server_cpu: float  # cores busy in the server during the run
    client_cpu: float
    load: float = 0.0  # the 1-minute load average as the run began


def load(
    tmp: Path,
    port: int,
    server_pid: int,
    requests: list[bytes],
    keep_alive: bool,
    conns: int,
    seconds: float,
    clients: int,
    tree: bool = False,
) -> Load:
    load_avg = os.getloadavg()[0]
    go = time.time() + 1.5  # past the load processes' start-up
    procs = []
    for c in range(clients):
        share = conns // clients + (c < conns % clients)
        args = {
            "port": port,
            "keep_alive": keep_alive,
            "conns": share,
            "seconds": seconds,
            "go": go,
            "requests": [r.hex() for r in requests[c::clients]],
        }
        out = open(tmp / f"load-{c}.out", "w+")
        procs.append((subprocess.Popen(child_command("load", args, tmp), stdout=out), out))
    time.sleep(max(0.0, go - time.time()))
    cpu0, t0 = cpu_seconds(server_pid, tree), time.perf_counter()
    time.sleep(seconds)
    server_cpu = (cpu_seconds(server_pid, tree) - cpu0) / (time.perf_counter() - t0)
    results = []
    for proc, out in procs:
        if proc.wait(timeout=seconds + 60) != 0:
            raise RuntimeError("a load process failed")
        out.seek(0)
        results.append(json.loads(out.read().strip().splitlines()[-1]))
        out.close()
    ok = sum(r["ok"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    failed = sum(r["failed"] for r in results)
    return Load(ok / elapsed, failed, server_cpu, sum(r["cpu"] for r in results) / elapsed, load_avg)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group led by a process we started: openssl's -multi parent ignores a
    SIGTERM of its own until a worker dies, and respawns workers killed without one."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_ready(proc: subprocess.Popen[bytes], port: int, probe: bytes, what: str, logfile: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {logfile.read_text()[-800:]}")
        if one_shot(port, probe) is not None:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer within 90 s")


def seed_issued(data: Path, serials: list[int], revoked: set[int], base: int) -> None:
    """Certificate rows for the OCSP lookups (the responder reads serial and revocation only)."""
    from mailkms.config import load_settings
    from mailkms.store import Database

    url = load_settings(data).effective_database_url
    assert url.startswith("sqlite:///"), url
    db_path = Path(url.removeprefix("sqlite:///"))
    db = Database(url)
    db.migrate()
    db.dispose()
    with sqlite3.connect(db_path) as conn:
        conn.executemany(
            "INSERT INTO certificates (serial, user_id, kind, generation, not_before, not_after, der,"
            " revoked_at, revocation_reason) VALUES (?, NULL, 'signing', 0, ?, ?, x'00', ?, ?)",
            [
                (
                    format(s, "x"),
                    sql_time(base - 86400),
                    sql_time(base + YEAR),
                    sql_time(base) if s in revoked else None,
                    "keyCompromise" if s in revoked else None,
                )
                for s in serials
            ],
        )
    conn.close()


def in_process_rates(data: Path, requests: list[bytes], seconds: float) -> tuple[float, float]:
    """Cached answers per second in this process, without sockets: from `answer_cached` alone, and
    through the plain-http ASGI app (routing, middleware, metrics). The gap to the HTTP figure is
    what uvicorn and the kernel add."""
    from mailkms.api import create_http_app
    from mailkms.clock import SystemClock
    from mailkms.config import load_settings
    from mailkms.services import Services

    services = Services.build(load_settings(data, pool={"size": 0}), SystemClock())
    app = create_http_app(services)

    async def through_app(der: bytes) -> None:
        headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/ocsp-request")]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/ocsp",
            "raw_path": b"/ocsp",
            "query_string": b"",
            "root_path": "",
            "headers": [*headers, (b"content-length", str(len(der)).encode())],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        messages = [{"type": "http.request", "body": der, "more_body": False}]

        async def receive() -> dict[str, object]:
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)  # a disconnect never comes: the app has its body
            return {"type": "http.disconnect"}

        async def send(message: dict[str, object]) -> None:
            if message["type"] == "http.response.start" and message["status"] != 200:
                raise RuntimeError(f"the ASGI app answered {message['status']}")

        await app(scope, receive, send)  # type: ignore[arg-type]

    async def app_rate() -> float:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for der in requests:
                await through_app(der)
            count += len(requests)
        return count / (time.perf_counter() - start)

    try:
        for der in requests:
            services.ocsp.answer(der)  # this process's cache
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for der in requests:
                services.ocsp.answer_cached(der)
            count += len(requests)
        return count / (time.perf_counter() - start), asyncio.run(app_rate())
    finally:
        services.db.dispose()


def respin_check(tmp: Path, data: Path, port: int, serials: list[int], revoked: set[int], requests: list[bytes]) -> str:
    """A few answers from the listener, judged by `openssl ocsp -respin` against the real chain."""
    folder = tmp / "respin"
    folder.mkdir()
    issuing, root = data / "ca" / "issuing.crt.pem", data / "ca" / "root.crt.pem"
    picks = [i for i, s in enumerate(serials) if s in revoked][:3] + [
        i for i, s in enumerate(serials) if s not in revoked
    ][:3]
    seen = []
    for i in picks:
        answer = one_shot(port, requests[i])
        if answer is None:
            raise RuntimeError("the OCSP listener did not answer the spot check")
        path = folder / f"{i}.der"
        path.write_bytes(answer.public_bytes(serialization.Encoding.DER))
        done = subprocess.run(
            ["openssl", "ocsp", "-respin", str(path), "-issuer", str(issuing), "-CAfile", str(root),
             "-verify_other", str(issuing), "-serial", f"0x{serials[i]:x}", "-no_nonce"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        text = done.stdout + done.stderr
        want = "revoked" if serials[i] in revoked else "good"
        if done.returncode != 0 or "Response verify OK" not in text or f": {want}" not in text:
            raise RuntimeError(f"openssl ocsp -respin: {text[-600:]}")
        seen.append(want)
    return f"{seen.count('good')} good, {seen.count('revoked')} revoked, each 'Response verify OK'"


def bench_ocsp(
    tmp: Path, data: Path, quick: bool, seconds: float, conns: int, clients: int, processes: int = 2
) -> None:
    certs = 200 if quick else 1000
    base = int(time.time()) - 60
    rng = random.Random(SEED + 1)
    serials = [rng.getrandbits(159) or 1 for _ in range(certs)]
    revoked = set(serials[::10])
    seed_issued(data, serials, revoked, base)
    issuing = x509.load_pem_x509_certificate((data / "ca" / "issuing.crt.pem").read_bytes())
    mk_requests = ocsp_requests(issuing, serials)

    # mailkms serve: its own session, so that the whole group goes at the end. Its OCSP-only listener
    # ([revocation] ocsp_listen) runs in `processes` processes on one port.
    ocsp_port = free_port()
    env = clean_env(
        MAILKMS_DATA=str(data),
        MAILKMS_REVOCATION__OCSP_LISTEN=f"127.0.0.1:{ocsp_port}",
        MAILKMS_REVOCATION__OCSP_PROCESSES=str(processes),
    )
    http_port = free_port()
    serve_log = tmp / "serve.log"
    cmd = [str(BIN / "mailkms"), "serve", "--port", str(free_port()), "--http-port", str(http_port)]
    cmd += ["--mail-sink-port", str(free_port())]
    figures: dict[str, Load] = {}
    with open(serve_log, "wb") as fh:
        server = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log("OCSP: starting mailkms serve")
        wait_ready(server, http_port, mk_requests[0], "mailkms serve", serve_log)
        wait_ready(server, ocsp_port, mk_requests[0], "mailkms OCSP listener", serve_log)
        for port, where in ((http_port, "plain-http app"), (ocsp_port, "OCSP listener")):
            log(f"OCSP: warming mailkms's caches ({where}), one request per certificate ({certs}), 3 rounds")
            for _ in range(3 if port == ocsp_port else 1):  # each listener process has its own cache
                statuses = [one_shot(port, der) for der in mk_requests]
            good = sum(1 for r in statuses if r is not None and r.certificate_status is ocsp.OCSPCertStatus.GOOD)
            bad = sum(1 for r in statuses if r is not None and r.certificate_status is ocsp.OCSPCertStatus.REVOKED)
            if (good, bad) != (certs - len(revoked), len(revoked)):
                raise RuntimeError(f"mailkms ({where}) answered {good} good and {bad} revoked of {certs}")
        spot = respin_check(tmp, data, ocsp_port, serials, revoked, mk_requests)
        for keep_alive in (True, False):
            log(f"OCSP: mailkms, {'keep-alive' if keep_alive else 'one connection per request'}, {seconds:.0f} s")
            figures[f"mailkms-{keep_alive}"] = load(
                tmp, http_port, server.pid, mk_requests, keep_alive, conns, seconds, clients
            )
            log(f"OCSP: mailkms listener, {'keep-alive' if keep_alive else 'one connection per request'}")
            figures[f"listener-{keep_alive}"] = load(
                tmp, ocsp_port, server.pid, mk_requests, keep_alive, conns, seconds, clients, tree=True
            )
    finally:
        stop_group(server)

    # The peer: openssl ocsp on an RSA-3072 CA that signs its own answers, the same certificates.
    peer_dir = tmp / "ocsp-peer"
    key, cert_path = make_ca(peer_dir, "mailkms bench OCSP peer CA")
    with open(peer_dir / "index.txt", "w") as fh:
        fh.writelines(index_line(s, base + YEAR, (base, "keyCompromise") if s in revoked else None) for s in serials)
    peer_requests = ocsp_requests(x509.load_pem_x509_certificate(cert_path.read_bytes()), serials)
    peer_port = free_port()
    peer_log = peer_dir / "ocsp.log"
    cmd = ["openssl", "ocsp", "-index", str(peer_dir / "index.txt"), "-port", str(peer_port)]
    cmd += ["-rsigner", str(cert_path), "-rkey", str(key), "-CA", str(cert_path), "-multi", "2", "-nmin", "5"]
    with open(peer_log, "wb") as fh:
        # No new session: with -multi openssl makes its own process group, which fails for a session leader.
        peer = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    try:
        log("OCSP: openssl ocsp -multi 2")
        wait_ready(peer, peer_port, peer_requests[0], "openssl ocsp", peer_log)
        sample = [one_shot(peer_port, der) for der in peer_requests[:20]]
        if any(r is None or r.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL for r in sample):
            raise RuntimeError("openssl ocsp did not answer the sample")
        log(f"OCSP: openssl ocsp, one connection per request, {seconds:.0f} s")
        figures["openssl"] = load(tmp, peer_port, peer.pid, peer_requests, False, conns, seconds, clients)
    finally:
        stop_group(peer)

    log("OCSP: the cached answer path alone, in process")
    cached_rate, app_rate = in_process_rates(data, mk_requests, 0.5 if quick else 2.0)

    peer_load = figures["openssl"]
    where = f"loopback, {conns} connections from {clients} load process{'es' if clients > 1 else ''}, {seconds:.0f} s, client and server share 2 cores"
    peer_text = f"openssl ocsp -multi 2, RSA-3072 CA, one connection per request: {peer_load.rate:,.0f}/s"
    for keep_alive, how in ((True, "keep-alive (HTTP/1.1)"), (False, "one connection per request (HTTP/1.0)")):
        factor = 20 if keep_alive else 10
        for name, what in (("mailkms", "the server's plain-http port, one process"),
                           ("listener", f"the OCSP-only listener, {processes} processes on one port")):  # fmt: skip
            mine = figures[f"{name}-{keep_alive}"]
            row(
                f"OCSP responses/s over plain HTTP POST, {how}, {what}, {certs} certificates, cache warm ({where};"
                f" load {mine.load:.1f})",
                f"{mine.rate:,.0f}/s ({mine.rate / peer_load.rate:.1f}×)",
                peer_text + f" (load {peer_load.load:.1f})",
                f"≥ {factor} × openssl",
                mine.rate >= factor * peer_load.rate,
            )
    print(f"OCSP answers from the listener checked by `openssl ocsp -respin` (good and revoked): {spot}")
    for name, fig in figures.items():
        print(
            f"OCSP {name.replace('-True', ' keep-alive').replace('-False', ' per connection')}: "
            f"server busy {fig.server_cpu:.2f} cores, load generator {fig.client_cpu:.2f} cores, {fig.failed} failed"
        )
    stack = "with uvloop" if importlib.util.find_spec("uvloop") else "asyncio without uvloop"
    stack += ", httptools" if importlib.util.find_spec("httptools") else ", h11 (no httptools)"
    print(
        f"OCSP in process, no sockets, one core: OCSPResponder.answer_cached alone {cached_rate:,.0f}/s, through the "
        f"plain-http ASGI app {app_rate:,.0f}/s; the rest of each request's cost is uvicorn's. uvicorn here runs "
        f"{stack}, one process. mailkms signs with its delegated RSA-2048 responder (once per certificate, then "
        "from cache); openssl signs every answer with the RSA-3072 CA key."
    )


# --- main --------------------------------------------------------------------------------------------
CHILDREN = {"crl-core": child_crl_core, "crl-store": child_crl_store, "load": child_load}


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(CHILDREN[sys.argv[2]](json.loads(Path(sys.argv[3]).read_text()))), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny loops: checks the bench runs, figures meaningless")
    parser.add_argument("--seconds", type=float, help="load time per OCSP measurement (default 10, 2 with --quick)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent OCSP connections")
    parser.add_argument("--clients", type=int, default=1, help="load-generator processes")
    parser.add_argument("--ocsp-processes", type=int, default=2, help="processes of the OCSP-only listener")
    parser.add_argument(
        "--crl-workers", default="1", help="comma-separated CRL worker counts for the end-to-end rows (e.g. 1,2)"
    )
    parser.add_argument("--skip-crl", action="store_true")
    parser.add_argument("--skip-ocsp", action="store_true")
    args = parser.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    load_at_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="mailkms-bench-crl-ocsp-"))
    try:
        data = tmp / "data"
        log("mailkms init (RSA-3072 CA)")
        mailkms_init(data)
        if not args.skip_crl:
            bench_crl(tmp, data, args.quick, tuple(int(w) for w in args.crl_workers.split(",")))
        if not args.skip_ocsp:
            bench_ocsp(tmp, data, args.quick, seconds, args.connections, args.clients, args.ocsp_processes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    quick = " (--quick: figures meaningless)" if args.quick else ""
    print(
        f"bench/crl_ocsp.py took {time.monotonic() - T0:.0f} s{quick}; load average {load_at_start:.2f} at its "
        f"start, {os.getloadavg()[0]:.2f} at its end ({os.cpu_count()} cores; other work on the machine skews figures)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
