"""A CRL worker process imports mailkms.crl_build only: not the services, the ORM models or alembic
(114 MiB measured for mailkms.services against 55 MiB; issue 13 goal 3 bounds the CRL build's memory)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("mailkms.services", "mailkms.store", "mailkms.api", "sqlalchemy.orm", "alembic", "fastapi")


def test_the_crl_worker_module_leaves_the_heavy_packages_unimported() -> None:
    probe = (
        "import sys, mailkms.crl_build as m; "
        "assert callable(m.init_worker) and callable(m.build_in_worker); "
        f"print(','.join(name for name in {HEAVY!r} if name in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "", f"the CRL worker imports {done.stdout.strip()}"
