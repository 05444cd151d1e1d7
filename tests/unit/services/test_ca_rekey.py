"""`mailkms ca rekey` (issue 15, a new key for the issuing CA), on real files and a FakeClock: the
issuing CA gets a new key pair under the same name, signed by the root; the old pair is kept; a
running server takes it through the CA-file reload; what the old key issued is still this CA's for
renewal. pkilint and openssl judge the new certificate."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailkms.clock import UTC, FakeClock
from mailkms.errors import ConfigError
from mailkms.pki import CertKind, KeyType, PublicURLs, generate_key, issued_by, subscriber_validity
from mailkms.services import CAContext, CAPaths, rekey_issuing_ca
from mailkms.services._ca_rekey import key_id
from tests.judges import lint_pkix, lint_serverauth, openssl_verify
from tests.testca import init_server_ca

URLS = PublicURLs("http://kms.example.org/")
START = dt.datetime(2026, 3, 1, 10, 0, 0, tzinfo=UTC)
NAMES, MAIL_FROM = ["kms.example.org"], "mailkms@kms.example.org"


def _leaf(ctx: CAContext, mailbox: str) -> x509.Certificate:
    key = generate_key(KeyType.P256)
    prepared = ctx.issuer.prepare_subscriber(
        CertKind.SIGNING, mailbox, key.public_key(), subscriber_validity(START, 12), list(KeyType)
    )
    return ctx.issuer.issue(prepared)


def test_rekey_makes_a_new_key_that_a_running_server_takes(tmp_path: Path) -> None:
    clock = FakeClock(START)
    paths = CAPaths(tmp_path / "data")
    init_server_ca(paths, clock, KeyType.P256)
    passphrase = paths.passphrase_file.read_bytes().strip()
    running = CAContext.load(paths, passphrase_env="", urls=URLS)
    old_ca = running.issuing.certificate
    old_leaf = _leaf(running, "alice@example.org")
    old_responder = running.ocsp_responder
    assert old_responder is not None

    clock.set(START + dt.timedelta(days=1))
    done = rekey_issuing_ca(paths, passphrase, "", URLS, clock.now())
    new_ca = x509.load_pem_x509_certificate(paths.issuing_cert.read_bytes())
    assert done.old_key_id == key_id(old_ca) != done.new_key_id == key_id(new_ca)
    assert new_ca.subject == old_ca.subject and new_ca.public_key() != old_ca.public_key()
    assert issued_by(new_ca, running.root)
    for verdict in (lint_pkix(new_ca), lint_serverauth(new_ca, "-d")):
        assert verdict.exit_code == 0, str(verdict)
    kept = x509.load_pem_x509_certificate((done.kept_in / "issuing.crt.pem").read_bytes())
    assert kept == old_ca and (done.kept_in / "issuing.key.pem").stat().st_mode & 0o077 == 0

    assert running.reload_from_files() == ["issuing-ca"]  # serve: every reload_check_seconds / SIGHUP
    assert running.issuing.certificate == new_ca
    assert running.issuing.private_key.public_key() == new_ca.public_key()
    assert running.previous_issuing == [old_ca]
    assert running.issued_here(old_leaf)  # renewal accepts what the old key issued
    new_leaf = _leaf(running, "bob@example.org")
    assert issued_by(new_leaf, new_ca) and not issued_by(new_leaf, old_ca)
    at = clock.now() + dt.timedelta(hours=1)
    for leaf, ca in ((new_leaf, new_ca), (old_leaf, old_ca)):
        verdict = openssl_verify(leaf, running.root, [ca], purpose="smimesign", at=at)
        assert verdict.exit_code == 0, str(verdict)
    wrong = openssl_verify(old_leaf, running.root, [new_ca], purpose="smimesign", at=at)
    assert wrong.exit_code != 0  # a new key, not a new certificate for the old one

    assert "ocsp-responder" in running.ensure_server_identities(NAMES, MAIL_FROM, clock)
    assert running.ocsp_responder is not None and issued_by(running.ocsp_responder.certificate, new_ca)
    # A second process loading afresh sees the same: new key, old certificate remembered.
    fresh = CAContext.load(paths, passphrase_env="", urls=URLS)
    assert fresh.issuing.certificate == new_ca and fresh.previous_issuing == [old_ca]
    pem = new_ca.public_bytes(serialization.Encoding.PEM)
    assert pem not in (done.kept_in / "issuing.crt.pem").read_bytes()


def test_rekey_needs_the_root(tmp_path: Path) -> None:
    clock = FakeClock(START)
    paths = CAPaths(tmp_path / "data")
    init_server_ca(paths, clock, KeyType.P256, offline_root=tmp_path / "root", root_passphrase=b"root passphrase x")
    before = paths.issuing_cert.read_bytes()
    with pytest.raises(ConfigError, match="offline"):
        rekey_issuing_ca(paths, paths.passphrase_file.read_bytes().strip(), "", URLS, clock.now())
    assert paths.issuing_cert.read_bytes() == before
