"""Revocation, CRL and OCSP through the services on SQLite and PostgreSQL, judged by pkilint and openssl."""

from __future__ import annotations

import base64
import datetime as dt
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from fastapi.testclient import TestClient
from sqlalchemy import select

from mailkms.api import create_app, create_http_app
from mailkms.errors import (
    AlreadyRevoked,
    BadRevocationReason,
    CertificateNotFound,
    Malformed,
    Revoked,
    TokenInvalid,
    UserNotFound,
)
from mailkms.pki import sign_request
from mailkms.services import UserState
from mailkms.services._issuance import serial_hex
from mailkms.store import AuditRecord, Certificate, User
from tests.conftest import make_csr, transport_pem
from tests.judges import pem, pkilint

RENEW_URL = "https://localhost:8443/api/v1/renewals"


@pytest.fixture(autouse=True)
def _server_identities(services) -> None:  # type: ignore[no-untyped-def]
    """What `mailkms serve` does at start: a current OCSP responder and root CRL, server certs in the store."""
    services.ensure_server_identities()


class Enrolled:
    def __init__(self, services, mailbox: str) -> None:  # type: ignore[no-untyped-def]
        self.mailbox = mailbox
        token = services.users.add(mailbox, "", None, "admin:test")
        csr, self.signing_key = make_csr(mailbox)
        services.enrolment.enrol(mailbox, token, csr, transport_pem(mailbox)[0])
        self.certs = certificates_of(services, mailbox)
        self.signing = next(c for c in self.certs if _is_signing(c))

    def renewal_request(self, services) -> dict:  # type: ignore[no-untyped-def,type-arg]
        csr, _ = make_csr(self.mailbox)
        body = {"mailbox": self.mailbox, "csr": csr.decode()}
        return sign_request(self.signing_key, [self.signing], services.nonces.new(), RENEW_URL, body)


def _is_signing(cert: x509.Certificate) -> bool:
    return cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature


def certificates_of(services, mailbox: str) -> list[x509.Certificate]:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        user = session.execute(select(User).where(User.email == mailbox)).scalar_one()
        rows = session.execute(select(Certificate.der).where(Certificate.user_id == user.id)).scalars()
        return [x509.load_der_x509_certificate(der) for der in rows]


def _ocsp_request(cert: x509.Certificate, issuer: x509.Certificate, algorithm=None) -> bytes:  # type: ignore[no-untyped-def]
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm or hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER)


def _status(services, cert: x509.Certificate) -> ocsp.OCSPResponse:  # type: ignore[no-untyped-def]
    answer = services.ocsp.answer(_ocsp_request(cert, services.ca.issuing.certificate))
    return ocsp.load_der_ocsp_response(answer.der)


def _openssl_verify_crl(
    services, leaf: x509.Certificate, crl_der: bytes, at: dt.datetime
) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "root.pem").write_bytes(pem(services.ca.root))
        (d / "sub.pem").write_bytes(pem(services.ca.issuing.certificate))
        (d / "leaf.pem").write_bytes(pem(leaf))
        (d / "crl.pem").write_bytes(x509.load_der_x509_crl(crl_der).public_bytes(serialization.Encoding.PEM))
        cmd = ["openssl", "verify", "-crl_check", "-attime", str(int(at.timestamp()))]
        cmd += ["-CAfile", str(d / "root.pem"), "-untrusted", str(d / "sub.pem"), "-CRLfile", str(d / "crl.pem")]
        return subprocess.run([*cmd, str(d / "leaf.pem")], capture_output=True, text=True, timeout=60)


def _verify_signature(responder: x509.Certificate, response: ocsp.OCSPResponse) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    key = responder.public_key()
    algorithm = response.signature_hash_algorithm
    assert algorithm is not None
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(response.signature, response.tbs_response_bytes, padding.PKCS1v15(), algorithm)
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))


def _audit(services, action: str) -> list[AuditRecord]:  # type: ignore[no-untyped-def]
    with services.db.transaction() as session:
        return list(
            session.execute(select(AuditRecord).where(AuditRecord.action == action).order_by(AuditRecord.seq)).scalars()
        )


