"""The client runs on a machine that has only the client side installed (no server libraries)."""

from __future__ import annotations

import subprocess
import sys

SERVER_ONLY = ["sqlalchemy", "fastapi", "alembic", "aiosmtpd", "uvicorn", "pydantic_settings", "psycopg", "Crypto"]

PROGRAM = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {SERVER_ONLY!r}:
            raise ImportError('server-only package ' + name + ' is not installed here')
        return None
sys.meta_path.insert(0, Block())
sys.argv = ['mailkms-client', '--help']
from mailkms.client import main
try:
    main()
except SystemExit as exc:
    assert exc.code == 0, exc.code
for name in {SERVER_ONLY!r}:
    assert name not in sys.modules, name
print('client ok')
"""


def test_client_imports_no_server_library() -> None:
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "enroll" in result.stdout and "logon" in result.stdout and "client ok" in result.stdout


def test_blocker_really_blocks() -> None:
    """The check above can fail: importing a server module under the blocker is refused."""
    program = PROGRAM.replace(
        "from mailkms.client import main", "import mailkms.store\nfrom mailkms.client import main"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "server-only package" in result.stderr
