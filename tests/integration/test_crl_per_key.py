"""CRLs per issuing CA key (issue 15): after `mailkms ca rekey` every CRL is signed by the key that
issued the certificates it lists (RFC 5280 §6.3.3). The old key keeps `/crl/issuing.crl` (and its
partitions); the new key's certificates name partitions of their own, even with partitioning off.
Judged by `openssl verify -crl_check` (error 23 for a revoked certificate of either key, OK for the
others) and pkilint (`lint_crl -t CRL -p BR`, 0 findings), on SQLite and PostgreSQL, with the CRLs
built in this process and in a CRL worker process started before the rekey."""

from __future__ import annotations

import datetime as dt
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from sqlalchemy import select

from mailkms.api import create_http_app
from mailkms.config import Settings
from mailkms.pki import ca_key_id, crl_urls, issued_by
from mailkms.services import CRLWorkers, Services, rekey_issuing_ca
from mailkms.services._revocation import KEYLESS_GRACE_SECONDS
from mailkms.store import Certificate, PublishedCRL
from tests.conftest import CA_PASSPHRASE
from tests.integration.test_revocation import Enrolled
from tests.judges import lint_smime, pem, pkilint


@pytest.fixture(params=[0, 3], ids=["one-crl-per-key", "partitions-of-3"])
def sized(request, settings: Settings, clock):  # type: ignore[no-untyped-def]
    ca = settings.ca.model_copy(update={"crl_partition_size": request.param})
    svc = Services.build(settings.model_copy(update={"ca": ca}), clock)
    svc.ensure_server_identities()
    yield svc
    svc.close()


def openssl_verify_crl(
    root: x509.Certificate, issuer: x509.Certificate, leaf: x509.Certificate, crl_der: bytes, at: dt.datetime
) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "root.pem").write_bytes(pem(root))
        (d / "sub.pem").write_bytes(pem(issuer))
        (d / "leaf.pem").write_bytes(pem(leaf))
        (d / "crl.pem").write_bytes(x509.load_der_x509_crl(crl_der).public_bytes(serialization.Encoding.PEM))
        cmd = ["openssl", "verify", "-crl_check", "-attime", str(int(at.timestamp()))]
        cmd += ["-CAfile", str(d / "root.pem"), "-untrusted", str(d / "sub.pem"), "-CRLfile", str(d / "crl.pem")]
        done = subprocess.run([*cmd, str(d / "leaf.pem")], capture_output=True, text=True, timeout=60)
        return done.returncode, done.stdout + done.stderr


def _crl_of(http: TestClient, cert: x509.Certificate) -> bytes:
    (url,) = crl_urls(cert)
    got = http.get(url.removeprefix("http://kms.example.org"))
    assert got.status_code == 200, (url, got.status_code)
    return got.content


def _aki(crl: x509.CertificateRevocationList) -> str:
    key_id = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert key_id is not None
    return key_id.hex()


def _revoke_and_judge(services: Services, clock, people: list[tuple[Enrolled, x509.Certificate]]) -> None:  # type: ignore[no-untyped-def]
    for who, _ in people:
        services.revocation.revoke_serial(f"0x{who.signing.serial_number:x}", "keyCompromise", "admin:test")
    clock.advance(dt.timedelta(minutes=1))
    services.revocation.refresh_latest()
    http = TestClient(create_http_app(services))
    at = clock.now()
    for who, issuer in people:
        crl_der = _crl_of(http, who.signing)
        crl = x509.load_der_x509_crl(crl_der)
        assert _aki(crl) == ca_key_id(issuer), who.mailbox  # signed by the key that issued it
        assert crl.is_signature_valid(issuer.public_key())
        assert crl.get_revoked_certificate_by_serial_number(who.signing.serial_number) is not None
        code, out = openssl_verify_crl(services.ca.root, issuer, who.signing, crl_der, at)
        assert code != 0 and "error 23" in out and "certificate revoked" in out, (who.mailbox, out)
        encryption = next(c for c in who.certs if c != who.signing)  # not revoked: verifies with its own CRL
        code, out = openssl_verify_crl(services.ca.root, issuer, encryption, _crl_of(http, encryption), at)
        assert code == 0 and "OK" in out, (who.mailbox, out)
        verdict = pkilint(
            "lint_crl", ["-t", "CRL", "-p", "BR", "-s", "WARNING"], crl.public_bytes(serialization.Encoding.PEM)
        )
        assert verdict.exit_code == 0, (who.mailbox, str(verdict))


