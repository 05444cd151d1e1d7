"""A small real PKI for the S/MIME tests (made at run time), and the outside judges' command lines."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailkms.clock import UTC
from mailkms.pki import (
    CertKind,
    Issuer,
    KeyType,
    PrivateKey,
    PublicURLs,
    SoftSigner,
    generate_key,
    make_issuing_ca,
    make_root,
    subscriber_validity,
)

NOW = dt.datetime.now(UTC).replace(microsecond=0)
MESSAGE = (
    b"From: Alice <alice@example.org>\n"
    b"To: Bob <bob@example.org>\n"
    b"Subject: quarterly figures\n"
    b"Date: Wed, 25 Nov 2026 10:00:00 +0000\n"
    b"Message-ID: <figures-1@example.org>\n"
    b"\n"
    b"Hello Bob,\n\nthe figures are attached in spirit.\n-- \nAlice\n"
)


@dataclass
class Identity:
    mailbox: str
    signing: x509.Certificate
    signing_key: PrivateKey
    encryption: x509.Certificate
    encryption_key: PrivateKey


@dataclass
class SmimePKI:
    root: x509.Certificate
    issuing: x509.Certificate
    issuer: Issuer
    folder: Path

    def identity(
        self, mailbox: str, signing_type: KeyType = KeyType.RSA2048, start: dt.datetime | None = None
    ) -> Identity:
        validity = subscriber_validity(start or NOW - dt.timedelta(days=1), 18)
        sk = generate_key(signing_type)
        ek = generate_key(KeyType.RSA2048)
        signing = self.issuer.issue(
            self.issuer.prepare_subscriber(CertKind.SIGNING, mailbox, sk.public_key(), validity, list(KeyType))
        )
        encryption = self.issuer.issue(
            self.issuer.prepare_subscriber(CertKind.ENCRYPTION, mailbox, ek.public_key(), validity, list(KeyType))
        )
        ident = Identity(mailbox, signing, sk, encryption, ek)
        name = mailbox.split("@")[0] + ("" if start is None else f"-{start:%Y%m}")
        write_pem(self.folder / f"{name}-sign.crt", signing)
        write_key(self.folder / f"{name}-sign.key", sk)
        write_pem(self.folder / f"{name}-enc.crt", encryption)
        write_key(self.folder / f"{name}-enc.key", ek)
        return ident

    @property
    def root_pem(self) -> Path:
        return self.folder / "root.crt"

    @property
    def issuing_pem(self) -> Path:
        return self.folder / "issuing.crt"


def write_pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def write_key(path: Path, key: PrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def make_pki(folder: Path) -> SmimePKI:
    folder.mkdir(parents=True, exist_ok=True)
    root_key = generate_key(KeyType.RSA2048)
    root = make_root(root_key, "mailkms smime test", None, NOW - dt.timedelta(days=1000))
    issuing_key = generate_key(KeyType.RSA2048)
    issuing = make_issuing_ca(
        SoftSigner(root, root_key),
        issuing_key,
        "mailkms smime test",
        None,
        PublicURLs("http://kms.example.org/"),
        NOW - dt.timedelta(days=900),
    )
    write_pem(folder / "root.crt", root)
    write_pem(folder / "issuing.crt", issuing)
    return SmimePKI(
        root, issuing, Issuer(SoftSigner(issuing, issuing_key), PublicURLs("http://kms.example.org/")), folder
    )


def run(cmd: list[str], data: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(cmd, input=data, capture_output=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return proc


def nss_tools() -> bool:
    return all(shutil.which(t) for t in ("certutil", "cmsutil", "pk12util"))


def require_tools(*names: str, package: str) -> None:
    """Outside judges: missing in CI is a failure (as PostgreSQL is), elsewhere a skip."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    message = f"{', '.join(missing)} missing ({package}): run scripts/system-deps.sh"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_nss() -> None:
    require_tools("certutil", "cmsutil", "pk12util", package="libnss3-tools")


def require_gpgsm() -> None:
    require_tools("gpgsm", "gpgconf", package="gpgsm")
