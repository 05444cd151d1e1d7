"""PKCS#12 (RFC 7292) holding a whole key history: every key, its certificate and the chain.

`cryptography` writes one private key per file, so the PFX is assembled from asn1crypto's
PKCS#12 structures. Keys and certificates are encrypted with PBES2 (PBKDF2-HMAC-SHA256,
AES-256-CBC; `cryptography`'s PBKDF2HMAC and AES); the integrity MAC is HMAC-SHA256 with
its key from the PKCS#12 KDF (RFC 7292 Appendix B.2: the only MAC key derivation that
OpenSSL 3.0 and NSS check). Each key bag and its certificate bag share a localKeyId and a
friendly name that says what the key is.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from asn1crypto import algos as asn1_algos
from asn1crypto import cms as asn1_cms
from asn1crypto import core as asn1_core
from asn1crypto import keys as asn1_keys
from asn1crypto import pkcs12 as asn1_pkcs12
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.hazmat.primitives.serialization import pkcs12 as crypto_pkcs12

from mailkms.errors import BadMessage, WrongPassphrase
from mailkms.pki._keys import PrivateKey, load_private_key_der, pbes2_encrypt, private_key_der
from mailkms.pki._smime import aes_cbc_decrypt

PBKDF2_ITERATIONS = 600_000  # OWASP 2023 for PBKDF2-HMAC-SHA256
MAC_ITERATIONS = 600_000
# Reading: a file names its own iteration counts, and each is work done before the password is
# known to be right. Refuse counts above this (17x what we write), and more than this in all.
MAX_READ_ITERATIONS = 10_000_000
MAX_READ_ITERATIONS_TOTAL = 40_000_000
_SALT_BYTES = 16
_HASHLIB = {"sha1": "sha1", "sha224": "sha224", "sha256": "sha256", "sha384": "sha384", "sha512": "sha512"}
_PRF: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_AES = {"aes128_cbc": 16, "aes192_cbc": 24, "aes256_cbc": 32}


@dataclass(frozen=True)
class KeyEntry:
    """A private key with its certificate, under one friendly name."""

    key: PrivateKey
    certificate: x509.Certificate
    friendly_name: str


@dataclass(frozen=True)
class Bundle:
    entries: tuple[KeyEntry, ...]
    chain: tuple[x509.Certificate, ...]  # CA certificates (no key)


# --- the PKCS#12 key derivation (RFC 7292 Appendix B.2), for the MAC key -------------------------
def pkcs12_kdf(
    password: str, salt: bytes, iterations: int, length: int, hash_name: str = "sha256", ident: int = 3
) -> bytes:
    """ID 3 = MAC key. The password is a BMPString with two zero bytes at the end."""
    v = hashlib.new(hash_name).block_size
    pw = (password.encode("utf-16-be") + b"\x00\x00") if password else b""

    def fill(data: bytes) -> bytes:
        if not data:
            return b""
        size = v * ((len(data) + v - 1) // v)
        return (data * (size // len(data) + 1))[:size]

    d = bytes([ident]) * v
    i = bytearray(fill(salt) + fill(pw))
    out = b""
    while len(out) < length:
        a = d + bytes(i)
        for _ in range(iterations):
            a = hashlib.new(hash_name, a).digest()
        out += a
        b = int.from_bytes(fill(a)[:v], "big")
        for j in range(0, len(i), v):
            block = (int.from_bytes(i[j : j + v], "big") + b + 1) % (1 << (8 * v))
            i[j : j + v] = block.to_bytes(v, "big")
    return out[:length]


def _mac(data: bytes, password: str, salt: bytes, iterations: int, hash_name: str) -> bytes:
    size = hashlib.new(hash_name).digest_size
    key = pkcs12_kdf(password, salt, iterations, size, hash_name)
    return hmac.new(key, data, hash_name).digest()


# --- PBES2 --------------------------------------------------------------------------------------
def _pbes2_encrypt(data: bytes, password: str, iterations: int) -> tuple[asn1_algos.EncryptionAlgorithm, bytes]:
    algorithm, encrypted = pbes2_encrypt(data, password.encode(), iterations)
    return algorithm, encrypted


def _pbes2_decrypt(algorithm: asn1_algos.EncryptionAlgorithm, data: bytes, password: str, budget: _Budget) -> bytes:
    if algorithm["algorithm"].native != "pbes2":
        legacy = _legacy_iterations(algorithm)
        if legacy is not None:
            budget.spend(legacy)
        raise _Legacy(algorithm["algorithm"].native)
    params = algorithm["parameters"]
    kdf = params["key_derivation_func"]
    scheme = params["encryption_scheme"]
    cipher_name = scheme["algorithm"].native
    if kdf["algorithm"].native != "pbkdf2" or cipher_name not in _AES:
        raise _Legacy(f"{kdf['algorithm'].native}/{cipher_name}")
    kp = kdf["parameters"]
    prf = _PRF.get(kp["prf"]["algorithm"].native)
    if prf is None:
        raise _Legacy(kp["prf"]["algorithm"].native)
    iterations = budget.spend(kp["iteration_count"].native)
    key = PBKDF2HMAC(prf(), _AES[cipher_name], kp["salt"].native, iterations).derive(password.encode())
    try:
        return aes_cbc_decrypt(key, scheme["parameters"].native, data)
    except ValueError:
        raise WrongPassphrase("the password does not open the PKCS#12 file") from None


class _Budget:
    """The iteration counts one read may run: each at most MAX_READ_ITERATIONS, all together at most
    MAX_READ_ITERATIONS_TOTAL, so a crafted file cannot make an import hang."""

    def __init__(self) -> None:
        self.left = MAX_READ_ITERATIONS_TOTAL

    def spend(self, iterations: object) -> int:
        if not isinstance(iterations, int) or iterations < 1:
            raise BadMessage("the PKCS#12 file names an invalid iteration count")
        if iterations > MAX_READ_ITERATIONS:
            raise BadMessage(
                f"the PKCS#12 file asks for {iterations:,} key-derivation iterations; at most "
                f"{MAX_READ_ITERATIONS:,} are run"
            )
        if iterations > self.left:
            raise BadMessage("the PKCS#12 file asks for too many key-derivation iterations in all")
        self.left -= iterations
        return iterations


def _legacy_iterations(algorithm: asn1_algos.EncryptionAlgorithm) -> object:
    """The iteration count of a PKCS#5 v1 / PKCS#12 PBE algorithm (None when it has none)."""
    try:
        params = algorithm["parameters"]
        return params["iterations"].native
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


