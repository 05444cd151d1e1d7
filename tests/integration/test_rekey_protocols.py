"""After `mailkms ca rekey` every protocol knows both issuing CAs (issue 15): EST /cacerts lists the
new and the replaced issuing CA and the root (openssl pkcs7 reads three), following the reload of a
running app; CMP kur signed with a certificate of the replaced key is the renewal, answered with a
certificate of the new key (the request made by `openssl cmp`). The client's side (a delivery carries
both CAs and the client keeps the old one) is in tests/e2e/test_ca_rekey_e2e.py."""

from __future__ import annotations

import base64
import datetime as dt
import subprocess

from cryptography.hazmat.primitives.serialization import pkcs7
from fastapi.testclient import TestClient

from mailkms.api import create_app
from mailkms.pki import KeyType, generate_key, issued_by, same_public_key
from mailkms.pki._cmp import parse_request as parse_cmp_request
from mailkms.pki._cmp import verify_signature as verify_cmp_signature
from mailkms.services import rekey_issuing_ca
from tests.cmp_support import answer_of, issued_certificate
from tests.conftest import CA_PASSPHRASE
from tests.integration.test_cmp_service import ALICE, YEAR_LATER, enrolled, handle, kur, signed


def test_est_cmp_and_deliveries_know_both_issuing_cas_after_a_rekey(services, clock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    services.ensure_server_identities()
    app = TestClient(create_app(services))  # built before the rekey, as a running server's
    old_ca = services.ca.issuing.certificate
    cert, key = enrolled(services, clock, tmp_path, ALICE)  # by CMP ir, from the old key
    assert issued_by(cert, old_ca)

    rekey_issuing_ca(services.ca.paths, CA_PASSPHRASE.encode(), "", services.ca.urls, clock.now())
    services.reload_ca()
    new_ca = services.ca.issuing.certificate

    # EST cacerts follows the reload: new issuing CA, the replaced one, the root.
    got = app.get("/.well-known/est/cacerts")
    assert got.status_code == 200
    der = base64.b64decode(got.content)
    listed = pkcs7.load_der_pkcs7_certificates(der)  # a SET: DER order, not ours
    assert len(listed) == 3 and set(listed) == {new_ca, old_ca, services.ca.root}
    printed = subprocess.run(
        ["openssl", "pkcs7", "-inform", "DER", "-print_certs", "-noout"], input=der, capture_output=True, timeout=60
    )
    assert printed.returncode == 0 and printed.stdout.count(b"subject=") == 3, printed.stdout + printed.stderr

    # CMP kur with the old key's certificate, once due: a certificate of the new key.
    clock.advance(YEAR_LATER)
    services.ensure_server_identities()
    new_key = generate_key(KeyType.P256)
    answer = handle(services, kur(tmp_path, clock.now(), cert, key, new_key))
    assert answer_of(answer)[0] == "kup", answer_of(answer)
    renewed = issued_certificate(answer)
    assert issued_by(renewed, new_ca) and same_public_key(renewed.public_key(), new_key.public_key())  # type: ignore[arg-type]

    # genm caCerts (signed with the old key's certificate, which is still valid) names both issuing CAs.
    assert services.ca.issuing_certificates(clock.now()) == (new_ca, old_ca)


def test_cmp_after_a_rekey_signs_with_the_new_key_and_hands_each_certificate_its_own_chain(  # type: ignore[no-untyped-def]
    services, clock, tmp_path
) -> None:
    """A running server that took a `ca rekey` protects its CMP answers with the new key at once (the
    CMP service was built before the rekey), and a repeated kur (the client lost the answer) whose
    certificate the old key signed gets the old issuing CA as its chain in extraCerts."""
    services.ensure_server_identities()
    old_ca = services.ca.issuing.certificate
    cert, key = enrolled(services, clock, tmp_path, ALICE)
    clock.advance(YEAR_LATER)
    services.ensure_server_identities()
    new_key = generate_key(KeyType.P256)
    first = handle(services, kur(tmp_path, clock.now(), cert, key, new_key))
    assert answer_of(first)[0] == "kup", answer_of(first)
    renewed = issued_certificate(first)
    assert issued_by(renewed, old_ca)

    rekey_issuing_ca(services.ca.paths, CA_PASSPHRASE.encode(), "", services.ca.urls, clock.now())
    services.reload_ca()
    new_ca = services.ca.issuing.certificate
    again = handle(services, kur(tmp_path, clock.now(), cert, key, new_key))
    assert answer_of(again)[0] == "kup", answer_of(again)
    assert issued_certificate(again) == renewed  # the same certificate, not a second one
    extra = parse_cmp_request(again).extra_certs
    assert extra[0] == new_ca  # the protection: the key the server holds now
    assert old_ca in extra  # the chain of the certificate handed back: the key that signed it
    assert services.ca.chain_of(renewed) == (old_ca, services.ca.root)
    assert services.ca.chain_of(new_ca) == (services.ca.issuing.certificate, services.ca.root)  # (the root's AKI)


def test_a_replaced_issuing_ca_leaves_cacerts_and_deliveries_once_expired(services, clock) -> None:  # type: ignore[no-untyped-def]
    """EST cacerts, CMP caCerts and the delivery mail hand out a replaced issuing CA only while it is
    valid: once it has expired, so has everything it issued."""
    services.ensure_server_identities()
    old_ca = services.ca.issuing.certificate
    rekey_issuing_ca(services.ca.paths, CA_PASSPHRASE.encode(), "", services.ca.urls, clock.now())
    services.reload_ca()
    new_ca = services.ca.issuing.certificate
    assert new_ca.not_valid_after_utc > old_ca.not_valid_after_utc
    assert services.ca.issuing_certificates(old_ca.not_valid_after_utc) == (new_ca, old_ca)  # its last second
    later = old_ca.not_valid_after_utc + dt.timedelta(seconds=1)
    assert services.ca.issuing_certificates(later) == (new_ca,)
    clock.set(later)
    got = TestClient(create_app(services)).get("/.well-known/est/cacerts")
    assert got.status_code == 200
    assert set(pkcs7.load_der_pkcs7_certificates(base64.b64decode(got.content))) == {new_ca, services.ca.root}


def test_cmp_answers_are_signed_by_the_new_key_after_a_reload(services, clock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every CMP answer, an error to garbage included, is signed (signature checked) by the issuing
    key the server holds: the old one before the reload, the new one right after."""
    services.ensure_server_identities()
    old_ca = services.ca.issuing.certificate
    cert, key = enrolled(services, clock, tmp_path, ALICE)  # the CMP service is built and has answered
    assert verify_cmp_signature(parse_cmp_request(handle(services, b"not a PKIMessage"))) == old_ca

    rekey_issuing_ca(services.ca.paths, CA_PASSPHRASE.encode(), "", services.ca.urls, clock.now())
    services.reload_ca()
    new_ca = services.ca.issuing.certificate
    assert verify_cmp_signature(parse_cmp_request(handle(services, b"not a PKIMessage"))) == new_ca
    genp = handle(services, signed(tmp_path, clock.now(), "genm", cert, key, "-infotype", "caCerts"))
    assert answer_of(genp)[0] == "genp"  # asked with the old key's certificate
    assert verify_cmp_signature(parse_cmp_request(genp)) == new_ca
