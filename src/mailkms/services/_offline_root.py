"""An offline root: its key lives only in a root folder (a removable disk carried to an offline
machine), never in the server's data folder.

The root signs intermediates (the S/MIME issuing CA, the infrastructure CA that issues the server's
TLS certificate) and its own CRL, nothing else. Both happen at a ceremony (`mailkms ca root-ceremony`)
on the machine that holds the root folder; what it signs is carried back and imported by the server
(`mailkms ca import`). The server's side makes the requests (`mailkms ca request`): CSRs signed with
the intermediate's own key, which never leaves the data folder.

Root folder:
    root.key.pem      the root key, PKCS#8 encrypted under the root passphrase (not the CA passphrase)
    root.crt.pem      the root certificate
    ceremony.json     public URL (for CDP/AIA), last root CRL number, intermediates revoked so far
    issued/           every intermediate the root signed (a log for the next ceremony)
    crl/              every root CRL signed
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailkms.errors import ConfigError, Conflict, Malformed, NotFound
from mailkms.pki import (
    BR_MAX_ARL_VALIDITY,
    CertKind,
    KeyType,
    PrivateKey,
    PublicURLs,
    RevokedEntry,
    SoftSigner,
    build_crl,
    certify_ca,
    encrypt_private_key,
    generate_key,
    key_type_of,
    load_private_key,
    make_root,
    signature_hash_for,
)
from mailkms.pki._pkcs11 import TokenKeyRef, open_token_key
from mailkms.services._files import write_atomically

ROOT_KEY = "root.key.pem"
ROOT_CERT = "root.crt.pem"
STATE = "ceremony.json"
ROOT_TOKEN_REF = "root.key.pkcs11"
OFFLINE_ROOT_CRL_VALIDITY = dt.timedelta(days=180)  # the ARL may run 365 days (BR); a ceremony twice a year


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class RootFolder:
    path: Path

    @property
    def key(self) -> Path:
        return self.path / ROOT_KEY

    @property
    def cert(self) -> Path:
        return self.path / ROOT_CERT

    @property
    def state(self) -> Path:
        return self.path / STATE

    @property
    def token_ref(self) -> Path:
        """With the root key in a PKCS#11 token (`root-ceremony migrate-key`): the URI (no PIN) and CKA_ID."""
        return self.path / ROOT_TOKEN_REF

    @property
    def in_token(self) -> bool:
        return self.token_ref.exists()


def create_offline_root(
    folder: Path,
    passphrase: bytes,
    *,
    key_type: KeyType,
    organization: str,
    country: str | None,
    urls: PublicURLs,
    now: dt.datetime,
) -> SoftSigner:
    """A new root, written only to `folder`; the signer is for the caller to sign the first
    intermediates and CRL with, then forget."""
    key = generate_key(key_type)
    root = make_root(key, organization, country, now)
    return _write_root_folder(folder, key, root, passphrase, urls)


def _write_root_folder(
    folder: Path, key: PrivateKey, root: x509.Certificate, passphrase: bytes, urls: PublicURLs
) -> SoftSigner:
    where = RootFolder(folder)
    if where.key.exists() or where.state.exists():
        raise Conflict(f"{folder} already holds a root")
    state = {"public_url": urls.base, "crl_number": 0, "revoked": []}
    write_atomically(where.key, encrypt_private_key(key, passphrase), 0o600)
    write_atomically(where.cert, _pem(root))
    write_atomically(where.state, json.dumps(state, indent=2).encode())
    return SoftSigner(root, key)


def move_root_offline(
    root_key: Path, root_cert: Path, ca_passphrase: bytes, folder: Path, passphrase: bytes, urls: PublicURLs
) -> SoftSigner:
    """An install from before: the root key is written to `folder`, re-encrypted under the root
    passphrase; the caller signs what it still needs, then removes the key from the data folder."""
    key = load_private_key(root_key.read_bytes(), ca_passphrase)
    root = x509.load_pem_x509_certificate(root_cert.read_bytes())
    return _write_root_folder(folder, key, root, passphrase, urls)


