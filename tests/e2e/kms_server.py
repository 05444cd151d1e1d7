"""A deployment whose public URL is on loopback, with users enrolled, and byte-exact client runs
(S/MIME goes through stdin and stdout as bytes). Builds on the shared e2e `Deployment`."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.e2e.conftest import BIN, CLIENT_PASSPHRASE, ClientHome, Deployment, _env, enrolled


def smime_client(
    home: Path,
    *args: str,
    data: bytes | None = None,
    env: dict[str, str] | None = None,
    offset_days: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    cmd = [str(BIN / "mailkms-client"), "--home", str(home), *args]
    full_env = _env({"MAILKMS_CLIENT_PASSPHRASE": CLIENT_PASSPHRASE, **(env or {})}, offset_days)
    return subprocess.run(cmd, input=data, env=full_env, capture_output=True, timeout=120)


@contextlib.contextmanager
def smime_deployment(folder: Path, mailboxes: Sequence[str]) -> Iterator[tuple[Deployment, dict[str, ClientHome]]]:
    """CDP and AIA links point at this server's own http port, so a client that follows them
    (`verify` fetches the CRL) stays on this machine."""
    dep = Deployment(folder / "data")
    dep.admin("init", "--hostname", "localhost", "--public-url", f"http://localhost:{dep.http_port}/")
    dep.start()
    try:
        yield dep, {mailbox: enrolled(dep, folder, mailbox) for mailbox in mailboxes}
    finally:
        dep.stop()
