"""`mailkms-client install` into the mail programs' own key stores, judged by their own tools: NSS
(`certutil`, `cmsutil`: Thunderbird, Evolution) and gpgsm (KMail, mutt), with a key store of two
generations made at run time. Messages are made and checked by openssl."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from mailkms.client._mail import import_pkcs12
from mailkms.client._mailstores import InstallTargets, Secrets
from mailkms.client._store import KeyStore
from mailkms.clock import FakeClock
from mailkms.pki import KeyEntry, KeyType, build_pkcs12, fingerprint_sha256
from tests.smime_support import (
    MESSAGE,
    NOW,
    Identity,
    SmimePKI,
    require_gpgsm,
    require_nss,
    run,
    write_key,
    write_pem,
)

PASS = "key-store-passphrase"
NSS_PW = "nss-password-made-at-run-time"
GPGSM_PW = "gpgsm-passphrase-made-at-run-time"
ALICE = "alice@example.org"

needs_nss = pytest.mark.usefixtures("_nss_tools")
needs_gpgsm = pytest.mark.usefixtures("_gpgsm_tools")


@pytest.fixture
def _nss_tools() -> None:
    require_nss()


@pytest.fixture
def _gpgsm_tools() -> None:
    require_gpgsm()


def _client_bin() -> str:
    import sys

    return str(Path(sys.executable).parent / "mailkms-client")


@dataclass
class World:
    pki: SmimePKI
    new: Identity  # the current generation
    old: Identity  # about 13 months older: its encryption key must still open old mail


@pytest.fixture(scope="module")
def world(smime_pki: SmimePKI) -> World:
    new, old = (smime_pki.identity(ALICE, start=NOW - dt.timedelta(days=d)) for d in (1, 400))
    return World(smime_pki, new, old)


@pytest.fixture
def home(tmp_path: Path, world: World) -> Path:
    """A client key store holding the new signing key and both encryption keys (made by import)."""
    entries = [KeyEntry(world.new.signing_key, world.new.signing, "signing")]
    entries += [KeyEntry(g.encryption_key, g.encryption, f"enc {n}") for n, g in enumerate((world.new, world.old))]
    data = build_pkcs12(entries, [world.pki.issuing, world.pki.root], "pw", iterations=1000, mac_iterations=1000)
    folder = tmp_path / "home"
    import_pkcs12(folder, data, "pw", PASS.encode(), FakeClock(NOW), fingerprint=fingerprint_sha256(world.pki.root))
    return folder


def client(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAILKMS_")}
    full = {**base, "MAILKMS_CLIENT_PASSPHRASE": PASS, **(env or {})}
    return subprocess.run(
        [_client_bin(), "--home", str(home), *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def encrypt_with_openssl(tmp_path: Path, cert: x509.Certificate, tag: str) -> Path:
    src, dst = tmp_path / f"plain-{tag}.eml", tmp_path / f"to-{tag}.p7m"
    src.write_bytes(MESSAGE)
    recipient = write_pem(tmp_path / f"recipient-{tag}.pem", cert)
    cmd = ["openssl", "cms", "-encrypt", "-aes256", "-binary", "-in", str(src), "-outform", "DER", "-out", str(dst)]
    run([*cmd, str(recipient)])
    return dst


def openssl_signer(tmp_path: Path, world: World, signed: Path) -> x509.Certificate:
    """openssl accepts the signature under the root (S/MIME signing purpose); returns the signer."""
    signer = tmp_path / "signer.pem"
    run(
        [
            "openssl",
            "cms",
            "-verify",
            "-inform",
            "DER",
            "-in",
            str(signed),
            "-CAfile",
            str(world.pki.root_pem),
            "-certfile",
            str(world.pki.issuing_pem),
            "-purpose",
            "smimesign",
            "-signer",
            str(signer),
            "-out",
            str(tmp_path / "verified.eml"),
        ]
    )
    assert b"attached in spirit" in (tmp_path / "verified.eml").read_bytes()
    return x509.load_pem_x509_certificate(signer.read_bytes())


# --- NSS --------------------------------------------------------------------------------------------
def nss_listing(db: Path) -> list[tuple[str, str]]:
    out = run(["certutil", "-L", "-d", f"sql:{db}"]).stdout.decode()
    rows = []
    for line in out.splitlines()[4:]:
        if line.strip():
            name, trust = line.rstrip().rsplit(None, 1)
            rows.append((name.strip(), trust))
    return rows


def nss_keys(db: Path, pwfile: Path | None) -> list[str]:
    cmd = ["certutil", "-K", "-d", f"sql:{db}"] + (["-f", str(pwfile)] if pwfile else [])
    proc = run(cmd, check=False)
    return [line for line in proc.stdout.decode().splitlines() if line.startswith("<")]


def nss_certs(db: Path, nickname: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(run(["certutil", "-L", "-d", f"sql:{db}", "-n", nickname, "-a"]).stdout)


def nss_sign(db: Path, pwfile: Path, src: Path, out: Path) -> None:
    """cmsutil signs as the mailbox: NSS picks the newest valid signing certificate of that name."""
    run(["cmsutil", "-S", "-N", ALICE, "-d", f"sql:{db}", "-f", str(pwfile), "-i", str(src), "-o", str(out)])


@pytest.fixture
def pwfile(tmp_path: Path) -> Path:
    path = tmp_path / "nss-pw.txt"  # for the judges' command lines only
    path.write_text(NSS_PW + "\n")
    return path


@needs_nss
def test_nss_holds_every_key_opens_old_and_new_mail_and_signs_with_the_new_key(
    tmp_path: Path, home: Path, world: World, pwfile: Path
) -> None:
    db = tmp_path / "profile"
    done = client(home, "install", "--nss", str(db), env={"MAILKMS_NSS_PASSWORD": NSS_PW})
    assert done.returncode == 0, done.stderr
    assert "3 key(s) installed, 0 already there" in done.stdout
    assert (db / "cert9.db").exists() and (db / "key4.db").exists()
    trust = dict(nss_listing(db))
    assert trust["mailkms smime test S/MIME Root CA"] == ",C,"  # a trusted CA for e-mail only
    assert trust["mailkms smime test S/MIME Issuing CA"] == ",,"
    assert trust[ALICE] == "u,u,u"
    held = nss_certs(db, ALICE)
    assert sorted(c.serial_number for c in held) == sorted(
        c.serial_number for c in (world.new.signing, world.new.encryption, world.old.encryption)
    )
    assert len(nss_keys(db, pwfile)) == 3
    for tag, ident in (("old", world.old), ("new", world.new)):
        enveloped = encrypt_with_openssl(tmp_path, ident.encryption, tag)
        out = tmp_path / f"opened-{tag}.eml"
        run(["cmsutil", "-D", "-d", f"sql:{db}", "-f", str(pwfile), "-i", str(enveloped), "-o", str(out)])
        assert out.read_bytes() == MESSAGE
    (tmp_path / "msg.eml").write_bytes(MESSAGE)
    signed = tmp_path / "signed.p7m"
    nss_sign(db, pwfile, tmp_path / "msg.eml", signed)
    assert openssl_signer(tmp_path, world, signed) == world.new.signing
    # the one-time PKCS#12 files are gone
    assert not list(Path(tempfile.gettempdir()).glob("mailkms-p12-*/key.p12"))


@needs_nss
def test_nss_install_twice_installs_nothing_twice(tmp_path: Path, home: Path, pwfile: Path) -> None:
    db = tmp_path / "profile"
    env = {"MAILKMS_NSS_PASSWORD": NSS_PW}
    assert client(home, "install", "--nss", str(db), env=env).returncode == 0
    before = (nss_listing(db), nss_keys(db, pwfile))
    again = client(home, "install", "--nss", f"{db}", env=env)
    assert again.returncode == 0, again.stderr
    assert "0 key(s) installed, 3 already there" in again.stdout
    assert (nss_listing(db), nss_keys(db, pwfile)) == before
    assert len(before[1]) == 3


@needs_nss
def test_nss_root_already_there_keeps_its_name_and_its_ssl_trust(
    tmp_path: Path, home: Path, world: World, pwfile: Path
) -> None:
    db = tmp_path / "profile"
    db.mkdir()
    run(["certutil", "-N", "-d", f"sql:{db}", "-f", str(pwfile)])
    root = str(world.pki.root_pem)
    run(["certutil", "-A", "-d", f"sql:{db}", "-f", str(pwfile), "-n", "Our company root", "-t", "C,,", "-i", root])
    done = client(home, "install", "--nss", str(db), env={"MAILKMS_NSS_PASSWORD": NSS_PW})
    assert done.returncode == 0, done.stderr
    trust = dict(nss_listing(db))
    assert trust["Our company root"] == "C,C,"
    assert "mailkms smime test S/MIME Root CA" not in trust


@needs_nss
def test_nss_wrong_password_is_refused_and_changes_nothing(tmp_path: Path, home: Path, pwfile: Path) -> None:
    db = tmp_path / "profile"
    db.mkdir()
    run(["certutil", "-N", "-d", f"sql:{db}", "-f", str(pwfile)])
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in db.iterdir()}
    listing = nss_listing(db)
    done = client(home, "install", "--nss", str(db), env={"MAILKMS_NSS_PASSWORD": "not-the-password"})
    assert done.returncode == 18, done.stdout + done.stderr
    assert "does not open the NSS database" in done.stderr and "MAILKMS_NSS_PASSWORD" in done.stderr
    assert "not-the-password" not in done.stdout + done.stderr
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in db.iterdir()} == files
    assert nss_listing(db) == listing and nss_keys(db, pwfile) == []


@needs_nss
def test_nss_profile_without_a_password_needs_none(tmp_path: Path, home: Path, world: World) -> None:
    """Thunderbird's default: no primary password. Nothing is asked, and NSS still opens the mail."""
    db = tmp_path / "profile"
    db.mkdir()
    run(["certutil", "-N", "-d", f"sql:{db}", "--empty-password"])
    done = client(home, "install", "--nss", str(db))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "opened.eml"
    enveloped = encrypt_with_openssl(tmp_path, world.old.encryption, "old")
    run(["cmsutil", "-D", "-d", f"sql:{db}", "-i", str(enveloped), "-o", str(out)])
    assert out.read_bytes() == MESSAGE


