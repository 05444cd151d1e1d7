"""How a new user reaches the commands: a client-only install, `make admin`, the activation line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailkms.cli import SERVER_MISSING_EXIT

REPO = Path(__file__).resolve().parents[2]
UV = REPO / ".tools" / "bin" / "uv"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client_only_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("client-only") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # the project as a user installs it: its own dependencies only, no extras
    subprocess.run(
        [str(UV), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), str(REPO)],
        check=True,
        timeout=300,
    )
    return venv


def test_the_install_really_lacks_the_server(client_only_venv: Path) -> None:
    probe = subprocess.run([str(client_only_venv / "bin" / "python"), "-c", "import fastapi"], capture_output=True)
    assert probe.returncode != 0


def test_mailkms_says_what_to_install_instead_of_a_traceback(client_only_venv: Path) -> None:
    result = subprocess.run(
        [str(client_only_venv / "bin" / "mailkms"), "user", "list"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == SERVER_MISSING_EXIT
    assert "Traceback" not in result.stderr
    assert "pip install 'mailkms[server]'" in result.stderr
    assert "mailkms-client" in result.stderr


def test_the_client_runs_without_the_server(client_only_venv: Path) -> None:
    result = subprocess.run(
        [str(client_only_venv / "bin" / "mailkms-client"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "enroll" in result.stdout and "logon" in result.stdout


def test_make_admin_runs_the_admin_commands_on_the_data_folder(tmp_path: Path) -> None:
    """The README's way to reach `mailkms` beside `make serve`, without knowing about .venv/bin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKMS_")}
    env["MAILKMS_DATA"] = str(tmp_path / "data")
    result = subprocess.run(
        ["make", "-s", "-C", str(REPO), "admin", "ARGS=ca fingerprint"], capture_output=True, text=True, env=env
    )
    # no CA in that fresh folder: the admin command itself answers, with its own exit code and words
    assert "no CA in" in result.stderr and str(tmp_path / "data") in result.stderr
    activated = subprocess.run(
        ["bash", "-c", f". {REPO}/.venv/bin/activate && command -v mailkms && command -v mailkms-client"],
        capture_output=True,
        text=True,
    )
    assert activated.returncode == 0
    assert activated.stdout.split() == [str(REPO / ".venv/bin/mailkms"), str(REPO / ".venv/bin/mailkms-client")]
