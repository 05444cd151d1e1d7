"""Encryption keys made before the transaction, in the signer processes (SQLite and PostgreSQL):
while a renewal's or an enrolment's key is being made, the store's write lock and the audit head
are free (another node is not kept waiting); a refused request's key goes to the pool; a wrong
token costs no key."""

from __future__ import annotations

import datetime as dt
import sqlite3

import psycopg
import pytest
from sqlalchemy import func, select

from mailkms.config import load_settings
from mailkms.errors import NotDue, TokenInvalid
from mailkms.pki import KeyType, PrivateKey, sign_request
from mailkms.services import KeyPool, Services
from mailkms.store import PooledKey
from tests.conftest import CA_PASSPHRASE, PUBLIC_URL, make_csr, transport_pem
from tests.integration.test_renewal_service import URL, Enrolled


class LockProbe:
    """Makes keys with the real signer processes and, at that moment, checks from a connection
    of its own that nobody holds the store's write lock (SQLite) or the audit head (PostgreSQL)."""

    def __init__(self, services: Services) -> None:
        self._inner = services.signers
        self._url = services.db.url
        self.free: list[bool] = []

    def make_key(self, key_type: KeyType) -> PrivateKey:
        self.free.append(self._lock_is_free())
        return self._inner.make_key(key_type)

    def _lock_is_free(self) -> bool:
        if self._url.startswith("sqlite"):
            conn = sqlite3.connect(self._url.removeprefix("sqlite:///"), timeout=0.2, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
                return True
            except sqlite3.OperationalError:
                return False
            finally:
                conn.close()
        raw = self._url.replace("+psycopg", "")
        with psycopg.connect(raw) as conn:
            try:
                conn.execute("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE NOWAIT")
                return True
            except psycopg.errors.LockNotAvailable:
                return False
            finally:
                conn.rollback()


@pytest.fixture
def svc(data_dir, db_url, clock):  # type: ignore[no-untyped-def]
    settings = load_settings(
        data_dir,
        database_url=db_url,
        ca_passphrase=CA_PASSPHRASE,
        server={"hostname": "localhost", "public_url": PUBLIC_URL},
        pool={"size": 0},
        issuance={"signer_processes": 1},
    )
    services = Services.build(settings, clock)
    yield services
    services.close()


def test_keys_for_enrolment_and_renewal_are_made_with_no_lock_held(svc: Services) -> None:
    probe = LockProbe(svc)
    svc.issuer._maker = probe
    alice = Enrolled(svc, "alice@example.org")
    assert probe.free == [True]  # the enrolment's key
    svc.clock.advance(dt.timedelta(days=380))  # type: ignore[attr-defined]
    csr, _ = make_csr(alice.mailbox)
    body = sign_request(
        alice.signing_key, [alice.cert], svc.nonces.new(), URL, {"mailbox": alice.mailbox, "csr": csr.decode()}
    )
    accepted = svc.renewal.renew(body, URL)
    assert accepted.generation == 2 and not accepted.already_issued
    assert probe.free == [True, True]  # and the renewal's


def test_a_wrong_token_costs_no_key(svc: Services) -> None:
    probe = LockProbe(svc)
    svc.issuer._maker = probe
    svc.users.add("bob@example.org", "", None, "admin:test")
    csr, _ = make_csr("bob@example.org")
    pem, _, _ = transport_pem("bob@example.org")
    with pytest.raises(TokenInvalid):
        svc.enrolment.enrol("bob@example.org", "not-the-token", csr, pem)
    assert probe.free == []


def test_a_renewal_refused_by_its_rules_costs_no_key(svc: Services) -> None:
    """The rules are checked in a read before anything is signed or made (PairIssuer.presign): a
    renewal that is not due costs neither a key nor a signature."""
    pool = KeyPool(svc.db, svc.pool_keyring, svc.clock, KeyType.RSA2048, size=4)
    alice = Enrolled(svc, "alice@example.org")
    svc.issuer.keys = pool  # an empty pool: a key would be made in a signer process
    probe = LockProbe(svc)
    svc.issuer._maker = probe
    signed_before = svc.signers._batcher.items
    csr, _ = make_csr(alice.mailbox)
    body = sign_request(
        alice.signing_key, [alice.cert], svc.nonces.new(), URL, {"mailbox": alice.mailbox, "csr": csr.decode()}
    )
    with pytest.raises(NotDue):
        svc.renewal.renew(body, URL)
    assert probe.free == []  # no key made
    assert svc.signers._batcher.items == signed_before  # nothing signed
    with svc.db.read_only() as session:
        assert session.execute(select(func.count(PooledKey.id))).scalar_one() == 0