class _Legacy(Exception):
    """A PKCS#12 encrypted with something other than PBES2/AES: left to `cryptography`'s reader."""


# --- writing ------------------------------------------------------------------------------------
def _attributes(friendly_name: str, local_key_id: bytes | None) -> asn1_pkcs12.Attributes:
    attrs: list[dict[str, object]] = [{"type": "friendly_name", "values": [friendly_name]}]
    if local_key_id is not None:
        attrs.append({"type": "local_key_id", "values": [local_key_id]})
    return asn1_pkcs12.Attributes(attrs)


def local_key_id(cert: x509.Certificate) -> bytes:
    """SHA-1 of the certificate, as OpenSSL sets it (an identifier, not a security function)."""
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER), usedforsecurity=False).digest()


def _subject_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def build_pkcs12(
    entries: Sequence[KeyEntry],
    chain: Sequence[x509.Certificate],
    password: str,
    *,
    iterations: int = PBKDF2_ITERATIONS,
    mac_iterations: int = MAC_ITERATIONS,
) -> bytes:
    """One PFX with every key (shrouded), its certificate and the CA chain (encrypted)."""
    if not password:
        raise BadMessage("a PKCS#12 export needs a password")
    if not entries:
        raise BadMessage("nothing to export")
    key_bags = []
    cert_bags = []
    for entry in entries:
        kid = local_key_id(entry.certificate)
        algorithm, encrypted = _pbes2_encrypt(private_key_der(entry.key), password, iterations)
        shrouded = asn1_keys.EncryptedPrivateKeyInfo({"encryption_algorithm": algorithm, "encrypted_data": encrypted})
        key_bags.append(
            asn1_pkcs12.SafeBag(
                {
                    "bag_id": "pkcs8_shrouded_key_bag",
                    "bag_value": shrouded,
                    "bag_attributes": _attributes(entry.friendly_name, kid),
                }
            )
        )
        cert_bags.append(_cert_bag(entry.certificate, entry.friendly_name, kid))
    for cert in chain:
        cert_bags.append(_cert_bag(cert, _subject_name(cert), None))
    certs_der = asn1_pkcs12.SafeContents(cert_bags).dump()
    algorithm, encrypted = _pbes2_encrypt(certs_der, password, iterations)
    encrypted_certs = asn1_cms.ContentInfo(
        {
            "content_type": "encrypted_data",
            "content": asn1_cms.EncryptedData(
                {
                    "version": "v0",
                    "encrypted_content_info": {
                        "content_type": "data",
                        "content_encryption_algorithm": algorithm,
                        "encrypted_content": encrypted,
                    },
                }
            ),
        }
    )
    keys_info = asn1_cms.ContentInfo({"content_type": "data", "content": asn1_pkcs12.SafeContents(key_bags).dump()})
    auth_safe = asn1_pkcs12.AuthenticatedSafe([encrypted_certs, keys_info]).dump()
    salt = os.urandom(_SALT_BYTES)
    pfx = asn1_pkcs12.Pfx(
        {
            "version": "v3",
            "auth_safe": {"content_type": "data", "content": auth_safe},
            "mac_data": {
                "mac": {
                    "digest_algorithm": {"algorithm": "sha256"},
                    "digest": _mac(auth_safe, password, salt, mac_iterations, "sha256"),
                },
                "mac_salt": salt,
                "iterations": mac_iterations,
            },
        }
    )
    der: bytes = pfx.dump()
    return der