def test_revoking_a_user_shows_in_crl_and_ocsp_and_openssl_agrees(services, clock) -> None:
    alice = Enrolled(services, "alice@example.org")
    bob = Enrolled(services, "bob@example.org")
    first = services.revocation.publish_crl()
    assert first is not None and first.entries == 0
    assert services.revocation.publish_crl() is None  # nothing changed, not due

    clock.advance(dt.timedelta(minutes=5))
    reports = services.revocation.revoke_users([alice.mailbox], "keyCompromise", "admin:test")
    assert {s for s in reports[0].serials} == {format(c.serial_number, "x") for c in alice.certs}
    crl_view = services.revocation.latest
    assert crl_view is not None and crl_view.number == first.number + 1 and crl_view.entries == 2

    crl = x509.load_der_x509_crl(crl_view.der)
    assert crl.is_signature_valid(services.ca.issuing.certificate.public_key())
    entry = crl.get_revoked_certificate_by_serial_number(alice.signing.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(bob.signing.serial_number) is None
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=7)

    verdict = pkilint(
        "lint_crl", ["-t", "CRL", "-p", "BR", "-s", "WARNING"], crl.public_bytes(serialization.Encoding.PEM)
    )
    assert verdict.exit_code == 0, verdict

    now = clock.now()
    revoked = _openssl_verify_crl(services, alice.signing, crl_view.der, now)
    assert revoked.returncode != 0 and "error 23" in revoked.stdout + revoked.stderr, revoked
    good = _openssl_verify_crl(services, bob.signing, crl_view.der, now)
    assert good.returncode == 0, good.stdout + good.stderr

    answer = _status(services, alice.signing)
    assert answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert answer.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert answer.revocation_reason is x509.ReasonFlags.key_compromise
    assert answer.revocation_time_utc == reports[0].revoked_at.replace(microsecond=0)
    assert _status(services, bob.signing).certificate_status is ocsp.OCSPCertStatus.GOOD

    with services.db.transaction() as session:
        user = session.execute(select(User).where(User.email == alice.mailbox)).scalar_one()
        assert user.status == "revoked"
    assert services.users.show(alice.mailbox).state is UserState.REVOKED
    assert len(_audit(services, "certificate.revoked")) == 2
    assert len(_audit(services, "user.revoked")) == 1
    assert [r.details for r in _audit(services, "crl.published")][-1].count('"entries":2') == 1
    assert services.verify_audit().ok


def test_ocsp_answers_from_cache_and_changes_on_revocation(services, clock) -> None:
    carol = Enrolled(services, "carol@example.org")
    request = _ocsp_request(carol.signing, services.ca.issuing.certificate)
    assert services.ocsp.answer_cached(request) is None  # nothing signed yet
    first = services.ocsp.answer(request)
    assert first.status == "good"
    again = services.ocsp.answer_cached(request)
    assert again is not None and again.der == first.der  # a lookup, not a new signature

    services.revocation.revoke_serial(format(carol.signing.serial_number, "X"), "superseded", "admin:test")
    assert services.ocsp.answer_cached(request) is None  # forgotten at once
    after = ocsp.load_der_ocsp_response(services.ocsp.answer(request).der)
    assert after.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert after.revocation_reason is x509.ReasonFlags.superseded

    # Refreshed once it is ocsp_refresh_hours old.
    cached = services.ocsp.answer(request)
    clock.advance(dt.timedelta(hours=services.settings.revocation.ocsp_refresh_hours, seconds=1))
    assert services.ocsp.answer_cached(request) is None
    assert services.ocsp.answer(request).der != cached.der


def test_ocsp_responses_are_well_formed_for_every_status(services, clock, tmp_path: Path) -> None:
    dave = Enrolled(services, "dave@example.org")
    erin = Enrolled(services, "erin@example.org")
    services.revocation.revoke_users([erin.mailbox], None, "admin:test")
    issuer = services.ca.issuing.certificate
    responder = services.ca.require_ocsp_responder().certificate
    cases = {
        "good": _ocsp_request(dave.signing, issuer),
        "revoked": _ocsp_request(erin.signing, issuer),
        "good-sha256": _ocsp_request(dave.signing, issuer, hashes.SHA256()),
    }
    (tmp_path / "root.pem").write_bytes(pem(services.ca.root))
    (tmp_path / "sub.pem").write_bytes(pem(issuer))
    for name, request in cases.items():
        answer = services.ocsp.answer(request)
        response = ocsp.load_der_ocsp_response(answer.der)
        assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
        assert answer.status == name.removesuffix("-sha256")
        assert response.certificates == [responder]
        assert response.responder_key_hash is not None
        assert response.hash_algorithm.name == ocsp.load_der_ocsp_request(request).hash_algorithm.name
        window = response.next_update_utc - response.this_update_utc
        assert dt.timedelta(hours=8) <= window <= dt.timedelta(days=10)
        assert response.this_update_utc <= clock.now()
        _verify_signature(responder, response)
        verdict = pkilint("lint_ocsp_response", ["-s", "WARNING"], answer.der)
        assert verdict.exit_code == 0, f"{name}: {verdict}"
        (tmp_path / f"{name}.der").write_bytes(answer.der)
        cmd = ["openssl", "ocsp", "-respin", str(tmp_path / f"{name}.der"), "-issuer", str(tmp_path / "sub.pem")]
        cmd += ["-CAfile", str(tmp_path / "root.pem"), "-no_nonce", "-attime", str(int(clock.now().timestamp()))]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert "Response verify OK" in done.stdout + done.stderr, done.stdout + done.stderr