@needs_nss
def test_a_new_nss_database_needs_a_password(tmp_path: Path, home: Path) -> None:
    db = tmp_path / "profile"
    done = client(home, "install", "--nss", str(db))
    assert done.returncode == 18
    assert "needs a password" in done.stderr
    assert not (db / "cert9.db").exists()


def test_a_missing_tool_is_named_with_its_package(tmp_path: Path, home: Path) -> None:
    done = client(
        home, "install", "--nss", str(tmp_path / "db"), env={"PATH": "/nonexistent", "MAILKMS_NSS_PASSWORD": "x"}
    )
    assert done.returncode == 17
    assert "install libnss3-tools" in done.stderr


# --- gpgsm --------------------------------------------------------------------------------------------
def gpgsm(
    home: Path, *args: str, passphrase: str | None = None, data: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    cmd = ["gpgsm", "--homedir", str(home), "--batch", "--disable-crl-checks"]
    fds: tuple[int, ...] = ()
    read = -1
    if passphrase is not None:
        read, write = os.pipe()
        os.write(write, passphrase.encode() + b"\n")
        os.close(write)
        cmd += ["--pinentry-mode", "loopback", "--passphrase-fd", str(read)]
        fds = (read,)
    try:
        return subprocess.run([*cmd, *args], input=data, capture_output=True, pass_fds=fds, timeout=120, check=False)
    finally:
        if read >= 0:
            os.close(read)


def forget_passphrases(home: Path) -> None:
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True, check=True)


