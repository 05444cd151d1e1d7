"""CRL partitions on SQLite and PostgreSQL: each certificate's CDP names its partition, each partition
CRL lists only its own, bounded, and the outside judges agree (pkilint, openssl verify -crl_check)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select, update

from mailkms.api import create_http_app
from mailkms.config import Settings
from mailkms.pki import crl_urls
from mailkms.services import CRLWorkers, Services
from mailkms.store import Certificate, PublishedCRL
from tests.integration.test_revocation import Enrolled, _openssl_verify_crl
from tests.judges import lint_smime, pkilint

SIZE = 3  # certificates per partition: a pair and a half


@pytest.fixture
def partitioned(settings: Settings, clock):  # type: ignore[no-untyped-def]
    svc = Services.build(
        settings.model_copy(update={"ca": settings.ca.model_copy(update={"crl_partition_size": SIZE})}), clock
    )
    svc.ensure_server_identities()
    yield svc
    svc.close()


def _verify(services: Services, leaf: x509.Certificate, crl_der: bytes, at: dt.datetime) -> tuple[int, str]:
    done = _openssl_verify_crl(services, leaf, crl_der, at)
    return done.returncode, done.stdout + done.stderr


def _served(http: TestClient, url: str) -> bytes:
    path = url.removeprefix("http://kms.example.org")
    resp = http.get(path)
    assert resp.status_code == 200, (url, resp.status_code)
    assert resp.headers["content-type"] == "application/pkix-crl"
    return resp.content


def test_partitions_bound_each_crl_and_openssl_and_pkilint_agree(partitioned: Services, clock) -> None:  # type: ignore[no-untyped-def]
    services = partitioned
    users = [Enrolled(services, f"p{i}@example.org") for i in range(4)]  # 8 certificates: partitions 1, 2, 3
    with services.db.read_only() as session:
        counts = dict(
            session.execute(select(Certificate.crl_partition, func.count()).group_by(Certificate.crl_partition)).all()
        )
        assigned = dict(
            session.execute(
                select(PublishedCRL.partition, PublishedCRL.assigned).where(PublishedCRL.partition.is_not(None))
            ).all()
        )
    assert counts == {None: 2, 1: 3, 2: 3, 3: 2}  # the server's own two certificates stay on the whole-CA CRL
    assert assigned == {1: 3, 2: 3, 3: 2}

    # Every certificate names its partition's CRL; pkilint takes the CDP as it is.
    certs = [c for u in users for c in u.certs]
    urls = {c.serial_number: crl_urls(c) for c in certs}
    assert {u for us in urls.values() for u in us} == {f"http://kms.example.org/crl/issuing/{n}.crl" for n in (1, 2, 3)}
    for cert in certs:
        verdict = lint_smime(cert)
        assert verdict.exit_code == 0, verdict

    http = TestClient(create_http_app(services))
    # A partition's URL answers from its first certificate on (its empty CRL was signed when opened).
    for n in (1, 2, 3):
        crl = x509.load_der_x509_crl(_served(http, f"http://kms.example.org/crl/issuing/{n}.crl"))
        assert len(crl) == 0
    assert http.get("/crl/issuing/99.crl").status_code == 404

    # Revoke one user whose pair sits in two partitions.
    clock.advance(dt.timedelta(minutes=1))
    victim = users[1]  # certificates 3 and 4 of the 8: partitions 1 and 2
    services.revocation.revoke_users([victim.mailbox], "keyCompromise", "admin:test")
    services.revocation.refresh_latest()
    now = clock.now()
    lists: dict[str, x509.CertificateRevocationList] = {}
    for n in (1, 2, 3):
        url = f"http://kms.example.org/crl/issuing/{n}.crl"
        der = _served(http, url)
        crl = x509.load_der_x509_crl(der)
        lists[url] = crl
        assert crl.is_signature_valid(services.ca.issuing.certificate.public_key())  # type: ignore[arg-type]
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
        assert idp.critical and idp.value.only_contains_user_certs
        assert idp.value.full_name == [x509.UniformResourceIdentifier(url)]
        assert len(crl) <= SIZE
        verdict = pkilint(
            "lint_crl", ["-t", "CRL", "-p", "BR", "-s", "WARNING"], crl.public_bytes(serialization.Encoding.PEM)
        )
        assert verdict.exit_code == 0, verdict

    # Each revoked certificate is on its own partition's CRL only; openssl says 23 there.
    for cert in victim.certs:
        (url,) = urls[cert.serial_number]
        assert lists[url].get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        others = [u for u in lists if u != url]
        assert all(lists[u].get_revoked_certificate_by_serial_number(cert.serial_number) is None for u in others)
        code, out = _verify(services, cert, _served(http, url), now)
        assert code != 0 and "error 23" in out, out
        # Another partition's CRL is not the certificate's scope: openssl refuses it (44), never "OK".
        code, out = _verify(services, cert, _served(http, others[0]), now)
        assert code != 0 and "error 44" in out, out
    for user in (users[0], users[2], users[3]):
        for cert in user.certs:
            (url,) = urls[cert.serial_number]
            code, out = _verify(services, cert, _served(http, url), now)
            assert code == 0, out

    # Only the partitions that held the revoked certificates were signed again.
    numbers = {
        n: x509.load_der_x509_crl(_served(http, f"http://kms.example.org/crl/issuing/{n}.crl")) for n in (1, 2, 3)
    }
    touched = {int(urls[c.serial_number][0].rsplit("/", 1)[1].split(".")[0]) for c in victim.certs}
    for n, crl in numbers.items():
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        assert number == (2 if n in touched else 1), (n, number)

    # The whole-CA CRL now covers the certificates without a partition only, and says so.
    whole = x509.load_der_x509_crl(_served(http, "http://kms.example.org/crl/issuing.crl"))
    idp = whole.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    assert idp.full_name == [x509.UniformResourceIdentifier("http://kms.example.org/crl/issuing.crl")]
    verdict = pkilint(
        "lint_crl", ["-t", "CRL", "-p", "BR", "-s", "WARNING"], whole.public_bytes(serialization.Encoding.PEM)
    )
    assert verdict.exit_code == 0, verdict
    signer = services.ca.require_mail_signer().certificate
    assert crl_urls(signer) == ["http://kms.example.org/crl/issuing.crl"]
    code, out = _verify(services, signer, _served(http, "http://kms.example.org/crl/issuing.crl"), now)
    assert code == 0, out


def test_a_forced_refresh_resigns_every_partition_and_the_flag_clears(partitioned: Services, clock) -> None:  # type: ignore[no-untyped-def]
    services = partitioned
    users = [Enrolled(services, f"q{i}@example.org") for i in range(2)]  # partitions 1 and 2
    services.revocation.revoke_users([users[0].mailbox], None, "admin:test", publish=False)
    assert services.revocation.crl_due()
    view = services.revocation.publish_crl()
    assert view is not None and not services.revocation.crl_due()
    clock.advance(dt.timedelta(hours=25))  # past crl_refresh_hours: every scope is due
    assert services.revocation.crl_due()
    services.revocation.publish_crl()
    assert not services.revocation.crl_due()
    with services.db.read_only() as session:
        rows = {r.scope: r for r in session.execute(select(PublishedCRL)).scalars()}
    assert set(rows) == {"issuing", "issuing-1", "issuing-2"}
    assert all(r.this_update == clock.now().replace(microsecond=0) for r in rows.values())
    assert rows["issuing-1"].entries + rows["issuing-2"].entries == 2


def test_worker_processes_build_the_same_crls_off_the_server(partitioned: Services, settings: Settings, clock) -> None:  # type: ignore[no-untyped-def]
    """`serve` builds CRLs in spawned processes that open the CA key once; what they sign is what the
    server would have signed, and the rows they read are the store's (both partitions, both revoked)."""
    services = partitioned
    users = [Enrolled(services, f"w{i}@example.org") for i in range(3)]  # partitions 1 and 2
    workers = CRLWorkers(settings.effective_database_url, services.ca, 1)
    try:
        services.revocation.builder = workers
        services.revocation.revoke_users([u.mailbox for u in users], "superseded", "admin:test")
        services.revocation.refresh_latest()
        found: dict[int, str] = {}
        for n in (1, 2):
            # publishing does not fill this process's cache with partitions nobody asked it for
            assert services.revocation.latest_of(f"issuing-{n}") is None
            view = services.revocation.refresh_scope(f"issuing-{n}")
            assert view is not None and view.number == 2
            assert services.revocation.latest_of(f"issuing-{n}") == view  # held once asked for
            crl = x509.load_der_x509_crl(view.der)
            assert crl.is_signature_valid(services.ca.issuing.certificate.public_key())  # type: ignore[arg-type]
            found.update({entry.serial_number: f"issuing-{n}" for entry in crl})
        assert set(found) == {c.serial_number for u in users for c in u.certs}
        assert not services.revocation.crl_due()
    finally:
        workers.close()


