"""Revocation end to end: a real `mailkms serve`, the admin CLI and `mailkms-client`, with curl,
`openssl verify`/`openssl ocsp` and pkilint as the judges.

One deployment serves the whole module (enrolment costs seconds per client process); the
tests run in file order and build on each other's state: alice is revoked by the first, re-enrolled
by the third; bob stays good throughout.
"""

from __future__ import annotations

import base64
import re
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from tests.e2e.conftest import BIN, ClientHome, Deployment, Result, enrolled, init_deployment, openssl

pytestmark = pytest.mark.e2e

ALICE = "alice@example.org"
BOB = "bob@example.org"
PICKUP_SECONDS = 15.0  # poll_seconds is 2 s; a loaded 2-core machine gets generous slack
REVOKED_TEXT = "Your security certificates have been revoked."


@dataclass
class World:
    dep: Deployment
    work: Path
    root: Path
    issuing: Path
    alice: ClientHome
    bob: ClientHome
    alice_signing: Path
    alice_encryption: Path
    bob_signing: Path

    @property
    def ocsp_url(self) -> str:
        return f"http://127.0.0.1:{self.dep.http_port}/ocsp"

    @property
    def crl_url(self) -> str:
        return f"http://127.0.0.1:{self.dep.http_port}/crl/issuing.crl"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _serial(pem: Path) -> str:
    return format(x509.load_pem_x509_certificate(pem.read_bytes()).serial_number, "x")


def _run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def _curl(url: str, out: Path) -> None:
    done = _run("curl", "--silent", "--show-error", "--fail", "--max-time", "20", "-o", str(out), url)
    assert done.returncode == 0, f"curl {url} failed ({done.returncode}): {done.stderr}"


def _ocsp_query(world: World, cert: Path, respout: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`openssl ocsp` as a relying party: ask the responder over plain http and verify the answer."""
    cmd = [
        "openssl",
        "ocsp",
        "-issuer",
        str(world.issuing),
        "-cert",
        str(cert),
        "-url",
        world.ocsp_url,
        "-CAfile",
        str(world.root),
        "-no_nonce",
        "-timeout",
        "20",
    ]
    if respout is not None:
        cmd += ["-respout", str(respout)]
    return _run(*cmd)


def _ocsp_status(done: subprocess.CompletedProcess[str], cert: Path) -> str | None:
    """'good' / 'revoked' / 'unknown' for a verified answer, else None."""
    if done.returncode != 0 or "Response verify OK" not in done.stderr:
        return None
    found = re.search(rf"^{re.escape(str(cert))}: (\w+)", done.stdout, re.MULTILINE)
    return found.group(1) if found else None


def _wait_ocsp(world: World, cert: Path, wanted: str, respout: Path | None = None) -> str:
    """Poll the responder until it says `wanted` for `cert`; return openssl's output."""
    deadline = time.monotonic() + PICKUP_SECONDS
    last: subprocess.CompletedProcess[str] | None = None
    while time.monotonic() < deadline:
        last = _ocsp_query(world, cert, respout)
        if _ocsp_status(last, cert) == wanted:
            return last.stdout
        time.sleep(0.3)
    assert last is not None
    raise AssertionError(
        f"OCSP did not say {wanted!r} for {cert.name} within {PICKUP_SECONDS} s:\n"
        f"{last.stdout}{last.stderr}\n{world.dep.log()[-3000:]}"
    )


def _verify_with_crl(world: World, cert: Path, crl_pem: Path) -> subprocess.CompletedProcess[str]:
    return _run(
        "openssl",
        "verify",
        "-x509_strict",
        "-purpose",
        "smimesign",
        "-crl_check",
        "-CAfile",
        str(world.root),
        "-untrusted",
        str(world.issuing),
        "-CRLfile",
        str(crl_pem),
        str(cert),
    )


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)


def _fetch_crl_pem(world: World, name: str, min_number: int) -> Path:
    """The issuing CRL as curl fetches it (DER), turned into PEM by openssl; polled until the
    server has picked up CRL `min_number` (the CLI publishes it, the server notices by polling)."""
    der = world.work / f"{name}.der"
    pem = world.work / f"{name}.pem"
    deadline = time.monotonic() + PICKUP_SECONDS
    while True:
        _curl(world.crl_url, der)
        done = openssl("crl", "-inform", "DER", "-in", str(der), "-out", str(pem))
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        number = _crl_number(x509.load_pem_x509_crl(pem.read_bytes()))
        if number >= min_number:
            return pem
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the server still serves CRL {number}, not {min_number}, after {PICKUP_SECONDS} s\n"
                f"{world.dep.log()[-3000:]}"
            )
        time.sleep(0.3)