def _cert_bag(cert: x509.Certificate, name: str, kid: bytes | None) -> asn1_pkcs12.SafeBag:
    bag = asn1_pkcs12.CertBag(
        {"cert_id": "x509", "cert_value": asn1_core.ParsableOctetString(cert.public_bytes(serialization.Encoding.DER))}
    )
    return asn1_pkcs12.SafeBag({"bag_id": "cert_bag", "bag_value": bag, "bag_attributes": _attributes(name, kid)})


# --- reading ------------------------------------------------------------------------------------
@dataclass
class _Bag:
    kind: str  # key | cert
    value: bytes
    friendly_name: str | None
    local_key_id: bytes | None


def _bag_attrs(bag: asn1_pkcs12.SafeBag) -> tuple[str | None, bytes | None]:
    name = kid = None
    for attr in bag["bag_attributes"] or []:
        kind = attr["type"].native
        if kind == "friendly_name" and len(attr["values"]):
            name = str(attr["values"][0].native)
        elif kind == "local_key_id" and len(attr["values"]):
            kid = bytes(attr["values"][0].native)
    return name, kid


def _read_bags(contents: asn1_pkcs12.SafeContents, password: str, out: list[_Bag], budget: _Budget) -> None:
    for bag in contents:
        bag_id = bag["bag_id"].native
        name, kid = _bag_attrs(bag)
        value = bag["bag_value"]
        if bag_id == "pkcs8_shrouded_key_bag":
            epki = asn1_keys.EncryptedPrivateKeyInfo.load(value.untag().dump())
            der = _pbes2_decrypt(epki["encryption_algorithm"], epki["encrypted_data"].native, password, budget)
            out.append(_Bag("key", der, name, kid))
        elif bag_id == "key_bag":
            out.append(_Bag("key", value.untag().dump(), name, kid))
        elif bag_id == "cert_bag":
            cert_bag = asn1_pkcs12.CertBag.load(value.untag().dump())
            if cert_bag["cert_id"].native == "x509":
                out.append(_Bag("cert", cert_bag["cert_value"].contents, name, kid))
        elif bag_id == "safe_contents":
            _read_bags(asn1_pkcs12.SafeContents.load(value.untag().dump()), password, out, budget)


def read_pkcs12(data: bytes, password: str) -> Bundle:
    """Every key with its certificate, and the certificates without a key (the chain)."""
    budget = _Budget()
    try:
        pfx = asn1_pkcs12.Pfx.load(data)
        auth_safe_der = pfx["auth_safe"]["content"].native
        mac_data = pfx["mac_data"]
        if mac_data.native is not None:
            hash_name = _HASHLIB.get(mac_data["mac"]["digest_algorithm"]["algorithm"].native)
            if hash_name is None:
                budget.spend(mac_data["iterations"].native)
                raise _Legacy("mac")
            want = mac_data["mac"]["digest"].native
            iterations = budget.spend(mac_data["iterations"].native)
            got = _mac(auth_safe_der, password, mac_data["mac_salt"].native, iterations, hash_name)
            if not hmac.compare_digest(want, got):
                raise WrongPassphrase("the password does not open the PKCS#12 file (or the file was altered)")
        bags: list[_Bag] = []
        for info in asn1_pkcs12.AuthenticatedSafe.load(auth_safe_der):
            kind = info["content_type"].native
            if kind == "data":
                _read_bags(asn1_pkcs12.SafeContents.load(info["content"].native), password, bags, budget)
            elif kind == "encrypted_data":
                eci = info["content"]["encrypted_content_info"]
                plain = _pbes2_decrypt(
                    eci["content_encryption_algorithm"], eci["encrypted_content"].native, password, budget
                )
                _read_bags(asn1_pkcs12.SafeContents.load(plain), password, bags, budget)
            else:
                raise BadMessage(f"unsupported PKCS#12 content {kind}")
        return _pair(bags)
    except _Legacy:
        _check_legacy_costs(data)
        return _read_legacy(data, password)
    except (WrongPassphrase, BadMessage):
        raise
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise BadMessage(f"not a readable PKCS#12 file ({exc.__class__.__name__})") from exc


