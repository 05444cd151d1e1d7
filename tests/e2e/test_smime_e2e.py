"""Secure e-mail end to end: a real `mailkms serve`, real enrolled `mailkms-client` key stores, and
openssl, NSS (cmsutil, pk12util, certutil) and curl as the judges, both ways."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import CLIENT_PASSPHRASE, ClientHome, Deployment
from tests.e2e.kms_server import smime_client, smime_deployment
from tests.smime_support import MESSAGE, require_nss, run

pytestmark = pytest.mark.e2e

ALICE, BOB, CAROL = "alice@example.org", "bob@example.org", "carol@example.org"
EXPORT_PW = "export-password-made-at-run-time"


class Kms:
    """The deployment and its enrolled users, with byte-exact client runs."""

    def __init__(self, dep: Deployment, homes: dict[str, ClientHome]) -> None:
        self.dep = dep
        self.homes = homes
        self.url = dep.url
        self.fingerprint = dep.fingerprint()
        self.root_pem = dep.data / "ca" / "root.crt.pem"
        self.issuing_pem = dep.data / "ca" / "issuing.crt.pem"

    def client(self, home: Path, *args: str, data: bytes | None = None, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        return smime_client(home, *args, data=data, env=env)


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kms]:
    folder = tmp_path_factory.mktemp("smime-e2e")
    with smime_deployment(folder, (ALICE, BOB, CAROL)) as (dep, homes):
        yield Kms(dep, homes)


def home(kms: Kms, mailbox: str) -> Path:
    return kms.homes[mailbox].home


def ok(proc) -> bytes:  # type: ignore[no-untyped-def]
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return bytes(proc.stdout)


def status(kms: Kms, mailbox: str) -> dict:  # type: ignore[type-arg]
    return json.loads(ok(kms.client(home(kms, mailbox), "status", "--json")))


def key_file(kms: Kms, mailbox: str, kind: str) -> Path:
    data = status(kms, mailbox)
    return home(kms, mailbox) / "keys" / f"{kind}-{data[kind]['serial']}.pem"


def cert_file(kms: Kms, mailbox: str, kind: str, folder: Path) -> Path:
    path = folder / f"{mailbox}-{kind}.pem"
    path.write_bytes(ok(kms.client(home(kms, mailbox), "cert", kind)))
    return path


def openssl(kms: Kms, *args: str, data: bytes | None = None) -> bytes:
    env = {"PATH": "/usr/bin:/bin", "P": CLIENT_PASSPHRASE}
    proc = subprocess.run(["openssl", *args], input=data, capture_output=True, env=env, timeout=60)
    assert proc.returncode == 0, f"openssl {' '.join(args)}: {proc.stderr.decode(errors='replace')}"
    return proc.stdout


def body_of(message: bytes) -> bytes:
    return re.split(rb"\r?\n\r?\n", message, maxsplit=1)[1]


def der_of(message: bytes) -> bytes:
    return base64.b64decode(body_of(message))


# --- the directory ----------------------------------------------------------------------------------
def test_directory_serves_certs_only_and_pem_over_https(kms: Kms, tmp_path: Path) -> None:
    url = f"{kms.url}/api/v1/directory/{BOB}"
    headers = tmp_path / "headers"
    der = run(["curl", "-sS", "--fail", "--cacert", str(kms.root_pem), "-D", str(headers), "-o", "-", url]).stdout
    assert "application/pkcs7-mime; smime-type=certs-only" in headers.read_text()
    printed = run(["openssl", "pkcs7", "-inform", "DER", "-print_certs", "-noout"], data=der).stdout.decode()
    assert f"subject=CN = {BOB}" in printed and "Issuing CA" in printed
    pem = run(["curl", "-sS", "--fail", "--cacert", str(kms.root_pem), f"{url}?format=pem"]).stdout
    accept = run(
        ["curl", "-sS", "--fail", "--cacert", str(kms.root_pem), "-H", "Accept: application/pem-certificate-chain", url]
    ).stdout
    assert pem == accept and pem.count(b"BEGIN CERTIFICATE") == 2
    leaf = tmp_path / "bob.pem"
    leaf.write_bytes(pem.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n")
    # the published certificate is bob's encryption certificate, and it chains to the root
    assert leaf.read_bytes().strip() == (cert_file(kms, BOB, "encryption", tmp_path).read_bytes().strip())
    run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(kms.root_pem),
            "-untrusted",
            str(kms.issuing_pem),
            "-purpose",
            "smimeencrypt",
            str(leaf),
        ]
    )
    ext = run(["openssl", "x509", "-in", str(leaf), "-noout", "-ext", "keyUsage"]).stdout.decode()
    assert "Key Encipherment" in ext


def test_directory_refusals_are_problem_documents(kms: Kms) -> None:
    for address, code in (("nobody@example.org", 404), ("not-an-address", 400)):
        proc = run(
            [
                "curl",
                "-sS",
                "--cacert",
                str(kms.root_pem),
                "-w",
                "\n%{http_code}",
                f"{kms.url}/api/v1/directory/{address}",
            ]
        )
        body, status_code = proc.stdout.rsplit(b"\n", 1)
        assert int(status_code) == code
        assert json.loads(body)["status"] == code
    spec = run(["curl", "-sS", "--cacert", str(kms.root_pem), f"{kms.url}/openapi.json"]).stdout
    paths = json.loads(spec)["paths"]
    assert "/api/v1/directory/{email}" in paths
    assert "application/pem-certificate-chain" in json.dumps(paths["/api/v1/directory/{email}"])


# --- what the client writes, the judges read -----------------------------------------------------
@pytest.mark.parametrize("opaque", [False, True], ids=["multipart-signed", "opaque"])
def test_client_signature_verifies_in_openssl(kms: Kms, tmp_path: Path, opaque: bool) -> None:
    signed = ok(kms.client(home(kms, ALICE), "sign", *(["--opaque"] if opaque else []), data=MESSAGE))
    if opaque:
        assert b"application/pkcs7-mime; smime-type=signed-data" in signed
    else:
        assert b'protocol="application/pkcs7-signature"; micalg=sha-256' in signed
    assert signed.startswith(b"From: Alice <alice@example.org>\r\n")  # outer fields stay outside
    out = openssl(
        kms,
        "cms", "-verify", "-CAfile", str(kms.root_pem), "-certfile", str(kms.issuing_pem), "-purpose", "smimesign",
        data=signed,
    )  # fmt: skip
    assert b"the figures are attached in spirit." in out
    # the receiving client says who signed and that it is trusted
    proc = kms.client(home(kms, BOB), "verify", data=signed)
    report = proc.stderr.decode()
    assert proc.returncode == 0, report
    assert f"Signed by {ALICE}" in report and "TRUSTED" in report
    assert "Revocation: not revoked (CRL of" in report  # fetched from the server at the certificate's CDP
    assert b"Subject: quarterly figures" in proc.stdout


def test_client_encryption_opens_in_openssl_for_every_recipient_and_the_sender(kms: Kms, tmp_path: Path) -> None:
    encrypted = ok(kms.client(home(kms, ALICE), "encrypt", "--to", BOB, data=MESSAGE))
    assert b"application/pkcs7-mime; smime-type=enveloped-data" in encrypted
    assert b"Subject: quarterly figures" in encrypted.split(b"\r\n\r\n")[0]
    info = openssl(kms, "cms", "-cmsout", "-print", "-inform", "DER", data=der_of(encrypted)).decode()
    assert "aes-256-cbc" in info and info.count("rsaEncryption") == 2  # bob and alice herself
    for mailbox in (BOB, ALICE):
        plain = openssl(
            kms,
            "cms", "-decrypt", "-recip", str(cert_file(kms, mailbox, "encryption", tmp_path)),
            "-inkey", str(key_file(kms, mailbox, "encryption")), "-passin", "env:P",
            data=encrypted,
        )  # fmt: skip
        assert b"the figures are attached in spirit." in plain
        opened = ok(kms.client(home(kms, mailbox), "decrypt", data=encrypted))
        assert opened.startswith(b"From: Alice <alice@example.org>\r\n")
        assert b"the figures are attached in spirit." in opened
    # the directory certificate was cached in alice's home
    assert (home(kms, ALICE) / "directory" / f"{BOB}.pem").exists()


def test_sign_and_encrypt_then_decrypt_and_verify(kms: Kms) -> None:
    both = ok(kms.client(home(kms, ALICE), "encrypt", "--to", BOB, "--sign", data=MESSAGE))
    opened = ok(kms.client(home(kms, BOB), "decrypt", data=both))
    proc = kms.client(home(kms, BOB), "verify", data=opened)
    assert proc.returncode == 0 and "TRUSTED" in proc.stderr.decode()


# --- what openssl writes, the client reads -------------------------------------------------------------
def test_openssl_signatures_verify_in_the_client(kms: Kms, tmp_path: Path) -> None:
    signer = cert_file(kms, ALICE, "signing", tmp_path)
    key = key_file(kms, ALICE, "signing")
    for extra in ([], ["-nodetach"]):
        signed = openssl(
            kms,
            "cms", "-sign", "-signer", str(signer), "-inkey", str(key), "-passin", "env:P", *extra,
            data=MESSAGE,
        )  # fmt: skip
        proc = kms.client(home(kms, BOB), "verify", data=signed)
        assert proc.returncode == 0, proc.stderr
        assert "TRUSTED" in proc.stderr.decode() and b"quarterly figures" in proc.stdout


@pytest.mark.parametrize(
    "options",
    [
        ["-aes256"],
        ["-aes-256-gcm"],
        ["-aes-128-gcm", "KEY", "-keyopt", "rsa_padding_mode:oaep"],
        ["-aes256", "KEY", "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"],
    ],
    ids=["aes256-cbc", "aes256-gcm", "aes128-gcm-oaep", "aes256-cbc-oaep-sha256"],
)
def test_openssl_encryption_opens_in_the_client(kms: Kms, tmp_path: Path, options: list[str]) -> None:
    bob_cert = cert_file(kms, BOB, "encryption", tmp_path)
    cipher, *keyopts = options  # -keyopt applies to the -recip before it
    encrypted = openssl(kms, "cms", "-encrypt", cipher, "-recip", str(bob_cert), *keyopts[1:], data=MESSAGE)
    opened = ok(kms.client(home(kms, BOB), "decrypt", data=encrypted))
    assert b"the figures are attached in spirit." in opened
    refused = kms.client(home(kms, CAROL), "decrypt", data=encrypted)
    assert refused.returncode != 0 and b"not encrypted to any of your keys" in refused.stderr


# --- refusals: clear words, non-zero exits, no traceback ------------------------------------------------
def test_tampered_truncated_unsigned_and_wrong_recipient_input(kms: Kms) -> None:
    signed = ok(kms.client(home(kms, ALICE), "sign", data=MESSAGE))
    opaque = ok(kms.client(home(kms, ALICE), "sign", "--opaque", data=MESSAGE))
    encrypted = ok(kms.client(home(kms, ALICE), "encrypt", "--to", BOB, data=MESSAGE))
    cases = {
        "tampered": ("verify", BOB, signed.replace(b"attached in spirit", b"attached in SPIRIT"), 3, b"changed after it was signed"),
        "tampered header of the signed part": (
            "verify", BOB, signed.replace(b"charset=us-ascii", b"charset=utf-8"), 3, b"changed after it was signed",
        ),
        "truncated signed": ("verify", BOB, signed[: len(signed) // 2], 2, b"truncated"),
        "truncated opaque": ("verify", BOB, opaque[: len(opaque) - 400], 2, b"damaged or truncated"),
        "unsigned": ("verify", BOB, MESSAGE, 2, b"not signed"),
        "encrypted, not signed": ("verify", BOB, encrypted, 2, b"decrypt it first"),
        "wrong recipient": ("decrypt", CAROL, encrypted, 2, b"not encrypted to any of your keys"),
        "truncated encrypted": ("decrypt", BOB, encrypted[: len(encrypted) - 300], 2, b"damaged or truncated"),
        "not encrypted": ("decrypt", BOB, MESSAGE, 2, b"not S/MIME encrypted"),
        "empty": ("verify", BOB, b"", 2, b"empty"),
    }  # fmt: skip
    for name, (command, mailbox, data, code, words) in cases.items():
        proc = kms.client(home(kms, mailbox), command, data=data)
        assert proc.returncode == code, (name, proc.returncode, proc.stderr)
        assert b"Traceback" not in proc.stderr, name
        assert proc.stderr.startswith(b"mailkms-client: ") and words in proc.stderr, (name, proc.stderr)
    assert kms.client(home(kms, ALICE), "encrypt", "--to", "nobody@example.org", data=MESSAGE).returncode == 4


# --- NSS (Thunderbird's library) reads ours, and we read NSS's ----------------------------------------------------------
def test_nss_imports_the_export_and_reads_our_messages(kms: Kms, tmp_path: Path) -> None:
    require_nss()
    p12 = tmp_path / "bob.p12"
    env = {"MAILKMS_EXPORT_PASSWORD": EXPORT_PW}
    printed = ok(kms.client(home(kms, BOB), "export", "--out", str(p12), env=env)).decode()
    assert f"{BOB} signing" in printed and f"{BOB} encryption" in printed
    info = run(["openssl", "pkcs12", "-info", "-in", str(p12), "-passin", f"pass:{EXPORT_PW}", "-noout"])
    assert b"Shrouded Keybag: PBES2, PBKDF2, AES-256-CBC" in info.stderr + info.stdout
    db = tmp_path / "nssdb"
    db.mkdir()
    run(["certutil", "-N", "-d", f"sql:{db}", "--empty-password"])
    run(["pk12util", "-i", str(p12), "-d", f"sql:{db}", "-W", EXPORT_PW])
    keys = run(["certutil", "-K", "-d", f"sql:{db}"]).stdout.decode()
    assert f"{BOB} signing" in keys and f"{BOB} encryption" in keys
    run(["certutil", "-M", "-n", _root_nickname(db), "-t", "C,C,C", "-d", f"sql:{db}"])

    encrypted = ok(kms.client(home(kms, ALICE), "encrypt", "--to", BOB, data=MESSAGE))
    (tmp_path / "env.der").write_bytes(der_of(encrypted))
    opened = run(["cmsutil", "-D", "-i", str(tmp_path / "env.der"), "-d", f"sql:{db}"]).stdout
    assert b"the figures are attached in spirit." in opened

    signed = ok(kms.client(home(kms, ALICE), "sign", data=MESSAGE))
    boundary = re.search(rb'boundary="([^"]+)"', signed).group(1)  # type: ignore[union-attr]
    parts = signed.split(b"\r\n--" + boundary)
    (tmp_path / "content").write_bytes(parts[1].split(b"\r\n", 1)[1])
    (tmp_path / "sig.der").write_bytes(base64.b64decode(parts[2].split(b"\r\n\r\n", 1)[1]))
    nss_verify = ["cmsutil", "-D", "-i", str(tmp_path / "sig.der"), "-c", str(tmp_path / "content"), "-n", "-h", "2"]
    checked = run([*nss_verify, "-d", f"sql:{db}", "-u", "4"])
    assert b"signer0.status=GoodSignature" in checked.stdout
    (tmp_path / "content").write_bytes(parts[1].split(b"\r\n", 1)[1].replace(b"Bob", b"Rob"))
    forged = run([*nss_verify, "-d", f"sql:{db}", "-u", "4"], check=False)
    assert b"signer0.status=DigestMismatch" in forged.stdout


def test_nss_made_messages_open_in_the_client(kms: Kms, tmp_path: Path) -> None:
    require_nss()
    p12 = tmp_path / "alice.p12"
    ok(kms.client(home(kms, ALICE), "export", "--out", str(p12), env={"MAILKMS_EXPORT_PASSWORD": EXPORT_PW}))
    db = tmp_path / "nssdb"
    db.mkdir()
    run(["certutil", "-N", "-d", f"sql:{db}", "--empty-password"])
    run(["pk12util", "-i", str(p12), "-d", f"sql:{db}", "-W", EXPORT_PW])
    run(["certutil", "-M", "-n", _root_nickname(db), "-t", "C,C,C", "-d", f"sql:{db}"])
    bob_cert = cert_file(kms, BOB, "encryption", tmp_path)
    run(["certutil", "-A", "-n", "bob", "-t", ",,", "-i", str(bob_cert), "-d", f"sql:{db}"])
    signing_nick = next(
        line.split(">", 1)[1].split(None, 2)[2].strip()
        for line in run(["certutil", "-K", "-d", f"sql:{db}"]).stdout.decode().splitlines()
        if "signing" in line
    )
    entity = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nSigned by NSS.\r\n"
    (tmp_path / "entity").write_bytes(entity)
    run(
        ["cmsutil", "-S", "-T", "-G", "-P", "-H", "SHA256", "-N", signing_nick, "-i", str(tmp_path / "entity"),
         "-o", str(tmp_path / "nss.p7s"), "-d", f"sql:{db}"]
    )  # fmt: skip
    sig = base64.encodebytes((tmp_path / "nss.p7s").read_bytes())
    # as a mail file on disk: LF line ends, the way Maildir keeps it
    mail = (
        b"From: alice@example.org\nTo: bob@example.org\nSubject: from NSS\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256;\n'
        b' boundary="nss-b"\n\nThis is a signed message.\n--nss-b\n'
        + entity.replace(b"\r\n", b"\n")
        + b"\n--nss-b\nContent-Type: application/pkcs7-signature; name=smime.p7s\n"
        b"Content-Transfer-Encoding: base64\n\n" + sig + b"\n--nss-b--\n"
    )
    proc = kms.client(home(kms, BOB), "verify", data=mail)
    assert proc.returncode == 0, proc.stderr
    assert "TRUSTED" in proc.stderr.decode() and b"Signed by NSS." in proc.stdout
    run(
        [
            "cmsutil",
            "-E",
            "-r",
            "bob",
            "-i",
            str(tmp_path / "entity"),
            "-o",
            str(tmp_path / "nss.p7m"),
            "-d",
            f"sql:{db}",
        ]
    )
    enveloped = (
        b"From: alice@example.org\nTo: bob@example.org\nSubject: from NSS\nMIME-Version: 1.0\n"
        b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m\n"
        b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes((tmp_path / "nss.p7m").read_bytes())
    )
    opened = ok(kms.client(home(kms, BOB), "decrypt", data=enveloped))
    assert b"Signed by NSS." in opened


def _root_nickname(db: Path) -> str:
    listing = run(["certutil", "-L", "-d", f"sql:{db}"]).stdout.decode()
    return next(line[:60].strip() for line in listing.splitlines() if "Root CA" in line)


# --- moving to a new machine ---------------------------------------------------------------------------
def test_export_import_into_a_new_key_store_keeps_reading_old_mail(kms: Kms, tmp_path: Path) -> None:
    old_mail = ok(kms.client(home(kms, ALICE), "encrypt", "--to", BOB, data=MESSAGE))
    p12 = tmp_path / "bob.p12"
    ok(kms.client(home(kms, BOB), "export", "--out", str(p12), env={"MAILKMS_EXPORT_PASSWORD": EXPORT_PW}))
    assert p12.stat().st_mode & 0o077 == 0
    new_home = tmp_path / "new-machine"
    wrong = kms.client(new_home, "import", str(p12), env={"MAILKMS_EXPORT_PASSWORD": "not the password"})
    assert wrong.returncode != 0 and b"password" in wrong.stderr and b"Traceback" not in wrong.stderr
    imported = kms.client(
        new_home, "import", str(p12), "--fingerprint", kms.fingerprint, "--server", kms.url,
        env={"MAILKMS_IMPORT_PASSWORD": EXPORT_PW},
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert b"Imported the keys of bob@example.org" in imported.stdout
    assert b"the figures are attached in spirit." in ok(kms.client(new_home, "decrypt", data=old_mail))
    signed = ok(kms.client(new_home, "sign", data=MESSAGE.replace(b"From: Alice <alice@", b"From: Bob <bob@")))
    verdict = kms.client(home(kms, ALICE), "verify", data=signed)
    assert verdict.returncode == 0 and f"Signed by {BOB}" in verdict.stderr.decode()
    again = kms.client(new_home, "import", str(p12), env={"MAILKMS_IMPORT_PASSWORD": EXPORT_PW})
    assert again.returncode != 0 and b"already holds a key store" in again.stderr
    shutil.rmtree(new_home)