def _request_for_serial(services, serial: int, algorithm=None) -> bytes:  # type: ignore[no-untyped-def]
    """A request naming our issuing CA and a serial of our choosing."""
    responder = services.ca.require_ocsp_responder().certificate  # any certificate the issuing CA issued
    asked = ocsp.load_der_ocsp_request(_ocsp_request(responder, services.ca.issuing.certificate, algorithm))
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        asked.issuer_name_hash, asked.issuer_key_hash, serial, algorithm or hashes.SHA1()
    )
    return builder.build().public_bytes(serialization.Encoding.DER)


def _with_revocation(settings, **changes):  # type: ignore[no-untyped-def]
    return settings.model_copy(update={"revocation": settings.revocation.model_copy(update=changes)})


def test_never_issued_serials_get_unauthorized_unsigned_and_take_no_cache(services) -> None:  # type: ignore[no-untyped-def]
    """S/MIME BR 4.9.10: never "good" for an unused serial; RFC 6960 §2.3 / RFC 5019 §2.2.3: unauthorized."""
    import secrets

    olga = Enrolled(services, "olga@example.org")
    services.ocsp.answer(_ocsp_request(olga.signing, services.ca.issuing.certificate))
    entries, size = services.ocsp.cached(), services.ocsp.cached_bytes()
    assert entries == 1 and size > 1000
    for _ in range(300):
        for algorithm in (hashes.SHA1(), hashes.SHA256()):
            answer = services.ocsp.answer(_request_for_serial(services, secrets.randbits(159), algorithm))
            assert answer.status == "unused" and answer.max_age == 0
            assert ocsp.load_der_ocsp_response(answer.der).response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED
    assert (services.ocsp.cached(), services.ocsp.cached_bytes()) == (entries, size)
    # Issued after the question was asked: answered at once (nothing negative was cached).
    serial = secrets.randbits(159)
    assert services.ocsp.answer(_request_for_serial(services, serial)).status == "unused"
    with services.db.transaction() as session:
        row = session.execute(select(Certificate).where(Certificate.serial == serial_hex(olga.signing.serial_number)))
        cert = row.scalar_one()
        cert.serial = serial_hex(serial)  # stand-in for a certificate issued meanwhile (any node)
    assert services.ocsp.answer(_request_for_serial(services, serial)).status == "good"


def test_the_ocsp_cache_is_bounded_in_bytes_lru(services, settings, clock) -> None:  # type: ignore[no-untyped-def]
    from mailkms.services import OCSPResponder

    people = [Enrolled(services, f"lru{i}@example.org") for i in range(4)]
    requests = [_ocsp_request(p.signing, services.ca.issuing.certificate) for p in people]
    one = services.ocsp.answer(requests[0])
    per_entry = len(one.der) + 288
    small = OCSPResponder(
        services.db, services.ca, _with_revocation(settings, ocsp_cache_bytes=3 * per_entry + 10), clock
    )
    for request in requests:
        small.answer(request)
    assert small.cached() == 3 and small.cached_bytes() <= 3 * per_entry + 10
    assert small.answer_cached(requests[0]) is None  # the least recently used went first
    assert small.answer_cached(requests[3]) is not None
    small.answer_cached(requests[1])  # used: now the newest
    small.answer(requests[0])  # evicts requests[2], the least recently used
    assert small.answer_cached(requests[1]) is not None and small.answer_cached(requests[2]) is None
    small.forget([format(people[1].signing.serial_number, "X")])
    assert small.cached() == 2 and small.cached_bytes() == 2 * per_entry


