"""Renewals per second from a filled key pool (the burst of issue 13), in process on SQLite, with
the callers of bench/run.py (RENEW_CALLERS concurrent requests). Setup (CA, pool keys on two
processes, enrolments) is not timed; the load average is printed with the figure.

    .venv/bin/python bench/renewal_burst.py [--users 200] [--profile out.prof]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.run import (
    RENEW_CALLERS,
    RENEW_URL,
    UserForRenewal,
    _enrol_for_renewal,
    _pool_keys,
    _renew,
    make_ca,
    settings_for,
)
from mailkms.clock import FakeClock
from mailkms.pki import KeyType, sign_request
from mailkms.services import KeyPool, Services


def _renew_one(services: Services, user: UserForRenewal) -> None:
    """As bench/run.py's callers do, one renewal on this thread."""
    mailbox, key_pem, der, csr = user
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = x509.load_der_x509_certificate(der)
    jws = sign_request(key, [cert], services.nonces.new(), RENEW_URL, {"mailbox": mailbox, "csr": csr.decode()})
    assert not services.renewal.renew(jws, RENEW_URL).already_issued


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--profile", default="")
    args = parser.parse_args()
    n = args.users
    tmp = Path(tempfile.mkdtemp(prefix="mailkms-burst-"))
    try:
        data = make_ca(tmp / "ca", KeyType.RSA3072)
        now = dt.datetime.now(dt.UTC)
        clock = FakeClock(now)
        extra: dict[str, object] = {"issuance": {"batch_size": 1}} if args.profile else {}
        settings = settings_for(data, f"sqlite:///{tmp / 'burst.db'}", pool={"size": 0}, **extra)
        services = Services.build(settings, clock)
        pool = KeyPool(services.db, services.pool_keyring, clock, KeyType.RSA2048, size=3 * n + 10)
        pool.store(_pool_keys(2 * n + 4))
        services.issuer.keys = pool
        users = _enrol_for_renewal(services, "burst", n, now)
        clock.advance(dt.timedelta(days=366))
        services.signers.start()
        assert pool.size() >= n
        load = os.getloadavg()
        profiler = cProfile.Profile() if args.profile else None
        start, cpu = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        if profiler:  # one caller, each renewal in a transaction of its own on this thread: all of it profiled
            for user in users:
                _renew_one(services, user)
        else:
            _renew(services, users)
        if profiler:
            profiler.disable()
            profiler.dump_stats(args.profile)
        elapsed = time.perf_counter() - start
        cpu_ms = 1000 * (time.process_time() - cpu) / n  # all threads of this process, less sensitive to load
        services.close()
        print(
            f"renewal from the pool, {n} users, {RENEW_CALLERS} callers, SQLite: {n / elapsed:.1f}/s, "
            f"server-process CPU {cpu_ms:.1f} ms a renewal "
            f"(load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after {os.getloadavg()[0]:.2f})"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
