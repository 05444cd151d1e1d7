"""`mailkms ca rekey`: the S/MIME issuing CA rolled to a new key pair (same subject name, new Subject
Key Identifier), signed by the online root. The new key is made where the current one lives (the
PKCS#11 token when a key store is configured, else an encrypted file); the old certificate and key
are kept under DATA/ca/previous/, named by the old key's identifier, never deleted here. With an
offline root the same roll is `ca request --kind issuing --new-key` + ceremony + `ca import`
(services/_ca_import.py), which keeps the old pair with `keep_old_pair` from here.

Running servers take the new key through the CA-file reload (CAContext.reload_from_files, every
[ca] reload_check_seconds and on SIGHUP); they never load a CA key per request.

OCSP and CRLs are per key: the old key answers OCSP for what it issued (RFC 6960 §4.2.2.2) and keeps
signing the CRLs its certificates name; the new key's certificates name CRL partitions of their own
(services._crl_partitions, RFC 5280 §6.3.3)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailkms.errors import ConfigError, Conflict, Internal
from mailkms.pki import CertKind, PublicURLs, SoftSigner, certify_ca, key_type_of, load_private_key
from mailkms.services._ca import CAPaths, KeyMaker, load_key_at, token_ref_path
from mailkms.services._files import write_atomically


@dataclass(frozen=True)
class Rekeyed:
    old_key_id: str  # SKI of the replaced issuing CA certificate, hex
    new_key_id: str
    serial: int  # of the new issuing CA certificate
    not_after: dt.datetime
    kept_in: Path  # where the old certificate and key are


def key_id(cert: x509.Certificate) -> str:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def rekey_issuing_ca(paths: CAPaths, passphrase: bytes, key_store: str, urls: PublicURLs, now: dt.datetime) -> Rekeyed:
    """A new issuing key and certificate from the online root; the old pair moved to previous/<SKI>/.
    The new certificate is written last, so a server reloading in between still sees a matching pair
    (reload_from_files loads the key named beside a certificate whose public key changed)."""
    if paths.root_offline:
        raise ConfigError(
            "the root is offline: give the issuing CA a new key at a root ceremony (ca request --kind issuing "
            "--new-key, root-ceremony sign-ca, ca import)"
        )
    root = x509.load_pem_x509_certificate(paths.root_cert.read_bytes())
    old = x509.load_pem_x509_certificate(paths.issuing_cert.read_bytes())
    try:
        old_key = load_key_at(paths.issuing_key, passphrase)
        root_key = load_private_key(paths.root_key.read_bytes(), passphrase)
    except ValueError:
        raise ConfigError("the CA passphrase does not open the CA keys") from None
    if old_key.public_key() != old.public_key():
        raise Internal(f"{paths.issuing_key} is not the key of {paths.issuing_cert}")
    old_id = key_id(old)
    previous_folder(paths, old)  # refused before a key is made
    keys = KeyMaker(passphrase, key_store)
    new_key = keys.new(key_type_of(old_key), f"issuing-{now:%Y%m%dT%H%M%S}")
    new = certify_ca(SoftSigner(root, root_key), CertKind.ISSUING_CA, new_key.public_key(), old.subject, urls, now)
    if key_id(new) == old_id:
        raise Internal("the new issuing key has the identifier of the old one")
    kept = keep_old_pair(paths, old, now)
    keys.save(new_key, paths.issuing_key)
    write_atomically(paths.issuing_cert, new.public_bytes(serialization.Encoding.PEM))
    return Rekeyed(old_id, key_id(new), new.serial_number, new.not_valid_after_utc, kept)


def previous_folder(paths: CAPaths, old: x509.Certificate) -> Path:
    """DATA/ca/previous/<SKI of `old`>/, which must not exist yet."""
    kept = paths.previous_dir / key_id(old)
    if kept.exists():
        raise Conflict(f"{kept} exists already")
    return kept


def keep_old_pair(paths: CAPaths, old: x509.Certificate, now: dt.datetime) -> Path:
    """The issuing CA's current certificate `old` and its key (the encrypted file, or the reference to
    the token's key) copied to previous/<old SKI>/ with retired.json, before a new key takes their
    place (`ca rekey`, and `ca import` of a certificate for the key `ca request --new-key` made).
    Copied, not moved: the files stay valid until the new pair is complete."""
    kept = previous_folder(paths, old)
    write_atomically(kept / "issuing.crt.pem", old.public_bytes(serialization.Encoding.PEM))
    ref = token_ref_path(paths.issuing_key)
    if ref.exists():
        write_atomically(token_ref_path(kept / "issuing.key.pem"), ref.read_bytes())
    else:
        write_atomically(kept / "issuing.key.pem", paths.issuing_key.read_bytes(), 0o600)
    info = {
        "retired_at": now.isoformat(),
        "not_after": old.not_valid_after_utc.isoformat(),
        "serial": f"{old.serial_number:x}",
    }
    write_atomically(kept / "retired.json", json.dumps(info, indent=2).encode())
    return kept
