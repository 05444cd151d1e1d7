"""Renewals signed before their transaction (PairIssuer.presign), on SQLite and PostgreSQL: the pair
comes from the signer processes, the pool key is claimed in batches, and a pair signed for anything
that changed before the transaction is never stored."""

from __future__ import annotations

import dataclasses
import datetime as dt
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
from cryptography import x509
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from mailkms.pki import KeyType, crl_urls, generate_key, issued_by, signer_key_id
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


def test_a_pair_signed_for_what_changed_is_not_stored(presigning) -> None:  # type: ignore[no-untyped-def]
    svc, _ = presigning
    key = generate_key(KeyType.P256)
    other = generate_key(KeyType.P256)
    lifetime, _ = svc.settings.policy.for_group(None)
    key_id = svc.ca.issuer.key_id
    pair = svc.issuer.presign("a@example.org", None, 3, key.public_key())
    assert pair is not None
    assert _still_right(pair, "a@example.org", 3, key_id, key.public_key(), lifetime)
    assert not _still_right(pair, "b@example.org", 3, key_id, key.public_key(), lifetime)  # another user
    assert not _still_right(pair, "a@example.org", 4, key_id, key.public_key(), lifetime)  # a concurrent renewal won
    assert not _still_right(pair, "a@example.org", 3, "cd" * 20, key.public_key(), lifetime)  # `ca rekey` in between
    assert not _still_right(pair, "a@example.org", 3, key_id, other.public_key(), lifetime)  # another request's key
    assert not _still_right(pair, "a@example.org", 3, key_id, key.public_key(), lifetime + 1)  # the group changed
    assert public_key_der(key.public_key()) != public_key_der(other.public_key())
    # a pair whose two certificates name different issuing keys is right for neither
    rekey_issuing_ca(svc.ca.paths, CA_PASSPHRASE.encode(), "", svc.ca.urls, svc.clock.now())
    svc.reload_ca()
    new_pair = svc.issuer.presign("a@example.org", None, 3, key.public_key())
    assert new_pair is not None
    new_key_id = svc.ca.issuer.key_id
    assert _still_right(new_pair, "a@example.org", 3, new_key_id, key.public_key(), lifetime)
    mixed = dataclasses.replace(pair, encryption=new_pair.encryption)
    assert not _still_right(mixed, "a@example.org", 3, key_id, key.public_key(), lifetime)
    assert not _still_right(mixed, "a@example.org", 3, new_key_id, key.public_key(), lifetime)


def test_a_rekey_before_the_signer_processes_sign_gives_the_new_key_its_partition(presigning, clock) -> None:  # type: ignore[no-untyped-def]
    """`ca rekey` taken after the read that allowed pre-signing (the old key needed no partition)
    but before the signer processes sign: they sign with the new key, whose certificates must name
    a partition of their own (the whole-CA CRL is the old key's). The transaction signs again."""
    svc, pool = presigning
    user = Enrolled(svc, "q@example.org")
    pool.refill_once(batch=CLAIM_BATCH + 4)
    clock.advance(dt.timedelta(days=366))
    real = svc.issuer.presign

    def rekey_then_presign(*args, **kwargs):  # type: ignore[no-untyped-def]
        rekey_issuing_ca(svc.ca.paths, CA_PASSPHRASE.encode(), "", svc.ca.urls, clock.now())
        svc.reload_ca()
        pair = real(*args, **kwargs)
        assert pair is not None and signer_key_id(pair.signing) == svc.ca.issuer.key_id  # the new key signed it
        return pair

    svc.issuer.presign = rekey_then_presign  # type: ignore[method-assign]
    accepted = svc.renewal.renew(_request(svc, user), URL)
    assert accepted.generation == 2
    with svc.db.read_only() as session:
        rows = session.execute(
            select(Certificate).join(User).where(User.email == user.mailbox, Certificate.generation == 2)
        ).scalars()
        partitions = {row.kind: row.crl_partition for row in rows}
    assert set(partitions) == {"signing", "encryption"}
    assert all(p is not None for p in partitions.values())  # counted in a partition of the new key
    for kind, cert in _stored(svc, user.mailbox, 2).items():
        assert signer_key_id(cert) == svc.ca.issuer.key_id
        (url,) = crl_urls(cert)
        assert url.endswith(f"/crl/issuing/{partitions[kind]}.crl")  # not the old key's whole-CA CRL


def test_a_failed_claim_makes_the_key_instead(presigning, caplog) -> None:  # type: ignore[no-untyped-def]
    """The store refusing the pool-key claim (a lock timeout, a lost connection) costs the request
    nothing: the key is made, as with an empty pool."""
    svc, pool = presigning

    def broken_claim(key_type, count):  # type: ignore[no-untyped-def]
        raise OperationalError("SELECT", {}, Exception("database is locked"))

    pool.claim = broken_claim  # type: ignore[method-assign]
    key = generate_key(KeyType.P256)
    pair = svc.issuer.presign("c@example.org", None, 2, key.public_key())
    assert pair is not None and pair.encryption.public_key() == pair.encryption_key.public_key()
    assert any("could not be claimed" in r.getMessage() for r in caplog.records)


def test_a_key_submitted_to_a_failed_signing_job_never_returns_to_the_pool(presigning) -> None:  # type: ignore[no-untyped-def]
    """The signer processes may sign the encryption certificate before the job fails: its key is
    named by a certificate, so it is dropped, not given to the pool for someone else."""
    svc, pool = presigning
    pool.refill_once(batch=CLAIM_BATCH + 4)
    stored_back: list[bytes] = []
    real_store = pool.store

    def watch_store(ders):  # type: ignore[no-untyped-def]
        stored_back.extend(ders)
        return real_store(ders)

    pool.store = watch_store  # type: ignore[method-assign]

    def failing_sign(jobs):  # type: ignore[no-untyped-def]
        raise BrokenProcessPool("killed after the encryption certificate was signed")

    svc.issuer._signers.sign = failing_sign  # type: ignore[union-attr]
    key = generate_key(KeyType.P256)
    assert svc.issuer.presign("d@example.org", None, 2, key.public_key()) is None  # signed in the transaction
    assert stored_back == []


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