def test_ocsp_threads_answer_try_later_when_busy(services, settings, clock) -> None:  # type: ignore[no-untyped-def]
    from mailkms.services import OCSPResponder

    pat = Enrolled(services, "pat@example.org")
    request = _ocsp_request(pat.signing, services.ca.issuing.certificate)
    busy = OCSPResponder(
        services.db, services.ca, _with_revocation(settings, ocsp_sign_threads=1, ocsp_sign_queue=1), clock
    )
    entered, release = threading.Event(), threading.Event()
    state_of = busy._state_of

    def slow(query):  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(30)
        return state_of(query)

    busy._state_of = slow  # type: ignore[method-assign]
    try:
        running = busy.submit(request)
        assert running is not None and entered.wait(30)
        waiting = busy.submit(request)
        assert waiting is not None  # the one queue place
        assert busy.submit(request) is None  # full: the caller answers tryLater, nothing signed
        client = TestClient(create_http_app(services))
        services.ocsp._slots = busy._slots  # the endpoint's responder shares the full gate
        tried = client.post("/ocsp", content=request, headers={"Content-Type": "application/ocsp-request"})
        assert ocsp.load_der_ocsp_response(tried.content).response_status is ocsp.OCSPResponseStatus.TRY_LATER
        assert tried.headers["cache-control"] == "no-store"
    finally:
        release.set()
    assert running.result(30).status == "good" and waiting.result(30).status == "good"
    assert busy.submit(request) is not None  # places free again
    busy.close()


def test_ocsp_refuses_malformed_and_other_cas(services, smime_pki) -> None:  # type: ignore[no-untyped-def]
    assert services.ocsp.answer(b"\x30\x03garbage").status == "malformed"
    assert ocsp.load_der_ocsp_response(services.ocsp.answer(b"").der).response_status is (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    )
    other = smime_pki.identity("x@example.org")
    foreign = _ocsp_request(other.signing, smime_pki.issuing)
    answer = services.ocsp.answer(foreign)
    assert answer.status == "unauthorized"
    assert ocsp.load_der_ocsp_response(answer.der).response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_revoked_user_cannot_renew_and_reenrolment_brings_them_back(services, clock) -> None:
    frank = Enrolled(services, "frank@example.org")
    spare_token = services.users.reenroll(frank.mailbox, "admin:test")  # an unused token, killed by revocation
    services.revocation.revoke_users([frank.mailbox], "affiliationChanged", "admin:test")
    clock.advance(dt.timedelta(days=380))
    request = frank.renewal_request(services)
    with pytest.raises(Revoked):
        services.renewal.renew(request, RENEW_URL)
    with pytest.raises(TokenInvalid):
        services.enrolment.enrol(
            frank.mailbox, spare_token, make_csr(frank.mailbox)[0], transport_pem(frank.mailbox)[0]
        )
    with pytest.raises(AlreadyRevoked):
        services.revocation.revoke_users([frank.mailbox], None, "admin:test")

    token = services.users.reenroll(frank.mailbox, "admin:test")
    csr, _ = make_csr(frank.mailbox)
    services.enrolment.enrol(frank.mailbox, token, csr, transport_pem(frank.mailbox)[0])
    assert services.users.show(frank.mailbox).state is UserState.ACTIVE
    newest = max(certificates_of(services, frank.mailbox), key=lambda c: c.not_valid_before_utc)
    assert _status(services, newest).certificate_status is ocsp.OCSPCertStatus.GOOD
    assert _status(services, frank.signing).certificate_status is ocsp.OCSPCertStatus.REVOKED


def test_revoking_an_old_generation_by_serial_leaves_the_user_active(services, clock) -> None:
    gina = Enrolled(services, "gina@example.org")
    clock.advance(dt.timedelta(days=370))
    request = gina.renewal_request(services)
    services.renewal.renew(request, RENEW_URL)
    report = services.revocation.revoke_serial(f"0x{gina.signing.serial_number:x}", "superseded", "admin:test")
    assert not report.user_revoked
    assert services.users.show(gina.mailbox).state is UserState.ACTIVE


