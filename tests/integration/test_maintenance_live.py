"""Maintenance while the server runs (issue 12, "tests that cannot fail"): the real `serve()` in
process (HTTPS, http, SMTP sink, outbox and every background loop), on an injected clock moved
by hand, with the daily round every 0.2 s instead of every day. Each job is taken across its
threshold: just before it nothing changes, just after it the new certificate or CRL is in place
and is what the running server hands out (a new TLS handshake sees the new certificate: no
restart). A round is known to have run at a time by its debug record, which carries the clock
time it started at (`at`)."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from sqlalchemy import func, select

from mailkms.cli._serve import serve
from mailkms.clock import FakeClock
from mailkms.config import load_settings
from mailkms.pki import crl_number, verify_message
from mailkms.services import Services, ShareInput
from mailkms.services._ca import (
    MAIL_SIGNER_RENEW_BEFORE,
    OCSP_RESPONDER_RENEW_BEFORE,
    ROOT_CRL_VALIDITY,
    TLS_RENEW_BEFORE,
)
from mailkms.store import Certificate, KeyHandover, RecoveryHold
from tests.conftest import CA_PASSPHRASE, PUBLIC_URL, START, make_csr, transport_pem

HOUR = dt.timedelta(hours=1)
BOOTSTRAP_PASSPHRASE = b"test-recovery-passphrase"  # what tests/conftest.py gives init_ca
MARGIN = dt.timedelta(minutes=1)  # TLS and the root CRL fall due five minutes apart
ROUND = 0.2  # seconds between the daily rounds here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rounds(logging.Handler):
    """The debug records of the loops: which ran, at what time of the injected clock."""

    LOGGERS = ("mailkms.serve", "mailkms.background")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Rounds:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self)
        return self

    def __exit__(self, *_: object) -> None:
        for name, level in self._levels.items():
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(level)

    def wait(self, job: str, at: dt.datetime, timeout: float = 30.0) -> None:
        """Until a round of `job` (daily, housekeeping, revocation) started at `at` or later ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in list(self.records):
                when = getattr(record, "at", None)
                if when is not None and str(record.msg).startswith(job) and when >= at:
                    return
            time.sleep(0.05)
        pytest.fail(f"no {job} round at {at} within {timeout} s")


