"""A process that issues signing certificates from many threads through `CertificateIssuance`
(signer processes + group commit) and prints `ISSUED <serial>` for each certificate the moment
its caller is answered; the crash test kills it mid-run.

    python tests/issuance_load.py DATA_DIR DATABASE_URL CSR_DIR
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mailkms.clock import SystemClock
from mailkms.config import load_settings
from mailkms.services import Services, serial_hex
from tests.conftest import CA_PASSPHRASE, PUBLIC_URL


def main() -> None:
    data, url, csr_dir = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    settings = load_settings(
        data,
        database_url=url,
        ca_passphrase=CA_PASSPHRASE,
        server={"hostname": "localhost", "public_url": PUBLIC_URL},
        pool={"size": 0},
        issuance={"signer_processes": 2, "batch_size": 64},
    )
    services = Services.build(settings, SystemClock())
    services.signers.start()
    csrs = sorted(csr_dir.glob("*.csr"))
    lock = threading.Lock()
    print("READY", flush=True)

    def caller(n: int) -> None:
        for i in range(n, 10**9, 32):  # until killed
            path = csrs[i % len(csrs)]
            cert = services.issuance.issue_signing(path.read_bytes(), f"{path.stem}@example.org", "load")
            with lock:
                sys.stdout.write(f"ISSUED {serial_hex(cert.serial_number)}\n")
                sys.stdout.flush()

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(caller, range(32)))


if __name__ == "__main__":
    main()
