"""Key custody with real processes: where the CA passphrase comes from, `--production` refusals,
the bootstrap recovery passphrase kept off stdout, `mailkms doctor`, and the server's own address."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, free_port

pytestmark = pytest.mark.e2e
PUBLIC = "http://kms.example.org/"


def mailkms(
    args: list[str], env: dict[str, str], *, pass_fds: tuple[int, ...] = (), timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "mailkms"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        pass_fds=pass_fds,
    )


def base_env(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKMS_") and k != "CREDENTIALS_DIRECTORY"}
    return {**env, "MAILKMS_DATA": str(data), **extra}


INIT = ["init", "--hostname", "localhost", "--public-url", PUBLIC, "--key-type", "p256"]


def pipe(text: str) -> int:
    read_end, write_end = os.pipe()
    os.write(write_end, text.encode() + b"\n")
    os.close(write_end)
    return read_end


def doctor(env: dict[str, str], *extra: str) -> tuple[int, dict[str, object]]:
    done = mailkms(["doctor", "--json", *extra], env)
    return done.returncode, json.loads(done.stdout)


def codes(report: dict[str, object], severity: str | None = None) -> set[str]:
    findings = report["findings"]
    assert isinstance(findings, list)
    return {f["code"] for f in findings if severity is None or f["severity"] == severity}


def test_the_default_init_warns_loudly_and_keeps_secrets_off_stdout(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = base_env(data)
    done = mailkms(INIT, env)  # as `make serve` runs it, here without a terminal
    assert done.returncode == 0, done.stderr
    assert "WARNING: the CA passphrase is generated and kept in" in done.stderr
    assert "full compromise of the CA" in done.stderr
    assert "stdout is not a terminal" in done.stderr
    passphrase_file = data / "recovery" / "bootstrap-passphrase"
    secret = passphrase_file.read_text().strip()
    assert len(secret) >= 32 and secret not in done.stdout + done.stderr
    for path in (
        passphrase_file,
        data / "mailkms.toml",
        data / "ca" / "passphrase",
        data / "audit" / "checkpoint.key.pem",
    ):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert "production = false" in (data / "mailkms.toml").read_text()

    code, report = doctor(env)
    assert code == 0 and report["ok"] is True and report["ca_passphrase_source"] == "file beside the keys"
    assert {"production-off", "ca-passphrase-file", "bootstrap-passphrase-file", "bootstrap-ceremony"} <= codes(
        report, "warning"
    )
    (data / "mailkms.toml").chmod(0o644)
    code, report = doctor(env)
    assert code == 0 and "config-mode" in codes(report, "warning")
    # The same deployment judged for production: each of those is critical, and doctor says so by its exit code.
    code, report = doctor(env, "--production")
    assert code == 78 and report["ok"] is False
    assert {"ca-passphrase-file", "bootstrap-passphrase-file", "bootstrap-ceremony", "config-mode"} <= codes(
        report, "critical"
    )
    # ... and the server refuses to start on it.
    served = mailkms(["serve", "--production", "--port", str(free_port()), "--http-port", "0"], env, timeout=60)
    assert served.returncode == 78 and "keeps the CA passphrase beside the CA keys" in served.stderr
    # The server's own mail identity is no user.
    added = mailkms(["user", "add", "mailkms@kms.example.org", "--json"], env)
    assert added.returncode == 6 and json.loads(added.stdout)["error"] == "reserved-mailbox"
    assert mailkms(["user", "add", "MailKMS@kms.example.org"], env).returncode == 6


def test_production_refuses_every_secret_beside_the_keys(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = base_env(data)
    no_passphrase = mailkms([*INIT, "--production"], env)
    assert no_passphrase.returncode == 78 and "production: no CA passphrase given" in no_passphrase.stderr
    assert not data.exists() or not any(data.iterdir())  # refused before anything was written
    env_ca = base_env(data, MAILKMS_CA_PASSPHRASE="ca-" + uuid.uuid4().hex)
    no_terminal = mailkms([*INIT, "--production"], env_ca)
    assert no_terminal.returncode == 78 and "--recovery-passphrase-out" in no_terminal.stderr
    weak = mailkms([*INIT, "--production"], {**env_ca, "MAILKMS_RECOVERY_PASSPHRASE": "too-short"})
    assert weak.returncode == 2 and "at least 16 characters" in weak.stderr
    taken = tmp_path / "taken.txt"
    taken.write_text("")
    exists = mailkms([*INIT, "--production", "--recovery-passphrase-out", str(taken)], env_ca)
    assert exists.returncode == 5 and "already exists" in exists.stderr
    assert not (data / "ca").exists()


def test_passphrase_sources_fd_credential_environment(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ca_passphrase = "ca-" + uuid.uuid4().hex
    out = tmp_path / "bootstrap.pass"
    fd = pipe(ca_passphrase)
    try:
        done = mailkms(
            [*INIT, "--production", "--passphrase-fd", str(fd), "--recovery-passphrase-out", str(out)],
            base_env(data),
            pass_fds=(fd,),
        )
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr and not (data / "ca" / "passphrase").exists()
    assert out.stat().st_mode & 0o777 == 0o600 and "production = true" in (data / "mailkms.toml").read_text()

    def add(env: dict[str, str], mailbox: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
        return mailkms(["user", "add", mailbox, "--json"], env, pass_fds=pass_fds)

    fd = pipe(ca_passphrase)  # MAILKMS_CA_PASSPHRASE_FD
    try:
        assert add(base_env(data, MAILKMS_CA_PASSPHRASE_FD=str(fd)), "a@example.org", (fd,)).returncode == 0
    finally:
        os.close(fd)
    creds = tmp_path / "credentials"  # what systemd's LoadCredential= makes
    creds.mkdir()
    (creds / "mailkms-ca-passphrase").write_text(ca_passphrase + "\n")
    assert add({**base_env(data), "CREDENTIALS_DIRECTORY": str(creds)}, "b@example.org").returncode == 0
    assert add(base_env(data, MAILKMS_CA_PASSPHRASE=ca_passphrase), "c@example.org").returncode == 0
    missing = add(base_env(data), "d@example.org")
    assert missing.returncode == 78 and "production: no CA passphrase given" in missing.stdout
    wrong = add(base_env(data, MAILKMS_CA_PASSPHRASE="not-it"), "d@example.org")
    assert wrong.returncode == 78 and "does not open" in wrong.stdout

    code, report = doctor(base_env(data))
    assert report["production"] is True and "production-off" not in codes(report)
    assert code == 78 and codes(report, "critical") == {"bootstrap-ceremony"}


def test_on_a_terminal_init_shows_the_passphrase_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [str(BIN / "mailkms"), *INIT],
            env=base_env(data, MAILKMS_CA_PASSPHRASE="ca-" + uuid.uuid4().hex, COLUMNS="200"),
            stdout=terminal,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        os.close(terminal)
        output = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(timeout=180) == 0
    finally:
        os.close(controller)
    text = output.decode()
    assert "Passphrase of that share (shown once, never stored" in text
    shown = text.split("keep it offline):", 1)[1].split()[0]
    assert len(shown) >= 32
    assert not (data / "recovery" / "bootstrap-passphrase").exists()
    assert shown not in "".join(p.read_text(errors="replace") for p in data.rglob("*") if p.is_file())


def test_an_init_that_fails_half_way_leaves_nothing_in_the_way_of_a_retry(tmp_path: Path) -> None:
    """init stops at its last step (the audit checkpoint key: DATA/audit is a file in the way), after
    the CA keys, the bootstrap share and its passphrase file were written. None of them may stay: a
    stale passphrase file or share would block the retry ("already exists") or pair with nothing."""
    data = tmp_path / "data"
    data.mkdir()
    blocker = data / "audit"
    blocker.write_text("in the way\n")
    out = tmp_path / "officer-usb" / "recovery-passphrase"
    out.parent.mkdir()
    env = base_env(data)
    for extra in ([], ["--recovery-passphrase-out", str(out)]):
        done = mailkms([*INIT, *extra], env)
        assert done.returncode == 78, done.stdout + done.stderr
        assert "what it had written was removed" in done.stderr and "Traceback" not in done.stderr
        assert sorted(p.name for p in data.iterdir()) == ["audit"]  # only what was there before
        assert blocker.read_text() == "in the way\n"
        assert list(out.parent.iterdir()) == []
    blocker.unlink()
    done = mailkms([*INIT, "--recovery-passphrase-out", str(out)], env)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600 and (data / "recovery").is_dir()
    assert (data / "audit" / "checkpoint.key.pem").exists() and (data / "ca" / "root.crt.pem").exists()
