"""EST simpleenroll requests per second over HTTPS, beside `openssl ca` in the same run.

A bounded local load: a fresh data folder, a fixed number of users with their one-time tokens
and pre-made CSRs, one `mailkms serve` on loopback, and a concurrent httpx client that sends each
CSR once (every request spends a token and issues a whole pair: the signing certificate, a
server-made RSA-2048 encryption key, its certificate, the archive envelope and the audit
records). The peer signs the same CSRs with the same issuing CA key with `openssl ca`, one
process per CSR: first the signing certificate alone, then the whole pair's work (`openssl ca`,
`openssl genpkey` RSA-2048, `openssl req`, `openssl ca`). No EST server is packaged for Debian
or PyPI to compare with over the wire, so the peer is the CA work without EST around it.

    .venv/bin/python bench/est.py [--users 200] [--concurrency 8] [--peer 60]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailkms.clock import SystemClock
from mailkms.config import load_settings
from mailkms.services import Services

BIN = Path(sys.executable).parent
WARM_UP = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_csr(mailbox: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, mailbox), x509.NameAttribute(NameOID.EMAIL_ADDRESS, mailbox)]
    )
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def prepare(data: Path, users: int) -> list[tuple[str, str, bytes]]:
    env = {**os.environ, "MAILKMS_DATA": str(data)}
    env.pop("MAILKMS_CA_PASSPHRASE", None)
    subprocess.run(
        [str(BIN / "mailkms"), "init", "--hostname", "localhost", "--public-url", "http://kms.example.org/"],
        env=env,
        check=True,
        capture_output=True,
    )
    services = Services.build(load_settings(data), SystemClock())
    work = []
    for i in range(users):
        mailbox = f"user{i:05d}@example.org"
        token = services.users.add(mailbox, "", None, "admin:bench")
        work.append((mailbox, token, make_csr(mailbox)))
    services.db.dispose()
    return work


async def load(
    port: int, root: Path, work: list[tuple[str, str, bytes]], concurrency: int
) -> tuple[float, list[float]]:
    url = f"https://localhost:{port}/.well-known/est/simpleenroll"
    queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    latencies: list[float] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            mailbox, token, csr = queue.get_nowait()
            started = time.perf_counter()
            reply = await client.post(
                url,
                content=base64.encodebytes(csr),
                headers={"Content-Type": "application/pkcs10"},
                auth=(mailbox, token),
            )
            latencies.append(time.perf_counter() - started)
            if reply.status_code != 200:
                raise SystemExit(f"{mailbox}: {reply.status_code} {reply.text}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(verify=str(root), limits=limits, timeout=120) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - started, latencies


def fill_pool(data: Path, size: int) -> float:
    """`mailkms pool fill` with [pool] size = `size` before the server starts (not timed in the row)."""
    env = {**os.environ, "MAILKMS_DATA": str(data), "MAILKMS_POOL__SIZE": str(size)}
    env.pop("MAILKMS_CA_PASSPHRASE", None)
    started = time.perf_counter()
    subprocess.run([str(BIN / "mailkms"), "pool", "fill", "--json"], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def serve(data: Path, port: int, pool: int = 0) -> subprocess.Popen[bytes]:
    # One load generator on one address: the per-client rate limit would measure itself. `pool`: [pool]
    # size for the server (0: its default); bench/cmp.py starts its server here too.
    env = {**os.environ, "MAILKMS_DATA": str(data), "MAILKMS_LIMITS__RATE_PER_MINUTE": "0"}
    if pool:
        env["MAILKMS_POOL__SIZE"] = str(pool)
    env.pop("MAILKMS_CA_PASSPHRASE", None)
    command = [str(BIN / "mailkms"), "serve", "--port", str(port)]
    command += ["--http-port", str(free_port()), "--mail-sink-port", str(free_port())]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if (
                httpx.get(f"https://localhost:{port}/healthz", verify=str(data / "ca" / "root.crt.pem")).status_code
                == 200
            ):
                return server
        except httpx.HTTPError:
            time.sleep(0.3)
    server.terminate()
    raise SystemExit("mailkms serve did not start")


# --- the peer: openssl ca, one process per CSR ------------------------------------------------------
CA_CONFIG = """
[ ca ]
default_ca = est_peer
[ est_peer ]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/certs
rand_serial = yes
default_md = sha256
default_days = 548
policy = any_name
email_in_dn = yes
unique_subject = no
copy_extensions = none
x509_extensions = {ext}
[ any_name ]
commonName = optional
emailAddress = optional
[ {ext} ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,{key_usage}
extendedKeyUsage = emailProtection
subjectAltName = email:copy
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
certificatePolicies = 2.23.140.1.5.1.3
crlDistributionPoints = URI:http://kms.example.org/crl/issuing.crl
authorityInfoAccess = caIssuers;URI:http://kms.example.org/ca/issuing.crt,OCSP;URI:http://kms.example.org/ocsp
"""


def openssl_peer(data: Path, work: list[tuple[str, str, bytes]], pair: bool) -> float:
    peer = data.parent / ("peer-pair" if pair else "peer-sign")
    (peer / "certs").mkdir(parents=True)
    (peer / "index.txt").write_text("")
    for ext, key_usage in (("signing", "digitalSignature"), ("encryption", "keyEncipherment")):
        (peer / f"{ext}.cnf").write_text(CA_CONFIG.format(dir=peer, ext=ext, key_usage=key_usage))
    ca = data / "ca"
    common = ["-batch", "-notext", "-cert", str(ca / "issuing.crt.pem"), "-keyfile", str(ca / "issuing.key.pem")]
    common += ["-passin", f"file:{ca / 'passphrase'}"]
    for i, (_, _, csr) in enumerate(work):
        (peer / f"{i}.csr").write_bytes(x509.load_der_x509_csr(csr).public_bytes(serialization.Encoding.PEM))
    started = time.perf_counter()
    for i, (mailbox, _, _) in enumerate(work):
        run = ["openssl", "ca", "-config", str(peer / "signing.cnf"), *common]
        subprocess.run(
            [*run, "-in", str(peer / f"{i}.csr"), "-out", str(peer / f"{i}.pem")], check=True, capture_output=True
        )
        if pair:
            key = peer / f"{i}.enc.key"
            subprocess.run(
                ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key)],
                check=True,
                capture_output=True,
            )
            subj = f"/CN={mailbox}/emailAddress={mailbox}"
            subprocess.run(
                ["openssl", "req", "-new", "-key", str(key), "-subj", subj, "-out", str(peer / f"{i}.enc.csr")],
                check=True,
                capture_output=True,
            )
            run = ["openssl", "ca", "-config", str(peer / "encryption.cnf"), *common]
            subprocess.run(
                [*run, "-in", str(peer / f"{i}.enc.csr"), "-out", str(peer / f"{i}.enc.pem")],
                check=True,
                capture_output=True,
            )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200, help="simpleenroll requests measured")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--peer", type=int, default=60, help="CSRs signed by the openssl peer")
    parser.add_argument(
        "--no-pool", action="store_true", help="leave the key pool at its default size instead of filling it first"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailkms-bench-est-") as tmp:
        data = Path(tmp) / "data"
        print(f"preparing {args.users + WARM_UP} users, tokens and P-256 CSRs ...", flush=True)
        work = prepare(data, args.users + WARM_UP)
        pool = 0 if args.no_pool else args.users + WARM_UP
        if pool:
            print(f"filling the key pool with {pool} RSA-2048 keys (not timed) ...", flush=True)
            filled = fill_pool(data, pool)
            print(f"pool filled in {filled:.1f} s", flush=True)
        port = free_port()
        load_start = os.getloadavg()[0]
        server = serve(data, port, pool)
        try:
            root = data / "ca" / "root.crt.pem"
            asyncio.run(load(port, root, work[:WARM_UP], 2))
            elapsed, latencies = asyncio.run(load(port, root, work[WARM_UP:], args.concurrency))
        finally:
            server.terminate()
            server.wait(timeout=30)
        latencies.sort()
        rate = args.users / elapsed
        p50 = statistics.median(latencies) * 1000
        p95 = latencies[int(0.95 * (len(latencies) - 1))] * 1000
        peer_work = work[WARM_UP : WARM_UP + args.peer]
        sign_s = openssl_peer(data, peer_work, pair=False)
        pair_s = openssl_peer(data, peer_work, pair=True)
    filled_note = f"key pool filled with {pool} keys first" if pool else "key pool at its default size"
    print(
        f"\nEST simpleenroll over HTTPS (loopback, 1 server process, {args.concurrency} concurrent, keep-alive, "
        f"{filled_note}; load average {load_start:.2f} at the start):"
    )
    print(
        f"  mailkms  {args.users} enrolments in {elapsed:.2f} s = {rate:7.1f} req/s   p50 {p50:.0f} ms  p95 {p95:.0f} ms"
    )
    print("  (each: token spent, signing cert + RSA-2048 encryption key + its cert, archived, audited)")
    print(f"peer, same issuing CA key, one process per invocation, {len(peer_work)} CSRs:")
    print(f"  openssl ca, signing certificate only      {len(peer_work) / sign_s:7.1f} certs/s")
    print(f"  openssl ca + genpkey + req + ca (the pair) {len(peer_work) / pair_s:7.1f} pairs/s")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end")
    # the row for bench/run.py's table (| figure | mailkms | peer | goal | met |); issue 13 sets no rate for it
    print(
        f"| EST simpleenroll over HTTPS from a load generator (loopback, 1 server process, {args.concurrency} "
        f"concurrent, keep-alive, {filled_note}; each a whole pair: token, 2 certificates, archive, audit; "
        f"load {load_start:.2f} → {os.getloadavg()[0]:.2f}) | {rate:.1f} req/s (p50 {p50:.0f} ms, p95 {p95:.0f} ms) "
        f"| openssl ca one process per CSR: {len(peer_work) / sign_s:.1f} certs/s, the pair with genpkey "
        f"{len(peer_work) / pair_s:.1f}/s | — (an HTTP row, issue 13 goal 1) | — |"
    )


if __name__ == "__main__":
    main()
