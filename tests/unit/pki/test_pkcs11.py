"""The PKCS#11 key store: RFC 7512 URIs, and token keys (SoftHSM2, initialised here) behind
cryptography's key interface, judged by cryptography's own verification and openssl."""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509.oid import NameOID

from mailkms.errors import ConfigError, KeyStoreUnavailable
from mailkms.pki import CertKind, KeyType, key_type_of, signature_hash_for
from mailkms.pki._pkcs11 import Token, TokenECKey, TokenRSAKey, open_token_key, parse_key_store_uri
from tests.smime_support import require_tools

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def test_uri_parts_and_percent_decoding() -> None:
    uri = parse_key_store_uri(
        "pkcs11:token=My%20CA;object=issuing?module-path=/usr/lib/x.so&pin-source=file:/etc/mailkms/pin%201"
    )
    assert (uri.token, uri.object, uri.module_path) == ("My CA", "issuing", "/usr/lib/x.so")
    assert uri.pin_path == Path("/etc/mailkms/pin 1")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("token=a;object=b", "pkcs11:"),
        ("pkcs11:token=a?module-path=/x.so&pin-source=file:/p", "object"),
        ("pkcs11:token=a;object=b?pin-source=file:/p", "module-path"),
        ("pkcs11:token=a;object=b?module-path=/x.so", "pin-source"),
        ("pkcs11:token=a;object=b?module-path=/x.so&pin-value=1234", "must not hold the PIN"),
        ("pkcs11:token=a;object=b?module-path=/x.so&pin-source=|/bin/echo", "not a command"),
        ("pkcs11:token;object=b?module-path=/x.so&pin-source=file:/p", "malformed"),
    ],
)
def test_bad_uris_are_refused(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_key_store_uri(text)


def test_config_refuses_a_pin_in_the_uri(tmp_path: Path) -> None:
    from mailkms.config import load_settings

    with pytest.raises(ConfigError, match="PIN"):
        load_settings(tmp_path, ca={"key_store": "pkcs11:token=a;object=b?module-path=/x.so&pin-value=1"})


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Token, Path]]:
    require_tools("softhsm2-util", package="softhsm2")
    folder = tmp_path_factory.mktemp("softhsm")
    (folder / "tokens").mkdir()
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "unit", "--pin", "1111", "--so-pin", "2222"],
        check=True,
        capture_output=True,
    )
    (folder / "pin").write_text("1111\n")
    uri = f"pkcs11:token=unit;object=ca?module-path={MODULE}&pin-source=file:{folder / 'pin'}"
    tok = Token.for_uri(uri)
    tok.session()  # C_Initialize after SOFTHSM2_CONF is set (the library is one per process)
    tok.forget()
    import pkcs11

    pkcs11.lib(MODULE).reinitialize()  # an earlier test in this process may have read another conf
    try:
        yield tok, folder
    finally:
        tok.forget()
        if old is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old


