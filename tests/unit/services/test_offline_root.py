"""The offline root's files and ceremonies (issue 15 §2), on real files and a FakeClock: the data
folder never holds the root key, the ceremony signs intermediates from the server's CSRs and the
root CRL, and the server imports only what its own root signed. pkilint judges what is signed."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailkms.clock import UTC, FakeClock
from mailkms.config import load_settings
from mailkms.errors import Conflict, Internal, Malformed
from mailkms.pki import CertKind, KeyType, PublicURLs, crl_number, issued_by, load_private_key
from mailkms.services import (
    CAContext,
    CAPaths,
    RootCeremony,
    health_checks,
    import_signed,
    init_ca,
    request_intermediate,
    take_root_offline,
)
from tests.judges import lint_pkix, lint_serverauth, pkilint

URLS = PublicURLs("http://kms.example.org/")
ROOT_PASSPHRASE = b"a root passphrase made for this test run"
START = dt.datetime(2026, 3, 1, 10, 0, 0, tzinfo=UTC)


@dataclass
class World:
    paths: CAPaths
    root_dir: Path
    clock: FakeClock

    @property
    def passphrase(self) -> bytes:
        return self.paths.passphrase_file.read_bytes().strip()

    def ceremony(self) -> RootCeremony:
        return RootCeremony.open(self.root_dir, ROOT_PASSPHRASE)


def _init(tmp: Path, key_type: KeyType = KeyType.P384) -> World:
    clock = FakeClock(START)
    paths = CAPaths(tmp / "data")
    init_ca(
        paths,
        passphrase_env="",
        key_type=key_type,
        organization="mailkms test",
        country="DE",
        urls=URLS,
        hostnames=["kms.example.org"],
        mail_from="mailkms@kms.example.org",
        clock=clock,
        recovery_passphrase="recovery passphrase for this test run",
        offline_root=tmp / "root",
        root_passphrase=ROOT_PASSPHRASE,
    )
    return World(paths, tmp / "root", clock)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return _init(tmp_path_factory.mktemp("offline"))


def _lint_arl(crl: x509.CertificateRevocationList) -> None:
    verdict = pkilint(
        "lint_crl", ["-t", "ARL", "-p", "BR", "-s", "WARNING"], crl.public_bytes(serialization.Encoding.PEM)
    )
    assert verdict.exit_code == 0, str(verdict)


def test_no_key_in_the_data_folder_opens_as_the_root_key(world: World) -> None:
    root = x509.load_pem_x509_certificate(world.paths.root_cert.read_bytes())
    assert not world.paths.root_key.exists() and world.paths.root_offline
    keys = [p for p in world.paths.data_dir.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert len(keys) >= 4  # issuing, infrastructure, TLS, mail signer, OCSP responder, audit...
    for path in keys:
        key = load_private_key(path.read_bytes(), world.passphrase)
        assert key.public_key() != root.public_key(), path
    assert world.ceremony().root == root  # the root folder's key is the root's, under its own passphrase
    with pytest.raises(Exception, match="passphrase"):
        RootCeremony.open(world.root_dir, world.passphrase)


def test_init_signs_both_intermediates_and_the_first_root_crl(world: World) -> None:
    root = x509.load_pem_x509_certificate(world.paths.root_cert.read_bytes())
    infra = x509.load_pem_x509_certificate(world.paths.infrastructure_cert.read_bytes())
    issuing = x509.load_pem_x509_certificate(world.paths.issuing_cert.read_bytes())
    for cert in (infra, issuing):
        assert issued_by(cert, root)
        for verdict in (lint_pkix(cert), lint_serverauth(cert, "-d")):
            assert verdict.exit_code == 0, str(verdict)
    chain = x509.load_pem_x509_certificates(world.paths.tls_cert.read_bytes())
    assert [c.subject for c in chain[1:]] == [infra.subject]  # the server sends leaf + infrastructure CA
    assert issued_by(chain[0], infra)
    crl = x509.load_der_x509_crl(world.paths.root_crl.read_bytes())
    assert crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
    _lint_arl(crl)


def test_the_server_cannot_open_an_offline_root(world: World) -> None:
    ctx = CAContext.load(world.paths, passphrase_env="", urls=URLS)
    with pytest.raises(Internal, match="offline"):
        ctx._root_signer()
    before = ctx.root_crl
    world.clock.set(START + dt.timedelta(days=150))  # an online root would re-sign its CRL by now
    renewed = ctx.ensure_server_identities(["kms.example.org"], "mailkms@kms.example.org", world.clock)
    assert "root-crl" not in renewed and ctx.root_crl == before
    world.clock.set(START)


def test_ceremony_round_trip_new_issuing_certificate_and_new_infrastructure_key(tmp_path: Path) -> None:
    w = _init(tmp_path, KeyType.RSA3072)
    old_issuing = x509.load_pem_x509_certificate(w.paths.issuing_cert.read_bytes())
    old_infra = x509.load_pem_x509_certificate(w.paths.infrastructure_cert.read_bytes())
    with pytest.raises(Conflict):
        request_intermediate(w.paths, w.passphrase, CertKind.ISSUING_CA, new_key=True)
    csr_issuing = request_intermediate(w.paths, w.passphrase, CertKind.ISSUING_CA, new_key=False)
    csr_infra = request_intermediate(w.paths, w.passphrase, CertKind.INFRASTRUCTURE_CA, new_key=True)

    w.clock.set(START + dt.timedelta(days=400))
    ceremony = w.ceremony()
    kind, issuing = ceremony.sign_intermediate(csr_issuing, w.clock.now())
    assert kind is CertKind.ISSUING_CA
    kind, infra = ceremony.sign_intermediate(csr_infra, w.clock.now())
    assert kind is CertKind.INFRASTRUCTURE_CA
    for cert in (issuing, infra):
        for verdict in (lint_pkix(cert), lint_serverauth(cert, "-d")):
            assert verdict.exit_code == 0, str(verdict)
    assert issuing.public_key() == old_issuing.public_key() and issuing.subject == old_issuing.subject
    assert infra.public_key() != old_infra.public_key()
    crl = ceremony.sign_crl(
        w.clock.now(), dt.timedelta(days=365), ((old_infra.serial_number, x509.ReasonFlags.superseded),)
    )
    _lint_arl(crl)
    assert crl_number(crl) == 2 and [r.serial_number for r in crl] == [old_infra.serial_number]

    running = CAContext.load(w.paths, passphrase_env="", urls=URLS)  # a server started before the import
    for data in (
        issuing.public_bytes(serialization.Encoding.PEM),
        infra.public_bytes(serialization.Encoding.DER),
        crl.public_bytes(serialization.Encoding.DER),
    ):
        import_signed(w.paths, w.passphrase, data, w.clock.now())
    assert w.paths.issuing_cert.read_bytes() == issuing.public_bytes(serialization.Encoding.PEM)
    assert (w.paths.retired_dir / f"issuing-ca-{old_issuing.serial_number:x}.crt.pem").exists()
    assert not any(w.paths.pending_dir.glob("*.key.pem"))
    running.ensure_server_identities(["kms.example.org"], "mailkms@kms.example.org", w.clock)  # the daily check
    assert running.root_crl is not None and crl_number(running.root_crl) == 2  # read again, no restart
    ctx = CAContext.load(w.paths, passphrase_env="", urls=URLS)
    assert ctx.root_crl is not None and crl_number(ctx.root_crl) == 2
    renewed = ctx.ensure_server_identities(["kms.example.org"], "mailkms@kms.example.org", w.clock)
    assert "tls" in renewed  # the TLS certificate now comes from the new infrastructure key
    chain = x509.load_pem_x509_certificates(w.paths.tls_cert.read_bytes())
    assert issued_by(chain[0], infra) and chain[1] == infra

    # The next CRL still lists the intermediate revoked before; an old CRL is not taken back.
    again = w.ceremony().sign_crl(w.clock.now())
    assert [r.serial_number for r in again] == [old_infra.serial_number] and crl_number(again) == 3
    with pytest.raises(Conflict):
        import_signed(w.paths, w.passphrase, crl.public_bytes(serialization.Encoding.DER), w.clock.now())
    with pytest.raises(Conflict):
        import_signed(w.paths, w.passphrase, issuing.public_bytes(serialization.Encoding.PEM), w.clock.now())


def test_import_refuses_what_another_root_signed(world: World, tmp_path: Path) -> None:
    other = _init(tmp_path)
    csr = request_intermediate(world.paths, world.passphrase, CertKind.ISSUING_CA, new_key=False)
    _, foreign = other.ceremony().sign_intermediate(csr, START)
    foreign_crl = other.ceremony().sign_crl(START)
    for data in (
        foreign.public_bytes(serialization.Encoding.PEM),
        foreign_crl.public_bytes(serialization.Encoding.DER),
    ):
        with pytest.raises(Malformed, match="root"):
            import_signed(world.paths, world.passphrase, data, START)
    with pytest.raises(Malformed):
        import_signed(world.paths, world.passphrase, b"not a certificate", START)


def test_doctor_warns_before_the_offline_root_crl_runs_out(world: World) -> None:
    settings = load_settings(world.paths.data_dir)
    crl = x509.load_der_x509_crl(world.paths.root_crl.read_bytes())
    assert crl.next_update_utc is not None
    codes = {f.code: f.severity for f in health_checks(settings, None, FakeClock(START))}
    assert "root-crl-due" not in codes and "root-crl-expired" not in codes
    due = crl.next_update_utc - dt.timedelta(days=settings.revocation.root_crl_warn_days - 1)
    assert {f.code: f.severity for f in health_checks(settings, None, FakeClock(due))}["root-crl-due"] == "warning"
    late = crl.next_update_utc + dt.timedelta(seconds=1)
    assert {f.code: f.severity for f in health_checks(settings, None, FakeClock(late))}[
        "root-crl-expired"
    ] == "critical"


def test_an_install_from_before_keeps_its_online_root_then_moves_it_offline(tmp_path: Path) -> None:
    clock = FakeClock(START)
    paths = CAPaths(tmp_path / "data")
    names, mail_from = ["kms.example.org"], "mailkms@kms.example.org"
    init_ca(
        paths,
        passphrase_env="",
        key_type=KeyType.P256,
        organization="mailkms test",
        country="DE",
        urls=URLS,
        hostnames=names,
        mail_from=mail_from,
        clock=clock,
        recovery_passphrase="recovery passphrase for this test run",
    )
    assert paths.root_key.exists() and not paths.root_offline  # the default keeps the root in the data folder
    paths.infrastructure_cert.unlink()  # as an install from before the infrastructure CA
    paths.infrastructure_key.unlink()
    passphrase = paths.passphrase_file.read_bytes().strip()
    root = x509.load_pem_x509_certificate(paths.root_cert.read_bytes())

    ctx = CAContext.load(paths, passphrase_env="", urls=URLS)
    assert "tls" in ctx.ensure_server_identities(names, mail_from, clock)
    tls = x509.load_pem_x509_certificates(paths.tls_cert.read_bytes())
    assert len(tls) == 1 and issued_by(tls[0], root)  # unchanged: TLS from the root, as before
    clock.set(START + dt.timedelta(days=70))  # an online root re-signs its CRL itself
    assert "root-crl" in ctx.ensure_server_identities(names, mail_from, clock)
    assert ctx.root_crl is not None and crl_number(ctx.root_crl) == 2

    made = take_root_offline(paths, passphrase, tmp_path / "root", ROOT_PASSPHRASE, URLS, clock.now())
    assert made == ["infrastructure-ca", "root-crl"] and paths.root_offline
    assert RootCeremony.open(tmp_path / "root", ROOT_PASSPHRASE).root == root
    crl = x509.load_der_x509_crl(paths.root_crl.read_bytes())
    assert crl_number(crl) == 3 and crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
    _lint_arl(crl)
    infra = x509.load_pem_x509_certificate(paths.infrastructure_cert.read_bytes())
    for verdict in (lint_pkix(infra), lint_serverauth(infra, "-d")):
        assert verdict.exit_code == 0, str(verdict)
    ctx = CAContext.load(paths, passphrase_env="", urls=URLS)
    assert "tls" in ctx.ensure_server_identities(names, mail_from, clock)
    assert issued_by(x509.load_pem_x509_certificates(paths.tls_cert.read_bytes())[0], infra)
    with pytest.raises(Conflict):
        take_root_offline(paths, passphrase, tmp_path / "root2", ROOT_PASSPHRASE, URLS, clock.now())
