"""CMP use cases on a real store (SQLite and PostgreSQL) and a fake clock, with the requests made
by `openssl cmp` at the fake clock's time: enrolment with the token, the renewal rules of kur,
revocation by the holder, replays and wrong protection refused as CMP error messages."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import os
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from pyasn1.codec.der import decoder, encoder
from pyasn1.type import univ
from pyasn1_alt_modules import rfc9480
from sqlalchemy import func, select, update

from mailkms.api._cmp import status_of
from mailkms.pki import KeyType, PrivateKey, generate_key, same_public_key
from mailkms.pki._cmp import FailInfo as CMPFailInfo
from mailkms.pki._cmp import parse_request as parse_answer
from mailkms.store import Certificate, KeyHandover, OutboxMessage, Token
from tests.cmp_support import answer_of, issued_certificate, openssl_request, write_cert, write_key

ALICE = "alice@example.org"
BOB = "bob@example.org"
YEAR_LATER = dt.timedelta(days=395)


def ir(tmp: Path, at: dt.datetime, mailbox: str, token: str, key: PrivateKey, subject: str | None = None) -> bytes:
    key_file = write_key(tmp / f"ir-{mailbox}.key", key)
    return openssl_request(
        tmp, "-cmd", "ir", "-ref", mailbox, "-secret", f"pass:{token}", "-newkey", str(key_file),
        "-subject", subject or f"/CN={mailbox}", "-recipient", "/CN=mailkms", "-certout", str(tmp / "x.pem"),
        at=at,
    )  # fmt: skip


def signed(tmp: Path, at: dt.datetime, command: str, cert: x509.Certificate, key: PrivateKey, *extra: str) -> bytes:
    cert_file = write_cert(tmp / f"{command}-cert.pem", cert)
    key_file = write_key(tmp / f"{command}-cert.key", key)
    return openssl_request(
        tmp, "-cmd", command, "-cert", str(cert_file), "-key", str(key_file), "-recipient", "/CN=mailkms",
        "-certout", str(tmp / "y.pem"), *extra, at=at,
    )  # fmt: skip


def kur(tmp: Path, at: dt.datetime, cert: x509.Certificate, key: PrivateKey, new_key: PrivateKey) -> bytes:
    return signed(tmp, at, "kur", cert, key, "-newkey", str(write_key(tmp / "new.key", new_key)))


def bob_sender(cert: x509.Certificate):  # type: ignore[no-untyped-def]
    name = rfc9480.GeneralName()
    name["directoryName"]["rdnSequence"] = decoder.decode(cert.subject.public_bytes(), asn1Spec=rfc9480.Name())[0][
        "rdnSequence"
    ]
    return name


def handle(services, data: bytes) -> bytes:  # type: ignore[no-untyped-def]
    return services.cmp.handle(data, status_of)  # type: ignore[no-any-return]


def refused(services, data: bytes, bit: CMPFailInfo, code: str = "") -> None:  # type: ignore[no-untyped-def]
    body, bits, text = answer_of(handle(services, data))
    assert body == "error" and bits == [int(bit)], (bits, text)
    assert code in text, text


def enrolled(services, clock, tmp: Path, mailbox: str) -> tuple[x509.Certificate, PrivateKey]:  # type: ignore[no-untyped-def]
    token = services.users.add(mailbox, "", None, "admin:test")
    key = generate_key(KeyType.P256)
    answer = handle(services, ir(tmp, clock.now(), mailbox, token, key))
    assert answer_of(answer)[0] == "ip", answer_of(answer)
    return issued_certificate(answer), key


def test_ir_with_the_token_issues_the_pair_and_refusals_leave_the_token_unspent(services, clock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    token = services.users.add(ALICE, "Alice", None, "admin:test")
    key = generate_key(KeyType.P256)
    now = clock.now()
    refused(
        services, ir(tmp_path, now, ALICE, "a-wrong-token", key), CMPFailInfo.BAD_MESSAGE_CHECK, "bad-cmp-protection"
    )
    refused(services, ir(tmp_path, now, ALICE, token, key, f"/CN={BOB}"), CMPFailInfo.BAD_CERT_TEMPLATE, "bad-csr")
    refused(services, ir(tmp_path, now, BOB, token, key), CMPFailInfo.BAD_MESSAGE_CHECK)  # no such user
    assert services.users.show(ALICE).generation == 0  # nothing issued, the token still good

    request = ir(tmp_path, now, ALICE, token, key)
    answer = handle(services, request)
    assert answer_of(answer)[0] == "ip"
    cert = issued_certificate(answer)
    assert same_public_key(cert.public_key(), key.public_key())  # type: ignore[arg-type]
    view = services.users.show(ALICE)
    assert view.generation == 1 and {c.kind for c in view.certificates} == {"signing", "encryption"}
    with services.db.transaction() as session:  # the encryption key waits for EST serverkeygen
        assert session.execute(select(func.count()).select_from(KeyHandover)).scalar_one() == 1

    refused(services, request, CMPFailInfo.TRANSACTION_ID_IN_USE)  # the same message again
    refused(services, ir(tmp_path, now, ALICE, token, key), CMPFailInfo.NOT_AUTHORIZED, "token-used")

    message, _ = decoder.decode(request, asn1Spec=rfc9480.PKIMessage())
    message["body"]["pollReq"].append(message["body"]["pollReq"].getComponentType().clone())
    message["body"]["pollReq"][0]["certReqId"] = 0
    refused(services, encoder.encode(message), CMPFailInfo.BAD_REQUEST, "immediate")


def test_a_token_without_a_sealed_copy_or_an_old_message_is_refused(services, clock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    token = services.users.add(ALICE, "", None, "admin:test")
    key = generate_key(KeyType.P256)
    request = ir(tmp_path, clock.now(), ALICE, token, key)
    clock.advance(dt.timedelta(hours=1))
    refused(services, request, CMPFailInfo.BAD_TIME, "stale-request")
    with services.db.transaction() as session:  # a token made before CMP existed: nothing to key a MAC
        session.execute(update(Token).values(cmp_secret=None))
    refused(services, ir(tmp_path, clock.now(), ALICE, token, key), CMPFailInfo.BAD_MESSAGE_CHECK)


def test_kur_is_the_renewal_with_its_rules(services, clock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cert, key = enrolled(services, clock, tmp_path, ALICE)
    bob_cert, bob_key = enrolled(services, clock, tmp_path, BOB)
    new_key = generate_key(KeyType.P256)
    refused(services, kur(tmp_path, clock.now(), cert, key, new_key), CMPFailInfo.NOT_AUTHORIZED, "not-due")
    message, _ = decoder.decode(kur(tmp_path, clock.now(), cert, key, new_key), asn1Spec=rfc9480.PKIMessage())
    message["header"]["sender"] = decoder.decode(encoder.encode(bob_sender(bob_cert)), asn1Spec=rfc9480.GeneralName())[
        0
    ]
    message["extraCerts"][0] = decoder.decode(bob_cert.public_bytes(Encoding.DER), asn1Spec=rfc9480.CMPCertificate())[0]
    refused(services, encoder.encode(message), CMPFailInfo.BAD_MESSAGE_CHECK)  # Alice's signature, Bob's certificate

    clock.advance(YEAR_LATER)
    answer = handle(services, kur(tmp_path, clock.now(), cert, key, new_key))
    assert answer_of(answer)[0] == "kup", answer_of(answer)
    renewed = issued_certificate(answer)
    assert same_public_key(renewed.public_key(), new_key.public_key())  # type: ignore[arg-type]
    assert services.users.show(ALICE).generation == 2
    with services.db.transaction() as session:  # the new encryption pair goes by e-mail, as every renewal
        assert session.execute(select(func.count()).select_from(OutboxMessage)).scalar_one() == 1
    # the answer was lost: the same request again (a new transaction) gets the pair already issued
    again = handle(services, kur(tmp_path, clock.now(), cert, key, new_key))
    assert issued_certificate(again).serial_number == renewed.serial_number
    assert services.users.show(ALICE).generation == 2

    clock.advance(dt.timedelta(days=600) - YEAR_LATER)  # Bob's pair is past its notAfter
    refused(services, kur(tmp_path, clock.now(), bob_cert, bob_key, new_key), CMPFailInfo.NOT_AUTHORIZED, "reenrolment")


def test_rr_revokes_the_holders_own_certificate_only(services, clock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cert, key = enrolled(services, clock, tmp_path, ALICE)
    bob_cert, _ = enrolled(services, clock, tmp_path, BOB)
    other = write_cert(tmp_path / "bob.pem", bob_cert)
    refused(
        services,
        signed(tmp_path, clock.now(), "rr", cert, key, "-oldcert", str(other), "-revreason", "1"),
        CMPFailInfo.NOT_AUTHORIZED,
        "not-owner",
    )
    own = write_cert(tmp_path / "own.pem", cert)
    answer = handle(services, signed(tmp_path, clock.now(), "rr", cert, key, "-oldcert", str(own), "-revreason", "1"))
    assert answer_of(answer)[0] == "rp"
    assert services.users.show(ALICE).state.value == "REVOKED"
    assert services.users.show(BOB).state.value == "ACTIVE"
    clock.advance(YEAR_LATER)
    refused(services, kur(tmp_path, clock.now(), cert, key, generate_key(KeyType.P256)), CMPFailInfo.CERT_REVOKED)


@pytest.mark.parametrize("body", [b"", b"\x30\x00", b"not DER at all"])
def test_what_is_not_a_pkimessage_gets_a_signed_error(services, body: bytes) -> None:  # type: ignore[no-untyped-def]
    from mailkms.pki._cmp import parse_request as parse_cmp_request
    from mailkms.pki._cmp import verify_signature as verify_cmp_signature

    answer = handle(services, body)
    assert answer_of(answer)[1] == [int(CMPFailInfo.BAD_DATA_FORMAT)]
    assert verify_cmp_signature(parse_cmp_request(answer)) == services.ca.issuing.certificate


def test_cr_and_implicit_confirm_close_at_once_and_purge_drops_unusable_sealed_tokens(
    services, clock, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from mailkms.store import CMPTransaction

    token = services.users.add(ALICE, "", None, "admin:test")
    key_file = write_key(tmp_path / "cr.key", generate_key(KeyType.P256))
    request = openssl_request(
        tmp_path, "-cmd", "cr", "-ref", ALICE, "-secret", f"pass:{token}", "-newkey", str(key_file),
        "-subject", f"/CN={ALICE}", "-recipient", "/CN=mailkms", "-implicit_confirm", "-certout", str(tmp_path / "c.pem"),
        at=clock.now(),
    )  # fmt: skip
    answer = handle(services, request)
    assert answer_of(answer)[0] == "cp"
    assert parse_answer(answer).implicit_confirm  # granted: no certConf expected
    with services.db.transaction() as session:
        assert session.execute(select(CMPTransaction)).scalar_one().closed_at is not None
        assert session.execute(select(Token)).scalar_one().cmp_secret is None  # erased with the transaction

    services.users.add(BOB, "", None, "admin:test")  # never used: sealed until it expires
    assert services.cmp.purge() == 0
    with services.db.transaction() as session:
        assert session.execute(select(func.count()).where(Token.cmp_secret.is_not(None))).scalar_one() == 1
    clock.advance(dt.timedelta(days=8))
    assert services.cmp.purge() >= 1
    with services.db.transaction() as session:
        assert session.execute(select(func.count()).where(Token.cmp_secret.is_not(None))).scalar_one() == 0


def test_with_cmp_off_tokens_are_not_sealed_and_nothing_listens(services, settings, clock) -> None:  # type: ignore[no-untyped-def]
    from mailkms.api import create_app
    from mailkms.services import Services

    assert "/.well-known/cmp" in create_app(services).openapi()["paths"]  # on by default

    off = settings.model_copy(update={"cmp": settings.cmp.model_copy(update={"enabled": False})})
    without = Services.build(off, clock)
    try:
        without.users.add(ALICE, "", None, "admin:test")
        with without.db.transaction() as session:
            assert session.execute(select(Token)).scalar_one().cmp_secret is None
        paths = create_app(without).openapi()["paths"]
        assert "/.well-known/cmp" not in paths and "/.well-known/est/simpleenroll" in paths
    finally:
        without.close()


def test_a_mangled_openssl_request_always_gets_a_cmp_error(services, clock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Bytes of a real ir changed, cut or repeated: never an exception, always an error message."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    token = services.users.add(ALICE, "", None, "admin:test")
    original = ir(tmp_path, clock.now(), ALICE, token, generate_key(KeyType.P256))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    @given(
        at=st.integers(min_value=0, max_value=len(original) - 1),
        value=st.integers(min_value=0, max_value=255),
        cut=st.integers(min_value=0, max_value=8),
    )
    def mangle(at: int, value: int, cut: int) -> None:
        data = bytearray(original)
        data[at] = value if data[at] != value else value ^ 0x01
        mangled = bytes(data[: len(data) - cut])
        body, bits, text = answer_of(handle(services, mangled))
        assert body == "error" and len(bits) == 1 and "urn:mailkms:problem:" in text, (body, bits, text)

    mangle()
    assert services.users.show(ALICE).generation == 0  # nothing was issued for a mangled request


def openssl_csr(tmp: Path, key: PrivateKey, subject: str) -> Path:
    """A PKCS#10 request made by `openssl req` (what `openssl cmp -cmd p10cr -csr` sends as it is)."""
    key_file = write_key(tmp / "p10.key", key)
    out = tmp / "p10.csr"
    subprocess.run(
        ["openssl", "req", "-new", "-key", str(key_file), "-subj", subject, "-out", str(out)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return out


def mac_request(tmp: Path, at: dt.datetime, mailbox: str, token: str, *args: str) -> bytes:
    return openssl_request(
        tmp, *args, "-ref", mailbox, "-secret", f"pass:{token}", "-recipient", "/CN=mailkms", at=at
    )  # fmt: skip


def test_p10cr_with_the_token_issues_as_ir_does(services, clock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    token = services.users.add(ALICE, "", None, "admin:test")
    key = generate_key(KeyType.P256)
    other = openssl_csr(tmp_path, key, f"/CN={BOB}")
    p10cr = ("-cmd", "p10cr", "-certout", str(tmp_path / "x.pem"), "-csr")
    refused(
        services, mac_request(tmp_path, clock.now(), ALICE, token, *p10cr, str(other)), CMPFailInfo.BAD_CERT_TEMPLATE
    )
    assert services.users.show(ALICE).generation == 0  # nothing issued, the token still good
    csr = openssl_csr(tmp_path, key, f"/CN={ALICE}")
    answer = handle(services, mac_request(tmp_path, clock.now(), ALICE, token, *p10cr, str(csr)))
    assert answer_of(answer)[0] == "cp", answer_of(answer)
    response = parse_answer(answer).message["body"]["cp"]["response"][0]
    assert int(response["certReqId"]) == -1  # RFC 9483 §4.1.4
    cert = issued_certificate(answer)
    assert same_public_key(cert.public_key(), key.public_key())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == [ALICE]
    assert services.users.show(ALICE).generation == 1


def genp_of(answer: bytes) -> dict[str, object]:
    """{infoType: infoValue DER or None} of a genp."""
    parsed = parse_answer(answer)
    assert parsed.body == "genp", answer_of(answer)
    return {
        str(itav["infoType"]): bytes(itav["infoValue"]) if itav["infoValue"].isValue else None
        for itav in parsed.message["body"]["genp"]
    }


def test_genm_with_the_token_answers_and_leaves_the_token_unspent(services, clock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    token = services.users.add(ALICE, "", None, "admin:test")
    now = clock.now()
    refused(
        services,
        mac_request(tmp_path, now, ALICE, "a-wrong-token", "-cmd", "genm", "-infotype", "caCerts"),
        CMPFailInfo.BAD_MESSAGE_CHECK,
    )
    values = genp_of(handle(services, mac_request(tmp_path, now, ALICE, token, "-cmd", "genm", "-infotype", "caCerts")))
    ca_certs, _ = decoder.decode(values[str(rfc9480.id_it_caCerts)], asn1Spec=rfc9480.CaCertsValue())
    got = [x509.load_der_x509_certificate(encoder.encode(c)) for c in ca_certs]
    assert got == [services.ca.issuing.certificate, services.ca.root]
    types = genp_of(
        handle(services, mac_request(tmp_path, now, ALICE, token, "-cmd", "genm", "-infotype", "signKeyPairTypes"))
    )
    assert types[str(rfc9480.id_it_signKeyPairTypes)]  # rsaEncryption, P-256, P-384
    for name, oid in (
        ("caKeyUpdateInfo", rfc9480.id_it_caKeyUpdateInfo),
        ("certReqTemplate", rfc9480.id_it_certReqTemplate),
    ):
        assert genp_of(
            handle(services, mac_request(tmp_path, now, ALICE, token, "-cmd", "genm", "-infotype", name))
        ) == {
            str(oid): None  # no root CA update, no template required
        }
    services.revocation.publish_crl(force=True)
    crl = genp_of(handle(services, mac_request(tmp_path, now, ALICE, token, "-cmd", "genm", "-infotype", "currentCRL")))
    published = x509.load_der_x509_crl(bytes(crl[str(rfc9480.id_it_currentCRL)]))  # type: ignore[arg-type]
    assert published.issuer == services.ca.issuing.certificate.subject
    # the token still enrols
    assert answer_of(handle(services, ir(tmp_path, now, ALICE, token, generate_key(KeyType.P256))))[0] == "ip"


def test_two_concurrent_kur_with_one_certificate_issue_once(services, clock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two key updates signed with the same current certificate, each with a new key of its own, at
    once (SQLite and PostgreSQL): one renewal, the other a CMP error; never a second generation, and
    never the winner's certificate handed to the loser (whose certConf would reject it)."""
    cert, key = enrolled(services, clock, tmp_path, ALICE)
    clock.advance(YEAR_LATER)
    new_keys = [generate_key(KeyType.P256), generate_key(KeyType.P256)]
    requests = []
    for i, new_key in enumerate(new_keys):
        folder = tmp_path / f"kur{i}"
        folder.mkdir()
        requests.append(kur(folder, clock.now(), cert, key, new_key))
    barrier = threading.Barrier(2)

    def send(data: bytes) -> bytes:
        barrier.wait(timeout=30)
        return handle(services, data)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(send, requests))
    bodies = [answer_of(a) for a in answers]
    won = [i for i, (body, _, _) in enumerate(bodies) if body == "kup"]
    assert len(won) == 1, bodies
    lost = bodies[1 - won[0]]
    assert lost[0] == "error" and lost[1] == [int(CMPFailInfo.SIGNER_NOT_TRUSTED)], lost
    assert "already renewed" in lost[2], lost
    renewed = issued_certificate(answers[won[0]])
    assert same_public_key(renewed.public_key(), new_keys[won[0]].public_key())  # type: ignore[arg-type]
    assert services.users.show(ALICE).generation == 2
    with services.db.read_only() as session:
        signing = session.execute(
            select(func.count()).select_from(Certificate).where(Certificate.kind == "signing")
        ).scalar_one()
    assert signing == 2  # the enrolment's and the one renewal's: no double issue


def test_a_signed_p10cr_is_the_renewal(services, clock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cert, key = enrolled(services, clock, tmp_path, ALICE)
    new_key = generate_key(KeyType.P256)
    csr = openssl_csr(tmp_path, new_key, f"/CN={ALICE}")
    refused(services, signed(tmp_path, clock.now(), "p10cr", cert, key, "-csr", str(csr)), CMPFailInfo.NOT_AUTHORIZED)
    clock.advance(YEAR_LATER)
    answer = handle(services, signed(tmp_path, clock.now(), "p10cr", cert, key, "-csr", str(csr)))
    assert answer_of(answer)[0] == "cp", answer_of(answer)
    assert same_public_key(issued_certificate(answer).public_key(), new_key.public_key())
    assert services.users.show(ALICE).generation == 2


def test_a_signed_genm_for_the_root_ca_update_says_there_is_none(services, clock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """rootCaCert (RFC 9483 §4.3.2), which OpenSSL 3.0 cannot name: openssl's signed genm for
    caCerts, its infoType changed with pyasn1 and signed again with the holder's key."""
    cert, key = enrolled(services, clock, tmp_path, ALICE)
    request = signed(tmp_path, clock.now(), "genm", cert, key, "-infotype", "caCerts")
    message, _ = decoder.decode(request, asn1Spec=rfc9480.PKIMessage())
    message["body"]["genm"][0]["infoType"] = rfc9480.id_it_rootCaCert
    part = rfc9480.ProtectedPart()
    part["header"], part["body"] = message["header"], message["body"]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signature = key.sign(encoder.encode(part), ec.ECDSA(hashes.SHA256()))
    message["protection"] = message["protection"].clone(univ.BitString.fromOctetString(signature))
    assert genp_of(handle(services, encoder.encode(message))) == {str(rfc9480.id_it_rootCaKeyUpdate): None}
    # the same replayed: refused; changed (a fresh nonce) without signing again: refused
    refused(services, encoder.encode(message), CMPFailInfo.BAD_SENDER_NONCE)
    message["header"]["senderNonce"] = message["header"]["senderNonce"].clone(os.urandom(16))
    refused(services, encoder.encode(message), CMPFailInfo.BAD_MESSAGE_CHECK)
