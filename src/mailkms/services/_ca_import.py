"""The server's half of a root ceremony: requests to carry to the offline root (`mailkms ca request`)
and the import of what it signed (`mailkms ca import`). The intermediates' keys never leave the
data folder; only CSRs go out and certificates and CRLs come back."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailkms.errors import Conflict, Malformed, NotFound
from mailkms.pki import (
    CertKind,
    PrivateKey,
    PublicURLs,
    ca_name,
    crl_number,
    encrypt_private_key,
    issued_by,
    key_type_of,
    load_private_key,
    make_infrastructure_ca,
)
from mailkms.services._ca import CAPaths, KeyMaker, key_exists, load_key_at, token_ref_path
from mailkms.services._ca_rekey import Rekeyed, keep_old_pair, key_id
from mailkms.services._files import write_atomically
from mailkms.services._offline_root import (
    INTERMEDIATE_CN,
    RootCeremony,
    kind_of_intermediate,
    make_csr,
    move_root_offline,
    new_key_like,
)


def _files(paths: CAPaths, kind: CertKind) -> tuple[Path, Path]:
    if kind is CertKind.ISSUING_CA:
        return paths.issuing_cert, paths.issuing_key
    if kind is CertKind.INFRASTRUCTURE_CA:
        return paths.infrastructure_cert, paths.infrastructure_key
    raise Malformed(f"{kind.value} is not an intermediate")


def _pending_key(paths: CAPaths, kind: CertKind) -> Path:
    """A new key waiting for its certificate: the encrypted file, or (a PKCS#11 key store) `.pkcs11` beside it."""
    return paths.pending_dir / f"{kind.value}.key.pem"


def request_intermediate(
    paths: CAPaths,
    passphrase: bytes,
    kind: CertKind,
    *,
    new_key: bool,
    key_store: str = "",
    now: dt.datetime | None = None,
) -> bytes:
    """A CSR for a new certificate of the S/MIME issuing CA or the infrastructure CA, signed with its
    key: the current one (a new certificate for the same key, e.g. before it expires), or with
    `new_key` a new one kept in DATA/ca/pending until the certificate comes back. The issuing CA's new
    key is made where its keys live (in the token of `key_store` when one is configured); its CSR
    carries the issuing CA's name, so the root signs the same name with a new key identifier, and
    `import_signed` then keeps the old pair in DATA/ca/previous/ as `mailkms ca rekey` does."""
    cert_path, key_path = _files(paths, kind)
    root = x509.load_pem_x509_certificate(paths.root_cert.read_bytes())
    if cert_path.exists():
        name = x509.load_pem_x509_certificate(cert_path.read_bytes()).subject
    else:  # an install from before the infrastructure CA
        new_key = True
        org = root.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
        country = root.subject.get_attributes_for_oid(x509.NameOID.COUNTRY_NAME)
        organization = str(org[0].value) if org else "mailkms"
        name = ca_name(
            f"{organization} {INTERMEDIATE_CN[kind]}", organization, str(country[0].value) if country else None
        )
    current = load_key_at(key_path, passphrase) if key_exists(key_path) else None
    key: PrivateKey
    if new_key:
        pending = _pending_key(paths, kind)
        if key_exists(pending):  # asked again: the same pending key, not a second one
            key = load_key_at(pending, passphrase)
        else:
            like = current or load_key_at(paths.issuing_key, passphrase)
            keys = KeyMaker(passphrase, key_store if kind is CertKind.ISSUING_CA else "")
            label = f"issuing-{now:%Y%m%dT%H%M%S}" if now else "issuing-new"  # in a token: LABEL-<this>
            key = keys.new(key_type_of(like), label)
            keys.save(key, pending)
    else:
        if current is None:
            raise NotFound(f"no key at {key_path}")
        key = current
    csr = make_csr(key, name)
    write_atomically(paths.pending_dir / f"{kind.value}.csr.pem", csr)
    return csr


@dataclass(frozen=True)
class Imported:
    what: str  # "root-crl", "issuing-ca" or "infrastructure-ca"
    serial: int  # the CRL number or the certificate serial
    not_after: dt.datetime
    rekeyed: Rekeyed | None = None  # the issuing CA took the new key of `ca request --new-key`


def import_signed(paths: CAPaths, passphrase: bytes, data: bytes, now: dt.datetime) -> Imported:
    """A root CRL or an intermediate from the ceremony, checked against the root before anything is
    written. A running server takes it without a restart (serve: _ca_watch_loop, SIGHUP).

    The issuing CA's certificate for the pending new key: the old certificate and key are kept in
    DATA/ca/previous/<old SKI>/ (as `mailkms ca rekey` keeps them: they go on answering OCSP for
    what they issued), the new key takes the old one's place, and the new certificate is written last."""
    root = x509.load_pem_x509_certificate(paths.root_cert.read_bytes())
    crl = _as_crl(data)
    if crl is not None:
        return _import_crl(paths, root, crl, now)
    cert = _as_cert(data)
    if not issued_by(cert, root):
        raise Malformed("the certificate is not signed by this server's root")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise Malformed(f"the certificate is not valid now (until {cert.not_valid_after_utc:%Y-%m-%d})")
    kind = kind_of_intermediate(cert)
    cert_path, key_path = _files(paths, kind)
    pending = _pending_key(paths, kind)
    requested = load_key_at(pending, passphrase) if key_exists(pending) else None
    new_key: PrivateKey | None = None
    if key_exists(key_path) and load_key_at(key_path, passphrase).public_key() == cert.public_key():
        pass
    elif requested is not None and requested.public_key() == cert.public_key():
        new_key = requested
    else:
        raise Malformed(f"the {kind.value} certificate is for no key of this server (current or requested)")
    old = x509.load_pem_x509_certificate(cert_path.read_bytes()) if cert_path.exists() else None
    if old == cert:
        raise Conflict(f"that {kind.value} certificate is already in use")
    rekeyed = None
    if new_key is not None and kind is CertKind.ISSUING_CA and old is not None:
        if cert.subject != old.subject:
            raise Malformed("the new issuing CA certificate does not carry the issuing CA's name")
        kept = keep_old_pair(paths, old, now)
        rekeyed = Rekeyed(key_id(old), key_id(cert), cert.serial_number, cert.not_valid_after_utc, kept)
    else:
        if old is not None:
            write_atomically(paths.retired_dir / f"{kind.value}-{old.serial_number:x}.crt.pem", cert_path.read_bytes())
        if new_key is not None and key_path.exists():
            write_atomically(
                paths.retired_dir / f"{kind.value}.{now:%Y%m%dT%H%M%S}.key.pem", key_path.read_bytes(), 0o600
            )
    if new_key is not None:
        KeyMaker(passphrase, "").save(new_key, key_path)  # a token's key: its reference only
        pending.unlink(missing_ok=True)
        token_ref_path(pending).unlink(missing_ok=True)
    write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    (paths.pending_dir / f"{kind.value}.csr.pem").unlink(missing_ok=True)
    return Imported(kind.value, cert.serial_number, cert.not_valid_after_utc, rekeyed)


def _import_crl(
    paths: CAPaths, root: x509.Certificate, crl: x509.CertificateRevocationList, now: dt.datetime
) -> Imported:
    if crl.issuer != root.subject or not crl.is_signature_valid(root.public_key()):  # type: ignore[arg-type]
        raise Malformed("the CRL is not signed by this server's root")
    if crl.next_update_utc is None or crl.next_update_utc <= now:
        raise Malformed("the CRL's nextUpdate has passed: sign a new one")
    if paths.root_crl.exists():
        current = x509.load_der_x509_crl(paths.root_crl.read_bytes())
        if crl_number(crl) <= crl_number(current):
            raise Conflict(f"the root CRL in use has number {crl_number(current)}; this one is {crl_number(crl)}")
    write_atomically(paths.root_crl, crl.public_bytes(serialization.Encoding.DER))
    return Imported("root-crl", crl_number(crl), crl.next_update_utc)


def _as_crl(data: bytes) -> x509.CertificateRevocationList | None:
    try:
        return x509.load_pem_x509_crl(data) if b"-----BEGIN X509 CRL" in data else x509.load_der_x509_crl(data)
    except ValueError:
        return None


def _as_cert(data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError:
        raise Malformed("neither a root CRL nor a certificate (PEM or DER)") from None


def take_root_offline(
    paths: CAPaths, passphrase: bytes, folder: Path, root_passphrase: bytes, urls: PublicURLs, now: dt.datetime
) -> list[str]:
    """An install from before: move the root key to `folder`. While it is still in hand it signs an
    infrastructure CA (if there is none: the server's TLS certificate came from the root) and a
    root CRL of the offline length; then the data folder's copy is removed. Returns what was made."""
    if paths.root_offline:
        raise Conflict("the root key is not in the data folder")
    signer = move_root_offline(paths.root_key, paths.root_cert, passphrase, folder, root_passphrase, urls)
    made = []
    if not paths.infrastructure_cert.exists():
        like = load_private_key(paths.issuing_key.read_bytes(), passphrase)
        key = new_key_like(like)
        org = signer.certificate.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
        country = signer.certificate.subject.get_attributes_for_oid(x509.NameOID.COUNTRY_NAME)
        cert = make_infrastructure_ca(
            signer, key, str(org[0].value) if org else "mailkms", str(country[0].value) if country else None, urls, now
        )
        write_atomically(paths.infrastructure_key, encrypt_private_key(key, passphrase), 0o600)
        write_atomically(paths.infrastructure_cert, cert.public_bytes(serialization.Encoding.PEM))
        made.append("infrastructure-ca")
    ceremony = RootCeremony.opened(folder, signer)
    if paths.root_crl.exists():  # go on from the number the server reached
        ceremony.continue_numbering(crl_number(x509.load_der_x509_crl(paths.root_crl.read_bytes())))
    crl = ceremony.sign_crl(now)
    write_atomically(paths.root_crl, crl.public_bytes(serialization.Encoding.DER))
    made.append("root-crl")
    paths.root_key.unlink()
    return made
