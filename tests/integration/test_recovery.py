"""M-of-N recovery through the services on a real store (SQLite and PostgreSQL): a user enrolled and
renewed twice gets every past encryption key back with exactly M of N shares, and openssl agrees;
every bad quorum is refused, audited, and opens nothing."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select, text

from mailkms.errors import (
    BadKey,
    MailkmsError,
    NothingArchived,
    QuorumNotMet,
    ShareDuplicate,
    ShareFromEarlierCeremony,
    ShareTampered,
    ShareUnreadable,
    ShareWrongPassphrase,
    TokenInvalid,
    TokenUsed,
)
from mailkms.pki import (
    KeyType,
    decrypt,
    envelope,
    generate_key,
    load_private_key_der,
    open_delivery,
    private_key_der,
    read_share,
    same_public_key,
    seal_share,
    sign_request,
)
from mailkms.pki._recovery import MIN_SCRYPT_N
from mailkms.services import NewOfficer, ShareInput
from mailkms.services._recovery import archive_recipient
from mailkms.store import (
    ArchivedKey,
    AuditRecord,
    Certificate,
    OutboxMessage,
    RecoveryCeremony,
    RecoveryHold,
    Token,
    User,
)
from tests.conftest import make_csr, transport_pem

BOOTSTRAP_PASSPHRASE = b"test-recovery-passphrase"  # what tests/conftest.py gives init_ca
OFFICERS = [
    NewOfficer("Olga", b"olga's long passphrase"),
    NewOfficer("Piet", b"piet's long passphrase"),
    NewOfficer("Quinn", b"quinn's long passphrase"),
]
RENEW_URL = "https://localhost:8443/api/v1/renewals"


@pytest.fixture
def recovery(services):  # type: ignore[no-untyped-def]
    services.recovery.scrypt_n = MIN_SCRYPT_N  # cheap share files here; the e2e test uses the real cost
    return services.recovery


def bootstrap_share(data_dir: Path) -> ShareInput:
    (path,) = (data_dir / "recovery").glob("share-*-1-bootstrap.json")
    return ShareInput(path.read_bytes(), BOOTSTRAP_PASSPHRASE)


def shares_of(paths: tuple[Path, ...], officers: list[NewOfficer] = OFFICERS) -> list[ShareInput]:
    return [ShareInput(p.read_bytes(), o.passphrase) for p, o in zip(paths, officers, strict=True)]


def enrol(services, email: str):  # type: ignore[no-untyped-def]
    token = services.users.add(email, "", None, "admin:test")
    csr, signing_key = make_csr(email)
    pem, _, _ = transport_pem(email)
    services.enrolment.enrol(email, token, csr, pem)
    return signing_key


def renew(services, clock, email: str, signing_key):  # type: ignore[no-untyped-def]
    """A real update request through the Renewal service, 13 months on (past the reminder point)."""
    clock.advance(dt.timedelta(days=396))
    with services.db.transaction() as s:
        user = s.execute(select(User).where(User.email == email)).scalar_one()
        row = s.execute(
            select(Certificate).where(
                Certificate.user_id == user.id, Certificate.kind == "signing", Certificate.generation == user.generation
            )
        ).scalar_one()
    cert = x509.load_der_x509_certificate(row.der)
    csr, new_key = make_csr(email)
    body = sign_request(signing_key, [cert], services.nonces.new(), RENEW_URL, {"mailbox": email, "csr": csr.decode()})
    services.renewal.renew(body, RENEW_URL)
    return new_key


def encryption_certs(services, email: str) -> dict[str, x509.Certificate]:  # type: ignore[no-untyped-def]
    with services.db.transaction() as s:
        rows = s.execute(
            select(Certificate)
            .join(User, User.id == Certificate.user_id)
            .where(User.email == email, Certificate.kind == "encryption")
        ).scalars()
        return {r.serial: x509.load_der_x509_certificate(r.der) for r in rows}


def openssl_roundtrip(cert: x509.Certificate, key_der: bytes, tmp: Path, name: str) -> bytes:
    """`openssl cms -encrypt -aes256 -recip old.pem`, then `openssl cms -decrypt` with the recovered key."""
    cert_pem, key_pem = tmp / f"{name}.crt.pem", tmp / f"{name}.key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        load_private_key_der(key_der).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    plain, sealed = tmp / f"{name}.txt", tmp / f"{name}.p7m"
    plain.write_bytes(f"old mail for {name}\n".encode())
    subprocess.run(
        ["openssl", "cms", "-encrypt", "-binary", "-aes256", "-in", plain, "-out", sealed, "-recip", cert_pem],
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        ["openssl", "cms", "-decrypt", "-in", sealed, "-recip", cert_pem, "-inkey", key_pem],
        check=True,
        capture_output=True,
    )
    return out.stdout


def count(services, model, *where) -> int:  # type: ignore[no-untyped-def]
    with services.db.transaction() as s:
        return int(s.execute(select(func.count()).select_from(model).where(*where)).scalar_one())


def audit_rows(services, action: str) -> list[AuditRecord]:  # type: ignore[no-untyped-def]
    with services.db.transaction() as s:
        return list(s.execute(select(AuditRecord).where(AuditRecord.action == action)).scalars())


def appoint(recovery, data_dir: Path, tmp_path: Path, threshold: int = 2):  # type: ignore[no-untyped-def]
    return recovery.replace_ceremony(
        OFFICERS, threshold, [bootstrap_share(data_dir)], tmp_path / "shares", "admin:test"
    )


# --- the whole story ------------------------------------------------------------------------------
def test_recover_with_exactly_m_of_n_returns_every_past_key(services, recovery, clock, data_dir, tmp_path) -> None:
    key = enrol(services, "alice@example.org")
    key = renew(services, clock, "alice@example.org", key)
    renew(services, clock, "alice@example.org", key)
    enrol(services, "bob@example.org")
    old = encryption_certs(services, "alice@example.org")
    assert len(old) == 3

    result = appoint(recovery, data_dir, tmp_path)
    assert result.rewrapped == 4 and result.officers == ("Olga", "Piet", "Quinn") and result.threshold == 2
    assert [p.stat().st_mode & 0o777 for p in result.share_files] == [0o600] * 3
    view = recovery.status()
    assert (view.id, view.threshold, view.archived_keys, view.archived_under_current) == (result.ceremony_id, 2, 4, 4)

    # exactly M of N: Olga and Quinn
    quorum = shares_of(result.share_files)
    recovered = recovery.recover("alice@example.org", [quorum[0], quorum[2]], "admin:test")
    assert set(recovered.key_serials) == set(old)
    assert recovered.authorised_by[0].startswith("Olga#1@")
    with services.db.transaction() as s:
        hold = s.execute(select(RecoveryHold)).scalar_one()
        sealed_hold = hold.sealed

    # the user enrols with the recovery token into a new key store (new signing key, new transport key)
    csr, _ = make_csr("alice@example.org")
    pem, transport_key, transport_cert = transport_pem("alice@example.org")
    accepted = services.enrolment.enrol("alice@example.org", recovered.token, csr, pem)
    assert accepted.generation == 4
    with services.db.transaction() as s:
        body = s.execute(select(OutboxMessage).where(OutboxMessage.purpose == "delivery:recovery")).scalar_one().body
    content = open_delivery(body)
    assert content.manifest.kind == "recovery"
    by_serial = {format(c.serial_number, "x"): c for c in content.certificates}
    delivered = {k.serial: decrypt(k.der, transport_cert, transport_key) for k in content.keys}
    assert set(delivered) == set(old) | {content.manifest.encryption_serial}
    for serial, cert in old.items():
        der = delivered[serial]
        assert der not in sealed_hold  # never in the clear at rest
        assert by_serial[serial] == cert  # the certs-only part carries the old certificates
        assert same_public_key(load_private_key_der(der).public_key(), cert.public_key())
        assert openssl_roundtrip(cert, der, tmp_path, serial) == f"old mail for {serial}\n".encode()

    # the token and the hold are spent
    assert count(services, RecoveryHold) == 0
    with pytest.raises(TokenUsed):
        services.enrolment.enrol("alice@example.org", recovered.token, csr, pem)
    assert services.verify_audit().ok
    (replaced,) = audit_rows(services, "recovery.ceremony.replaced")
    details = json.loads(replaced.details)
    assert details["officers"] == ["Olga", "Piet", "Quinn"] and details["rewrapped"] == 4
    assert details["authorised_by"][0].startswith("bootstrap#1@")
    (done,) = audit_rows(services, "key.recovered")
    assert sorted(json.loads(done.details)["serials"]) == sorted(old)


def test_bootstrap_ceremony_of_init_recovers_without_officers(services, recovery, data_dir) -> None:
    enrol(services, "carol@example.org")
    view = recovery.status()
    assert view.is_bootstrap and view.threshold == 1 and view.archived_under_current == 1
    result = recovery.recover("carol@example.org", [bootstrap_share(data_dir)], "admin:test")
    assert len(result.key_serials) == 1
    services.users.add("dave@example.org", "", None, "admin:test")
    with pytest.raises(NothingArchived):
        recovery.recover("dave@example.org", [bootstrap_share(data_dir)], "admin:test")


# --- refusals ---------------------------------------------------------------------------------------
def _tampered(share: ShareInput, **changes: object) -> ShareInput:
    doc = json.loads(share.data)
    doc.update(changes)
    return ShareInput(json.dumps(doc).encode(), share.passphrase)


def test_bad_quorums_are_refused_audited_and_open_nothing(services, recovery, data_dir, tmp_path) -> None:
    enrol(services, "erin@example.org")
    result = appoint(recovery, data_dir, tmp_path)
    s1, s2, s3 = shares_of(result.share_files)
    flipped = bytearray(base64.b64decode(json.loads(s2.data)["ciphertext"]))
    flipped[0] ^= 1
    header = read_share(s3.data).header
    resealed = ShareInput(seal_share(header, b"\x00" * 16, s3.passphrase, scrypt_n=MIN_SCRYPT_N), s3.passphrase)
    cases = [
        ([s1], QuorumNotMet, "1 share(s) given, 2 of the 3"),
        ([s1, bootstrap_share(data_dir)], ShareFromEarlierCeremony, "earlier recovery ceremony"),
        ([bootstrap_share(data_dir)], ShareFromEarlierCeremony, "bootstrap"),
        ([s1, ShareInput(s2.data, b"piet's WRONG passphrase")], ShareWrongPassphrase, "Piet"),
        ([s1, s1], ShareDuplicate, "given twice"),
        ([s1, _tampered(s2, created_at="2020-01-01T00:00:00+00:00")], ShareTampered, "altered"),
        ([s1, _tampered(s2, ciphertext=base64.b64encode(bytes(flipped)).decode())], ShareTampered, "altered"),
        ([s1, _tampered(s2, index=3, officer="Quinn")], ShareTampered, "altered"),
        ([s1, _tampered(s2, officer="Mallory")], ShareTampered, "ceremony's record"),
        ([s1, resealed], ShareTampered, "not the one written"),
        ([s1, ShareInput(b"%PDF-1.4 not a share", b"x")], ShareUnreadable, "not a mailkms recovery share"),
    ]
    for quorum, error, words in cases:
        with pytest.raises(error, match=re.escape(words)):
            recovery.recover("erin@example.org", quorum, "admin:test")
    refusals = audit_rows(services, "recovery.refused")
    assert [json.loads(r.details)["reason"] for r in refusals] == [e.code for _, e, _ in cases]
    assert json.loads(refusals[3].details)["officers"][0].startswith("Olga#1@")
    assert all(r.subject == "erin@example.org" for r in refusals)
    assert count(services, Token, Token.purpose == "recovery") == 0 and count(services, RecoveryHold) == 0
    with services.db.transaction() as s:
        everything = " ".join(r.details for r in s.execute(select(AuditRecord)).scalars())
    for share in (s1, s2, s3):
        assert share.passphrase.decode() not in everything
        assert json.loads(share.data)["ciphertext"] not in everything

    # the same quorum guards replacing the officers and exporting the archive
    with pytest.raises(QuorumNotMet):
        recovery.replace_ceremony(OFFICERS, 2, [s2], tmp_path / "again", "admin:test")
    with pytest.raises(ShareDuplicate):
        recovery.export_archive(_rsa_cert(tmp_path)[0], [s3, s3], "admin:test")
    assert recovery.status().id == result.ceremony_id and not (tmp_path / "again").exists()
    # and a right quorum still works afterwards
    assert len(recovery.recover("erin@example.org", [s2, s3], "admin:test").key_serials) == 1
    assert services.verify_audit().ok


def test_replacing_officers_rewraps_and_retires_the_earlier_shares(services, recovery, data_dir, tmp_path) -> None:
    enrol(services, "fay@example.org")
    first = appoint(recovery, data_dir, tmp_path, threshold=3)
    new_officers = [NewOfficer("Rui", b"rui's long passphrase"), NewOfficer("Sam", b"sam's long passphrase")]
    old_shares = shares_of(first.share_files)
    second = recovery.replace_ceremony(new_officers, 2, old_shares, tmp_path / "second", "admin:test")
    assert second.previous_id == first.ceremony_id and second.rewrapped == 1
    with services.db.transaction() as s:
        retired = s.get(RecoveryCeremony, first.ceremony_id)
        assert retired is not None and retired.wrapped_key is None and retired.retired_at is not None
        current = s.get(RecoveryCeremony, second.ceremony_id)
        assert current is not None
        keys = {row.archive_key_id for row in s.execute(select(ArchivedKey)).scalars()}
    assert keys == {current.key_id}
    with pytest.raises(ShareFromEarlierCeremony):
        recovery.recover("fay@example.org", old_shares, "admin:test")
    got = recovery.recover("fay@example.org", shares_of(second.share_files, new_officers), "admin:test")
    assert len(got.key_serials) == 1


def test_a_failed_rewrap_changes_nothing(services, recovery, data_dir, tmp_path) -> None:
    enrol(services, "gus@example.org")
    enrol(services, "hal@example.org")
    first = appoint(recovery, data_dir, tmp_path)
    with services.db.transaction() as s:
        hal = s.execute(select(User).where(User.email == "hal@example.org")).scalar_one()
        row = s.execute(select(ArchivedKey).where(ArchivedKey.user_id == hal.id)).scalar_one()
        row.envelope = b"\x30\x03\x02\x01\x00"  # damaged
    quorum = shares_of(first.share_files)[:2]
    with pytest.raises(MailkmsError, match="cannot decrypt"):
        recovery.replace_ceremony(OFFICERS, 2, quorum, tmp_path / "second", "admin:test")
    assert recovery.status().id == first.ceremony_id
    assert not any((tmp_path / "second").glob("*.json"))
    assert recovery.status().archived_under_current == 2
    assert len(recovery.recover("gus@example.org", quorum, "admin:test").key_serials) == 1


def test_held_keys_die_with_their_token(services, recovery, data_dir, tmp_path) -> None:
    enrol(services, "ida@example.org")
    result = recovery.recover("ida@example.org", [bootstrap_share(data_dir)], "admin:test")
    assert count(services, RecoveryHold) == 1
    services.users.reenroll("ida@example.org", "admin:test")  # a newer token replaces the recovery token
    assert recovery.purge() == 1 and count(services, RecoveryHold) == 0
    csr, _ = make_csr("ida@example.org")
    with pytest.raises(TokenInvalid):
        services.enrolment.enrol("ida@example.org", result.token, csr, transport_pem("ida@example.org")[0])


# --- export ----------------------------------------------------------------------------------------
def _rsa_cert(tmp: Path) -> tuple[x509.Certificate, Path, Path]:
    pem, key, cert = transport_pem("export@example.org")
    (tmp / "r.crt.pem").write_text(pem)
    (tmp / "r.key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, tmp / "r.crt.pem", tmp / "r.key.pem"


def assert_openssl_opens(entry: dict[str, str], tmp: Path, cert_pem: Path, key_pem: Path) -> None:
    """openssl cms -decrypt opens an exported key with the recipient's key; it matches its certificate."""
    (tmp / "k.der").write_bytes(base64.b64decode(entry["envelope"]))
    out = subprocess.run(
        ["openssl", "cms", "-decrypt", "-inform", "DER", "-in", tmp / "k.der", "-recip", cert_pem, "-inkey", key_pem],
        check=True,
        capture_output=True,
    ).stdout
    leaf = x509.load_pem_x509_certificate(entry["certificate"].encode())
    assert same_public_key(load_private_key_der(out).public_key(), leaf.public_key())


