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

Every scope belongs to one issuing CA key (`issuer_key_id`, fixed when its first CRL is signed): a
CRL must be signed by the key that issued the certificates it lists (RFC 5280 §6.3.3). After
`mailkms ca rekey` the new key's certificates therefore never join a scope of the old key: they
open partitions of their own, even with partitioning off (then one partition per key, unbounded),
while the old key keeps signing `/crl/issuing.crl` and its partitions until they retire.

A build streams the rows from a read-only snapshot into one `build_crl` call; `serve` runs it in
worker processes (`CRLWorkers`) that load the issuing CA key once, so neither the GIL nor the
store's write lock is held by the server while a CRL is built.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from typing import Any

from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, defer

from mailkms.clock import Clock
from mailkms.crl_build import (
    KEY_COMPROMISE,
    BuiltCRL,
    CRLJob,
    build_in_worker,
    build_scope,
    init_worker,
    revoked_entries,
    started,
)
from mailkms.errors import Internal
from mailkms.pki import PublicURLs, build_crl
from mailkms.services._audit import AuditLog
from mailkms.services._ca import CAContext
from mailkms.store import Database, PublishedCRL

__all__ = ["KEY_COMPROMISE", "BuiltCRL", "CRLJob", "CRLPartitions", "CRLWorkers", "build_scope", "revoked_entries"]

ISSUING_SCOPE = "issuing"


def partition_scope(partition: int | None) -> str:
    return ISSUING_SCOPE if partition is None else f"{ISSUING_SCOPE}-{partition}"


class CRLPartitions:
    """Assigns new certificates to partitions of at most `size` (0: no partitions)."""

    def __init__(self, ca: CAContext, size: int, validity: dt.timedelta, clock: Clock, audit: AuditLog) -> None:
        self._ca = ca
        self.size = size
        self._validity = validity
        self._clock = clock
        self._audit = audit
        self._whole_key: str | None = None

    @property
    def urls(self) -> PublicURLs:
        return self._ca.urls

    def take(self, session: Session, key_id: str) -> int | None:
        """The partition of one certificate the issuing key `key_id` is about to sign in `session`;
        None: the whole-CA CRL (no partitioning, and the key is the one that signs that CRL).

        Counted under the newest partition row's lock, so a partition never gets more than `size`
        certificates on any number of nodes; a rolled-back issuance gives its place back. Only this
        key's partitions are looked at: during a rekey, nodes still on the old key and nodes on the
        new one each fill their own newest partition instead of opening one at every turn.
        """
        if self.none_needed(session, key_id):
            return None
        newest_of_key = (
            select(PublishedCRL)
            .options(defer(PublishedCRL.der, raiseload=True))  # the lock and the count, not the CRL
            .where(PublishedCRL.partition.is_not(None), PublishedCRL.issuer_key_id == key_id)
            .order_by(PublishedCRL.partition.desc())
            .limit(1)
            .with_for_update()
        )
        row = session.execute(newest_of_key).scalar_one_or_none()
        while row is None or not self._has_room(row, key_id):
            # Another node may open the same number first, for this key (then it is joined) or for
            # another (then the number after it is tried).
            last = session.execute(select(func.max(PublishedCRL.partition))).scalar_one_or_none()
            row = self._open(session, (last or 0) + 1, key_id)
        row.assigned += 1
        assert row.partition is not None
        return row.partition

    def _has_room(self, row: PublishedCRL, key_id: str) -> bool:
        return row.issuer_key_id == key_id and not (self.size and row.assigned >= self.size)

    def none_needed(self, session: Session, key_id: str) -> bool:
        """Whether `take` would give None for this key (the whole-CA CRL): no lock, no write."""
        return not self.size and self._whole_ca_key(session) == key_id

    def _whole_ca_key(self, session: Session) -> str:
        """The key that signs the whole-CA CRL, remembered once read: fixed once signed, and until
        then the first key, which is the one that will sign it (RevocationService._signing_key)."""
        if self._whole_key is None:
            self._whole_key = (
                session.execute(
                    select(PublishedCRL.issuer_key_id).where(PublishedCRL.scope == ISSUING_SCOPE)
                ).scalar_one_or_none()
                or self._ca.first_key_id
            )
        return self._whole_key

    def take_alone(self, db: Database, key_id: str) -> int | None:
        """`take` in a transaction of its own (a server certificate, which has no issuance transaction)."""
        with db.transaction() as session:
            return self.take(session, key_id)

    def _open(self, session: Session, partition: int, key_id: str) -> PublishedCRL:
        """A new partition of the key `key_id`, with its first, empty CRL (one signature per `size` certificates)."""
        signer = self._ca.signer_for_key(key_id)
        if signer is None:
            raise Internal(f"no issuing CA key {key_id} on this server: it cannot open a CRL partition for it")
        scope = partition_scope(partition)
        this_update = self._clock.now().replace(microsecond=0)
        crl = build_crl(
            signer,
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
                issuer_key_id=key_id,
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
        opened = (
            select(PublishedCRL).options(defer(PublishedCRL.der, raiseload=True)).where(PublishedCRL.scope == scope)
        )
        return session.execute(opened.with_for_update()).scalar_one()


# --- worker processes ----------------------------------------------------------------------------------
class CRLWorkers:
    """`workers` processes that build CRLs (spawned, not forked: the server has threads)."""

    def __init__(self, database_url: str, ca: CAContext, workers: int) -> None:
        # The passphrase reaches the child through its start-up pipe, never the disk or the log. The
        # children run mailkms.crl_build only: they never import the services, the ORM or alembic.
        # They open every issuing key on disk (a scope is signed by its own key; a job naming a key
        # they lack makes them look again: `ca rekey` while they run).
        paths = ca.paths
        files = (str(paths.issuing_cert), str(paths.issuing_key), str(paths.previous_dir))
        self._executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
            initargs=(database_url, files, ca.at_rest_passphrase),
        )

    def start(self, timeout: float = 60.0) -> list[int]:
        """Start every worker now (each opens the key once) rather than at the first build; their pids."""
        executor: Any = self._executor
        wanted = executor._max_workers
        answered: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(answered) < wanted and time.monotonic() < deadline:  # until each has answered once
            answered |= {f.result() for f in [executor.submit(started) for _ in range(wanted)]}
        return sorted(answered)

    def __call__(self, jobs: Sequence[CRLJob]) -> Iterator[tuple[CRLJob, BuiltCRL]]:
        """The jobs on every worker at once; results in order, each as soon as it and those before it are done."""
        return zip(jobs, self._executor.map(build_in_worker, jobs), strict=True)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
