"""`mailkms-client verify` and revoked signers (issue 12 §10), against a real `mailkms serve`: the
client fetches the CRL the server publishes at the certificate's CDP; the signatures are made by
`openssl cms -sign` with the signer's real key, backdated ones under faketime.

keyCompromise: nothing made with the key is trusted, whatever signing time it claims (the thief
writes that time). superseded: a signature made before the revocation still counts as of its time;
one claiming a time after the revocation does not."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from tests.e2e.conftest import CLIENT_PASSPHRASE, ClientHome, Deployment
from tests.e2e.kms_server import smime_client, smime_deployment
from tests.smime_support import require_tools

pytestmark = pytest.mark.e2e

DAVE, ERIN = "dave@example.org", "erin@example.org"
READER = {DAVE: ERIN, ERIN: DAVE}  # each reads the other's mail


@dataclass
class Signer:
    mailbox: str
    cert: Path
    key: Path
    serial: int


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, dict[str, ClientHome]]]:
    require_tools("faketime", "openssl", package="faketime")
    with smime_deployment(tmp_path_factory.mktemp("verify-revoked"), (DAVE, ERIN)) as (dep, homes):
        yield dep, homes


def signer(homes: dict[str, ClientHome], mailbox: str, folder: Path) -> Signer:
    home = homes[mailbox].home
    status = smime_client(home, "status", "--json")
    assert status.returncode == 0, status.stderr
    serial = json.loads(status.stdout)["signing"]["serial"]
    cert = folder / f"{mailbox}.pem"
    cert.write_bytes(smime_client(home, "cert", "signing").stdout)
    return Signer(mailbox, cert, home / "keys" / f"signing-{serial}.pem", int(serial, 16))


def sign(who: Signer, at: dt.datetime | None = None) -> bytes:
    """openssl signs a mail from `who`; with `at`, at that (past) time by faketime: its signingTime."""
    entity = f"Content-Type: text/plain\r\n\r\nFrom {who.mailbox}, signed {at or 'now'}.\r\n".encode()
    command = ["openssl", "cms", "-sign", "-signer", str(who.cert), "-inkey", str(who.key), "-passin", "env:P"]
    if at is not None:
        command = [
            "faketime",
            "-f",
            at.strftime("%Y-%m-%d %H:%M:%S"),
            *command,
        ]  # frozen: opening the key takes a while
    env = {"PATH": os.environ["PATH"], "P": CLIENT_PASSPHRASE, "TZ": "UTC"}
    done = subprocess.run(command, input=entity, capture_output=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return f"From: {who.mailbox}\r\nTo: {READER[who.mailbox]}\r\nSubject: figures\r\n".encode() + done.stdout


def revoke(dep: Deployment, who: Signer, reason: str) -> dt.datetime:
    """`mailkms revoke`; the time in the CRL the server serves, once it lists the certificate."""
    dep.admin("revoke", who.mailbox, "--reason", reason)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://localhost:{dep.http_port}/crl/issuing.crl", timeout=5) as answer:
            entry = x509.load_der_x509_crl(answer.read()).get_revoked_certificate_by_serial_number(who.serial)
        if entry is not None:
            return entry.revocation_date_utc
        time.sleep(0.3)
    pytest.fail(f"the served CRL never listed {who.mailbox}")


def verify(homes: dict[str, ClientHome], message: bytes, reader: str) -> tuple[int, str]:
    done = smime_client(homes[reader].home, "verify", data=message)
    return done.returncode, done.stderr.decode(errors="replace")


@pytest.mark.parametrize(
    ("mailbox", "reason", "before_counts"),
    [(DAVE, "keyCompromise", False), (ERIN, "superseded", True)],
    ids=["keyCompromise", "superseded"],
)
def test_a_revoked_signer_and_the_signing_time_it_claims(
    world: tuple[Deployment, dict[str, ClientHome]], tmp_path: Path, mailbox: str, reason: str, before_counts: bool
) -> None:
    dep, homes = world
    who = signer(homes, mailbox, tmp_path)
    honest = sign(who)  # made before the revocation, with the true time
    code, report = verify(homes, honest, READER[mailbox])
    assert code == 0 and "TRUSTED" in report and "Revocation: not revoked" in report, report
    time.sleep(1.1)  # the revocation comes a whole second after the signature (CRL times are in seconds)

    revoked_at = revoke(dep, who, reason)
    not_before = x509.load_pem_x509_certificate(who.cert.read_bytes()).not_valid_before_utc
    claimed = revoked_at - dt.timedelta(seconds=1)
    assert claimed >= not_before
    backdated = sign(who, claimed)  # made now, after the revocation, claiming a time before it
    late = sign(who)  # made now, with the true time

    for message in (honest, backdated):
        code, report = verify(homes, message, READER[mailbox])
        if before_counts:
            assert code == 0 and "TRUSTED" in report and "NOT TRUSTED" not in report, report
            assert "revoked after the time the message says it was signed" in report
        else:
            assert code == 3 and "NOT TRUSTED" in report, report
            assert "its key was compromised" in report and "whatever signing time" in report
        assert f"(certificate {who.serial:x}" in report
    code, report = verify(homes, late, READER[mailbox])
    assert code == 3 and "NOT TRUSTED" in report, report
    assert ("before the message says it was signed" if before_counts else "its key was compromised") in report
    as_json = smime_client(homes[READER[mailbox]].home, "verify", "--json", data=backdated)
    verdict = json.loads(as_json.stdout)
    assert verdict["revocation"] == "revoked" and verdict["trusted"] is before_counts
    assert verdict["revocation_reason"] == ("superseded" if before_counts else "key_compromise")