def test_export_archive_needs_the_quorum_and_openssl_opens_it(services, recovery, data_dir, tmp_path) -> None:
    enrol(services, "jo@example.org")
    enrol(services, "kim@example.org")
    result = appoint(recovery, data_dir, tmp_path)
    cert, cert_pem, key_pem = _rsa_cert(tmp_path)
    quorum = shares_of(result.share_files)[1:]
    export = recovery.export_archive(cert, quorum, "admin:test")
    doc = json.loads(export.document)
    assert export.count == 2 and {k["mailbox"] for k in doc["keys"]} == {"jo@example.org", "kim@example.org"}
    for entry in doc["keys"]:
        assert_openssl_opens(entry, tmp_path, cert_pem, key_pem)
    one = recovery.export_archive(cert, quorum, "admin:test", email="kim@example.org")
    assert one.count == 1
    ec_cert = x509.load_pem_x509_certificate(
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                tmp_path / "ec.key",
                "-subj",
                "/CN=ec",
                "-days",
                "1",
            ],
            check=True,
            capture_output=True,
        ).stdout
    )
    with pytest.raises(BadKey):
        recovery.export_archive(ec_cert, quorum, "admin:test")
    assert [json.loads(r.details)["count"] for r in audit_rows(services, "archive.exported")] == [2, 1]


