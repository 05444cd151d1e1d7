"""CMP ir (+ certConf) enrolments per second with `openssl cmp`, beside EST simpleenroll with `curl`,
against the same `mailkms serve` in the same run.

A bounded local load: a fresh data folder, a fixed number of users with their one-time tokens, one
server on loopback. Both clients are one process per enrolment, `--concurrency` at once: `openssl
cmp -cmd ir` (PasswordBasedMac with the token, the ip, then certConf/pkiConf: two round trips) and
`curl` posting a PKCS#10 to EST simpleenroll (one round trip). The server does the same issuance for
both (the whole pair: signing certificate, RSA-2048 encryption key, its certificate, archive,
audit), so the difference is what CMP costs: its framing, the MAC, the second round trip. A third
row: `openssl cmp -cmd p10cr` with the same PKCS#10 request EST gets (CMP carrying PKCS#10 instead
of CRMF), also MAC with the token and certConf.

    .venv/bin/python bench/cmp.py [--users 60] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.est import free_port, prepare, serve


def _cmp_ir(tmp: Path, port: int, root: Path, mailbox: str, token: str, i: int) -> None:
    key = tmp / f"cmp-{i}.key"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    command = ["openssl", "cmp", "-cmd", "ir", "-server", f"localhost:{port}", "-path", ".well-known/cmp"]
    command += ["-tls_used", "-tls_trusted", str(root), "-trusted", str(root), "-ref", mailbox]
    command += ["-secret", f"pass:{token}", "-newkey", str(key), "-subject", f"/CN={mailbox}"]
    command += ["-recipient", "/CN=mailkms", "-certout", str(tmp / f"cmp-{i}.pem")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"openssl cmp {mailbox}: {done.stdout}{done.stderr}")


def _cmp_p10cr(tmp: Path, port: int, root: Path, mailbox: str, token: str, csr: bytes, i: int) -> None:
    request = tmp / f"p10-{i}.der"
    request.write_bytes(csr)
    command = ["openssl", "cmp", "-cmd", "p10cr", "-server", f"localhost:{port}", "-path", ".well-known/cmp"]
    command += ["-tls_used", "-tls_trusted", str(root), "-trusted", str(root), "-ref", mailbox]
    command += ["-secret", f"pass:{token}", "-csr", str(request), "-recipient", "/CN=mailkms"]
    command += ["-certout", str(tmp / f"p10-{i}.pem")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"openssl cmp p10cr {mailbox}: {done.stdout}{done.stderr}")


def _est_enrol(tmp: Path, port: int, root: Path, mailbox: str, token: str, csr: bytes, i: int) -> None:
    body = tmp / f"est-{i}.b64"
    body.write_bytes(base64.encodebytes(csr))
    command = ["curl", "-sf", "--cacert", str(root), "-u", f"{mailbox}:{token}"]
    command += ["-H", "Content-Type: application/pkcs10", "--data-binary", f"@{body}"]
    command += ["-o", str(tmp / f"est-{i}.out"), f"https://localhost:{port}/.well-known/est/simpleenroll"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"curl {mailbox}: exit {done.returncode} {done.stderr}")


def _timed(jobs: list[tuple[object, ...]], run: object, concurrency: int) -> float:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(run, *job) for job in jobs]:  # type: ignore[arg-type]
            future.result()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=60, help="enrolments measured per protocol")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="6 enrolments per protocol (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.users = 6
    with tempfile.TemporaryDirectory(prefix="mailkms-bench-cmp-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data"
        print(f"preparing {3 * args.users} users and tokens ...", flush=True)
        work = prepare(data, 3 * args.users)
        port = free_port()
        server = serve(data, port)
        root = data / "ca" / "root.crt.pem"
        try:
            cmp_jobs = [(tmp, port, root, m, t, i) for i, (m, t, _) in enumerate(work[: args.users])]
            est_jobs = [(tmp, port, root, m, t, c, i) for i, (m, t, c) in enumerate(work[args.users : 2 * args.users])]
            p10_jobs = [(tmp, port, root, m, t, c, i) for i, (m, t, c) in enumerate(work[2 * args.users :])]
            # the two halves interleaved, so neither gets the server's quiet start (key pool fill) alone
            half = args.users // 2
            cmp_s = est_s = p10_s = 0.0
            for part in (slice(0, half), slice(half, args.users)):
                est_s += _timed(est_jobs[part], _est_enrol, args.concurrency)  # type: ignore[arg-type]
                cmp_s += _timed(cmp_jobs[part], _cmp_ir, args.concurrency)  # type: ignore[arg-type]
                p10_s += _timed(p10_jobs[part], _cmp_p10cr, args.concurrency)  # type: ignore[arg-type]
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"\nenrolment over HTTPS (loopback, 1 server process, {args.concurrency} client processes at once):")
    print(f"  CMP ir + certConf, openssl cmp   {args.users} in {cmp_s:.2f} s = {args.users / cmp_s:6.1f} /s")
    print(f"  CMP p10cr + certConf, openssl    {args.users} in {p10_s:.2f} s = {args.users / p10_s:6.1f} /s")
    print(f"  EST simpleenroll, curl (peer)    {args.users} in {est_s:.2f} s = {args.users / est_s:6.1f} /s")
    print("  (each: token spent, signing cert + RSA-2048 encryption key + its cert, archived, audited)")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
