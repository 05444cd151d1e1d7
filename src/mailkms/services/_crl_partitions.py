"""CRL partitions: which CRL lists a certificate, and how one CRL is built from the store.

With `ca.crl_partition_size` set, every new certificate is assigned to the newest partition that
still has room (exactly counted under the partition row's lock, in the issuance transaction) and
its CDP names that partition's CRL, `/crl/issuing/N.crl`. That CRL carries an issuingDistribution-
Point with the same URL (RFC 5280 §5.2.5), so it is complete for its certificates and no relying
party takes it for the whole CA. No CRL ever lists more than the partition size, whatever the
number of certificates: memory and time per CRL stay bounded, and a revocation re-signs only its
own partition. A partition's first (empty) CRL is signed when the partition is opened, so its
URL answers from the moment the first certificate names it.

Certificates without a partition (issued before partitioning, or with it off) stay on the whole-CA
CRL, `/crl/issuing.crl`; once partitions exist that CRL also carries an IDP naming its own URL.

A build streams the rows from a read-only snapshot into one `build_crl` call; `serve` runs it in
worker processes (`CRLWorkers`) that load the issuing CA key once, so neither the GIL nor the
store's write lock is held by the server while a CRL is built.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import String, or_, select, type_coerce
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from mailkms.clock import Clock
from mailkms.pki import SUBSCRIBER_REASONS, CASigner, PublicURLs, RevokedEntry, SoftSigner, build_crl
from mailkms.services._audit import AuditLog
from mailkms.services._ca import CAContext, load_key_at
from mailkms.store import Certificate, Database, PublishedCRL

ISSUING_SCOPE = "issuing"
STREAM_ROWS = 20_000


def partition_scope(partition: int | None) -> str:
    return ISSUING_SCOPE if partition is None else f"{ISSUING_SCOPE}-{partition}"


@dataclass(frozen=True)
class CRLJob:
    """One CRL to build: its scope, the number it gets, its times and its IDP URL (None: no IDP).

    `previous_update` is the thisUpdate of the scope's CRL this one follows (number - 1; None: none
    signed yet): an expired certificate's entry stays until a CRL issued after its expiry has listed
    it (RFC 5280 §3.3), i.e. while notAfter >= previous_update.
    """

    scope: str
    partition: int | None
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    distribution_point: str | None
    previous_update: dt.datetime | None = None


@dataclass(frozen=True)
class BuiltCRL:
    der: bytes
    entries: int


class _Counter:
    def __init__(self) -> None:
        self.count = 0

    def through(self, items: Iterator[RevokedEntry]) -> Iterator[RevokedEntry]:
        for item in items:
            self.count += 1
            yield item


KEY_COMPROMISE = "keyCompromise"  # as stored in certificates.revocation_reason


def revoked_entries(
    session: Session, partition: int | None, previous_update: dt.datetime | None
) -> Iterator[RevokedEntry]:
    """The partition's revoked certificates still to be listed, streamed from the covering partial index.

    Listed: every unexpired one, and an expired one until it has been on one CRL issued after its
    expiry (RFC 5280 §3.3): the previous CRL of the scope (thisUpdate `previous_update`, None: there
    was none) came after its notAfter, so it was listed there and leaves now. A compromised key's
    entry stays: a signature it makes later, with a signing time claimed in the validity, stays refused.

    Read through Core with the time as the driver gives it (SQLite: text, parsed by fromisoformat;
    PostgreSQL: a datetime): the ORM's per-row type processing was a third of a 100k build. A naive
    time is UTC (the store writes UTC; cryptography reads naive times as UTC).
    """
    reasons = SUBSCRIBER_REASONS
    in_scope = Certificate.crl_partition.is_(None) if partition is None else Certificate.crl_partition == partition
    query = select(
        Certificate.serial, type_coerce(Certificate.revoked_at, String()), Certificate.revocation_reason
    ).where(in_scope, Certificate.revoked_at.is_not(None))
    if previous_update is not None:
        query = query.where(
            or_(Certificate.not_after >= previous_update, Certificate.revocation_reason == KEY_COMPROMISE)
        )
    parse = dt.datetime.fromisoformat
    rows = session.connection().execution_options(yield_per=STREAM_ROWS).execute(query)
    for serial, revoked_at, reason in rows:
        at: dt.datetime = revoked_at if isinstance(revoked_at, dt.datetime) else parse(revoked_at)
        yield RevokedEntry(int(serial, 16), at, reasons.get(reason) if reason else None)


def build_scope(session: Session, signer: CASigner, job: CRLJob) -> BuiltCRL:
    """One CRL in one pass: rows stream into the builder, no second list of the entries."""
    counted = _Counter()
    crl = build_crl(
        signer,
        counted.through(revoked_entries(session, job.partition, job.previous_update)),
        number=job.number,
        this_update=job.this_update,
        next_update=job.next_update,
        distribution_point=job.distribution_point,
    )
    return BuiltCRL(crl.public_bytes(serialization.Encoding.DER), counted.count)


class CRLPartitions:
    """Assigns new certificates to partitions of at most `size` (0: no partitions)."""

    def __init__(self, ca: CAContext, size: int, validity: dt.timedelta, clock: Clock, audit: AuditLog) -> None:
        self._ca = ca
        self.size = size
        self._validity = validity
        self._clock = clock
        self._audit = audit

    @property
    def urls(self) -> PublicURLs:
        return self._ca.urls

    def take(self, session: Session) -> int | None:
        """The partition of one certificate about to be issued in `session`; None without partitioning.

        Counted under the newest partition row's lock, so a partition never gets more than `size`
        certificates on any number of nodes; a rolled-back issuance gives its place back.
        """
        if not self.size:
            return None
        newest = (
            select(PublishedCRL)
            .where(PublishedCRL.partition.is_not(None))
            .order_by(PublishedCRL.partition.desc())
            .limit(1)
            .with_for_update()
        )
        row = session.execute(newest).scalar_one_or_none()
        if row is None or row.assigned >= self.size:
            row = self._open(session, 1 if row is None or row.partition is None else row.partition + 1)
        row.assigned += 1
        assert row.partition is not None
        return row.partition

    def _open(self, session: Session, partition: int) -> PublishedCRL:
        """A new partition with its first, empty CRL (one signature per `size` certificates)."""
        scope = partition_scope(partition)
        this_update = self._clock.now().replace(microsecond=0)
        crl = build_crl(
            self._ca.issuing,
            [],
            number=1,
            this_update=this_update,
            next_update=this_update + self._validity,
            distribution_point=self.urls.crl_partition(partition),
        )
        der = crl.public_bytes(serialization.Encoding.DER)
        insert: Any = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
        made = session.execute(
            insert(PublishedCRL)
            .values(
                scope=scope,
                partition=partition,
                number=1,
                entries=0,
                assigned=0,
                revision=0,
                der=der,
                this_update=this_update,
                next_update=this_update + self._validity,
            )
            .on_conflict_do_nothing(index_elements=["scope"])
        )
        if made.rowcount:  # type: ignore[attr-defined]
            self._audit.append(
                session, "system", "crl.published", scope, number=1, entries=0, bytes=len(der), opened=True
            )
        return session.execute(select(PublishedCRL).where(PublishedCRL.scope == scope).with_for_update()).scalar_one()


# --- worker processes ----------------------------------------------------------------------------------
_worker: tuple[Database, SoftSigner] | None = None


def _init_worker(database_url: str, cert_pem: bytes, key_path: str, passphrase: bytes) -> None:
    """Once per worker process: the issuing CA key (from its encrypted file) and a store connection."""
    global _worker
    key = load_key_at(Path(key_path), passphrase)
    _worker = (Database(database_url), SoftSigner(x509.load_pem_x509_certificate(cert_pem), key))


def _started() -> int:
    # long enough that each of the first jobs lands on a worker of its own. A timed wait, not time.sleep: under libfaketime with a large offset (the e2e
    # tests) clock_nanosleep on an absolute deadline fails with EINVAL and kills the worker.
    threading.Event().wait(0.2)
    return os.getpid()


def _build_in_worker(job: CRLJob) -> BuiltCRL:
    assert _worker is not None, "the CRL worker was not initialised"
    db, signer = _worker
    with db.read_only() as session:
        return build_scope(session, signer, job)


class CRLWorkers:
    """`workers` processes that build CRLs (spawned, not forked: the server has threads)."""

    def __init__(self, database_url: str, ca: CAContext, workers: int) -> None:
        cert_pem = ca.issuing.certificate.public_bytes(serialization.Encoding.PEM)
        # The passphrase reaches the child through its start-up pipe, never the disk or the log.
        self._executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(database_url, cert_pem, str(ca.paths.issuing_key), ca.at_rest_passphrase),
        )

    def start(self, timeout: float = 60.0) -> list[int]:
        """Start every worker now (each opens the key once) rather than at the first build; their pids."""
        executor: Any = self._executor
        wanted = executor._max_workers
        answered: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(answered) < wanted and time.monotonic() < deadline:  # until each has answered once
            answered |= {f.result() for f in [executor.submit(_started) for _ in range(wanted)]}
        return sorted(answered)

    def __call__(self, jobs: Sequence[CRLJob]) -> Iterator[tuple[CRLJob, BuiltCRL]]:
        """The jobs on every worker at once; results in order, each as soon as it and those before it are done."""
        return zip(jobs, self._executor.map(_build_in_worker, jobs), strict=True)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
