"""Issue 15: the offline root's ceremony gives the S/MIME issuing CA a new key, on real files and a
FakeClock. `ca request --new-key` makes the key (pending), the ceremony signs the CSR, `ca import`
keeps the old pair in DATA/ca/previous/<old SKI>/ as `ca rekey` does and a running server takes the
new key through the CA-file reload. pkilint judges the new certificate, openssl verify both chains."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailkms.errors import Conflict, Malformed
from mailkms.pki import CertKind, KeyType, generate_key, issued_by, load_private_key, subscriber_validity
from mailkms.services import CAContext, import_signed, request_intermediate
from mailkms.services._ca_rekey import key_id
from mailkms.services._offline_root import make_csr
from tests.judges import lint_pkix, lint_serverauth, openssl_verify
from tests.unit.services.test_offline_root import START, URLS, World, _init


def _leaf(ctx: CAContext, mailbox: str, now: dt.datetime) -> x509.Certificate:
    key = generate_key(KeyType.P256)
    prepared = ctx.issuer.prepare_subscriber(
        CertKind.SIGNING, mailbox, key.public_key(), subscriber_validity(now, 12), list(KeyType)
    )
    return ctx.issuer.issue(prepared)


def _ca_files(w: World) -> dict[str, bytes]:
    ca = w.paths.ca_dir
    return {str(p.relative_to(ca)): p.read_bytes() for p in sorted(ca.rglob("*")) if p.is_file()}


def test_the_ceremony_gives_the_issuing_ca_a_new_key(tmp_path: Path) -> None:
    w = _init(tmp_path, KeyType.P256)
    running = CAContext.load(w.paths, passphrase_env="", urls=URLS)  # a server started before
    old_ca = running.issuing.certificate
    old_key_pem = w.paths.issuing_key.read_bytes()
    old_leaf = _leaf(running, "alice@example.org", START)

    w.clock.set(START + dt.timedelta(days=30))
    csr_pem = request_intermediate(w.paths, w.passphrase, CertKind.ISSUING_CA, new_key=True, now=w.clock.now())
    csr = x509.load_pem_x509_csr(csr_pem)
    pending = w.paths.pending_dir / "issuing-ca.key.pem"
    assert csr.is_signature_valid and csr.subject == old_ca.subject
    assert csr.public_key() != old_ca.public_key()
    assert load_private_key(pending.read_bytes(), w.passphrase).public_key() == csr.public_key()
    assert pending.stat().st_mode & 0o077 == 0
    assert w.paths.issuing_key.read_bytes() == old_key_pem  # nothing in use changes before the import
    again = request_intermediate(w.paths, w.passphrase, CertKind.ISSUING_CA, new_key=True, now=w.clock.now())
    assert x509.load_pem_x509_csr(again).public_key() == csr.public_key()  # asked again: the same pending key

    kind, new_ca = w.ceremony().sign_intermediate(csr_pem, w.clock.now())
    assert kind is CertKind.ISSUING_CA
    assert new_ca.subject == old_ca.subject and key_id(new_ca) != key_id(old_ca)
    assert issued_by(new_ca, running.root)
    for verdict in (lint_pkix(new_ca), lint_serverauth(new_ca, "-d")):
        assert verdict.exit_code == 0, str(verdict)

    done = import_signed(w.paths, w.passphrase, new_ca.public_bytes(serialization.Encoding.PEM), w.clock.now())
    assert done.what == "issuing-ca" and done.serial == new_ca.serial_number
    assert done.rekeyed is not None
    assert (done.rekeyed.old_key_id, done.rekeyed.new_key_id) == (key_id(old_ca), key_id(new_ca))
    kept = w.paths.previous_dir / key_id(old_ca)
    assert done.rekeyed.kept_in == kept
    assert x509.load_pem_x509_certificate((kept / "issuing.crt.pem").read_bytes()) == old_ca
    assert (kept / "issuing.key.pem").read_bytes() == old_key_pem
    assert (kept / "issuing.key.pem").stat().st_mode & 0o077 == 0
    assert json.loads((kept / "retired.json").read_text())["serial"] == f"{old_ca.serial_number:x}"
    assert x509.load_pem_x509_certificate(w.paths.issuing_cert.read_bytes()) == new_ca
    in_use = load_private_key(w.paths.issuing_key.read_bytes(), w.passphrase)
    assert in_use.public_key() == new_ca.public_key() and w.paths.issuing_key.stat().st_mode & 0o077 == 0
    assert not any(w.paths.pending_dir.glob("issuing-ca.*"))

    assert running.reload_from_files() == ["issuing-ca"]  # serve: every reload_check_seconds / SIGHUP
    assert running.issuing.certificate == new_ca and running.previous_issuing == [old_ca]
    assert [s.certificate for s in running.previous_issuers()] == [old_ca]  # answers OCSP for old_leaf
    assert running.issued_here(old_leaf)
    new_leaf = _leaf(running, "bob@example.org", w.clock.now())
    assert issued_by(new_leaf, new_ca) and not issued_by(new_leaf, old_ca)
    at = w.clock.now() + dt.timedelta(hours=1)
    for leaf, ca in ((new_leaf, new_ca), (old_leaf, old_ca)):
        verdict = openssl_verify(leaf, running.root, [ca], purpose="smimesign", at=at)
        assert verdict.exit_code == 0, str(verdict)
    assert openssl_verify(old_leaf, running.root, [new_ca], purpose="smimesign", at=at).exit_code != 0

    # Imported twice: refused, nothing written.
    before = _ca_files(w)
    with pytest.raises(Conflict, match="already in use"):
        import_signed(w.paths, w.passphrase, new_ca.public_bytes(serialization.Encoding.DER), w.clock.now())
    assert _ca_files(w) == before
    fresh = CAContext.load(w.paths, passphrase_env="", urls=URLS)
    assert fresh.issuing.certificate == new_ca and fresh.previous_issuing == [old_ca]


def test_a_certificate_for_an_unknown_key_is_refused(tmp_path: Path) -> None:
    """The root signed the issuing CA's name for a key this server never made (no request, or another
    request's): refused before anything is written; the pending key stays for the right certificate."""
    w = _init(tmp_path, KeyType.P256)
    old_ca = x509.load_pem_x509_certificate(w.paths.issuing_cert.read_bytes())
    request_intermediate(w.paths, w.passphrase, CertKind.ISSUING_CA, new_key=True, now=START)
    stranger = make_csr(generate_key(KeyType.P256), old_ca.subject)
    _, foreign = w.ceremony().sign_intermediate(stranger, START)
    before = _ca_files(w)
    with pytest.raises(Malformed, match="no key of this server"):
        import_signed(w.paths, w.passphrase, foreign.public_bytes(serialization.Encoding.PEM), START)
    assert _ca_files(w) == before and not w.paths.previous_dir.exists()
