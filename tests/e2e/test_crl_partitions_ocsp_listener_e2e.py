"""A real `mailkms serve` with CRL partitions and the OCSP-only listener (issue 13 goals 3 and 4).

Certificates get their partition's CDP; the CRL at that URL (served by the server, built by its
worker process) makes `openssl verify -crl_check` say 23 for a revoked one and OK for a good one;
the OCSP-only listener (2 processes on one port) answers `openssl ocsp` as a client, and every
process says "revoked" within a poll after `mailkms revoke` in another process.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.e2e.conftest import PUBLIC_URL, enrolled, free_port, init_deployment


def _openssl_ocsp(port: int, cert: Path, issuer: Path, root: Path) -> str:
    """openssl as the OCSP client, on a connection of its own: the status it prints, verified."""
    done = subprocess.run(
        [
            *("openssl", "ocsp", "-url", f"http://127.0.0.1:{port}/ocsp", "-issuer", str(issuer)),
            *("-cert", str(cert), "-CAfile", str(root), "-no_nonce"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "Response verify OK" in done.stderr, done.stdout + done.stderr
    return done.stdout.split(f"{cert}: ", 1)[1].split()[0]


def _verify(cert: Path, crl: Path, issuer: Path, root: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["openssl", "verify", "-crl_check", "-CAfile", str(root), "-untrusted", str(issuer), "-CRLfile", str(crl)]
    return subprocess.run([*cmd, str(cert)], capture_output=True, text=True, timeout=60)


def test_partition_crls_and_the_ocsp_listener_on_a_real_server(tmp_path: Path) -> None:
    ocsp_port = free_port()
    dep = init_deployment(tmp_path / "data")
    dep.server_env.update(
        {
            "MAILKMS_CA__CRL_PARTITION_SIZE": "2",
            "MAILKMS_REVOCATION__OCSP_LISTEN": f"127.0.0.1:{ocsp_port}",
            "MAILKMS_REVOCATION__OCSP_PROCESSES": "2",
        }
    )
    work = tmp_path / "work"
    work.mkdir()
    dep.start()
    try:
        bob = enrolled(dep, work, "bob@example.org")
        carol = enrolled(dep, work, "carol@example.org")
        chain = dep.admin("ca", "chain").out
        issuer = work / "issuing.pem"
        issuer.write_text(chain.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")
        root = dep.data / "ca" / "root.crt.pem"
        certs = {}
        for name, home in (("bob", bob), ("carol", carol)):
            path = work / f"{name}.pem"
            path.write_text(home.run("cert", "signing").out)
            certs[name] = path
        cdp = {
            name: x509.load_pem_x509_certificate(path.read_bytes())
            .extensions.get_extension_for_class(x509.CRLDistributionPoints)
            .value[0]
            .full_name[0]
            .value
            for name, path in certs.items()
        }
        # A pair each, partitions of 2: bob's in 1, carol's in 2.
        assert cdp == {"bob": f"{PUBLIC_URL}crl/issuing/1.crl", "carol": f"{PUBLIC_URL}crl/issuing/2.crl"}

        assert _openssl_ocsp(ocsp_port, certs["carol"], issuer, root) == "good"
        assert httpx.get(f"http://127.0.0.1:{ocsp_port}/crl/issuing.crl").status_code == 404  # OCSP only

        dep.admin("revoke", "carol@example.org", "--reason", "keyCompromise")
        deadline = time.monotonic() + 30
        statuses: list[str] = []
        while time.monotonic() < deadline:  # each connection may reach either process: all must agree
            statuses = [_openssl_ocsp(ocsp_port, certs["carol"], issuer, root) for _ in range(8)]
            if set(statuses) == {"revoked"}:
                break
            time.sleep(0.5)
        assert set(statuses) == {"revoked"}, statuses
        assert {_openssl_ocsp(ocsp_port, certs["bob"], issuer, root) for _ in range(6)} == {"good"}

        for name, want_ok in (("carol", False), ("bob", True)):
            path = cdp[name].removeprefix(PUBLIC_URL)
            got = httpx.get(f"http://127.0.0.1:{dep.http_port}/{path}")
            assert got.status_code == 200 and got.headers["content-type"] == "application/pkix-crl"
            crl = work / f"{name}.crl"
            crl.write_bytes(x509.load_der_x509_crl(got.content).public_bytes(serialization.Encoding.PEM))
            verdict = _verify(certs[name], crl, issuer, root)
            if not want_ok:  # the admin CLI exports the same partition CRL; an unknown partition is exit 4
                number = path.rsplit("/", 1)[1].removesuffix(".crl")
                exported = dep.admin("crl", "export", "--pem", "--partition", number).out
                assert exported.encode() == crl.read_bytes()
                assert dep.admin("crl", "export", "--partition", "99", check=False).code == 4
            if want_ok:
                assert verdict.returncode == 0, verdict.stdout + verdict.stderr
            else:
                assert verdict.returncode != 0 and "error 23" in verdict.stdout + verdict.stderr, verdict.stdout
    finally:
        dep.stop()
    with socket.socket() as probe:  # the listener processes went with the server
        assert probe.connect_ex(("127.0.0.1", ocsp_port)) != 0