def test_bad_revocation_requests_are_refused_and_change_nothing(services) -> None:
    hank = Enrolled(services, "hank@example.org")
    for reason in ("unspecified", "certificateHold", "cACompromise", "nonsense"):
        with pytest.raises(BadRevocationReason):
            services.revocation.revoke_users([hank.mailbox], reason, "admin:test")
    with pytest.raises(UserNotFound):
        services.revocation.revoke_users(["nobody@example.org"], None, "admin:test")
    with pytest.raises(CertificateNotFound):
        services.revocation.revoke_serial("deadbeef", None, "admin:test")
    for bad in ("xyz", "-5", "0", ""):
        with pytest.raises(Malformed):
            services.revocation.revoke_serial(bad, None, "admin:test")
    assert services.users.show(hank.mailbox).state is UserState.ACTIVE
    assert _audit(services, "certificate.revoked") == []
    refusals = [r.details for r in _audit(services, "revocation.refused")]
    assert len(refusals) == 10
    assert sum('"reason":"bad-revocation-reason"' in d for d in refusals) == 4
    assert sum('"reason":"certificate-not-found"' in d for d in refusals) == 1
    services.revocation.revoke_serial(f"{hank.signing.serial_number:x}", None, "admin:test")
    with pytest.raises(AlreadyRevoked):
        services.revocation.revoke_serial(f"{hank.signing.serial_number:x}", None, "admin:test")
    crl = x509.load_der_x509_crl(services.revocation.latest.der)  # type: ignore[union-attr]
    entry = crl.get_revoked_certificate_by_serial_number(hank.signing.serial_number)
    assert entry is not None and len(entry.extensions) == 0  # no reason: the extension is omitted (BR 7.2.2)


def test_expired_certificates_drop_off_the_crl_except_compromised_keys(services, clock) -> None:
    """An expired certificate's entry stays on the first CRL issued after its expiry (RFC 5280 §3.3)
    and leaves with the next one, except after keyCompromise: a signature the thief makes later,
    claiming a signing time inside the validity, is still found revoked."""
    from mailkms.client._mail import CRLChecker
    from mailkms.pki import RevocationStatus, revoked_signature_problem

    ivan = Enrolled(services, "ivan@example.org")
    judy = Enrolled(services, "judy@example.org")
    services.revocation.revoke_users([ivan.mailbox], "cessationOfOperation", "admin:test")
    services.revocation.revoke_users([judy.mailbox], "keyCompromise", "admin:test")
    assert services.revocation.latest.entries == 4  # type: ignore[union-attr]
    number = services.revocation.latest.number  # type: ignore[union-attr]
    clock.advance(dt.timedelta(days=19 * 31))
    view = services.revocation.publish_crl()
    assert view is not None and view.number == number + 1  # due (older than crl_refresh_hours)
    first_after = x509.load_der_x509_crl(view.der)
    assert all(c.not_valid_after_utc < first_after.last_update_utc for c in ivan.certs + judy.certs)
    everyone = {c.serial_number for c in ivan.certs + judy.certs}
    assert {e.serial_number for e in first_after} == everyone  # on one CRL issued after their expiry
    clock.advance(dt.timedelta(hours=25))
    view = services.revocation.publish_crl()
    assert view is not None and view.number == number + 2
    crl = x509.load_der_x509_crl(view.der)
    assert {e.serial_number for e in crl} == {c.serial_number for c in judy.certs}  # then ivan's left
    verdict = pkilint(
        "lint_crl", ["-t", "CRL", "-p", "BR", "-s", "WARNING"], crl.public_bytes(serialization.Encoding.PEM)
    )
    assert verdict.exit_code == 0, verdict
    checker = CRLChecker(lambda url: view.der)
    issuer = services.ca.issuing.certificate
    assert checker.check(ivan.signing, issuer, clock.now()).status is RevocationStatus.GOOD
    late = checker.check(judy.signing, issuer, clock.now())
    assert late.status is RevocationStatus.REVOKED and late.reason is x509.ReasonFlags.key_compromise
    claimed = judy.signing.not_valid_before_utc + dt.timedelta(hours=1)  # before the revocation
    assert "compromised" in (revoked_signature_problem(late, claimed) or "")