def test_each_key_signs_the_crls_of_what_it_issued(sized: Services, clock) -> None:  # type: ignore[no-untyped-def]
    services = sized
    ann = Enrolled(services, "ann@example.org")
    services.revocation.publish_crl(force=True)
    old_ca = services.ca.issuing.certificate
    old_urls = {u for c in ann.certs for u in crl_urls(c)}

    rekey_issuing_ca(services.ca.paths, CA_PASSPHRASE.encode(), "", services.ca.urls, clock.now())
    assert "issuing-ca" in services.reload_ca()
    new_ca = services.ca.issuing.certificate
    ben = Enrolled(services, "ben@example.org")
    assert issued_by(ben.signing, new_ca) and issued_by(ann.signing, old_ca)
    new_urls = {u for c in ben.certs for u in crl_urls(c)}
    assert not new_urls & old_urls, (new_urls, old_urls)  # never a CRL of the other key

    # The server's own mail signer, re-issued by the new key at the reload, names a new-key CRL too.
    mail_signer = services.ca.require_mail_signer().certificate
    assert issued_by(mail_signer, new_ca) and not set(crl_urls(mail_signer)) & old_urls
    assert lint_smime(mail_signer).exit_code == 0
    with services.db.read_only() as session:
        keys = dict(session.execute(select(PublishedCRL.scope, PublishedCRL.issuer_key_id)).all())
        registered = session.execute(
            select(Certificate.crl_partition).where(Certificate.serial == f"{mail_signer.serial_number:x}")
        ).scalar_one_or_none()
    assert keys["issuing"] == ca_key_id(old_ca)
    assert {keys[f"issuing-{u.rsplit('/', 1)[1].removesuffix('.crl')}"] for u in new_urls} == {ca_key_id(new_ca)}
    if registered is not None:
        assert f"/crl/issuing/{registered}.crl" in crl_urls(mail_signer)[0]
    for cert in ben.certs:
        assert lint_smime(cert).exit_code == 0

    _revoke_and_judge(services, clock, [(ann, old_ca), (ben, new_ca)])


def test_a_crl_worker_started_before_the_rekey_signs_with_both_keys(settings: Settings, services, clock) -> None:  # type: ignore[no-untyped-def]
    services.ensure_server_identities()
    workers = CRLWorkers(settings.effective_database_url, services.ca, 1)
    try:
        workers.start()
        services.revocation.builder = workers
        cid = Enrolled(services, "cid@example.org")
        old_ca = services.ca.issuing.certificate
        rekey_issuing_ca(services.ca.paths, CA_PASSPHRASE.encode(), "", services.ca.urls, clock.now())
        services.reload_ca()
        dee = Enrolled(services, "dee@example.org")
        _revoke_and_judge(services, clock, [(cid, old_ca), (dee, services.ca.issuing.certificate)])
    finally:
        workers.close()


def test_a_scope_whose_key_left_the_data_folder_keeps_its_last_crl(services, clock, caplog) -> None:  # type: ignore[no-untyped-def]
    import shutil

    services.ensure_server_identities()
    eve = Enrolled(services, "eve@example.org")
    services.revocation.publish_crl(force=True)
    done = rekey_issuing_ca(services.ca.paths, CA_PASSPHRASE.encode(), "", services.ca.urls, clock.now())
    services.reload_ca()
    fox = Enrolled(services, "fox@example.org")
    with services.db.read_only() as session:
        before = session.get(PublishedCRL, "issuing")
        assert before is not None
        number = before.number
    shutil.rmtree(done.kept_in)  # an operator removed the old key
    services.reload_ca()
    services.ca.previous_signers = []  # what a restart without the folder loads
    services.revocation.revoke_serial(f"0x{eve.signing.serial_number:x}", "superseded", "admin:test")
    services.revocation.revoke_serial(f"0x{fox.signing.serial_number:x}", "superseded", "admin:test")
    with services.db.read_only() as session:
        after = session.get(PublishedCRL, "issuing")
        assert after is not None and after.number == number  # not re-signed by another key
        (url,) = crl_urls(fox.signing)
        scope = f"issuing-{url.rsplit('/', 1)[1].removesuffix('.crl')}"
        fox_crl = session.get(PublishedCRL, scope)
        assert fox_crl is not None and fox_crl.der is not None
        assert x509.load_der_x509_crl(fox_crl.der).get_revoked_certificate_by_serial_number(fox.signing.serial_number)
    assert any("not re-signed" in r.getMessage() for r in caplog.records)