def sha1(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA1()).hex().upper()


def gpgsm_secret_fingerprints(home: Path) -> set[str]:
    out = gpgsm(home, "--with-colons", "--list-secret-keys").stdout.decode()
    return {line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")}


@needs_gpgsm
def test_gpgsm_holds_every_key_opens_old_and_new_mail_and_signs_with_the_new_key(
    tmp_path: Path, home: Path, world: World, gnupg_home: Path
) -> None:
    done = client(
        home, "install", "--gpgsm", "--gnupg-home", str(gnupg_home), env={"MAILKMS_GPGSM_PASSPHRASE": GPGSM_PW}
    )
    assert done.returncode == 0, done.stderr
    assert "3 key(s) installed, 0 already there" in done.stdout
    wanted = {sha1(c) for c in (world.new.signing, world.new.encryption, world.old.encryption)}
    assert gpgsm_secret_fingerprints(gnupg_home) == wanted
    trustlist = (gnupg_home / "trustlist.txt").read_text()
    assert trustlist.replace(":", "").count(f"{sha1(world.pki.root)} S") == 1
    forget_passphrases(gnupg_home)  # what opens the keys now is their protection, not gpg-agent's cache
    for tag, ident in (("old", world.old), ("new", world.new)):
        enveloped = encrypt_with_openssl(tmp_path, ident.encryption, tag)
        opened = gpgsm(gnupg_home, "--decrypt", str(enveloped), passphrase=GPGSM_PW)
        assert opened.returncode == 0, opened.stderr
        assert opened.stdout == MESSAGE
    # the keys are protected in gpg-agent by the passphrase given: another one does not sign
    (tmp_path / "msg.eml").write_bytes(MESSAGE)
    forget_passphrases(gnupg_home)
    refused = gpgsm(gnupg_home, "-u", sha1(world.new.signing), "--sign", str(tmp_path / "msg.eml"), passphrase="wrong")
    assert refused.returncode != 0
    signed = gpgsm(gnupg_home, "-u", sha1(world.new.signing), "--sign", str(tmp_path / "msg.eml"), passphrase=GPGSM_PW)
    assert signed.returncode == 0, signed.stderr
    (tmp_path / "gpgsm-signed.p7m").write_bytes(signed.stdout)
    assert openssl_signer(tmp_path, world, tmp_path / "gpgsm-signed.p7m") == world.new.signing
    # and gpgsm trusts a signature openssl made with the new key: the chain ends at a trusted root
    by_openssl = tmp_path / "openssl-signed.p7m"
    run(
        [
            "openssl",
            "cms",
            "-sign",
            "-nodetach",
            "-in",
            str(tmp_path / "msg.eml"),
            "-signer",
            str(write_pem(tmp_path / "new-sign.crt", world.new.signing)),
            "-inkey",
            str(write_key(tmp_path / "new-sign.key", world.new.signing_key)),
            "-outform",
            "DER",
            "-out",
            str(by_openssl),
        ]
    )
    verified = gpgsm(gnupg_home, "--verify", str(by_openssl))
    assert verified.returncode == 0, verified.stderr
    assert b"Good signature" in verified.stderr


@needs_gpgsm
def test_gpgsm_install_twice_installs_nothing_twice(home: Path, gnupg_home: Path) -> None:
    env = {"MAILKMS_GPGSM_PASSPHRASE": GPGSM_PW}
    assert client(home, "install", "--gpgsm", "--gnupg-home", str(gnupg_home), env=env).returncode == 0
    keys = sorted((gnupg_home / "private-keys-v1.d").iterdir())
    trustlist = (gnupg_home / "trustlist.txt").read_text()
    again = client(home, "install", "--gpgsm", "--gnupg-home", str(gnupg_home), env=env)
    assert again.returncode == 0, again.stderr
    assert "0 key(s) installed, 3 already there" in again.stdout
    assert sorted((gnupg_home / "private-keys-v1.d").iterdir()) == keys and len(keys) == 3
    assert (gnupg_home / "trustlist.txt").read_text() == trustlist


@needs_gpgsm
def test_gpgsm_without_a_passphrase_installs_nothing(home: Path, gnupg_home: Path) -> None:
    done = client(home, "install", "--gpgsm", "--gnupg-home", str(gnupg_home))
    assert done.returncode == 18 and "MAILKMS_GPGSM_PASSPHRASE" in done.stderr
    assert (
        not list((gnupg_home / "private-keys-v1.d").glob("*.key"))
        if (gnupg_home / "private-keys-v1.d").exists()
        else True
    )


# --- PKCS#12 and remembered targets ------------------------------------------------------------------------
def test_install_pkcs12_is_the_export(tmp_path: Path, home: Path) -> None:
    out = tmp_path / "for-outlook.p12"
    done = client(home, "install", "--pkcs12", str(out), env={"MAILKMS_EXPORT_PASSWORD": "export-pw-1234"})
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    info = run(["openssl", "pkcs12", "-info", "-in", str(out), "-passin", "pass:export-pw-1234", "-noout"])
    assert (info.stdout + info.stderr).count(b"Shrouded Keybag: PBES2") == 3
    short = client(home, "install", "--pkcs12", str(out), env={"MAILKMS_EXPORT_PASSWORD": "short"})
    assert short.returncode == 2


@needs_nss
def test_remember_records_the_target_and_a_target_that_fails_is_a_note(tmp_path: Path, home: Path) -> None:
    db = tmp_path / "profile"
    done = client(home, "install", "--nss", str(db), "--remember", env={"MAILKMS_NSS_PASSWORD": NSS_PW})
    assert done.returncode == 0, done.stderr
    state = json.loads((home / "state.json").read_text())
    assert state["install_targets"] == [f"nss:{db.resolve()}"]
    # without the password (as at a sync from a script) the hook says so and does not raise
    store = KeyStore(home)
    hook = InstallTargets(store, lambda: PASS.encode(), Secrets(env={}, interactive=False))
    notes = hook.after_install(store.load())
    assert len(notes) == 1
    assert "was not updated" in notes[0] and f"mailkms-client install --nss {db.resolve()}" in notes[0]
    ok = InstallTargets(store, lambda: PASS.encode(), Secrets(env={"MAILKMS_NSS_PASSWORD": NSS_PW}))
    assert "0 key(s) installed, 3 already there" in ok.after_install(store.load())[0]


def test_bad_target_and_old_state_files(tmp_path: Path, home: Path) -> None:
    state = json.loads((home / "state.json").read_text())
    del state["install_targets"]  # a state file written before this field existed
    (home / "state.json").write_text(json.dumps(state))
    assert KeyStore(home).load().install_targets == []
    assert client(home, "install").returncode == 2
    assert client(home, "install", "--gnupg-home", str(tmp_path)).returncode == 2


@needs_nss
@needs_gpgsm
def test_a_p256_signing_key_goes_into_nss_and_gpgsm_2_2_is_told_why_not(
    tmp_path: Path, world: World, gnupg_home: Path, pwfile: Path
) -> None:
    ec_id = world.pki.identity(ALICE, signing_type=KeyType.P256)
    entries = [KeyEntry(ec_id.signing_key, ec_id.signing, "s"), KeyEntry(ec_id.encryption_key, ec_id.encryption, "e")]
    data = build_pkcs12(entries, [world.pki.issuing, world.pki.root], "pw", iterations=1000, mac_iterations=1000)
    home = tmp_path / "ec-home"
    import_pkcs12(home, data, "pw", PASS.encode(), FakeClock(NOW), fingerprint=fingerprint_sha256(world.pki.root))
    db = tmp_path / "profile"
    env = {"MAILKMS_NSS_PASSWORD": NSS_PW, "MAILKMS_GPGSM_PASSPHRASE": GPGSM_PW}
    done = client(home, "install", "--nss", str(db), env=env)
    assert done.returncode == 0, done.stderr
    assert any(line.split(">", 1)[1].split()[0] == "ec" for line in nss_keys(db, pwfile))
    (tmp_path / "msg.eml").write_bytes(MESSAGE)
    signed = tmp_path / "signed.p7m"
    nss_sign(db, pwfile, tmp_path / "msg.eml", signed)
    assert openssl_signer(tmp_path, world, signed) == ec_id.signing
    assert "0 key(s) installed, 2 already there" in client(home, "install", "--nss", str(db), env=env).stdout
    into_gpgsm = client(home, "install", "--gpgsm", "--gnupg-home", str(gnupg_home), env=env)
    assert into_gpgsm.returncode == 0, into_gpgsm.stderr
    if b"(GnuPG) 2.2." in subprocess.run(["gpgsm", "--version"], capture_output=True, check=True).stdout:
        assert "1 key(s) installed" in into_gpgsm.stdout and "cannot import from PKCS#12" in into_gpgsm.stdout
        assert gpgsm_secret_fingerprints(gnupg_home) == {sha1(ec_id.encryption)}
