"""`mailkms ca migrate-key`: an existing soft CA's keys (issuing CA, OCSP responder, mail signer) put
into a PKCS#11 token. Each key is imported as CKA_SENSITIVE and not extractable; its encrypted file is
removed only after a signature made by the token verifies under the key's certificate. The token
object is destroyed again when it does not, and the file stays."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from mailkms.errors import ConfigError, Conflict, Internal
from mailkms.pki import load_private_key
from mailkms.pki._pkcs11 import Token, TokenECKey, TokenRSAKey
from mailkms.services._ca import CAPaths, KeyMaker, token_ref_path
from mailkms.services._files import write_atomically
from mailkms.services._offline_root import RootCeremony, RootFolder


@dataclass(frozen=True)
class Migrated:
    role: str  # issuing, ocsp, mail
    label: str
    key_id: str  # CKA_ID, hex


def _roles(paths: CAPaths) -> list[tuple[str, Path, Path]]:
    return [
        ("issuing", paths.issuing_key, paths.issuing_cert),
        ("ocsp", paths.ocsp_key, paths.ocsp_cert),
        ("mail", paths.mail_key, paths.mail_cert),
    ]


def _token_signature_verifies(key: TokenRSAKey | TokenECKey, cert: x509.Certificate) -> bool:
    data = os.urandom(32)
    public = cert.public_key()
    try:
        if isinstance(key, TokenRSAKey) and isinstance(public, rsa.RSAPublicKey):
            public.verify(
                key.sign(data, padding.PKCS1v15(), hashes.SHA256()), data, padding.PKCS1v15(), hashes.SHA256()
            )
        elif isinstance(key, TokenECKey) and isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(key.sign(data, ec.ECDSA(hashes.SHA256())), data, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def migrate_keys_to_token(paths: CAPaths, passphrase: bytes, key_store: str) -> list[Migrated]:
    """Every key of the three roles that is still a file goes into the token named by `key_store`
    (labels as `init --key-store` makes them: OBJECT, OBJECT-ocsp, OBJECT-mail). A label the token
    already holds is refused before anything is imported."""
    token = Token.for_uri(key_store)
    todo = [(r, k, c) for r, k, c in _roles(paths) if k.exists() and not token_ref_path(k).exists()]
    if not todo:
        raise Conflict("no CA key is left in a file: they are in a token already (DATA/ca/*.pkcs11)")
    labels = {role: token.uri.object if role == "issuing" else f"{token.uri.object}-{role}" for role, _, _ in todo}
    taken = [label for label in labels.values() if token.find_label(label) is not None]
    if taken:
        raise Conflict(f"the token {token.uri.token!r} already holds keys labelled {', '.join(taken)}")
    done = []
    for role, key_path, cert_path in todo:
        try:
            key = load_private_key(key_path.read_bytes(), passphrase)
        except ValueError:
            raise ConfigError(f"the CA passphrase does not open {key_path}") from None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise Internal(f"{key_path} holds neither an RSA nor an EC key")
        key_id = os.urandom(16)
        moved = token.import_key(key, key_id, labels[role])
        del key
        if not _token_signature_verifies(moved, x509.load_pem_x509_certificate(cert_path.read_bytes())):
            token.destroy(key_id)
            raise Internal(
                f"a signature by the token's copy of the {role} key does not verify under {cert_path}: "
                f"the token object was destroyed again and {key_path} kept"
            )
        KeyMaker(passphrase, key_store).save(moved, key_path)  # DATA/...key.pkcs11 names it now
        key_path.unlink()
        done.append(Migrated(role, labels[role], key_id.hex()))
    return done


def set_key_store_in_config(config: Path, key_store: str) -> None:
    """[ca] key_store in mailkms.toml, so `serve` opens the token (the URI holds no PIN)."""
    text = config.read_text() if config.exists() else ""
    line = f"key_store = {json.dumps(key_store)}  # PKCS#11 token (README)\n"
    if "\n[ca]\n" in "\n" + text:
        text = ("\n" + text).replace("\n[ca]\n", "\n[ca]\n" + line, 1)[1:]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + "\n[ca]\n" + line
    config.write_text(text)


def migrate_root_key_to_token(root_dir: Path, passphrase: bytes, key_store: str) -> Migrated:
    """At the offline machine: the root folder's key goes into a PKCS#11 token (label OBJECT), checked
    by a signature of the token under the root certificate; then root.key.pem is removed and
    root.key.pkcs11 names the token key. Later ceremonies need the token and its PIN file, no passphrase."""
    ceremony = RootCeremony.open(root_dir, passphrase)
    folder = RootFolder(root_dir)
    if folder.in_token:
        raise Conflict(f"the root key of {root_dir} is in a token already")
    key = ceremony.signer.private_key
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise Internal("the root key is neither an RSA nor an EC key")
    token = Token.for_uri(key_store)
    label = token.uri.object
    if token.find_label(label) is not None:
        raise Conflict(f"the token {token.uri.token!r} already holds a key labelled {label}")
    key_id = os.urandom(16)
    moved = token.import_key(key, key_id, label)
    if not _token_signature_verifies(moved, ceremony.root):
        token.destroy(key_id)
        raise Internal(f"a signature by the token's copy of the root key does not verify: {folder.key} kept")
    text = json.dumps({"uri": moved.reference.uri, "id": key_id.hex()})
    write_atomically(folder.token_ref, (text + "\n").encode())
    folder.key.unlink()
    return Migrated("root", label, key_id.hex())