def _revoked_serials(crl_pem: Path) -> set[str]:
    crl = x509.load_pem_x509_crl(crl_pem.read_bytes())
    return {format(entry.serial_number, "x") for entry in crl}


def _ocsp_request_der(world: World, cert: Path) -> bytes:
    req = world.work / f"req-{cert.stem}.der"
    done = _run("openssl", "ocsp", "-issuer", str(world.issuing), "-cert", str(cert), "-reqout", str(req), "-no_nonce")
    assert done.returncode == 0 and req.exists(), done.stderr
    return req.read_bytes()


def _status_of(der: bytes) -> ocsp.OCSPCertStatus:
    response = ocsp.load_der_ocsp_response(der)
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL, response.response_status
    return response.certificate_status


def _no_findings(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0 and not done.stdout.strip(), f"pkilint: {done.returncode}\n{done.stdout}{done.stderr}"


# --- the shared deployment ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("revocation")
    dep = init_deployment(base / "data")
    dep.start()
    try:
        work = base / "work"
        work.mkdir()
        alice = enrolled(dep, work, ALICE)
        bob = enrolled(dep, work, BOB)
        chain = dep.admin("ca", "chain").out
        issuing = _write(
            work / "issuing.pem", chain.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
        )
        yield World(
            dep=dep,
            work=work,
            root=dep.data / "ca" / "root.crt.pem",
            issuing=issuing,
            alice=alice,
            bob=bob,
            alice_signing=_write(work / "alice-signing.pem", alice.run("cert", "signing").out),
            alice_encryption=_write(work / "alice-encryption.pem", alice.run("cert", "encryption").out),
            bob_signing=_write(work / "bob-signing.pem", bob.run("cert", "signing").out),
        )
    finally:
        dep.stop()


@pytest.fixture(scope="module")
def alice_revoked(world: World) -> Result:
    """`mailkms revoke alice --reason keyCompromise --json`, once for the module."""
    # Both users are good before anything is revoked (the responder may cache these answers).
    _wait_ocsp(world, world.alice_signing, "good")
    _wait_ocsp(world, world.bob_signing, "good")
    return world.dep.admin("revoke", ALICE, "--reason", "keyCompromise", "--json", check=False)


# --- 1. the CRL -----------------------------------------------------------------------------------


def test_revoke_publishes_a_crl_that_openssl_and_pkilint_accept(world: World, alice_revoked: Result) -> None:
    res = alice_revoked
    assert res.code == 0, res.err + res.out
    data = res.json()
    assert isinstance(data, dict)
    (report,) = data["revoked"]
    assert report["subject"] == ALICE and report["reason"] == "keyCompromise" and report["user_revoked"] is True
    assert set(report["serials"]) == {_serial(world.alice_signing), _serial(world.alice_encryption)}
    assert isinstance(data["crl_number"], int)

    crl_pem = _fetch_crl_pem(world, "crl-after-revoke", data["crl_number"])
    assert set(report["serials"]) <= _revoked_serials(crl_pem)
    assert _serial(world.bob_signing) not in _revoked_serials(crl_pem)
    crl = x509.load_pem_x509_crl(crl_pem.read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(int(_serial(world.alice_signing), 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.key_compromise

    # the PEM form over http is the same CRL
    pem_via_http = world.work / "crl-via-format-pem.pem"
    _curl(world.crl_url + "?format=pem", pem_via_http)
    assert x509.load_pem_x509_crl(pem_via_http.read_bytes()) == crl

    rejected = _verify_with_crl(world, world.alice_signing, crl_pem)
    assert rejected.returncode != 0, rejected.stdout
    assert "error 23" in rejected.stdout + rejected.stderr, rejected.stdout + rejected.stderr
    assert "certificate revoked" in rejected.stdout + rejected.stderr
    accepted = _verify_with_crl(world, world.bob_signing, crl_pem)
    assert accepted.returncode == 0 and ": OK" in accepted.stdout, accepted.stdout + accepted.stderr

    # the whole chain checked: the root's CRL (over http too) covers the issuing CA
    root_crl_der = world.work / "root-crl.der"
    _curl(f"http://127.0.0.1:{world.dep.http_port}/crl/root.crl", root_crl_der)
    root_crl_pem = world.work / "root-crl.pem"
    assert openssl("crl", "-inform", "DER", "-in", str(root_crl_der), "-out", str(root_crl_pem)).returncode == 0
    both = world.work / "crls.pem"
    both.write_text(crl_pem.read_text() + root_crl_pem.read_text())
    chain_ok = _run(
        "openssl",
        "verify",
        "-crl_check_all",
        "-CAfile",
        str(world.root),
        "-untrusted",
        str(world.issuing),
        "-CRLfile",
        str(both),
        str(world.bob_signing),
    )
    assert chain_ok.returncode == 0 and ": OK" in chain_ok.stdout, chain_ok.stdout + chain_ok.stderr

    # `mailkms crl export --pem` hands out the CRL the server publishes
    exported = world.dep.admin("crl", "export", "--pem").out
    assert x509.load_pem_x509_crl(exported.encode()) == crl

    _no_findings(_run(str(BIN / "lint_crl"), "lint", "-t", "CRL", "-p", "BR", "-s", "WARNING", str(crl_pem)))


# --- 2. OCSP --------------------------------------------------------------------------------------


def test_ocsp_post_and_get_say_revoked_and_good(world: World, alice_revoked: Result) -> None:
    assert alice_revoked.code == 0, alice_revoked.err
    # POST, as `openssl ocsp -url` sends it; the server picks the CLI's revocation up by polling.
    out = _wait_ocsp(world, world.alice_signing, "revoked")
    assert "Reason: keyCompromise" in out, out
    assert "Revocation Time:" in out
    bob_resp = world.work / "ocsp-bob-post.der"
    out = _wait_ocsp(world, world.bob_signing, "good", respout=bob_resp)

    # GET (RFC 6960 A.1): curl fetches, openssl judges the saved answer.
    for cert, wanted in ((world.alice_signing, "revoked"), (world.bob_signing, "good")):
        request = _ocsp_request_der(world, cert)
        encoded = urllib.parse.quote(base64.b64encode(request).decode(), safe="")
        resp = world.work / f"ocsp-get-{cert.stem}.der"
        _curl(f"{world.ocsp_url}/{encoded}", resp)
        judged = _run(
            "openssl",
            "ocsp",
            "-respin",
            str(resp),
            "-issuer",
            str(world.issuing),
            "-cert",
            str(cert),
            "-CAfile",
            str(world.root),
            "-no_nonce",
            "-resp_text",
        )
        assert judged.returncode == 0 and "Response verify OK" in judged.stderr, judged.stdout + judged.stderr
        assert _ocsp_status(judged, cert) == wanted, judged.stdout
        if wanted == "revoked":
            assert "Reason: keyCompromise" in judged.stdout, judged.stdout
            # the encryption certificate went with it
            assert _status_of(resp.read_bytes()) is ocsp.OCSPCertStatus.REVOKED
            _no_findings(_run(str(BIN / "lint_ocsp_response"), "lint", "-s", "WARNING", str(resp)))
    enc = _ocsp_query(world, world.alice_encryption)
    assert _ocsp_status(enc, world.alice_encryption) == "revoked", enc.stdout + enc.stderr
    _no_findings(_run(str(BIN / "lint_ocsp_response"), "lint", "-s", "WARNING", str(bob_resp)))


# --- 3. the user's side, refusals, and the way back -------------------------------------------------


def test_revoked_user_logon_refusals_and_reenrolment(world: World, alice_revoked: Result) -> None:
    dep = world.dep
    assert alice_revoked.code == 0, alice_revoked.err
    logon = world.alice.run("logon", "--answer", "yes")
    assert logon.code == 6, logon.out + logon.err
    assert REVOKED_TEXT in logon.err + logon.out

    again = dep.admin("revoke", ALICE, check=False)
    assert again.code == 5, again.out + again.err
    unspecified = dep.admin("revoke", "--reason", "unspecified", BOB, check=False)
    assert unspecified.code == 2, unspecified.out + unspecified.err
    missing = dep.admin("revoke", "--serial", "deadbeef", check=False)
    assert missing.code == 4, missing.out + missing.err
    nobody = dep.admin("revoke", "nobody@example.org", check=False)
    assert nobody.code == 4, nobody.out + nobody.err
    # none of the refusals touched bob
    shown = dep.admin("user", "show", BOB, "--json").json()
    assert isinstance(shown, dict) and shown["state"] == "ACTIVE", shown
    still = _ocsp_query(world, world.bob_signing)
    assert _ocsp_status(still, world.bob_signing) == "good", still.stdout + still.stderr

    # the way back: a new token, the same client home enrols again
    mails_before = len(dep.mails(ALICE))
    token = dep.admin("user", "reenroll", ALICE, "--json").json()
    assert isinstance(token, dict)
    res = world.alice.enroll(dep, str(token["token"]))
    assert res.code == 0, res.out + res.err
    dep.wait_for_mails(ALICE, mails_before + 1, timeout=60)
    logon = world.alice.run("logon")
    assert logon.code == 0, logon.out + logon.err
    assert "Installed" in logon.out and REVOKED_TEXT not in logon.out + logon.err

    new_signing = _write(world.work / "alice-signing-2.pem", world.alice.run("cert", "signing").out)
    assert _serial(new_signing) != _serial(world.alice_signing)
    _wait_ocsp(world, new_signing, "good")
    old = _ocsp_query(world, world.alice_signing)
    assert _ocsp_status(old, world.alice_signing) == "revoked", old.stdout + old.stderr
    crl_pem = _fetch_crl_pem(world, "crl-after-reenrol", 0)
    assert _serial(world.alice_signing) in _revoked_serials(crl_pem)
    assert _serial(new_signing) not in _revoked_serials(crl_pem)
    assert _verify_with_crl(world, new_signing, crl_pem).returncode == 0


# --- 4. robustness of the plain-http port -----------------------------------------------------------


def test_idle_and_slow_connections_do_not_starve_ocsp(world: World, alice_revoked: Result) -> None:
    assert alice_revoked.code == 0, alice_revoked.err
    port = world.dep.http_port
    bob_request = _ocsp_request_der(world, world.bob_signing)
    alice_request = _ocsp_request_der(world, world.alice_signing)
    _wait_ocsp(world, world.alice_signing, "revoked")

    idle: list[socket.socket] = []
    stop = threading.Event()
    slow_sent: list[int] = []

    def slow_client() -> None:
        raw = (
            b"POST /ocsp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/ocsp-request\r\n"
            + f"Content-Length: {len(bob_request)}\r\n\r\n".encode()
            + bob_request
        )
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            for i in range(len(raw)):
                if stop.is_set():
                    return
                try:
                    s.sendall(raw[i : i + 1])
                except OSError:
                    return
                slow_sent.append(i)
                stop.wait(0.5)

    slow = threading.Thread(target=slow_client, daemon=True)
    try:
        for _ in range(50):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        slow.start()
        deadline = time.monotonic() + 10
        while len(slow_sent) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(slow_sent) >= 3, "the slow client did not get going"

        durations: list[float] = []
        started = time.monotonic()
        for i in range(20):
            request, wanted = (
                (bob_request, ocsp.OCSPCertStatus.GOOD) if i % 2 else (alice_request, ocsp.OCSPCertStatus.REVOKED)
            )
            t0 = time.monotonic()
            reply = httpx.post(
                f"http://127.0.0.1:{port}/ocsp",
                content=request,
                headers={"Content-Type": "application/ocsp-request"},
                timeout=10,
            )
            durations.append(time.monotonic() - t0)
            assert reply.status_code == 200, reply.text
            assert reply.headers["content-type"] == "application/ocsp-response"
            assert _status_of(reply.content) is wanted
        total = time.monotonic() - started
        assert max(durations) < 2.0, f"slowest OCSP answer took {max(durations):.2f} s: {durations}"
        assert total < 15.0, f"20 OCSP answers took {total:.2f} s"
        assert slow.is_alive(), "the slow client must still be sending while the others were answered"
    finally:
        stop.set()
        for s in idle:
            s.close()
        slow.join(timeout=10)

    # everything closed: the server still answers, over OCSP and for the CRL
    reply = httpx.post(
        f"http://127.0.0.1:{port}/ocsp",
        content=bob_request,
        headers={"Content-Type": "application/ocsp-request"},
        timeout=10,
    )
    assert reply.status_code == 200 and _status_of(reply.content) is ocsp.OCSPCertStatus.GOOD
    assert _ocsp_status(_ocsp_query(world, world.bob_signing), world.bob_signing) == "good"
    crl = httpx.get(world.crl_url, timeout=10)
    assert crl.status_code == 200 and crl.headers["content-type"] == "application/pkix-crl"
    assert world.dep.proc is not None and world.dep.proc.poll() is None
    generated = world.dep.admin("crl", "generate", "--json").json()
    assert isinstance(generated, dict) and generated["entries"] >= 2, generated