class Live:
    """`serve()` on its own thread and event loop, stopped through its `stop` event."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.https_port, self.http_port = _free_port(), _free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failed: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._failed:
                raise self._failed[0]
            try:
                self.tls_certificate()
                return
            except OSError:
                time.sleep(0.1)
        pytest.fail("serve() did not listen in time")

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(
                self.services,
                bind="127.0.0.1",
                https_port=self.https_port,
                http_port=self.http_port,
                outbox_interval=0.1,
                maintenance_every=ROUND,
                stop=self._stop,
            )

        try:
            asyncio.run(main())
        except BaseException as exc:  # shown by the test, not lost in the thread
            self._failed.append(exc)

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "serve() did not stop"
        assert not self._failed, self._failed

    def tls_certificate(self) -> bytes:
        """The certificate a new TLS handshake is given (DER). Not verified: the clock is not now."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", self.https_port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    def get(self, path: str) -> bytes:
        answer = httpx.get(f"http://127.0.0.1:{self.http_port}{path}", timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.content

    def ocsp_responder(self, cert: x509.Certificate) -> x509.Certificate:
        """The responder certificate in the answer the running server gives for `cert`."""
        issuer = self.services.ca.issuing.certificate
        request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
        answer = httpx.post(
            f"http://127.0.0.1:{self.http_port}/ocsp",
            content=request.public_bytes(serialization.Encoding.DER),
            headers={"Content-Type": "application/ocsp-request"},
            timeout=10,
        )
        response = ocsp.load_der_ocsp_response(answer.content)
        assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
        [responder] = response.certificates
        return responder


@pytest.fixture
def live(data_dir: Path, tmp_path: Path) -> Iterator[tuple[Live, FakeClock, Rounds]]:
    settings = load_settings(
        data_dir,
        database_url=f"sqlite:///{tmp_path / 'store.db'}",
        ca_passphrase=CA_PASSPHRASE,
        server={"hostname": "localhost", "public_url": PUBLIC_URL},
        smtp={"sink_port": _free_port()},
        limits={"refusal_flush_seconds": 0.1},
        revocation={"poll_seconds": 0.1},
        pool={"size": 0},
        reminders={"enabled": False},
    )
    clock = FakeClock(START)
    services = Services.build(settings, clock)
    with Rounds() as rounds:
        server = Live(services)
        try:
            yield server, clock, rounds
        finally:
            server.close()


def _enrol(services: Services, mailbox: str) -> None:
    token = services.users.add(mailbox, "", None, "admin:test")
    services.enrolment.enrol(mailbox, token, make_csr(mailbox)[0], transport_pem(mailbox)[0])


def _delivery_signer(services: Services, mailbox: str) -> x509.Certificate:
    """The certificate that signed the delivery the running server's outbox put in the sink."""
    box = services.settings.data_dir / "mailboxes" / mailbox / "new"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        mails = [p for p in box.glob("*")] if box.exists() else []
        if mails:
            return verify_message(mails[0].read_bytes()).signed.signer
        time.sleep(0.1)
    pytest.fail(f"no delivery for {mailbox} reached the sink")


def test_purges_and_the_issuing_crl_across_their_thresholds(live: tuple[Live, FakeClock, Rounds]) -> None:
    server, clock, rounds = live
    services = server.services
    t0 = clock.now()
    nonce = services.nonces.new()
    services.nonces.consume(nonce)  # a spent nonce: one row, until it is stale anyway
    token = services.users.add("kim@example.org", "", None, "admin:test")
    csr = x509.load_pem_x509_csr(make_csr("kim@example.org")[0]).public_bytes(serialization.Encoding.DER)
    services.est.simpleenroll("kim@example.org", token, csr)  # a sealed key, one hour

    def sealed() -> int:
        with services.db.read_only() as session:
            return int(session.execute(select(func.count()).select_from(KeyHandover)).scalar_one())

    crl = x509.load_der_x509_crl(server.get("/crl/issuing.crl"))
    refresh = dt.timedelta(hours=services.settings.revocation.crl_refresh_hours)

    clock.set(t0 + dt.timedelta(minutes=5))
    rounds.wait("housekeeping", clock.now())
    assert services.nonces.spent() == 1 and sealed() == 1
    clock.set(t0 + services.nonces.ttl + dt.timedelta(minutes=2))  # stale (ttl + the nodes' skew): forgotten
    rounds.wait("housekeeping", clock.now())
    assert services.nonces.spent() == 0 and sealed() == 1
    clock.set(t0 + HOUR - dt.timedelta(minutes=1))
    rounds.wait("housekeeping", clock.now())
    assert sealed() == 1
    clock.set(t0 + HOUR + dt.timedelta(minutes=1))  # the hand-over hour has ended
    rounds.wait("housekeeping", clock.now())
    assert sealed() == 0

    clock.set(crl.last_update_utc + refresh - dt.timedelta(minutes=1))
    rounds.wait("revocation", clock.now())
    assert crl_number(x509.load_der_x509_crl(server.get("/crl/issuing.crl"))) == crl_number(crl)
    clock.set(crl.last_update_utc + refresh + dt.timedelta(minutes=1))
    rounds.wait("revocation", clock.now())
    fresh = x509.load_der_x509_crl(server.get("/crl/issuing.crl"))
    assert crl_number(fresh) == crl_number(crl) + 1 and fresh.last_update_utc >= crl.last_update_utc + refresh

    # a held recovery (the keys waiting for their owner's recovery token) goes when the token dies
    _enrol(services, "ray@example.org")
    share = next((services.settings.data_dir / "recovery").glob("share-*-1-bootstrap.json"))
    services.recovery.recover("ray@example.org", [ShareInput(share.read_bytes(), BOOTSTRAP_PASSPHRASE)], "admin:t")
    with services.db.read_only() as session:
        [held_until] = session.execute(select(RecoveryHold.expires_at)).scalars().all()
    held_until = held_until.replace(tzinfo=dt.UTC) if held_until.tzinfo is None else held_until

    def holds() -> int:
        with services.db.read_only() as session:
            return int(session.execute(select(func.count()).select_from(RecoveryHold)).scalar_one())

    clock.set(held_until - dt.timedelta(minutes=1))
    rounds.wait("daily", clock.now())
    assert holds() == 1
    clock.set(held_until + dt.timedelta(minutes=1))
    rounds.wait("daily", clock.now())
    assert holds() == 0


def test_server_certificates_and_the_root_crl_are_renewed_while_serving(live: tuple[Live, FakeClock, Rounds]) -> None:
    server, clock, rounds = live
    services = server.services
    ca, paths = services.ca, services.ca.paths
    enrolled = itertools.count()

    def newest_certificate() -> x509.Certificate:
        with services.db.read_only() as session:
            der = session.execute(select(Certificate.der).order_by(Certificate.id.desc()).limit(1)).scalar_one()
        return x509.load_der_x509_certificate(der)

    def served_responder() -> bytes:
        """OCSP for a serial asked about for the first time (never a cached answer)."""
        _enrol(services, f"probe{next(enrolled)}@example.org")
        return server.ocsp_responder(newest_certificate()).public_bytes(serialization.Encoding.DER)

    def served_mail_signer() -> bytes:
        mailbox = f"user{next(enrolled)}@example.org"
        _enrol(services, mailbox)
        return _delivery_signer(services, mailbox).public_bytes(serialization.Encoding.DER)

    def der(cert: x509.Certificate | None) -> bytes:
        assert cert is not None
        return cert.public_bytes(serialization.Encoding.DER)

    # name: (what the running server hands out, what it holds in memory, the file, when it is renewed)
    jobs = {
        "ocsp-responder": (
            served_responder,
            lambda: der(ca.require_ocsp_responder().certificate),
            lambda: der(x509.load_pem_x509_certificate(paths.ocsp_cert.read_bytes())),
            lambda c: c.not_valid_after_utc - OCSP_RESPONDER_RENEW_BEFORE,  # 10 days before its 30 end
        ),
        "root-crl": (
            lambda: server.get("/crl/root.crl"),
            lambda: ca.root_crl.public_bytes(serialization.Encoding.DER),  # type: ignore[union-attr]
            lambda: paths.root_crl.read_bytes(),
            lambda c: c.next_update_utc - ROOT_CRL_VALIDITY / 3,  # when a third of its life is left
        ),
        "tls": (  # a new handshake on the running server: no restart
            server.tls_certificate,
            lambda: der(ca.tls_cert),
            lambda: der(x509.load_pem_x509_certificate(paths.tls_cert.read_bytes())),
            lambda c: c.not_valid_after_utc - TLS_RENEW_BEFORE,
        ),
        "mail-signer": (  # the next delivery the outbox sends is signed by the new one
            served_mail_signer,
            lambda: der(ca.require_mail_signer().certificate),
            lambda: der(x509.load_pem_x509_certificate(paths.mail_cert.read_bytes())),
            lambda c: c.not_valid_after_utc - MAIL_SIGNER_RENEW_BEFORE,
        ),
    }

    def load(name: str, data: bytes) -> Any:
        return x509.load_der_x509_crl(data) if name == "root-crl" else x509.load_der_x509_certificate(data)

    first = {name: served() for name, (served, *_) in jobs.items()}
    for name, (_, held, on_disk, _) in jobs.items():
        assert first[name] == held() == on_disk(), name
    due = {name: jobs[name][3](load(name, first[name])) for name in jobs}
    assert all(when > clock.now() + MARGIN for when in due.values())
    for name in sorted(jobs, key=due.__getitem__):
        served, held, on_disk, _ = jobs[name]
        clock.set(due[name] - MARGIN)
        rounds.wait("daily", clock.now())
        assert served() == first[name], f"{name} changed before its time"
        clock.set(due[name] + MARGIN)
        rounds.wait("daily", clock.now())
        now_served = served()
        assert now_served != first[name], f"{name} was not renewed"
        assert now_served == held() == on_disk(), name
        new = load(name, now_served)
        if name == "root-crl":
            assert crl_number(new) == crl_number(load(name, first[name])) + 1
            assert new.last_update_utc <= clock.now() < new.next_update_utc
            assert new.is_signature_valid(ca.root.public_key())
        else:
            assert new.not_valid_before_utc <= clock.now() < new.not_valid_after_utc
            assert new.public_key() != load(name, first[name]).public_key()  # a new key too
