"""A full run with real processes (server, admin CLI, client): structured logs, and no secret in any line."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mailkms.pki import PrivateKey, load_private_key
from tests.e2e._nodes import BIN, free_port, run_mailkms, start_node, wait_for

pytestmark = pytest.mark.e2e


def _forms(key: PrivateKey) -> list[str]:
    """Ways a private key could leak into text: PEM lines, base64 and hex of the DER, the private number."""
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    b64 = base64.b64encode(der).decode()
    forms = [line for line in pem.decode().splitlines()[2:-2]]  # whole body lines, past the common prefix
    forms += [b64[i : i + 40] for i in range(200, len(b64) - 40, 300)]
    forms += [der.hex()[i : i + 48] for i in range(400, len(der) * 2 - 48, 600)]
    if isinstance(key, rsa.RSAPrivateKey):
        d = key.private_numbers().d
        forms += [str(d)[:40], format(d, "x")[:40]]
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        forms += [format(key.private_numbers().private_value, "x")[:40]]
    return forms


def _client(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "mailkms-client"), "--home", str(home), *args], env=env, capture_output=True, text=True, timeout=120
    )


def _metrics(data: Path, server: str) -> str:
    done = subprocess.run(
        ["curl", "-sS", "--cacert", str(data / "ca" / "root.crt.pem"), f"{server}/metrics"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout


def test_full_run_logs_are_structured_and_hold_no_secret(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ca_passphrase = "ca-" + uuid.uuid4().hex
    recovery = "rec-" + uuid.uuid4().hex
    client_passphrase = "client-" + uuid.uuid4().hex
    env = {
        **os.environ,
        "MAILKMS_DATA": str(data),
        "MAILKMS_CA_PASSPHRASE": ca_passphrase,
        "MAILKMS_RECOVERY_PASSPHRASE": recovery,
    }
    outputs: list[str] = []  # everything the processes printed, except the one intended token hand-out
    init = run_mailkms(["init", "--hostname", "localhost", "--public-url", "http://kms.example.org/"], env)
    assert init.returncode == 0, init.stderr
    outputs += [init.stderr]
    sink_port = free_port()
    node = start_node(
        env, tmp_path / "server.log", SMTP__SINK_PORT=str(sink_port), POOL__SIZE="3", POOL__REFILL_SECONDS="0.5"
    )
    server = f"https://localhost:{node.port}"
    try:
        added = run_mailkms(["user", "add", "alice@example.org", "--json"], env)
        assert added.returncode == 0, added.stderr
        token = json.loads(added.stdout)["token"]
        outputs += [added.stderr]
        fp = run_mailkms(["ca", "fingerprint"], env).stdout.strip()
        home = tmp_path / "client"
        cenv = {**os.environ, "MAILKMS_CLIENT_PASSPHRASE": client_passphrase}
        maildir = data / "mailboxes" / "alice@example.org"
        steps = [
            (
                "enroll",
                "--server",
                server,
                "--fingerprint",
                fp,
                "--email",
                "alice@example.org",
                "--token",
                token,
                "--maildir",
                str(maildir),
            ),
        ]
        wait_for(lambda: "mailkms_keypool_size 3.0" in _metrics(data, server), 120, "the key pool to fill")
        done = _client(home, cenv, *steps[0])
        assert done.returncode == 0, done.stderr
        outputs += [done.stdout, done.stderr]
        wait_for(lambda: maildir.joinpath("new").is_dir() and any(maildir.joinpath("new").iterdir()), 60, "the mail")
        for args in (("sync",), ("status",), ("logon", "--answer", "no"), ("cert", "signing")):
            done = _client(home, cenv, *args)
            assert done.returncode == 0, done.stderr
            outputs += [done.stdout, done.stderr]
        # A refusal with the spent token, so the refusal path logs too.
        again = _client(tmp_path / "client2", cenv, *steps[0])
        assert again.returncode != 0
        outputs += [again.stdout, again.stderr]
        metrics = _metrics(data, server)
        assert 'mailkms_certificates_issued_total{kind="signing"} 1.0' in metrics
        assert 'mailkms_refusals_total{action="enrolment",reason="token-used"} 1.0' in metrics
        # The encryption key came from the pool that the server's background worker filled.
        assert "mailkms_keypool_taken_total 1.0" in metrics
        assert "mailkms_keypool_fallback_total 0.0" in metrics
        verify = run_mailkms(["audit", "verify"], env)
        assert verify.returncode == 0
        outputs += [verify.stdout, verify.stderr]
    finally:
        node.stop()
    # Signed checkpoints of the audit head, outside the store: one at start, one at the stop.
    checked = run_mailkms(["audit", "verify", "--json"], env)
    assert checked.returncode == 0 and json.loads(checked.stdout)["checkpoints"] >= 2, checked.stdout
    outputs += [checked.stdout, checked.stderr]
    server_log = (tmp_path / "server.log").read_text()

    # Structured: every line of the server is one JSON object; requests carry their id.
    records = [json.loads(line) for line in server_log.splitlines() if line.strip()]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    with_ids = [r for r in records if r.get("request_id")]
    assert any("/api/v1/enrolments" in r["msg"] for r in with_ids)

    # Every secret made in the run: the token, three passphrases, and every private key.
    secrets = [token, ca_passphrase, recovery, client_passphrase]
    keys = [load_private_key(p.read_bytes(), client_passphrase.encode()) for p in sorted((home / "keys").glob("*.pem"))]
    for rel in ("ca/root.key.pem", "ca/issuing.key.pem", "tls/server.key.pem", "mail/signer.key.pem"):
        keys.append(load_private_key((data / rel).read_bytes(), ca_passphrase.encode()))
    assert len(keys) >= 7  # signing, encryption (from the pool) and transport keys of the client, and the server's
    forms = secrets + [form for key in keys for form in _forms(key)]
    haystack = server_log + "\n".join(outputs)
    leaked = [f for f in forms if f in haystack]
    assert not leaked, f"{len(leaked)} secret fragments found in logs/outputs"