class RootCeremony:
    """The root folder opened with its passphrase, on the offline machine."""

    def __init__(self, folder: RootFolder, signer: SoftSigner, state: dict[str, object]) -> None:
        self.folder = folder
        self.signer = signer
        self._state = state

    @classmethod
    def open(cls, path: Path, passphrase: bytes | None) -> RootCeremony:
        """The root key from the folder (under `passphrase`), or from the PKCS#11 token the folder
        names (the token's PIN from its pin-source file; no passphrase)."""
        folder = RootFolder(path)
        if not (folder.key.exists() or folder.in_token) or not folder.state.exists():
            raise NotFound(f"{path} holds no offline root ({ROOT_KEY} or {ROOT_TOKEN_REF}, {STATE})")
        key: PrivateKey
        if folder.in_token:
            ref = json.loads(folder.token_ref.read_text())
            key = open_token_key(TokenKeyRef(str(ref["uri"]), bytes.fromhex(str(ref["id"]))))
        elif passphrase is None:
            raise ConfigError("the root key is a file: give the root passphrase")
        else:
            try:
                key = load_private_key(folder.key.read_bytes(), passphrase)
            except ValueError:
                raise ConfigError("the root passphrase does not open the root key") from None
        root = x509.load_pem_x509_certificate(folder.cert.read_bytes())
        if root.public_key() != key.public_key():
            raise ConfigError(f"{folder.key} is not the key of {folder.cert}")
        state = json.loads(folder.state.read_text())
        return cls(folder, SoftSigner(root, key), state)

    @classmethod
    def opened(cls, path: Path, signer: SoftSigner) -> RootCeremony:
        """The folder just made by `create_offline_root`, with the key still in hand (init)."""
        return cls(RootFolder(path), signer, json.loads(RootFolder(path).state.read_text()))

    def continue_numbering(self, last: int) -> None:
        """The next CRL follows `last` (the number an online root reached before it was moved)."""
        if last > int(str(self._state["crl_number"])):
            self._state["crl_number"] = last
            write_atomically(self.folder.state, json.dumps(self._state, indent=2).encode())

    @property
    def root(self) -> x509.Certificate:
        return self.signer.certificate

    @property
    def urls(self) -> PublicURLs:
        return PublicURLs(str(self._state["public_url"]))

    def sign_intermediate(
        self, csr_data: bytes, now: dt.datetime, lifetime: dt.timedelta | None = None
    ) -> tuple[CertKind, x509.Certificate]:
        """A CSR the server made (`mailkms ca request`) becomes an intermediate. Which kind is
        written in the CSR's subject by the server and checked again here."""
        csr = _load_csr(csr_data)
        if not csr.is_signature_valid:
            raise Malformed("the CSR's signature does not verify (it was not made with its own key)")
        kind = _kind_of_name(csr.subject)
        args = {"lifetime": lifetime} if lifetime is not None else {}
        cert = certify_ca(self.signer, kind, csr.public_key(), csr.subject, self.urls, now, **args)  # type: ignore[arg-type]
        write_atomically(self.folder.path / "issued" / f"{kind.value}-{cert.serial_number:x}.crt.pem", _pem(cert))
        return kind, cert

    def sign_crl(
        self,
        now: dt.datetime,
        validity: dt.timedelta = OFFLINE_ROOT_CRL_VALIDITY,
        revoke: tuple[tuple[int, x509.ReasonFlags | None], ...] = (),
    ) -> x509.CertificateRevocationList:
        """The root's CRL (an ARL: at most 365 days), listing every intermediate revoked so far."""
        revoked = list(self._revoked())
        known = {e.serial for e in revoked}
        this_update = now.replace(microsecond=0)
        for serial, reason in revoke:
            if serial not in known:
                revoked.append(RevokedEntry(serial, this_update, reason))
                known.add(serial)
        number = int(str(self._state["crl_number"])) + 1
        crl = build_crl(
            self.signer,
            revoked,
            number=number,
            this_update=this_update,
            next_update=this_update + validity,
            max_validity=BR_MAX_ARL_VALIDITY,
        )
        self._state["crl_number"] = number
        self._state["revoked"] = [
            {"serial": f"{e.serial:x}", "at": e.revoked_at.isoformat(), "reason": e.reason.value if e.reason else None}
            for e in revoked
        ]
        write_atomically(self.folder.path / "crl" / f"root-{number}.crl", crl.public_bytes(serialization.Encoding.DER))
        write_atomically(self.folder.state, json.dumps(self._state, indent=2).encode())
        return crl

    def _revoked(self) -> list[RevokedEntry]:
        entries = self._state.get("revoked") or []
        assert isinstance(entries, list)
        return [
            RevokedEntry(
                int(e["serial"], 16),
                dt.datetime.fromisoformat(e["at"]),
                x509.ReasonFlags(e["reason"]) if e.get("reason") else None,
            )
            for e in entries
        ]


def _load_csr(data: bytes) -> x509.CertificateSigningRequest:
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise Malformed(f"not a certificate signing request: {exc}") from None


INTERMEDIATE_CN = {CertKind.ISSUING_CA: "S/MIME Issuing CA", CertKind.INFRASTRUCTURE_CA: "Infrastructure CA"}


def _kind_of_name(name: x509.Name) -> CertKind:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    for kind, marker in INTERMEDIATE_CN.items():
        if marker in cn:
            return kind
    raise Malformed(f"the CSR's CN {cn!r} names no intermediate mailkms makes ({', '.join(INTERMEDIATE_CN.values())})")


def kind_of_intermediate(cert: x509.Certificate) -> CertKind:
    """By the EKU the root wrote: emailProtection is the S/MIME issuing CA, serverAuth the infrastructure CA."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise Malformed("an intermediate without extendedKeyUsage is none mailkms uses") from None
    if ExtendedKeyUsageOID.EMAIL_PROTECTION in eku:
        return CertKind.ISSUING_CA
    if ExtendedKeyUsageOID.SERVER_AUTH in eku:
        return CertKind.INFRASTRUCTURE_CA
    raise Malformed("the intermediate is neither for e-mail nor for TLS")


def make_csr(key: PrivateKey, name: x509.Name) -> bytes:
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, signature_hash_for(key))
    return csr.public_bytes(serialization.Encoding.PEM)


def new_key_like(key: PrivateKey) -> PrivateKey:
    return generate_key(key_type_of(key))