def _numbers(services: Services) -> dict[str, int]:
    with services.db.read_only() as session:
        return {r.scope: r.number for r in session.execute(select(PublishedCRL)).scalars()}


def test_a_full_partition_whose_certificates_all_expired_gets_a_final_crl_then_no_more(
    partitioned: Services, clock
) -> None:  # type: ignore[no-untyped-def]
    services = partitioned
    users = [Enrolled(services, f"x{i}@example.org") for i in range(2)]  # partition 1 full (3), partition 2 (1)
    services.revocation.revoke_users([users[0].mailbox], None, "admin:test", publish=False)
    services.revocation.publish_crl()
    clock.advance(dt.timedelta(days=560))  # past every certificate's 18 months
    services.revocation.publish_crl()  # the final CRL of partition 1: signed after all its certificates expired
    final = _numbers(services)
    with services.db.read_only() as session:
        der = session.execute(select(PublishedCRL.der).where(PublishedCRL.scope == "issuing-1")).scalar_one()
    assert der is not None
    revoked = {c.serial_number for c in users[0].certs}
    # RFC 5280 §3.3: the final CRL, the first one issued after they expired, still lists them
    assert {e.serial_number for e in x509.load_der_x509_crl(der)} == revoked
    clock.advance(dt.timedelta(hours=25))  # past crl_refresh_hours
    assert services.revocation.crl_due()  # the open partition and the whole-CA CRL are still refreshed
    services.revocation.publish_crl()
    after = _numbers(services)
    assert after["issuing-1"] == final["issuing-1"]  # retired: not re-signed
    assert after["issuing-2"] == final["issuing-2"] + 1
    assert after["issuing"] == final["issuing"] + 1
    assert not services.revocation.crl_due()  # and the poller does not spin on it
    services.revocation.publish_crl(force=True)  # an administrator's forced refresh still signs it
    assert _numbers(services)["issuing-1"] == final["issuing-1"] + 1
    with services.db.read_only() as session:
        der = session.execute(select(PublishedCRL.der).where(PublishedCRL.scope == "issuing-1")).scalar_one()
    assert der is not None and len(x509.load_der_x509_crl(der)) == 0  # their one CRL after expiry was the final


