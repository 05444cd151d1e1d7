"""End to end with real processes: `mailkms init` and `serve`, a user enrolled twice with
`mailkms-client`, officers appointed with `mailkms recovery init`, `mailkms recover` with 2 of 3
share files, and a fresh client home enrolled with the recovery token holding every earlier key:
mail that openssl encrypted to each old certificate opens there."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
MAILBOX = "alice@example.org"
CLIENT_PASSPHRASE = "alice's key store passphrase"
OFFICERS = {"Olga": "olga's long passphrase", "Piet": "piet's long passphrase", "Quinn": "quinn's long passphrase"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: list[str], env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    if ok and done.returncode != 0:
        raise AssertionError(f"{args} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


@contextlib.contextmanager
def server(env: dict[str, str], port: int, http_port: int, sink_port: int, log: Path) -> Iterator[None]:
    args = [str(BIN / "mailkms"), "serve", "--port", str(port), "--http-port", str(http_port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen([*args, "--mail-sink-port", str(sink_port)], env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def sync_until(client: list[str], env: dict[str, str], generation: int, home: Path) -> list[str]:
    """`mailkms-client sync` until the delivery of `generation` is installed; the encryption key history."""
    deadline = time.monotonic() + 90
    while True:
        run([*client, "sync"], env, ok=False)
        state = json.loads((home / "state.json").read_text())
        if max((g["generation"] for g in state["generations"]), default=0) == generation:
            return sorted(state["encryption_history"])
        assert time.monotonic() < deadline, f"generation {generation} never arrived"
        time.sleep(0.3)


def test_recovery_with_real_processes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port, http_port, sink_port = _free_port(), _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKMS_")}
    env |= {"MAILKMS_DATA": str(data), "MAILKMS_CLIENT_PASSPHRASE": CLIENT_PASSPHRASE}
    mailkms = [str(BIN / "mailkms")]
    # Not a terminal: the generated passphrase of the bootstrap share goes to a new 0600 file, not stdout.
    passphrase_out = tmp_path / "bootstrap.pass"
    init_run = run(
        [*mailkms, "init", "--hostname", "localhost", "--json", "--recovery-passphrase-out", str(passphrase_out)], env
    )
    init = json.loads(init_run.stdout)
    bootstrap = Path(init["recovery_share"])
    assert bootstrap.parent == data / "recovery" and bootstrap.stat().st_mode & 0o777 == 0o600
    assert init["recovery_passphrase_file"] == str(passphrase_out) and "recovery_passphrase" not in init
    assert passphrase_out.stat().st_mode & 0o777 == 0o600
    assert passphrase_out.read_text().strip() not in init_run.stdout + init_run.stderr
    assert not (data / "recovery" / "bootstrap-passphrase").exists()
    maildir = data / "mailboxes" / MAILBOX

    def client(home: Path) -> list[str]:
        return [str(BIN / "mailkms-client"), "--home", str(home)]

    def enroll(home: Path, token: str) -> None:
        run(
            [*client(home), "enroll", "--server", f"https://localhost:{port}", "--fingerprint",
             init["root_fingerprint_sha256"], "--email", MAILBOX, "--token", token, "--maildir", str(maildir)],
            env,
        )  # fmt: skip

    first_home, fresh_home = tmp_path / "laptop", tmp_path / "new-laptop"
    with server(env, port, http_port, sink_port, tmp_path / "server.log"):
        # two generations on the first laptop: enrolment, then re-enrolment by the administrator
        enroll(first_home, json.loads(run([*mailkms, "user", "add", MAILBOX, "--json"], env).stdout)["token"])
        sync_until(client(first_home), env, 1, first_home)
        enroll(first_home, json.loads(run([*mailkms, "user", "reenroll", MAILBOX, "--json"], env).stdout)["token"])
        old = sync_until(client(first_home), env, 2, first_home)
        assert len(old) == 2

        # officers replace the bootstrap ceremony of `mailkms init` (its share authorises that)
        (tmp_path / "officers.pass").write_text("".join(p + "\n" for p in OFFICERS.values()))
        names = [arg for name in OFFICERS for arg in ("--officer", name)]
        ceremony = json.loads(
            run(
                [*mailkms, "recovery", "init", "--officers", "3", "--threshold", "2", *names,
                 "--passphrase-file", str(tmp_path / "officers.pass"), "--share", str(bootstrap),
                 "--share-passphrase-file", str(tmp_path / "bootstrap.pass"),
                 "--out-dir", str(tmp_path / "shares"), "--json"],
                env,
            ).stdout
        )  # fmt: skip
        assert ceremony["rewrapped"] == 2 and ceremony["officers"] == list(OFFICERS)
        olga, piet, quinn = (Path(p) for p in ceremony["share_files"])

        # one share is not a quorum (the earlier-ceremony and other refusals: tests/integration)
        refused = run(
            [*mailkms, "recover", MAILBOX, "--share", str(piet)],
            env | {"MAILKMS_SHARE_PASSPHRASE_1": OFFICERS["Piet"]},
            ok=False,
        )
        assert refused.returncode == 3 and "1 share(s) given, 2 of the 3 officers are needed" in refused.stderr
        # Olga and Quinn: exactly M of N
        recovered = json.loads(
            run(
                [*mailkms, "recover", MAILBOX, "--share", str(olga), "--share", str(quinn), "--json"],
                env | {"MAILKMS_SHARE_PASSPHRASE_1": OFFICERS["Olga"], "MAILKMS_SHARE_PASSPHRASE_2": OFFICERS["Quinn"]},
            ).stdout
        )
        assert sorted(recovered["key_serials"]) == sorted(old)

        # the user, on a new laptop, enrols with the recovery token
        enroll(fresh_home, recovered["token"])
        sync_until(client(fresh_home), env, 3, fresh_home)
        history = json.loads(run([*client(fresh_home), "status", "--json"], env).stdout)["encryption_key_history"]
        assert set(old) < set(history) and len(history) == 3

    # mail that openssl encrypted to each earlier certificate opens on the new laptop
    first_state = json.loads((first_home / "state.json").read_text())
    for serial in old:
        cert = tmp_path / f"old-{serial}.pem"
        cert.write_text(first_state["encryption_history"][serial])
        (tmp_path / "plain.txt").write_text(f"mail to {serial}\n")
        run(
            ["openssl", "cms", "-encrypt", "-aes256", "-in", str(tmp_path / "plain.txt"),
             "-out", str(tmp_path / "mail.eml"), "-recip", str(cert)],
            env,
        )  # fmt: skip
        opened = run([*client(fresh_home), "decrypt", str(tmp_path / "mail.eml")], env).stdout
        assert (
            opened.replace("\r\n", "\n").endswith(f"\nmail to {serial}\n")
            or opened.replace("\r\n", "\n") == f"mail to {serial}\n"
        )
    assert json.loads(run([*mailkms, "audit", "verify", "--json"], env).stdout)["ok"]
    recovery_status = json.loads(run([*mailkms, "recovery", "status", "--json"], env).stdout)
    assert recovery_status["ceremony_id"] == ceremony["ceremony_id"] and recovery_status["held_recoveries"] == 0
    assert recovery_status["archived_keys"] == recovery_status["archived_under_current_key"] == 3
