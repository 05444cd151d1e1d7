"""Certificates signed per second with the issuing CA key in a PKCS#11 token (SoftHSM2) beside the
same with the soft key (an encrypted file loaded into memory), through the server's own signing path
(`SignerPool`: `signer_processes` workers, each with its own token session; 0 = in process).

A fresh data folder per key store, made by `mailkms init` (with `--key-store pkcs11:...` for the
token, which this script initialises with softhsm2-util in a temporary SOFTHSM2_CONF); then
`--certs` subscriber certificates (bare P-256 public keys, the full S/MIME profile) per row.

    .venv/bin/python bench/hsm.py [--certs 400] [--key-type p256] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mailkms.config import load_settings
from mailkms.pki import CertKind, KeyType, SignJob
from mailkms.services import CAContext, CAPaths, public_urls
from mailkms.services._signers import SignerPool

BIN = Path(sys.executable).parent
MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def softhsm(folder: Path) -> str:
    """A token labelled `bench` in its own folder; returns the key store URI (PIN in a file)."""
    (folder / "tokens").mkdir(parents=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # this process and the signer processes it spawns
    pin = folder / "pin"
    pin.write_text("bench-pin\n")
    pin.chmod(0o600)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", "bench-pin", "--so-pin", "so-pin"],
        check=True,
        capture_output=True,
    )
    return f"pkcs11:token=bench;object=ca?module-path={MODULE}&pin-source=file:{pin}"


def init(data: Path, key_type: str, key_store: str) -> CAContext:
    env = {**os.environ, "MAILKMS_DATA": str(data)}
    env.pop("MAILKMS_CA_PASSPHRASE", None)
    command = [str(BIN / "mailkms"), "init", "--hostname", "localhost", "--key-type", key_type]
    subprocess.run(
        [*command, *(["--key-store", key_store] if key_store else [])], env=env, check=True, capture_output=True
    )
    settings = load_settings(data)
    return CAContext.load(CAPaths(data), passphrase_env="", urls=public_urls(settings), key_store=settings.ca.key_store)


def jobs(count: int) -> list[SignJob]:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    out = []
    for i in range(count):
        der = (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        out.append(
            SignJob(
                CertKind.SIGNING.value,
                f"user{i:05d}@example.org",
                now,
                now + dt.timedelta(days=365),
                tuple(k.value for k in KeyType),
                public_key_der=der,
            )
        )
    return out


def rate(ca: CAContext, work: list[SignJob], processes: int) -> float:
    pool = SignerPool(ca.issuing, ca.urls, processes, chunk=16)
    try:
        pool.start()
        pool.sign(work[:8])  # warm: sessions open, code paths loaded
        started = time.perf_counter()
        certs = pool.sign(work)
        elapsed = time.perf_counter() - started
    finally:
        pool.close()
    assert len(certs) == len(work)
    certs[0].verify_directly_issued_by(ca.issuing.certificate)
    return len(work) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--certs", type=int, default=400)
    parser.add_argument("--key-type", default="p256", choices=["p256", "p384", "rsa3072", "rsa4096"])
    parser.add_argument("--quick", action="store_true", help="tiny loops: checks the bench runs")
    args = parser.parse_args()
    if shutil.which("softhsm2-util") is None or not Path(MODULE).exists():
        print("softhsm2 is not installed (scripts/system-deps.sh): no PKCS#11 rows")
        return 0
    count = 24 if args.quick else args.certs
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        uri = softhsm(folder / "hsm")
        soft = init(folder / "soft", args.key_type, "")
        token = init(folder / "token", args.key_type, uri)
        work = jobs(count)
        for processes in (0, 2):
            s, t = rate(soft, work, processes), rate(token, work, processes)
            where = "in process" if processes == 0 else f"{processes} signer processes"
            print(
                f"| certificates/s, {args.key_type} CA key in SoftHSM2, {where} | {t:.0f} | soft key: {s:.0f} "
                f"| informative | {t / s:.0%} of soft |"
            )
    load = os.getloadavg()[0]
    print(f"SoftHSM2 bench: {count} certificates per row, load average {load:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
