"""The `mailkms` command line (server and administration).

`main` imports the command line only when it runs, so that a machine with only the client
installed (`pip install mailkms`) gets a sentence saying what to install instead of a traceback.
"""

from __future__ import annotations

import sys

# The distributions of the `server` extra, by the module name they provide.
SERVER_MODULES = {
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "sqlalchemy": "sqlalchemy",
    "alembic": "alembic",
    "aiosmtpd": "aiosmtpd",
    "pydantic_settings": "pydantic-settings",
    "pydantic": "pydantic",
    "psycopg": "psycopg",
    "Crypto": "pycryptodome",
    "prometheus_client": "prometheus-client",
    "httptools": "httptools",
    "uvloop": "uvloop",
    "starlette": "starlette",
    "argon2": "argon2-cffi",
    "pyotp": "pyotp",
    "jinja2": "jinja2",
    "multipart": "python-multipart",
}

SERVER_MISSING_EXIT = 78  # EX_CONFIG: the installation, not the input, is wrong


def main() -> None:
    try:
        from mailkms.cli._main import main as run
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in SERVER_MODULES:
            raise
        print(
            f"mailkms: the server and admin commands are not installed here (missing: {SERVER_MODULES[top]}).\n"
            "This machine has only the client, `mailkms-client`. To run the server or the admin commands:\n"
            "    pip install 'mailkms[server]'",
            file=sys.stderr,
        )
        raise SystemExit(SERVER_MISSING_EXIT) from None
    run()


__all__ = ["SERVER_MISSING_EXIT", "main"]