def _pair(bags: list[_Bag]) -> Bundle:
    certs = [(x509.load_der_x509_certificate(b.value), b) for b in bags if b.kind == "cert"]
    used: set[int] = set()
    entries: list[KeyEntry] = []
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    for bag in (b for b in bags if b.kind == "key"):
        key = load_private_key_der(bag.value)
        public = key.public_key().public_bytes(serialization.Encoding.DER, spki)
        match = None
        for index, (cert, cert_bag) in enumerate(certs):
            same_key = cert.public_key().public_bytes(serialization.Encoding.DER, spki) == public
            if same_key and (bag.local_key_id is None or cert_bag.local_key_id in (bag.local_key_id, None)):
                match = index
                break
        if match is None:
            raise BadMessage("a key in the PKCS#12 file has no certificate")
        used.add(match)
        cert, cert_bag = certs[match]
        entries.append(KeyEntry(key, cert, bag.friendly_name or cert_bag.friendly_name or _subject_name(cert)))
    chain = tuple(cert for index, (cert, _) in enumerate(certs) if index not in used)
    return Bundle(tuple(entries), chain)


def _check_legacy_costs(data: bytes) -> None:
    """Before OpenSSL reads another program's file: the iteration counts it names (MAC, encrypted
    contents, shrouded keys in plain contents) within the same caps."""
    budget = _Budget()
    try:
        pfx = asn1_pkcs12.Pfx.load(data)
        if pfx["mac_data"].native is not None:
            budget.spend(pfx["mac_data"]["iterations"].native)
        for info in asn1_pkcs12.AuthenticatedSafe.load(pfx["auth_safe"]["content"].native):
            kind = info["content_type"].native
            if kind == "encrypted_data":
                algorithm = info["content"]["encrypted_content_info"]["content_encryption_algorithm"]
                _spend_algorithm(algorithm, budget)
            elif kind == "data":
                for bag in asn1_pkcs12.SafeContents.load(info["content"].native):
                    if bag["bag_id"].native == "pkcs8_shrouded_key_bag":
                        epki = asn1_keys.EncryptedPrivateKeyInfo.load(bag["bag_value"].untag().dump())
                        _spend_algorithm(epki["encryption_algorithm"], budget)
    except BadMessage:
        raise
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise BadMessage(f"not a readable PKCS#12 file ({exc.__class__.__name__})") from exc


def _spend_algorithm(algorithm: asn1_algos.EncryptionAlgorithm, budget: _Budget) -> None:
    if algorithm["algorithm"].native == "pbes2":
        budget.spend(algorithm["parameters"]["key_derivation_func"]["parameters"]["iteration_count"].native)
        return
    iterations = _legacy_iterations(algorithm)
    if iterations is not None:
        budget.spend(iterations)


def _read_legacy(data: bytes, password: str) -> Bundle:
    """Other programs' files (3DES/RC2, one key): `cryptography`'s own reader."""
    try:
        loaded = crypto_pkcs12.load_pkcs12(data, password.encode())
    except ValueError:
        raise WrongPassphrase("the password does not open the PKCS#12 file (or it is damaged)") from None
    entries: list[KeyEntry] = []
    if loaded.key is not None and loaded.cert is not None:
        key = load_private_key_der(
            loaded.key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        name = (
            loaded.cert.friendly_name.decode() if loaded.cert.friendly_name else _subject_name(loaded.cert.certificate)
        )
        entries.append(KeyEntry(key, loaded.cert.certificate, name))
    return Bundle(tuple(entries), tuple(c.certificate for c in loaded.additional_certs))
