"""An OCSP flood of never-issued serials against a real `mailkms serve` (issue 12 item 4).

50,000 POSTs of random serials over keep-alive connections to the plain-http port while a user
enrols: the server's RSS and the OCSP cache stay put, every flood answer is `unauthorized`
(never issued: RFC 6960 §2.3, S/MIME BR 4.9.10) or `tryLater` (the OCSP threads were busy), the
enrolment's delivery mail arrives, and the answers for issued certificates are still right
(`openssl ocsp -respin`, pkilint). /metrics sits on its own listener behind a bearer token here.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from tests.e2e.conftest import BIN, Deployment, enrolled, free_port, init_deployment

FLOOD = int(os.environ.get("MAILKMS_TEST_OCSP_FLOOD", "50000"))
CONNECTIONS = 8
TOKEN = "flood-test-metrics-token"
# Measured: +0.4 MiB over 50,000 requests (123.0 -> 123.4 MiB), after a 2,000-request warm-up.
# Before the fix each never-issued serial stayed in the cache at ~2.3 KB: 50,000 of them are
# ~110 MiB. 16 MiB leaves room for allocator noise and still fails that by far.
RSS_GROWTH_MB = 16


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert found
    return int(found.group(1))


def _metric(text: str, series: str) -> float:
    found = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", text, re.M)
    assert found, f"{series} not in /metrics"
    return float(found.group(1))


class _Flood:
    """Keep-alive HTTP/1.1 POSTs of OCSP requests on a few connections; counts the answers."""

    def __init__(self, port: int, requests: list[bytes]) -> None:
        self.port = port
        self.requests = requests
        self.statuses: Counter[str] = Counter()
        self.seconds = 0.0
        self.error: BaseException | None = None

    async def _connection(self, share: list[bytes]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = "POST /ocsp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/ocsp-request\r\nContent-Length: "
        try:
            for der in share:
                writer.write(f"{head}{len(der)}\r\n\r\n".encode() + der)
                status_line = await reader.readline()
                assert status_line.startswith(b"HTTP/1.1 200"), status_line
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.statuses[ocsp.load_der_ocsp_response(body).response_status.name] += 1
        finally:
            writer.close()

    async def _all(self) -> None:
        shares = [self.requests[i::CONNECTIONS] for i in range(CONNECTIONS)]
        await asyncio.gather(*(self._connection(share) for share in shares))

    def run(self) -> None:
        started = time.monotonic()
        try:
            asyncio.run(self._all())
        except BaseException as exc:  # reported by the test thread
            self.error = exc
        self.seconds = time.monotonic() - started


def _requests_for_random_serials(issued: x509.Certificate, issuer: x509.Certificate, count: int) -> list[bytes]:
    asked = ocsp.OCSPRequestBuilder().add_certificate(issued, issuer, hashes.SHA1()).build()
    out = []
    for _ in range(count):
        builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
            asked.issuer_name_hash, asked.issuer_key_hash, secrets.randbits(159) | 1 << 150, hashes.SHA1()
        )
        out.append(builder.build().public_bytes(serialization.Encoding.DER))
    return out


def _judge(dep: Deployment, work: Path, cert_pem: str, issuer: Path, name: str) -> str:
    """The server's answer for an issued certificate, judged by openssl -respin and pkilint."""
    cert = work / f"{name}.pem"
    cert.write_text(cert_pem)
    request, response = work / f"{name}.req", work / f"{name}.resp"
    subprocess.run(
        ["openssl", "ocsp", "-issuer", str(issuer), "-cert", str(cert), "-reqout", str(request), "-no_nonce"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    answer = httpx.post(
        f"http://127.0.0.1:{dep.http_port}/ocsp",
        content=request.read_bytes(),
        headers={"Content-Type": "application/ocsp-request"},
    )
    response.write_bytes(answer.content)
    root = dep.data / "ca" / "root.crt.pem"
    judged = subprocess.run(
        [
            *("openssl", "ocsp", "-respin", str(response), "-issuer", str(issuer), "-cert", str(cert)),
            *("-CAfile", str(root), "-no_nonce"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Response verify OK" in judged.stderr, judged.stdout + judged.stderr
    lint = subprocess.run(
        [str(BIN / "lint_ocsp_response"), "lint", "-s", "WARNING", str(response)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr
    found = re.search(rf"^{re.escape(str(cert))}: (\w+)", judged.stdout, re.M)
    assert found, judged.stdout
    return found.group(1)


def test_a_flood_of_never_issued_serials_leaves_memory_and_mail_alone(tmp_path: Path) -> None:
    metrics_port = free_port()
    dep = init_deployment(tmp_path / "data")
    dep.server_env.update({"MAILKMS_METRICS__LISTEN": f"127.0.0.1:{metrics_port}", "MAILKMS_METRICS__TOKEN": TOKEN})
    work = tmp_path / "work"
    work.mkdir()
    dep.start()
    try:
        assert dep.proc is not None
        pid = dep.proc.pid
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

        def scrape() -> str:
            got = httpx.get(metrics_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
            assert got.status_code == 200, got.text
            return got.text

        # /metrics: only on its own listener, only with the token.
        assert httpx.get(f"{dep.url}/metrics", verify=False).status_code == 404
        assert httpx.get(f"http://127.0.0.1:{dep.http_port}/metrics").status_code == 404
        assert httpx.get(metrics_url).status_code == 401
        assert httpx.get(metrics_url, headers={"Authorization": "Bearer nope"}).status_code == 401

        t0 = time.monotonic()
        bob = enrolled(dep, work, "bob@example.org")
        quiet_enrolment = time.monotonic() - t0
        carol = enrolled(dep, work, "carol@example.org")
        dep.admin("revoke", "carol@example.org", "--reason", "keyCompromise")
        chain = dep.admin("ca", "chain").out
        issuer_pem = chain.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
        issuer = work / "issuing.pem"
        issuer.write_text(issuer_pem)
        bob_pem = bob.run("cert", "signing").out
        requests = _requests_for_random_serials(
            x509.load_pem_x509_certificate(bob_pem.encode()), x509.load_pem_x509_certificate(issuer_pem.encode()), FLOOD
        )

        # Warm-up: the OCSP threads exist, the allocator has seen this kind of work.
        warm = _Flood(dep.http_port, requests[:2000])
        warm.run()
        assert warm.error is None, warm.error
        before = scrape()
        rss_before = _rss_kib(pid)
        unused_before = _metric(before, 'mailkms_ocsp_requests_total{status="unused"}')
        cache_before = _metric(before, "mailkms_ocsp_cache_bytes")

        flood = _Flood(dep.http_port, requests)
        runner = threading.Thread(target=flood.run)
        runner.start()
        time.sleep(1.0)
        t1 = time.monotonic()
        dave = enrolled(dep, work, "dave@example.org")  # mail flows meanwhile
        flood_enrolment = time.monotonic() - t1
        still_flooding = runner.is_alive()
        peak_rss = _rss_kib(pid)
        runner.join(300)
        assert not runner.is_alive() and flood.error is None, flood.error
        after = scrape()
        rss_after = _rss_kib(pid)

        assert sum(flood.statuses.values()) == FLOOD
        assert set(flood.statuses) <= {"UNAUTHORIZED", "TRY_LATER"}, flood.statuses
        assert flood.statuses["UNAUTHORIZED"] >= FLOOD // 2, flood.statuses
        unused = _metric(after, 'mailkms_ocsp_requests_total{status="unused"}') - unused_before
        assert unused == flood.statuses["UNAUTHORIZED"]
        cache_after = _metric(after, "mailkms_ocsp_cache_bytes")
        assert cache_after <= 64 * 1024 * 1024
        assert cache_after - cache_before < 20_000, (cache_before, cache_after)  # dave's answers at most: none asked
        growth_mb = (rss_after - rss_before) / 1024
        print(
            f"\nflood: {FLOOD} requests in {flood.seconds:.1f} s = {FLOOD / flood.seconds:,.0f}/s {dict(flood.statuses)}; "
            f"RSS {rss_before / 1024:.1f} -> peak {peak_rss / 1024:.1f} -> {rss_after / 1024:.1f} MiB; "
            f"cache {cache_before:.0f} -> {cache_after:.0f} bytes; enrolment to delivery mail "
            f"{quiet_enrolment:.1f} s quiet, {flood_enrolment:.1f} s during the flood (still flooding: {still_flooding})"
        )
        assert growth_mb < RSS_GROWTH_MB, f"RSS grew {growth_mb:.1f} MiB"
        assert dep.mails(dave.mailbox)

        # Issued certificates are still answered right, signed, and lint-clean.
        assert _judge(dep, work, bob_pem, issuer, "bob") == "good"
        assert _judge(dep, work, carol.run("cert", "signing").out, issuer, "carol") == "revoked"
    finally:
        dep.stop()
