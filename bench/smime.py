"""S/MIME throughput for a 10 kB message: mailkms in process, beside `openssl cms` in the same run.

    .venv/bin/python bench/smime.py [--seconds 2] [--invocations 20] [--cli]

mailkms: `mailkms.pki` sign (multipart/signed, RSA-2048, SHA-256), verify (CMS signature, no
chain), encrypt (AES-256-CBC to two RSA-2048 recipients: the colleague and the sender, as
`mailkms-client encrypt` does) and decrypt, each looped in this process for a bounded time.
openssl: `openssl cms -sign/-verify/-encrypt -aes256/-decrypt` on the same keys and message,
one process per operation (the CLI has no in-process loop), so its figure includes process start.
`--cli` adds `mailkms-client sign/verify/encrypt/decrypt`, also one process per operation.
Everything stays on this machine; the loops are bounded in count and time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives import serialization
from tests.smime_support import make_pki

from mailkms.client._mail import import_pkcs12
from mailkms.clock import SystemClock
from mailkms.pki import (
    KeyEntry,
    build_pkcs12,
    decrypt_message,
    encrypt_message,
    sign_detached,
    verify_message,
)


def message_10k() -> bytes:
    head = b"From: Alice <alice@example.org>\nTo: Bob <bob@example.org>\nSubject: bench\n\n"
    line = b"The quick brown fox jumps over the lazy dog, again and again, 0123456789.\n"
    body = (line * (10_000 // len(line) + 1))[:10_000]
    return head + body


def per_second(fn: Callable[[], object], seconds: float, max_ops: int = 100_000) -> float:
    fn()  # warm up
    count, start = 0, time.perf_counter()
    while count < max_ops and time.perf_counter() - start < seconds:
        fn()
        count += 1
    return count / (time.perf_counter() - start)


def per_invocation(
    cmd: list[str], invocations: int, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> float:
    times = []
    for _ in range(invocations):
        start = time.perf_counter()
        proc = subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=120)
        times.append(time.perf_counter() - start)
        if proc.returncode not in (0,):
            raise SystemExit(f"{' '.join(cmd[:3])}... failed: {proc.stderr.decode(errors='replace')[:300]}")
    return 1 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="time per in-process measurement")
    parser.add_argument("--invocations", type=int, default=20, help="openssl processes per operation")
    parser.add_argument("--cli", action="store_true", help="also time mailkms-client, one process per operation")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pki = make_pki(folder)
        alice = pki.identity("alice@example.org")
        bob = pki.identity("bob@example.org")
        msg = message_10k()
        (folder / "msg.eml").write_bytes(msg)

        signed = sign_detached(msg, alice.signing, alice.signing_key, [pki.issuing])
        encrypted = encrypt_message(msg, [bob.encryption, alice.encryption])
        ours = {
            "sign": per_second(
                lambda: sign_detached(msg, alice.signing, alice.signing_key, [pki.issuing]), args.seconds
            ),
            "verify": per_second(lambda: verify_message(signed), args.seconds),
            "encrypt": per_second(lambda: encrypt_message(msg, [bob.encryption, alice.encryption]), args.seconds),
            "decrypt": per_second(
                lambda: decrypt_message(encrypted, [(bob.encryption, bob.encryption_key)]), args.seconds
            ),
        }

        f = {name: str(folder / name) for name in os.listdir(folder)}
        osl_signed = folder / "osl-signed.eml"
        osl_enc = folder / "osl-enc.eml"
        subprocess.run(
            ["openssl", "cms", "-sign", "-in", f["msg.eml"], "-signer", f["alice-sign.crt"], "-inkey",
             f["alice-sign.key"], "-certfile", f["issuing.crt"], "-out", str(osl_signed)], check=True
        )  # fmt: skip
        subprocess.run(
            ["openssl", "cms", "-encrypt", "-aes256", "-in", f["msg.eml"], "-out", str(osl_enc),
             f["bob-enc.crt"], f["alice-enc.crt"]], check=True
        )  # fmt: skip
        n = args.invocations
        theirs = {
            "sign": per_invocation(
                ["openssl", "cms", "-sign", "-in", f["msg.eml"], "-signer", f["alice-sign.crt"], "-inkey",
                 f["alice-sign.key"], "-certfile", f["issuing.crt"], "-out", os.devnull], n
            ),
            "verify": per_invocation(
                ["openssl", "cms", "-verify", "-noverify", "-in", str(osl_signed), "-out", os.devnull], n
            ),
            "encrypt": per_invocation(
                ["openssl", "cms", "-encrypt", "-aes256", "-in", f["msg.eml"], "-out", os.devnull,
                 f["bob-enc.crt"], f["alice-enc.crt"]], n
            ),
            "decrypt": per_invocation(
                ["openssl", "cms", "-decrypt", "-in", str(osl_enc), "-recip", f["bob-enc.crt"], "-inkey",
                 f["bob-enc.key"], "-out", os.devnull], n
            ),
        }  # fmt: skip
        cli = _cli(folder, pki, alice, bob, msg, signed, encrypted, max(3, n // 4)) if args.cli else {}

    openssl_version = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    print(f"S/MIME, 10,000-byte body, RSA-2048 keys, SHA-256, AES-256-CBC to 2 recipients; {os.cpu_count()} CPUs")
    print(
        f"peer: {openssl_version}, one process per operation ({n} runs, median); mailkms: in process, {args.seconds:.0f} s each"
    )
    header = f"| {'operation':9} | {'mailkms in process':>18} | {'openssl cms per process':>23} |"
    if cli:
        header += f" {'mailkms-client per process':>26} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for op in ("sign", "verify", "encrypt", "decrypt"):
        row = f"| {op:9} | {ours[op]:>14,.0f} /s | {theirs[op]:>19,.1f} /s |"
        if cli:
            row += f" {cli[op]:>22,.1f} /s |"
        print(row)
    print("verify: mailkms checks the CMS signature only here (the chain check is a few more RSA verifies);")
    print("openssl -noverify likewise skips the chain. Load average now:", os.getloadavg()[0])


def _cli(folder, pki, alice, bob, msg, signed, encrypted, n) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """mailkms-client against key stores imported from PKCS#12 (no server needed for these four)."""
    bin_dir = Path(sys.executable).parent
    homes = {}
    for ident in (alice, bob):
        name = ident.mailbox.split("@")[0]
        data = build_pkcs12(
            [KeyEntry(ident.signing_key, ident.signing, "s"), KeyEntry(ident.encryption_key, ident.encryption, "e")],
            [pki.issuing, pki.root],
            "bench-pw",
            iterations=1000,
            mac_iterations=1000,
        )
        homes[name] = folder / f"home-{name}"
        import_pkcs12(homes[name], data, "bench-pw", b"bench-passphrase", SystemClock())
    env = {**os.environ, "MAILKMS_CLIENT_PASSPHRASE": "bench-passphrase"}
    client = [str(bin_dir / "mailkms-client"), "--home"]
    # encrypt --to needs the directory; its cache is filled here as a lookup would fill it
    (homes["alice"] / "directory").mkdir()
    (homes["alice"] / "directory" / "bob@example.org.pem").write_bytes(
        bob.encryption.public_bytes(serialization.Encoding.PEM) + pki.issuing.public_bytes(serialization.Encoding.PEM)
    )
    (homes["alice"] / "directory" / "bob@example.org.json").write_text(
        json.dumps({"fetched_at": dt.datetime.now(dt.UTC).isoformat()})
    )
    return {
        "sign": per_invocation([*client, str(homes["alice"]), "sign"], n, msg, env),
        "verify": per_invocation([*client, str(homes["bob"]), "verify", "--no-revocation"], n, signed, env),
        "encrypt": per_invocation([*client, str(homes["alice"]), "encrypt", "--to", "bob@example.org"], n, msg, env),
        "decrypt": per_invocation([*client, str(homes["bob"]), "decrypt"], n, encrypted, env),
    }


if __name__ == "__main__":
    main()