def _self_signed(key: TokenRSAKey | TokenECKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token test")])
    now = dt.datetime.now(dt.UTC)
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
    builder = builder.serial_number(x509.random_serial_number()).not_valid_before(now)
    return builder.not_valid_after(now + dt.timedelta(days=1)).sign(key, signature_hash_for(key))


@pytest.mark.parametrize("kind", [KeyType.P256, KeyType.P384, KeyType.RSA2048])
def test_token_keys_sign_what_cryptography_builds(token: tuple[Token, Path], kind: KeyType, tmp_path: Path) -> None:
    tok, _ = token
    key = tok.generate(kind, os.urandom(8), f"unit-{kind.value}")
    assert key_type_of(key) == kind
    cert = _self_signed(key)
    cert.verify_directly_issued_by(cert)  # cryptography checks the token's signature
    again = open_token_key(key.reference)  # as a signer process opens it
    assert again.public_key() == key.public_key()
    pem = tmp_path / "c.pem"
    from cryptography.hazmat.primitives.serialization import Encoding

    pem.write_bytes(cert.public_bytes(Encoding.PEM))
    done = subprocess.run(
        ["openssl", "verify", "-check_ss_sig", "-CAfile", str(pem), str(pem)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_token_keys_do_not_leave_the_token(token: tuple[Token, Path]) -> None:
    tok, _ = token
    rsa_key = tok.generate(KeyType.RSA2048, os.urandom(8), "unit-export")
    assert isinstance(rsa_key, TokenRSAKey)
    with pytest.raises(TypeError):
        rsa_key.private_numbers()
    with pytest.raises(TypeError):
        rsa_key.private_bytes()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        pickle.dumps(rsa_key)
    with pytest.raises(TypeError, match=r"PKCS#1 v1\.5"):  # PSS is not offered: said, not silently wrong
        rsa_key.sign(b"x", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    ec_key = tok.generate(KeyType.P256, os.urandom(8), "unit-export-ec")
    with pytest.raises(TypeError):
        ec_key.exchange(ec.ECDH(), ec.generate_private_key(ec.SECP256R1()).public_key())  # type: ignore[union-attr]


def test_wrong_pin_and_missing_token_are_key_store_unavailable(token: tuple[Token, Path]) -> None:
    _, folder = token
    for opened in list(Token._open.values()):  # log-in is per process: log out (close every session) first
        opened.forget()
    wrong = folder / "wrong-pin"
    wrong.write_text("9999\n")
    bad_pin = Token.for_uri(f"pkcs11:token=unit;object=ca?module-path={MODULE}&pin-source=file:{wrong}")
    with pytest.raises(KeyStoreUnavailable, match="log-in failed"):
        bad_pin.session()
    missing = Token.for_uri(f"pkcs11:token=absent;object=ca?module-path={MODULE}&pin-source=file:{wrong}")
    with pytest.raises(KeyStoreUnavailable, match="not present"):
        missing.session()
    no_pin_file = Token.for_uri(f"pkcs11:token=unit;object=ca?module-path={MODULE}&pin-source=file:{folder}/nope")
    with pytest.raises(ConfigError, match="PIN"):
        no_pin_file.session()


def _objects_with_id(key_id: bytes) -> list[str]:
    """What the token itself holds under this CKA_ID, read on a session of our own (python-pkcs11)."""
    import pkcs11

    with _own_session() as session:
        return sorted(str(o.object_class.name) for o in session.get_objects({pkcs11.Attribute.ID: key_id}))


def _own_session() -> Any:
    import pkcs11

    token = pkcs11.lib(MODULE).get_token(token_label="unit")
    try:
        return token.open(user_pin="1111")
    except pkcs11.exceptions.UserAlreadyLoggedIn:  # the log-in is the process's, shared by its sessions
        return token.open()


def test_retired_token_keys_are_destroyed_once_their_certificates_expired(
    token: tuple[Token, Path], tmp_path: Path
) -> None:
    """Issue 15 §1: OCSP-responder (30 days) and mail-signer (12 months) keys renewed in the token are
    destroyed there once the certificate of the old key has expired, not before; a token that is away
    at that moment is tried again at the next check."""
    from mailkms.clock import UTC, FakeClock
    from mailkms.services import CAContext, CAPaths
    from tests.testca import URLS as urls
    from tests.testca import init_server_ca

    tok, folder = token
    uri = f"pkcs11:token=unit;object=retire?module-path={MODULE}&pin-source=file:{folder / 'pin'}"
    start = dt.datetime(2026, 3, 1, 10, 0, 0, tzinfo=UTC)
    clock, paths = FakeClock(start), CAPaths(tmp_path / "data")
    names, mail_from = ["kms.example.org"], "mailkms@kms.example.org"
    init_server_ca(paths, clock, key_store=uri)
    ctx = CAContext.load(paths, passphrase_env="", urls=urls, key_store=uri)
    first = ctx.require_ocsp_responder()
    assert isinstance(first.private_key, TokenRSAKey | TokenECKey)
    first_id = first.private_key.reference.key_id
    assert _objects_with_id(first_id) == ["PRIVATE_KEY", "PUBLIC_KEY"]

    clock.set(start + dt.timedelta(days=21))  # renewed 10 days before the 30-day certificate ends
    assert "ocsp-responder" in ctx.ensure_server_identities(names, mail_from, clock)
    assert _objects_with_id(first_id) == ["PRIVATE_KEY", "PUBLIC_KEY"]  # its certificate is still valid

    # The token refuses at the moment the key is due: kept, and destroyed at the next check.
    clock.set(first.certificate.not_valid_after_utc + dt.timedelta(seconds=1))
    (folder / "pin").write_text("9999\n")
    Token.for_uri(uri).forget()
    tok.forget()
    try:
        assert "ocsp-key-destroyed" not in ctx.ensure_server_identities(names, mail_from, clock)
    finally:
        (folder / "pin").write_text("1111\n")
    assert _objects_with_id(first_id) == ["PRIVATE_KEY", "PUBLIC_KEY"]
    assert ctx.ensure_server_identities(names, mail_from, clock) == ["ocsp-key-destroyed"]
    assert _objects_with_id(first_id) == []
    current = ctx.require_ocsp_responder()
    assert isinstance(current.private_key, TokenRSAKey | TokenECKey)
    assert _objects_with_id(current.private_key.reference.key_id) == ["PRIVATE_KEY", "PUBLIC_KEY"]

    mail = ctx.require_mail_signer()
    assert isinstance(mail.private_key, TokenRSAKey | TokenECKey)
    clock.set(mail.certificate.not_valid_after_utc - dt.timedelta(days=80))  # renewed 90 days before its end
    assert "mail-signer" in ctx.ensure_server_identities(names, mail_from, clock)
    assert _objects_with_id(mail.private_key.reference.key_id) == ["PRIVATE_KEY", "PUBLIC_KEY"]
    clock.set(mail.certificate.not_valid_after_utc + dt.timedelta(hours=1))
    assert "mail-key-destroyed" in ctx.ensure_server_identities(names, mail_from, clock)
    assert _objects_with_id(mail.private_key.reference.key_id) == []
    assert json.loads(paths.retired_token_keys.read_text()) == [] or all(
        dt.datetime.fromisoformat(e["not_after"]) > clock.now()
        for e in json.loads(paths.retired_token_keys.read_text())
    )


def test_a_locked_pin_is_key_store_unavailable_with_what_to_do(
    token: tuple[Token, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CKR_PIN_LOCKED. SoftHSM2 has no retry counter (its maintainers: SoftHSMv2 issues 221 and 399), so
    the token's C_Login is stood in for here; a wrong PIN is tried for real above and in test_hsm_e2e."""
    import pkcs11.exceptions as p11

    _, folder = token

    class LockedToken:
        def open(self, **_: object) -> None:
            raise p11.PinLocked()

    class Lib:
        def get_token(self, **_: object) -> LockedToken:
            return LockedToken()

    locked = Token.for_uri(f"pkcs11:token=unit;object=locked?module-path={MODULE}&pin-source=file:{folder / 'pin'}")
    monkeypatch.setattr(locked, "_lib", Lib)
    with pytest.raises(KeyStoreUnavailable, match=r"PIN is locked after too many wrong tries.*SO PIN") as caught:
        locked.session()
    assert caught.value.http_status == 503 and caught.value.exit_code == 75  # cli/_exit.py: exit 75
    assert "1111" not in str(caught.value)


def _token_attributes(key_id: bytes) -> dict[str, object]:
    import pkcs11
    from pkcs11 import Attribute

    with _own_session() as session:
        private = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, id=key_id)
        wanted = ("SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE", "SIGN", "DECRYPT")
        return {name: bool(private[getattr(Attribute, name)]) for name in wanted}


def test_an_existing_soft_ca_is_migrated_into_the_token(token: tuple[Token, Path], tmp_path: Path) -> None:
    """`mailkms ca migrate-key --key-store URI` (the real command): the issuing CA, OCSP-responder and
    mail-signer keys go into the token, sensitive and not extractable by the token's own attributes;
    the key files are gone; the server then signs with the token; a second run is refused (exit 5)."""
    from mailkms.clock import UTC, FakeClock
    from mailkms.config import load_settings
    from mailkms.services import CAContext, CAPaths
    from tests.testca import URLS, init_server_ca

    _, folder = token
    uri = f"pkcs11:token=unit;object=migrated?module-path={MODULE}&pin-source=file:{folder / 'pin'}"
    clock, paths = FakeClock(dt.datetime(2026, 3, 1, tzinfo=UTC)), CAPaths(tmp_path / "data")
    init_server_ca(paths, clock, KeyType.RSA3072)
    env = {**os.environ, "MAILKMS_DATA": str(paths.data_dir), "PYTHONDONTWRITEBYTECODE": ""}
    command = [str(Path(sys.executable).parent / "mailkms"), "ca", "migrate-key", "--key-store", uri, "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    moved = json.loads(done.stdout)["migrated"]
    assert [(m["role"], m["label"]) for m in moved] == [
        ("issuing", "migrated"),
        ("ocsp", "migrated-ocsp"),
        ("mail", "migrated-mail"),
    ]
    for key_path in (paths.issuing_key, paths.ocsp_key, paths.mail_key):
        assert not key_path.exists() and key_path.with_suffix(".pkcs11").exists()
    for m in moved:
        assert _token_attributes(bytes.fromhex(m["id"])) == {
            "SENSITIVE": True,
            "EXTRACTABLE": False,
            "ALWAYS_SENSITIVE": False,  # the token says the truth: the key was outside before
            "NEVER_EXTRACTABLE": False,
            "SIGN": True,
            "DECRYPT": False,
        }
    assert load_settings(paths.data_dir).ca.key_store == uri
    ctx = CAContext.load(paths, passphrase_env="", urls=URLS, key_store=uri)
    assert isinstance(ctx.issuing.private_key, TokenRSAKey)
    issued = ctx.issuer.issue(
        ctx.issuer.prepare_ocsp_responder(ec.generate_private_key(ec.SECP256R1()).public_key(), clock.now())
    )
    issued.verify_directly_issued_by(ctx.issuing.certificate)  # signed in the token, verifies under the old certificate

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 5 and "in a token already" in again.stdout, again.stdout + again.stderr


def test_migration_keeps_the_file_when_the_tokens_signature_does_not_verify(
    token: tuple[Token, Path], tmp_path: Path
) -> None:
    from mailkms.clock import UTC, FakeClock
    from mailkms.errors import Internal
    from mailkms.services import CAPaths, migrate_keys_to_token
    from tests.testca import init_server_ca

    _, folder = token
    uri = f"pkcs11:token=unit;object=mismatch?module-path={MODULE}&pin-source=file:{folder / 'pin'}"
    paths = CAPaths(tmp_path / "data")
    init_server_ca(paths, FakeClock(dt.datetime(2026, 3, 1, tzinfo=UTC)))
    paths.issuing_cert.write_bytes(paths.infrastructure_cert.read_bytes())  # a certificate of another key
    before = paths.issuing_key.read_bytes()
    passphrase = paths.passphrase_file.read_bytes().strip()
    with pytest.raises(Internal, match="does not verify"):
        migrate_keys_to_token(paths, passphrase, uri)
    assert paths.issuing_key.read_bytes() == before and not paths.issuing_key.with_suffix(".pkcs11").exists()
    assert Token.for_uri(uri).find_label("mismatch") is None  # destroyed again in the token


def test_the_offline_root_key_goes_into_a_token_for_the_ceremony(token: tuple[Token, Path], tmp_path: Path) -> None:
    """`mailkms ca root-ceremony migrate-key` (the real command) puts the root folder's key into the
    token; the next ceremony (`sign-crl`) signs with the token and asks no root passphrase. Judged by
    the token's attributes, `openssl crl -CAfile root` and pkilint (ARL); the server imports the CRL."""
    from mailkms.clock import UTC, FakeClock
    from mailkms.services import CAPaths, import_signed
    from tests.judges import pkilint
    from tests.testca import init_server_ca

    _, folder = token
    uri = f"pkcs11:token=unit;object=offline-root?module-path={MODULE}&pin-source=file:{folder / 'pin'}"
    paths, root_dir, secret = CAPaths(tmp_path / "data"), tmp_path / "root", "a root passphrase for this test run"
    init_server_ca(
        paths, FakeClock(dt.datetime.now(UTC)), KeyType.P384, offline_root=root_dir, root_passphrase=secret.encode()
    )
    mailkms = str(Path(sys.executable).parent / "mailkms")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": ""}
    env.pop("MAILKMS_ROOT_PASSPHRASE", None)
    moved = subprocess.run(
        [mailkms, "ca", "root-ceremony", "migrate-key", "--root", str(root_dir), "--key-store", uri, "--json"],
        env={**env, "MAILKMS_ROOT_PASSPHRASE": secret},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert not (root_dir / "root.key.pem").exists() and (root_dir / "root.key.pkcs11").exists()
    attributes = _token_attributes(bytes.fromhex(json.loads(moved.stdout)["id"]))
    assert attributes["SENSITIVE"] and not attributes["EXTRACTABLE"], attributes

    crl_file = tmp_path / "root.crl"
    signed = subprocess.run(
        [mailkms, "ca", "root-ceremony", "sign-crl", "--root", str(root_dir), "--out", str(crl_file), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,  # no terminal and no passphrase: the token's PIN file is enough
    )
    assert signed.returncode == 0, signed.stdout + signed.stderr
    assert json.loads(signed.stdout)["crl_number"] == 2
    checked = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", str(crl_file), "-CAfile", str(root_dir / "root.crt.pem"), "-noout"],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr, checked.stdout + checked.stderr
    pem = x509.load_der_x509_crl(crl_file.read_bytes()).public_bytes(serialization.Encoding.PEM)
    verdict = pkilint("lint_crl", ["-t", "ARL", "-p", "BR", "-s", "WARNING"], pem)
    assert verdict.exit_code == 0, str(verdict)
    passphrase = paths.passphrase_file.read_bytes().strip()
    assert import_signed(paths, passphrase, crl_file.read_bytes(), dt.datetime.now(UTC)).serial == 2


def test_a_ceremony_rekey_makes_the_new_issuing_key_in_the_token(token: tuple[Token, Path], tmp_path: Path) -> None:
    """Issue 15: with [ca] key_store, `ca request --kind issuing --new-key` makes the new key inside the
    token (pending: its reference only); `ca import` of the root's certificate for it puts that
    reference in place and keeps the old one in previous/<SKI>/, whose key still signs (OCSP)."""
    from mailkms.clock import UTC, FakeClock
    from mailkms.services import CAContext, CAPaths, import_signed, request_intermediate
    from mailkms.services._ca_rekey import key_id
    from mailkms.services._offline_root import RootCeremony
    from tests.testca import URLS as urls
    from tests.testca import init_server_ca

    _, folder = token
    uri = f"pkcs11:token=unit;object=offline-rekey?module-path={MODULE}&pin-source=file:{folder / 'pin'}"
    start = dt.datetime(2026, 3, 1, 10, 0, 0, tzinfo=UTC)
    paths, root_dir, secret = CAPaths(tmp_path / "data"), tmp_path / "root", b"a root passphrase for this test run"
    init_server_ca(paths, FakeClock(start), KeyType.P256, offline_root=root_dir, root_passphrase=secret, key_store=uri)
    passphrase = paths.passphrase_file.read_bytes().strip()
    old_ref = json.loads((paths.ca_dir / "issuing.key.pkcs11").read_text())
    old_ca = x509.load_pem_x509_certificate(paths.issuing_cert.read_bytes())

    csr = request_intermediate(paths, passphrase, CertKind.ISSUING_CA, new_key=True, key_store=uri, now=start)
    pending = paths.pending_dir / "issuing-ca.key.pkcs11"
    assert pending.exists() and not (paths.pending_dir / "issuing-ca.key.pem").exists()
    new_ref = json.loads(pending.read_text())
    attributes = _token_attributes(bytes.fromhex(new_ref["id"]))
    assert attributes["SENSITIVE"] and not attributes["EXTRACTABLE"], attributes
    _, new_ca = RootCeremony.open(root_dir, secret).sign_intermediate(csr, start)
    done = import_signed(paths, passphrase, new_ca.public_bytes(serialization.Encoding.PEM), start)
    assert done.rekeyed is not None and done.rekeyed.new_key_id == key_id(new_ca)
    assert json.loads((paths.ca_dir / "issuing.key.pkcs11").read_text()) == new_ref and not pending.exists()
    kept = paths.previous_dir / key_id(old_ca)
    assert json.loads((kept / "issuing.key.pkcs11").read_text()) == old_ref
    assert not any(p.name.endswith("key.pem") for p in kept.iterdir())  # no key left the token

    ctx = CAContext.load(paths, passphrase_env="", urls=urls, key_store=uri)
    assert ctx.issuing.certificate == new_ca
    assert isinstance(ctx.issuing.private_key, TokenRSAKey | TokenECKey)
    assert ctx.issuing.private_key.reference.key_id.hex() == new_ref["id"]
    [previous] = ctx.previous_issuers()
    assert previous.certificate == old_ca and previous.private_key.public_key() == old_ca.public_key()
