"""Renewals signed before their transaction (PairIssuer.presign), on SQLite and PostgreSQL: the pair
comes from the signer processes, the pool key is claimed in batches, and a pair signed for anything
that changed before the transaction is never stored."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from sqlalchemy import select

from mailkms.pki import KeyType, generate_key, issued_by
from mailkms.services import KeyPool, Services, rekey_issuing_ca
from mailkms.services._issuance import CLAIM_BATCH, PresignedPair, _still_right, public_key_der
from mailkms.store import Certificate, User
from tests.conftest import CA_PASSPHRASE, store_settings
from tests.integration.test_renewal_service import URL, Enrolled, _request


@pytest.fixture
def presigning(data_dir: Path, db_url: str, clock):  # type: ignore[no-untyped-def]
    settings = store_settings(data_dir, db_url, issuance={"signer_processes": 1, "batch_size": 8})
    svc = Services.build(settings, clock)
    pool = KeyPool(svc.db, svc.pool_keyring, clock, KeyType.RSA2048, size=CLAIM_BATCH + 4)
    svc.issuer.keys = pool
    yield svc, pool
    svc.close()


def _stored(svc: Services, mailbox: str, generation: int) -> dict[str, x509.Certificate]:
    with svc.db.read_only() as session:
        user = session.execute(select(User).where(User.email == mailbox)).scalar_one()
        rows = session.execute(
            select(Certificate).where(Certificate.user_id == user.id, Certificate.generation == generation)
        ).scalars()
        return {row.kind: x509.load_der_x509_certificate(row.der) for row in rows}


def test_a_renewal_stores_the_pair_the_signer_processes_signed(presigning, clock) -> None:  # type: ignore[no-untyped-def]
    svc, pool = presigning
    users = [Enrolled(svc, f"p{i}@example.org") for i in range(2)]  # the pool is empty: keys made inline
    pool.refill_once(batch=CLAIM_BATCH + 4)
    assert pool.size() == CLAIM_BATCH + 4
    clock.advance(dt.timedelta(days=366))
    signed_before = svc.signers._batcher.items
    presigned: list[PresignedPair] = []
    real = svc.issuer.presign

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        pair = real(*args, **kwargs)
        presigned.append(pair)
        return pair

    svc.issuer.presign = spy  # type: ignore[method-assign]
    for user in users:
        accepted = svc.renewal.renew(_request(svc, user), URL)
        assert not accepted.already_issued and accepted.generation == 2
    assert svc.signers._batcher.items - signed_before == 4  # both certificates of both pairs, in the signer process
    assert all(p is not None for p in presigned)
    for user, pair in zip(users, presigned, strict=True):
        stored = _stored(svc, user.mailbox, 2)
        assert stored["signing"] == pair.signing and stored["encryption"] == pair.encryption
        assert all(issued_by(cert, svc.ca.issuing_certificate) for cert in stored.values())
    # one claim took a batch of pool keys for both renewals: the rest stay in the store
    assert pool.size() == 4
    assert svc.verify_audit().ok


def test_a_pair_signed_for_what_changed_is_not_stored() -> None:
    key = generate_key(KeyType.P256)
    other = generate_key(KeyType.P256)

    class _Cert:
        def public_key(self):  # type: ignore[no-untyped-def]
            return key.public_key()

    pair = PresignedPair("a@example.org", 3, "ab", _Cert(), _Cert(), key)  # type: ignore[arg-type]
    assert _still_right(pair, "a@example.org", 3, "ab", key.public_key())
    assert not _still_right(pair, "b@example.org", 3, "ab", key.public_key())  # another user
    assert not _still_right(pair, "a@example.org", 4, "ab", key.public_key())  # a concurrent renewal won
    assert not _still_right(pair, "a@example.org", 3, "cd", key.public_key())  # `ca rekey` in between
    assert not _still_right(pair, "a@example.org", 3, "ab", other.public_key())  # another request's key
    assert public_key_der(key.public_key()) != public_key_der(other.public_key())


def test_a_rekey_between_presign_and_transaction_signs_again_with_the_new_key(presigning, clock) -> None:  # type: ignore[no-untyped-def]
    svc, pool = presigning
    user = Enrolled(svc, "r@example.org")
    pool.refill_once(batch=CLAIM_BATCH + 4)
    clock.advance(dt.timedelta(days=366))
    old_key_id = svc.ca.issuer.key_id
    real = svc.issuer.presign

    def presign_then_rekey(*args, **kwargs):  # type: ignore[no-untyped-def]
        pair = real(*args, **kwargs)
        # the CA's key changes (another process's `ca rekey`, taken by reload) while the pair waits
        rekey_issuing_ca(svc.ca.paths, CA_PASSPHRASE.encode(), "", svc.ca.urls, clock.now())
        svc.reload_ca()
        return pair

    svc.issuer.presign = presign_then_rekey  # type: ignore[method-assign]
    accepted = svc.renewal.renew(_request(svc, user), URL)
    assert accepted.generation == 2
    assert svc.ca.issuer.key_id != old_key_id
    for cert in _stored(svc, user.mailbox, 2).values():
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        assert aki is not None and aki.hex() == svc.ca.issuer.key_id  # signed again, by the new key
        assert issued_by(cert, svc.ca.issuing_certificate)


def test_a_dead_signer_process_does_not_stop_a_renewal(presigning, clock) -> None:  # type: ignore[no-untyped-def]
    """The signer process killed (the OOM killer, an operator): the pair is signed in the server
    process instead, and the next request starts a new signer process."""
    import os
    import signal

    svc, pool = presigning
    users = [Enrolled(svc, f"k{i}@example.org") for i in range(2)]
    pool.refill_once(batch=CLAIM_BATCH + 4)
    clock.advance(dt.timedelta(days=366))
    svc.signers.start()
    executor = svc.signers._executor
    assert executor is not None
    for pid in list(executor._processes):  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGKILL)
    first = svc.renewal.renew(_request(svc, users[0]), URL)
    assert first.generation == 2 and not first.already_issued
    assert all(issued_by(c, svc.ca.issuing_certificate) for c in _stored(svc, users[0].mailbox, 2).values())
    second = svc.renewal.renew(_request(svc, users[1]), URL)  # new signer processes by now
    assert second.generation == 2
    assert svc.verify_audit().ok
