"""One CRL built from the store's revoked rows: the code a CRL worker process runs, and the server too.

Kept out of `mailkms.services` and `mailkms.store` on purpose: importing either package loads every
model, the ORM and alembic (114 MiB for `mailkms.services`, measured), and a worker only needs the
PKI core, SQLAlchemy Core and one query (about 55 MiB). Nothing here imports the ORM: the rows are
read through a lightweight `table()` of the columns the covering partial index holds (migration 0010).
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Connection, DateTime, Engine, column, create_engine, or_, select, table

from mailkms.pki import (
    SUBSCRIBER_REASONS,
    CASigner,
    PrivateKey,
    RevokedEntry,
    SoftSigner,
    build_crl,
    ca_key_id,
    load_private_key,
)

STREAM_ROWS = 20_000
KEY_COMPROMISE = "keyCompromise"  # as stored in certificates.revocation_reason

_revoked = table(
    "certificates",
    column("serial"),
    column("revoked_at"),
    column("revocation_reason"),
    column("not_after", DateTime(timezone=True)),
    column("crl_partition"),
)


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
    issuer_key_id: str = ""  # SKI hex of the issuing CA key that signs this scope ("": the current one)


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


def revoked_entries(
    connection: Connection, partition: int | None, previous_update: dt.datetime | None
) -> Iterator[RevokedEntry]:
    """The partition's revoked certificates still to be listed, streamed from the covering partial index.

    Listed: every unexpired one, and an expired one until it has been on one CRL issued after its
    expiry (RFC 5280 §3.3): the previous CRL of the scope (thisUpdate `previous_update`, None: there
    was none) came after its notAfter, so it was listed there and leaves now. A compromised key's
    entry stays: a signature it makes later, with a signing time claimed in the validity, stays refused.

    The time comes as the driver gives it (SQLite: text, parsed by fromisoformat; PostgreSQL: a
    datetime): no per-row type processing. A naive time is UTC (the store writes UTC).
    """
    c = _revoked.c
    in_scope = c.crl_partition.is_(None) if partition is None else c.crl_partition == partition
    query = select(c.serial, c.revoked_at, c.revocation_reason).where(in_scope, c.revoked_at.is_not(None))
    if previous_update is not None:
        since = previous_update.astimezone(dt.UTC)  # bound as the store writes it (UTC; text on SQLite)
        query = query.where(or_(c.not_after >= since, c.revocation_reason == KEY_COMPROMISE))
    reasons = SUBSCRIBER_REASONS
    parse = dt.datetime.fromisoformat
    rows = connection.execution_options(yield_per=STREAM_ROWS).execute(query)
    for serial, revoked_at, reason in rows:
        at: dt.datetime = revoked_at if isinstance(revoked_at, dt.datetime) else parse(revoked_at)
        yield RevokedEntry(int(serial, 16), at, reasons.get(reason) if reason else None)


def build_scope(connection: Connection, signer: CASigner, job: CRLJob) -> BuiltCRL:
    """One CRL in one pass: rows stream into the builder, no second list of the entries."""
    counted = _Counter()
    crl = build_crl(
        signer,
        counted.through(revoked_entries(connection, job.partition, job.previous_update)),
        number=job.number,
        this_update=job.this_update,
        next_update=job.next_update,
        distribution_point=job.distribution_point,
    )
    return BuiltCRL(crl.public_bytes(serialization.Encoding.DER), counted.count)


# --- in a worker process ----------------------------------------------------------------------------
@dataclass
class _Worker:
    engine: Engine
    ca_files: tuple[str, str, str]  # the issuing CA certificate, its key, the folder of replaced keys
    passphrase: bytes
    signers: dict[str, SoftSigner]  # by key id (SKI hex); the current key under "" too


_worker: _Worker | None = None


def _load_key(path: Path, passphrase: bytes) -> PrivateKey:
    if path.with_suffix(".pkcs11").exists():  # the key lives in a token (services._ca.token_ref_path)
        from mailkms.services._ca import load_key_at

        return load_key_at(path, passphrase)
    return load_private_key(path.read_bytes(), passphrase)


def issuing_signers(cert_path: Path, key_path: Path, previous_dir: Path, passphrase: bytes) -> dict[str, SoftSigner]:
    """Every issuing CA key on disk by key id: the current one (also under "") and those `mailkms ca rekey`
    replaced (previous/<SKI>/issuing.crt.pem + issuing.key.pem), each opened once."""
    current = SoftSigner(x509.load_pem_x509_certificate(cert_path.read_bytes()), _load_key(key_path, passphrase))
    signers = {"": current, ca_key_id(current.certificate): current}
    for kept in sorted(previous_dir.glob("*/issuing.crt.pem")) if previous_dir.exists() else []:
        key = kept.with_name("issuing.key.pem")
        if key.exists() or key.with_suffix(".pkcs11").exists():
            old = SoftSigner(x509.load_pem_x509_certificate(kept.read_bytes()), _load_key(key, passphrase))
            signers.setdefault(ca_key_id(old.certificate), old)
    return signers


def init_worker(database_url: str, ca_files: tuple[str, str, str], passphrase: bytes) -> None:
    """Once per worker process: the issuing CA keys (from their encrypted files) and a store engine."""
    global _worker
    sqlite = database_url.startswith("sqlite")
    engine = create_engine(database_url, **({"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}))
    cert, key, previous = (Path(p) for p in ca_files)
    _worker = _Worker(engine, ca_files, passphrase, issuing_signers(cert, key, previous, passphrase))


def started() -> int:
    # long enough that each of the first jobs lands on a worker of its own. A timed wait, not time.sleep:
    # under libfaketime with a large offset (the e2e tests) clock_nanosleep on an absolute deadline
    # fails with EINVAL and kills the worker.
    threading.Event().wait(0.2)
    return os.getpid()


def build_in_worker(job: CRLJob) -> BuiltCRL:
    assert _worker is not None, "the CRL worker was not initialised"
    signer = _worker.signers.get(job.issuer_key_id)
    if signer is None:  # a rekey since this worker started: the keys on disk again, once
        cert, key, previous = (Path(p) for p in _worker.ca_files)
        _worker.signers = issuing_signers(cert, key, previous, _worker.passphrase)
        signer = _worker.signers.get(job.issuer_key_id)
    if signer is None:
        raise LookupError(f"no issuing CA key {job.issuer_key_id} in the data folder")
    with _worker.engine.connect() as connection:  # one statement: one consistent snapshot; nothing written
        return build_scope(connection, signer, job)