# --- issuers and a re-wrap on PostgreSQL ---------------------------------------------------------------
def _wait_for_lock_wait(services, waiting_on: str) -> None:  # type: ignore[no-untyped-def]
    """Until another backend of this database waits for a row lock in a query on `waiting_on`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with services.db.engine.connect() as probe:
            waiting = probe.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database() AND query LIKE :pattern"
                ),
                {"pattern": f"%{waiting_on}%FOR UPDATE%"},
            ).scalar_one()
        if waiting:
            return
        time.sleep(0.05)
    raise AssertionError(f"the re-wrap never waited on {waiting_on}")


@pytest.mark.parametrize("audited_first", [False, True], ids=["share-lock", "audit-then-share-lock"])
def test_key_archived_during_a_rewrap_ends_under_the_new_key(
    services, recovery, data_dir, tmp_path, audited_first: bool
) -> None:
    """An issuance in flight when the officers replace the recovery key: its archived key must not
    stay enveloped to the retired key, and (as real issuances write an audit record before they
    archive) the two must not deadlock."""
    if services.db.is_sqlite:
        pytest.skip("SQLite runs one writer at a time (BEGIN IMMEDIATE); the row locks matter on PostgreSQL")
    enrol(services, "lee@example.org")
    outcome: dict[str, object] = {}

    def replace() -> None:
        try:
            outcome["result"] = appoint(recovery, data_dir, tmp_path)
        except BaseException as exc:
            outcome["error"] = exc

    key = generate_key(KeyType.RSA2048)
    worker = threading.Thread(target=replace)
    with services.db.transaction() as s:
        user = s.execute(select(User).where(User.email == "lee@example.org")).scalar_one()
        if audited_first:  # like Enrolment ("token.used") and Renewal ("renewal.received")
            services.audit.append(s, "lee@example.org", "token.used", "lee@example.org", purpose="test")
            worker.start()
            _wait_for_lock_wait(services, "audit_head")
        cert, key_id = archive_recipient(s, recovery._dir, services.audit)  # FOR SHARE on the recovery head
        s.add(
            ArchivedKey(
                user_id=user.id,
                certificate_serial="feedbeef",
                envelope=envelope(private_key_der(key), [cert]),
                archive_key_id=key_id,
                created_at=services.clock.now(),
            )
        )
        s.flush()
        if not audited_first:
            worker.start()
            _wait_for_lock_wait(services, "recovery_head")
    worker.join(120)
    assert "error" not in outcome, outcome
    with services.db.transaction() as s:
        row = s.execute(select(ArchivedKey).where(ArchivedKey.certificate_serial == "feedbeef")).scalar_one()
        new = s.get(RecoveryCeremony, outcome["result"].ceremony_id)  # type: ignore[attr-defined]
        assert new is not None and row.archive_key_id == new.key_id
    assert outcome["result"].rewrapped == 2  # type: ignore[attr-defined]


def test_the_archive_recipient_is_read_once_per_transaction_and_again_after_a_rolled_back_savepoint(
    services, recovery, data_dir
) -> None:  # type: ignore[no-untyped-def]
    """Group commit archives many keys in one transaction: the ceremony is read (FOR SHARE) once; a
    savepoint rolled back may have taken the lock with it, so the next key reads (and locks) again."""
    from sqlalchemy import event

    statements: list[str] = []

    def seen(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if "recovery_head" in statement:
            statements.append(statement)

    event.listen(services.db.engine, "before_cursor_execute", seen)
    try:
        with services.db.transaction() as s:
            first = archive_recipient(s, recovery._dir, services.audit)
            read = len(statements)  # one SELECT, or three on a fresh store (the bootstrap adopted)
            assert read >= 1
            assert archive_recipient(s, recovery._dir, services.audit) == first
            assert len(statements) == read  # the second key of the transaction: no second read
            with pytest.raises(RuntimeError), s.begin_nested():
                archive_recipient(s, recovery._dir, services.audit)
                raise RuntimeError("this unit is refused")
            again = archive_recipient(s, recovery._dir, services.audit)
            assert again[1] == first[1] and len(statements) == read + 1  # read again after the rollback
        with services.db.transaction() as s:
            archive_recipient(s, recovery._dir, services.audit)
        assert len(statements) == read + 2  # a new transaction reads (and locks) it again
    finally:
        event.remove(services.db.engine, "before_cursor_execute", seen)
