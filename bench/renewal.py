"""Renewals per second in process, with persistence (SQLite) and the outbox, and the share of
RSA-2048 key generation in it. Bounded: N users, one renewal each.

    .venv/bin/python bench/renewal.py [--users 60] [--db sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import make_csr, transport_pem

from mailkms.clock import UTC, FakeClock
from mailkms.config import load_settings
from mailkms.pki import KeyType, PublicURLs, generate_key, sign_request
from mailkms.services import CAPaths, Services, init_ca, tls_hostnames

URL = "https://localhost:8443/api/v1/renewals"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=60)
    parser.add_argument("--db", default="sqlite")
    args = parser.parse_args()
    start = dt.datetime(2026, 1, 15, 9, 30, tzinfo=UTC)
    tmp = Path(tempfile.mkdtemp(prefix="mailkms-bench-"))
    try:
        init_ca(
            CAPaths(tmp),
            passphrase_env="bench",
            key_type=KeyType.RSA3072,
            organization="bench",
            country=None,
            urls=PublicURLs("http://kms.example.org/"),
            hostnames=tls_hostnames("localhost"),
            mail_from="mailkms@kms.example.org",
            clock=FakeClock(start - dt.timedelta(days=1)),
            recovery_passphrase="bench-recovery",
        )
        url = "" if args.db == "sqlite" else "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        settings = load_settings(
            tmp, ca_passphrase="bench", database_url=url, server={"public_url": "http://kms.example.org/"}
        )
        clock = FakeClock(start)
        services = Services.build(settings, clock)
        users = []
        for i in range(args.users):
            mailbox = f"user{i}@example.org"
            token = services.users.add(mailbox, "", None, "bench")
            csr, key = make_csr(mailbox)
            pem, _, _ = transport_pem(mailbox)
            services.enrolment.enrol(mailbox, token, csr, pem)
            users.append((mailbox, key, services.users.show(mailbox)))
        from cryptography import x509
        from sqlalchemy import select

        from mailkms.store import Certificate

        clock.advance(dt.timedelta(days=380))
        requests = []
        for mailbox, key, view in users:
            serial = next(c.serial for c in view.certificates if c.kind == "signing")
            with services.db.transaction() as session:
                der = session.execute(select(Certificate.der).where(Certificate.serial == serial)).scalar_one()
            cert = x509.load_der_x509_certificate(der)
            csr, _ = make_csr(mailbox)
            requests.append((mailbox, key, cert, csr))
        t0 = time.perf_counter()
        for mailbox, key, cert, csr in requests:
            body = sign_request(key, [cert], services.nonces.new(), URL, {"mailbox": mailbox, "csr": csr.decode()})
            services.renewal.renew(body, URL)
        elapsed = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(args.users):
            generate_key(KeyType.RSA2048)
        keygen = time.perf_counter() - t1
        rate = args.users / elapsed
        keygen_rate = args.users / keygen
        print(f"| figure ({args.db}, {args.users} users, one core) | value |")
        print("|---|---|")
        print(
            f"| full renewal (JWS check, nonce, CSR, RSA-2048 keygen, 2 certs, archive, signed mail, outbox, audit) | {rate:.1f}/s |"
        )
        print(f"| RSA-2048 key generation alone | {keygen_rate:.1f}/s |")
        print(
            f"| share of renewal time spent generating the key | {100 * (keygen / args.users) / (elapsed / args.users):.0f}% |"
        )
        services.db.dispose()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