def test_a_node_without_the_new_key_leaves_its_crls_to_a_node_with_it(services, settings: Settings, clock) -> None:  # type: ignore[no-untyped-def]
    """Two nodes on one store and data folder: A takes the rekey, B has not yet (within its
    reload_check_seconds). B revokes a certificate of the new key: it cannot sign that partition's
    CRL, so the revocations-waiting flag stays for A, whose next publication lists it."""
    services.ensure_server_identities()
    node_b = Services.build(settings, clock)
    try:
        rekey_issuing_ca(services.ca.paths, CA_PASSPHRASE.encode(), "", services.ca.urls, clock.now())
        services.reload_ca()  # node A only
        gil = Enrolled(services, "gil@example.org")
        (url,) = crl_urls(gil.signing)
        scope = f"issuing-{url.rsplit('/', 1)[1].removesuffix('.crl')}"
        clock.advance(dt.timedelta(minutes=1))
        node_b.revocation.revoke_serial(f"0x{gil.signing.serial_number:x}", "superseded", "admin:test")
        with services.db.read_only() as session:
            waiting = session.get(PublishedCRL, "issuing")
            partition = session.get(PublishedCRL, scope)
            assert waiting is not None and waiting.dirty_since is not None  # left for a node with the key
            assert partition is not None and partition.der is not None
            assert (
                x509.load_der_x509_crl(partition.der).get_revoked_certificate_by_serial_number(
                    gil.signing.serial_number
                )
                is None
            )
        services.revocation.publish_crl()  # node A's next scheduler round
        with services.db.read_only() as session:
            partition = session.get(PublishedCRL, scope)
            assert partition is not None and partition.der is not None
            crl = x509.load_der_x509_crl(partition.der)
            assert crl.get_revoked_certificate_by_serial_number(gil.signing.serial_number) is not None
            assert crl.is_signature_valid(services.ca.issuing.certificate.public_key())  # type: ignore[arg-type]
            waiting = session.get(PublishedCRL, "issuing")
            assert waiting is not None and waiting.dirty_since is None
    finally:
        node_b.close()


def test_nodes_on_two_keys_fill_their_own_partitions(settings: Settings, clock) -> None:  # type: ignore[no-untyped-def]
    """During a rekey, one node on the new key and one still on the old issue in turn: each fills
    its own key's newest partition (partitions of 3: 6 certificates a node, at most 2 new
    partitions each) instead of opening a new partition whenever the newest is the other key's
    (then 3 each, every one holding a single pair)."""
    ca = settings.ca.model_copy(update={"crl_partition_size": 3})
    sized_settings = settings.model_copy(update={"ca": ca})
    node_a = Services.build(sized_settings, clock)
    node_b = Services.build(sized_settings, clock)
    try:
        node_a.ensure_server_identities()
        rekey_issuing_ca(node_a.ca.paths, CA_PASSPHRASE.encode(), "", node_a.ca.urls, clock.now())
        node_a.reload_ca()  # node B keeps the old key (within its reload_check_seconds)
        with node_a.db.read_only() as session:
            before = set(session.execute(select(PublishedCRL.partition)).scalars())
        for i in range(3):  # each enrolment: a signing and an encryption certificate
            Enrolled(node_a, f"new{i}@example.org")
            Enrolled(node_b, f"old{i}@example.org")
        with node_a.db.read_only() as session:
            opened = session.execute(
                select(PublishedCRL.partition, PublishedCRL.issuer_key_id, PublishedCRL.assigned).where(
                    PublishedCRL.partition.is_not(None)
                )
            ).all()
        opened = [row for row in opened if row.partition not in before]
        by_key: dict[str, list[int]] = {}
        for row in opened:
            by_key.setdefault(row.issuer_key_id, []).append(row.assigned)
        # (a partition of either key opened before may take the first certificates)
        assert len(by_key[node_a.ca.issuer.key_id]) <= 2 and len(by_key.get(node_b.ca.issuer.key_id, [])) <= 2
    finally:
        node_b.close()
        node_a.close()


def test_a_node_long_without_a_key_leaves_a_new_revocation_to_a_node_with_it(  # type: ignore[no-untyped-def]
    services, settings: Settings, clock, monkeypatch
) -> None:
    """Node B has lacked the new key for longer than KEYLESS_GRACE when it revokes a certificate
    of that key: the grace counts from the revocation, so the flag still waits for node A. Once
    the revocation has waited KEYLESS_GRACE, B counts the key as gone and clears the flag."""
    services.ensure_server_identities()
    node_b = Services.build(settings, clock)
    try:
        rekey_issuing_ca(services.ca.paths, CA_PASSPHRASE.encode(), "", services.ca.urls, clock.now())
        services.reload_ca()  # node A only
        hal = Enrolled(services, "hal@example.org")
        node_b.revocation.publish_crl(force=True)  # B misses the new key's partition from now on
        real_monotonic = time.monotonic
        monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + 2 * KEYLESS_GRACE_SECONDS)
        clock.advance(dt.timedelta(seconds=2 * KEYLESS_GRACE_SECONDS))
        node_b.revocation.revoke_serial(f"0x{hal.signing.serial_number:x}", "superseded", "admin:test")
        with services.db.read_only() as session:
            waiting = session.get(PublishedCRL, "issuing")
            assert waiting is not None and waiting.dirty_since is not None  # left for node A
        clock.advance(dt.timedelta(seconds=KEYLESS_GRACE_SECONDS + 60))
        node_b.revocation.publish_crl()  # the revocation waited the grace: the key counts as gone
        with services.db.read_only() as session:
            waiting = session.get(PublishedCRL, "issuing")
            assert waiting is not None and waiting.dirty_since is None
    finally:
        node_b.close()