def test_crl_numbers_increase_and_concurrent_revocations_share_crls(services) -> None:
    users = [Enrolled(services, f"u{i}@example.org") for i in range(6)]
    services.revocation.publish_crl(force=True)
    start = services.revocation.latest.number  # type: ignore[union-attr]
    errors: list[BaseException] = []

    def revoke(mailbox: str) -> None:
        try:
            services.revocation.revoke_users([mailbox], "keyCompromise", "admin:test")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=revoke, args=(u.mailbox,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = services.revocation.refresh_latest()
    assert final is not None and final.entries == 12
    numbers = [  # the issuing CA's CRLs; the root's and the infrastructure CA's are numbered on their own
        int(r.details.split('"number":')[1].split(",")[0].rstrip("}"))
        for r in _audit(services, "crl.published")
        if r.subject not in ("root", "infrastructure")
    ]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert final.number - start <= len(users)  # at most one CRL per revocation; fewer when they coalesce


def test_root_crl_is_an_arl_and_openssl_checks_the_whole_chain(services, clock) -> None:
    jane = Enrolled(services, "jane@example.org")
    services.ensure_server_identities()
    root_crl = services.ca.root_crl
    assert root_crl is not None and root_crl.is_signature_valid(services.ca.root.public_key())
    verdict = pkilint(
        "lint_crl", ["-t", "ARL", "-p", "BR", "-s", "WARNING"], root_crl.public_bytes(serialization.Encoding.PEM)
    )
    assert verdict.exit_code == 0, verdict
    issuing = services.revocation.publish_crl(force=True)
    assert issuing is not None
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "root.pem").write_bytes(pem(services.ca.root))
        (d / "sub.pem").write_bytes(pem(services.ca.issuing.certificate))
        (d / "leaf.pem").write_bytes(pem(jane.signing))
        crls = x509.load_der_x509_crl(issuing.der).public_bytes(serialization.Encoding.PEM)
        (d / "crls.pem").write_bytes(crls + root_crl.public_bytes(serialization.Encoding.PEM))
        cmd = ["openssl", "verify", "-crl_check_all", "-attime", str(int(clock.now().timestamp()))]
        cmd += ["-CAfile", str(d / "root.pem"), "-untrusted", str(d / "sub.pem"), "-CRLfile", str(d / "crls.pem")]
        done = subprocess.run([*cmd, str(d / "leaf.pem")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_server_certificates_are_known_to_ocsp(services) -> None:
    services.ensure_server_identities()
    signer = services.ca.require_mail_signer().certificate
    assert _status(services, signer).certificate_status is ocsp.OCSPCertStatus.GOOD
    responder = services.ca.require_ocsp_responder().certificate
    assert responder.extensions.get_extension_for_class(x509.OCSPNoCheck) is not None
    # The TLS-BR stand-in (-t OCSP-RESPONDER) wants C in the CA names, which this test CA lacks:
    # tests/unit/pki/test_revocation_core.py runs it on CAs with a country.
    verdict = pkilint("lint_pkix_cert", ["-s", "WARNING"], responder)
    assert verdict.exit_code == 0, verdict


@pytest.mark.parametrize("factory", [create_app, create_http_app])
def test_http_serves_crl_and_ocsp_by_get_and_post(services, factory) -> None:  # type: ignore[no-untyped-def]
    kate = Enrolled(services, "kate@example.org")
    services.revocation.revoke_users([kate.mailbox], "keyCompromise", "admin:test")
    services.ensure_server_identities()
    client = TestClient(factory(services))
    der = client.get("/crl/issuing.crl")
    assert der.status_code == 200 and der.headers["content-type"] == "application/pkix-crl"
    assert x509.load_der_x509_crl(der.content).get_revoked_certificate_by_serial_number(kate.signing.serial_number)
    as_pem = client.get("/crl/issuing.crl?format=pem")
    assert as_pem.content.startswith(b"-----BEGIN X509 CRL-----")
    accept_pem = client.get("/crl/issuing.crl", headers={"Accept": "application/x-pem-file"})
    assert accept_pem.content == as_pem.content
    root = client.get("/crl/root.crl")
    assert root.status_code == 200 and x509.load_der_x509_crl(root.content).issuer == services.ca.root.subject

    request = _ocsp_request(kate.signing, services.ca.issuing.certificate)
    posted = client.post("/ocsp", content=request, headers={"Content-Type": "application/ocsp-request"})
    assert posted.headers["content-type"] == "application/ocsp-response"
    assert ocsp.load_der_ocsp_response(posted.content).certificate_status is ocsp.OCSPCertStatus.REVOKED
    encoded = base64.b64encode(request).decode()
    got = client.get("/ocsp/" + encoded.replace("/", "%2F").replace("+", "%2B").replace("=", "%3D"))
    assert ocsp.load_der_ocsp_response(got.content).certificate_status is ocsp.OCSPCertStatus.REVOKED
    plain = client.get("/ocsp/" + encoded)
    assert plain.content == got.content
    bad = client.get("/ocsp/!!!not-base64")
    assert ocsp.load_der_ocsp_response(bad.content).response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    huge = client.post("/ocsp", content=b"\x30" * 20000)
    assert ocsp.load_der_ocsp_response(huge.content).response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    metrics = TestClient(create_app(services)).get("/metrics").text
    assert 'mailkms_ocsp_requests_total{status="revoked"}' in metrics
    assert 'mailkms_crl_age_seconds{crl="issuing"}' in metrics


def test_two_nodes_publish_each_crl_once(services, settings, clock) -> None:  # type: ignore[no-untyped-def]
    """Two service stacks (two nodes) on one store: a revocation is published once, by either."""
    from mailkms.services import Services

    if settings.effective_database_url.startswith("sqlite"):
        pytest.skip("SQLite is the single-node store")
    other = Services.build(settings, clock)
    try:
        lena = Enrolled(services, "lena@example.org")
        services.revocation.publish_crl(force=True)
        services.revocation.revoke_users([lena.mailbox], "keyCompromise", "admin:test", publish=False)
        assert services.revocation.crl_due() and other.revocation.crl_due()
        results: list[object] = []
        barrier = threading.Barrier(2)

        def publish(node) -> None:  # type: ignore[no-untyped-def]
            barrier.wait()
            results.append(node.revocation.publish_crl())

        threads = [threading.Thread(target=publish, args=(n,)) for n in (services, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        published = [r for r in results if r is not None]
        assert len(published) == 1 and len(results) == 2
        assert not services.revocation.crl_due() and not other.revocation.crl_due()
        # The other node serves the new CRL after its next poll, and forgets its cached answer.
        request = _ocsp_request(lena.signing, services.ca.issuing.certificate)
        assert other.revocation.refresh_latest().number == published[0].number  # type: ignore[union-attr,attr-defined]
        other.ocsp.sync()
        assert ocsp.load_der_ocsp_response(other.ocsp.answer(request).der).certificate_status is (
            ocsp.OCSPCertStatus.REVOKED
        )
    finally:
        other.close()


def test_a_node_forgets_answers_revoked_elsewhere_at_its_next_poll(services, settings, clock) -> None:  # type: ignore[no-untyped-def]
    from mailkms.services import Services

    mona = Enrolled(services, "mona@example.org")
    request = _ocsp_request(mona.signing, services.ca.issuing.certificate)
    assert services.ocsp.answer(request).status == "good"  # cached here
    admin = Services.build(settings, clock)  # the `mailkms revoke` process
    try:
        admin.revocation.revoke_users([mona.mailbox], "privilegeWithdrawn", "admin:test")
    finally:
        admin.close()
    assert services.ocsp.answer(request).status == "good"  # still the cached answer ...
    clock.advance(dt.timedelta(seconds=2))
    services.ocsp.sync()  # ... until the poll
    assert services.ocsp.answer(request).status == "revoked"


def test_the_clients_crl_check_reads_the_served_crl(services, clock) -> None:  # type: ignore[no-untyped-def]
    """The client's verify fetches the CRL at the certificate's CDP; here the server app answers it."""
    import urllib.parse

    from mailkms.client._mail import CRLChecker
    from mailkms.pki import RevocationStatus

    nina = Enrolled(services, "nina@example.org")
    http = TestClient(create_http_app(services))
    fetched: list[str] = []

    def fetch(url: str) -> bytes:
        fetched.append(url)
        resp = http.get(urllib.parse.urlsplit(url).path)
        assert resp.status_code == 200
        return resp.content

    checker = CRLChecker(fetch)
    issuer = services.ca.issuing.certificate
    services.revocation.publish_crl(force=True)
    assert checker.check(nina.signing, issuer, clock.now()).status is RevocationStatus.GOOD
    services.revocation.revoke_users([nina.mailbox], "keyCompromise", "admin:test")
    result = checker.check(nina.signing, issuer, clock.now())
    assert result.status is RevocationStatus.REVOKED
    assert fetched[0] == "http://kms.example.org/crl/issuing.crl"  # the CDP URL written into the certificate