def test_a_full_expired_partition_with_a_compromised_key_keeps_being_resigned(partitioned: Services, clock) -> None:  # type: ignore[no-untyped-def]
    services = partitioned
    users = [Enrolled(services, f"k{i}@example.org") for i in range(2)]
    services.revocation.revoke_users([users[0].mailbox], "keyCompromise", "admin:test", publish=False)
    services.revocation.publish_crl()
    clock.advance(dt.timedelta(days=560))
    services.revocation.publish_crl()
    final = _numbers(services)
    clock.advance(dt.timedelta(hours=25))
    services.revocation.publish_crl()
    assert _numbers(services)["issuing-1"] == final["issuing-1"] + 1  # its entries stay listed after expiry


def test_whether_a_key_needs_a_partition_is_read_once(services: Services) -> None:
    """Asked on every pre-signed renewal (twice): the whole-CA CRL's key is read from the store
    once, also while that CRL has never been signed (then it is the first key's)."""
    partitions = services.issuer.partitions
    assert partitions is not None
    with services.db.transaction() as session:
        session.execute(update(PublishedCRL).where(PublishedCRL.scope == "issuing").values(issuer_key_id=None))
    with services.db.read_only() as session:
        statements: list[str] = []
        listen = event.listens_for(session.get_bind(), "before_cursor_execute")
        recorder = listen(lambda conn, cursor, sql, *rest: statements.append(sql) if "SELECT" in sql else None)
        try:
            assert partitions.none_needed(session, services.ca.issuer.key_id)
            assert len(statements) == 1
            assert partitions.none_needed(session, services.ca.issuer.key_id)
            assert not partitions.none_needed(session, "ab" * 20)  # another key: partitions of its own
            assert len(statements) == 1
        finally:
            event.remove(session.get_bind(), "before_cursor_execute", recorder)
