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
from mailkms.errors import ConfigError, Conflict, Internal, Malformed
from mailkms.pki import CertKind, KeyType, PublicURLs, crl_number, issued_by, load_private_key, make_tls_server
from mailkms.services import (
    CAContext,
    CAPaths,
    RootCeremony,
    health_checks,
    import_signed,
    request_intermediate,
    take_root_offline,
)
from tests.judges import lint_pkix, lint_serverauth, openssl_verify, pkilint
from tests.testca import init_server_ca

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
    init_server_ca(paths, clock, key_type, offline_root=tmp / "root", root_passphrase=ROOT_PASSPHRASE)
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
    init_server_ca(paths, clock)
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


def _lint_crl(crl: x509.CertificateRevocationList) -> None:
    verdict = pkilint(
        "lint_crl", ["-t", "CRL", "-p", "BR", "-s", "WARNING"], crl.public_bytes(serialization.Encoding.PEM)
    )
    assert verdict.exit_code == 0, str(verdict)


def _uris(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    return [str(n.value) for p in cdp for n in p.full_name or []], [str(a.access_location.value) for a in aia]


def test_the_infrastructure_ca_publishes_the_crl_the_tls_certificate_names(tmp_path: Path) -> None:
    """Issue 15 §2: the TLS certificate's CDP is the infrastructure CA's CRL, signed by that CA on the
    server (the root stays offline); a replaced TLS certificate is listed superseded until it expires;
    a new infrastructure key from a ceremony signs the next CRL. Judged by pkilint and openssl verify
    -crl_check_all on the whole TLS chain."""
    w = _init(tmp_path)
    root = x509.load_pem_x509_certificate(w.paths.root_cert.read_bytes())
    infra = x509.load_pem_x509_certificate(w.paths.infrastructure_cert.read_bytes())
    root_crl = x509.load_der_x509_crl(w.paths.root_crl.read_bytes())
    leaf = x509.load_pem_x509_certificates(w.paths.tls_cert.read_bytes())[0]
    assert _uris(leaf) == ([URLS.infrastructure_crl], [URLS.infrastructure_cert])
    # pkix only: the TLS BR linter wants a DV/OV policy OID, which a private infrastructure CA must not claim.
    verdict = lint_pkix(leaf)
    assert verdict.exit_code == 0, str(verdict)
    crl = x509.load_der_x509_crl(w.paths.infrastructure_crl.read_bytes())
    assert crl.issuer == infra.subject and crl.is_signature_valid(infra.public_key())  # type: ignore[arg-type]
    assert crl_number(crl) == 1 and len(crl) == 0
    _lint_crl(crl)
    at = START + dt.timedelta(hours=1)
    ok = openssl_verify(leaf, root, [infra], purpose="sslserver", at=at, crls=[root_crl, crl])
    assert ok.exit_code == 0, str(ok)
    missing = openssl_verify(leaf, root, [infra], purpose="sslserver", at=at, crls=[root_crl])
    assert missing.exit_code != 0 and "unable to get certificate CRL" in missing.output

    # A new host name: a new TLS certificate; the old one is on the next CRL, superseded.
    ctx = CAContext.load(w.paths, passphrase_env="", urls=URLS)
    assert ctx.infrastructure_crl == crl
    w.clock.set(START + dt.timedelta(days=1))
    names = ["kms.example.org", "kms2.example.org"]
    renewed = ctx.ensure_server_identities(names, "mailkms@kms.example.org", w.clock)
    assert renewed == ["tls", "infrastructure-crl"]
    crl2 = ctx.infrastructure_crl
    assert crl2 is not None and crl_number(crl2) == 2
    assert [(r.serial_number, r.extensions.get_extension_for_class(x509.CRLReason).value.reason) for r in crl2] == [
        (leaf.serial_number, x509.ReasonFlags.superseded)
    ]
    _lint_crl(crl2)
    at = START + dt.timedelta(days=1, hours=1)
    revoked = openssl_verify(leaf, root, [infra], purpose="sslserver", at=at, crls=[root_crl, crl2])
    assert revoked.exit_code != 0 and "certificate revoked" in revoked.output
    new_leaf = x509.load_pem_x509_certificates(w.paths.tls_cert.read_bytes())[0]
    ok = openssl_verify(new_leaf, root, [infra], purpose="sslserver", at=at, crls=[root_crl, crl2])
    assert ok.exit_code == 0, str(ok)

    # The daily check: nothing to do while 4 days or more are left, re-signed after that.
    w.clock.set(START + dt.timedelta(days=3))
    assert ctx.ensure_server_identities(names, "mailkms@kms.example.org", w.clock) == []
    w.clock.set(START + dt.timedelta(days=4, hours=1))
    assert ctx.ensure_server_identities(names, "mailkms@kms.example.org", w.clock) == ["infrastructure-crl"]
    assert ctx.infrastructure_crl is not None and crl_number(ctx.infrastructure_crl) == 3
    assert [r.serial_number for r in ctx.infrastructure_crl] == [leaf.serial_number]

    # A ceremony gives the infrastructure CA a new key: the TLS certificate and the CRL follow it,
    # numbering goes on, and the old CA's TLS certificate is no entry of the new CA's CRL.
    csr = request_intermediate(w.paths, w.passphrase, CertKind.INFRASTRUCTURE_CA, new_key=True)
    _, infra2 = w.ceremony().sign_intermediate(csr, w.clock.now())
    import_signed(w.paths, w.passphrase, infra2.public_bytes(serialization.Encoding.PEM), w.clock.now())
    ctx = CAContext.load(w.paths, passphrase_env="", urls=URLS)
    assert ctx.ensure_server_identities(names, "mailkms@kms.example.org", w.clock) == ["tls", "infrastructure-crl"]
    crl4 = ctx.infrastructure_crl
    assert crl4 is not None and crl_number(crl4) == 4 and len(crl4) == 0
    assert crl4.is_signature_valid(infra2.public_key())  # type: ignore[arg-type]
    _lint_crl(crl4)
    leaf2 = x509.load_pem_x509_certificates(w.paths.tls_cert.read_bytes())[0]
    at = START + dt.timedelta(days=4, hours=2)
    ok = openssl_verify(leaf2, root, [infra2], purpose="sslserver", at=at, crls=[root_crl, crl4])
    assert ok.exit_code == 0, str(ok)


def test_a_tls_certificate_from_before_the_infrastructure_crl_is_replaced(tmp_path: Path) -> None:
    """Installs whose TLS certificate has no CDP get one at the next start."""
    w = _init(tmp_path)
    ctx = CAContext.load(w.paths, passphrase_env="", urls=URLS)
    assert ctx.infrastructure is not None and ctx.tls_cert is not None
    bare = make_tls_server(ctx.infrastructure, ctx.tls_cert.public_key(), ["kms.example.org"], START)
    ctx.tls_cert = bare
    assert ctx.ensure_server_identities(["kms.example.org"], "mailkms@kms.example.org", w.clock) == [
        "tls",
        "infrastructure-crl",
    ]
    assert _uris(x509.load_pem_x509_certificates(w.paths.tls_cert.read_bytes())[0])[0] == [URLS.infrastructure_crl]


def test_a_running_server_takes_an_import_without_a_restart(tmp_path: Path) -> None:
    """`mailkms ca import` beside a running server: the server's CA context takes the new issuing CA
    certificate, infrastructure CA and root CRL from the files (serve calls this when they change or
    on SIGHUP); a certificate that is not its key's is refused and nothing is taken."""
    w = _init(tmp_path)
    running = CAContext.load(w.paths, passphrase_env="", urls=URLS)
    stamp = running.files_stamp()
    assert running.reload_from_files() == []
    old_infra = running.infrastructure
    assert old_infra is not None
    csr_issuing = request_intermediate(w.paths, w.passphrase, CertKind.ISSUING_CA, new_key=False)
    csr_infra = request_intermediate(w.paths, w.passphrase, CertKind.INFRASTRUCTURE_CA, new_key=True)
    w.clock.set(START + dt.timedelta(days=1))
    ceremony = w.ceremony()
    _, issuing = ceremony.sign_intermediate(csr_issuing, w.clock.now())
    _, infra = ceremony.sign_intermediate(csr_infra, w.clock.now())
    crl = ceremony.sign_crl(w.clock.now())
    for data in (issuing.public_bytes(serialization.Encoding.PEM), infra.public_bytes(serialization.Encoding.PEM)):
        import_signed(w.paths, w.passphrase, data, w.clock.now())
    import_signed(w.paths, w.passphrase, crl.public_bytes(serialization.Encoding.DER), w.clock.now())
    assert running.files_stamp() != stamp
    assert running.reload_from_files() == ["issuing-ca", "infrastructure-ca", "root-crl"]
    assert running.issuing.certificate == issuing and running.issuer.certificate == issuing
    assert running.chain == (issuing, running.root)
    assert running.infrastructure is not None and running.infrastructure.certificate == infra
    assert running.root_crl is not None and crl_number(running.root_crl) == 2
    assert running.reload_from_files() == []
    names, mail_from = ["kms.example.org"], "mailkms@kms.example.org"
    assert running.ensure_server_identities(names, mail_from, w.clock) == ["tls", "infrastructure-crl"]
    assert issued_by(x509.load_pem_x509_certificates(w.paths.tls_cert.read_bytes())[0], infra)

    # The old infrastructure certificate put back beside the new key: refused, the server keeps what it has.
    w.paths.infrastructure_cert.write_bytes(old_infra.certificate.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="not the certificate of the key"):
        running.reload_from_files()
    assert running.infrastructure.certificate == infra
