"""A client key store waiting for its enrolment reply, the real reply, and ways to break it.

Everything is made at run time with mailkms's own pki functions under the session test CA
(tests/testca.py). Keys in the store are written with few PBKDF2 rounds so that a test may open
them hundreds of times; the delivery itself is what the server sends.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import datetime as dt
import email.policy
import mailbox as mbox
from collections.abc import Callable
from email.message import Message
from pathlib import Path

from asn1crypto import cms as a_cms
from asn1crypto import x509 as a_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, padding, rsa
from cryptography.x509.oid import NameOID

from mailkms.client._core import Client, _transport_certificate
from mailkms.client._store import ClientState, KeyStore, Pending, cert_to_pem
from mailkms.clock import FakeClock
from mailkms.pki import (
    CertKind,
    KeyType,
    Manifest,
    PrivateKey,
    build_delivery,
    encrypt_private_key,
    fingerprint_sha256,
    generate_key,
    private_key_der,
    sign_opaque,
    verify_signed_data,
)
from tests.testca import MAIL_FROM, MAILBOX, START, SessionCA, ca_of, key_of

PASSPHRASE = b"kit-passphrase"
REQUEST_ID = "req-kit-1"
AT = START + dt.timedelta(hours=1)
Pair = tuple[x509.Certificate, PrivateKey]


class FastKeyStore(KeyStore):
    """The real key store with cheap key derivation, and each key opened once (loading an RSA key
    checks it, which is slow): the fuzz tests open keys thousands of times."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self._opened: dict[tuple[str, bytes], PrivateKey] = {}

    def write_key(self, name: str, key: PrivateKey, passphrase: bytes) -> str:
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.keys_dir / name).write_bytes(encrypt_private_key(key, passphrase, iterations=1000))
        self._opened.pop((name, passphrase), None)
        return name

    def read_key(self, name: str, passphrase: bytes) -> PrivateKey:
        if (name, passphrase) not in self._opened:
            self._opened[name, passphrase] = super().read_key(name, passphrase)
        return self._opened[name, passphrase]


def hexserial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


@dataclasses.dataclass
class Kit:
    ca: SessionCA
    signer: Pair  # the server's mail-signing identity
    signing: x509.Certificate
    encryption: x509.Certificate
    encryption_key: PrivateKey
    transport: Pair
    manifest: Manifest
    home: Path
    clock: FakeClock
    client: Client

    @property
    def maildir(self) -> Path:
        return self.home / "Maildir"

    def fresh_state(self) -> ClientState:
        """The waiting state as saved by `enroll` (a copy: _install changes what it is given)."""
        return copy.deepcopy(self.client.store.load())

    def deliver(
        self,
        manifest: Manifest | None = None,
        certificates: list[x509.Certificate] | None = None,
        *,
        keys: list[tuple[str, PrivateKey]] | None = None,
        signer: Pair | None = None,
        signer_chain: list[x509.Certificate] | None = None,
    ) -> bytes:
        """The real reply; each part can be swapped: `keys` are (serial, key) enveloped to the
        transport key, `signer` signs the mail (with `signer_chain`, the test CA's by default)."""
        signer_cert, signer_key = signer or self.signer
        return build_delivery(
            manifest or self.manifest,
            certificates or [self.signing, self.encryption, self.ca.issuing, self.ca.root],
            [
                (serial, private_key_der(key), self.transport[0])
                for serial, key in (keys or [(hexserial(self.encryption), self.encryption_key)])
            ],
            sender=MAIL_FROM,
            signer_cert=signer_cert,
            signer_key=signer_key,
            signer_chain=signer_chain if signer_chain is not None else [self.ca.issuing, self.ca.root],
            message_id=f"<{REQUEST_ID}@kms.example.org>",
            date=START,
        )

    def add_mail(self, raw: bytes) -> str:
        return mbox.Maildir(str(self.maildir), create=True).add(raw)


def make_kit(home: Path) -> Kit:
    """A key store that has sent its enrolment request REQUEST_ID and waits for the reply."""
    ca = ca_of(KeyType.RSA3072)
    signer_key = key_of(KeyType.RSA2048, tag=5)
    signer = (ca.issue(CertKind.MAIL_SIGNER, signer_key, MAIL_FROM), signer_key)
    signing_key = key_of(KeyType.P256, tag=21)
    encryption_key = key_of(KeyType.RSA2048, tag=22)
    transport_key = key_of(KeyType.RSA2048, tag=23)
    transport = (_transport_certificate(transport_key, MAILBOX, START), transport_key)
    signing = ca.issue(CertKind.SIGNING, signing_key)
    encryption = ca.issue(CertKind.ENCRYPTION, encryption_key)
    manifest = Manifest(
        kind="enrolment",
        mailbox=MAILBOX,
        request_id=REQUEST_ID,
        generation=1,
        signing_serial=hexserial(signing),
        encryption_serial=hexserial(encryption),
        key_serials=(hexserial(encryption),),
        issued_at=START.isoformat(),
        reminder_at=(START + dt.timedelta(days=365)).isoformat(),
    )
    clock = FakeClock(AT)
    client = Client(home, clock, lambda: PASSPHRASE)
    client.store = FastKeyStore(home)
    store = client.store
    pending = store.write_key(f"signing-pending-{REQUEST_ID}.pem", signing_key, PASSPHRASE)
    transport_file = store.write_key(f"transport-{REQUEST_ID}.pem", transport_key, PASSPHRASE)
    mbox.Maildir(str(home / "Maildir"), create=True)
    store.save(
        ClientState(
            server="https://127.0.0.1:9",  # nothing listens: the client works offline
            mailbox=MAILBOX,
            root_fingerprint=fingerprint_sha256(ca.root),
            root_pem=cert_to_pem(ca.root),
            mail_from=MAIL_FROM,
            maildir=str(home / "Maildir"),
            pending=Pending("enrolment", REQUEST_ID, pending, START.isoformat()),
            transport_key_file=transport_file,
            transport_cert_pem=cert_to_pem(transport[0]),
        )
    )
    return Kit(ca, signer, signing, encryption, encryption_key, transport, manifest, home, clock, client)


# --- taking a delivery apart and putting it back together -------------------------------------------------
def split(raw: bytes) -> tuple[bytes, bytes]:
    """The outer headers, and the SignedData DER from the base64 body."""
    headers, _, body = raw.partition(b"\r\n\r\n")
    return headers, base64.b64decode(body)


def rebuilt(headers: bytes, der: bytes) -> bytes:
    return headers + b"\r\n\r\n" + base64.encodebytes(der).replace(b"\n", b"\r\n")


def signed_content(raw: bytes) -> bytes:
    return verify_signed_data(split(raw)[1]).content


def resigned(kit: Kit, raw: bytes, content: bytes, signer: Pair | None = None) -> bytes:
    """The same outer mail around new signed content, signed again by the real server key."""
    key_pair = signer or kit.signer
    headers, _ = split(raw)
    der = sign_opaque(content, key_pair[0], key_pair[1], [kit.ca.issuing, kit.ca.root])
    return rebuilt(headers, der)


def inner_message(raw: bytes) -> Message:
    return email.message_from_bytes(signed_content(raw), policy=email.policy.SMTP)


def replace_part(kit: Kit, raw: bytes, match: Callable[[Message], bool], data: bytes) -> bytes:
    """Swap the payload of the first inner part `match` picks, and sign again with the server key.
    (The base64 text is swapped as bytes, as the email package wrote it: parsing and writing the
    inner MIME anew for each of thousands of examples would cost most of the fuzz tests' time.)"""
    content = signed_content(raw)
    old = smtp_base64(part_payload(raw, match))
    assert content.count(old) == 1
    return resigned(kit, raw, content.replace(old, smtp_base64(data)))


def smtp_base64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def is_manifest(part: Message) -> bool:
    return part.get_filename() == "mailkms-delivery.json"


def is_certs(part: Message) -> bool:
    return part.get_param("smime-type") == "certs-only"


def is_key(part: Message) -> bool:
    return part.get_param("smime-type") == "enveloped-data"


def part_payload(raw: bytes, match: Callable[[Message], bool]) -> bytes:
    for part in inner_message(raw).walk():
        if not part.is_multipart() and match(part):
            data = part.get_payload(decode=True)
            assert isinstance(data, bytes)
            return data
    raise AssertionError("no such part")


def certs_only_der(certs: list[bytes]) -> bytes:
    """A certs-only SignedData holding the given certificate DER as they are (asn1crypto: no checks)."""
    signed = a_cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [],
            "encap_content_info": {"content_type": "data"},
            "certificates": [a_x509.Certificate.load(der) for der in certs],
            "signer_infos": [],
        }
    )
    return a_cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()


# --- certificates that cryptography loads but cannot read further --------------------------------------------
def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = (
        bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8)
    )
    return bytes([tag]) + length + body


def _sign(data: bytes, ca_key: PrivateKey) -> bytes:
    if isinstance(ca_key, rsa.RSAPrivateKey):
        return ca_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    return ca_key.sign(data, ec.ECDSA(hashes.SHA384() if ca_key.curve.key_size == 384 else hashes.SHA256()))


def edited_certificate(
    cert: x509.Certificate, edit: Callable[[bytes], bytes], ca_key: PrivateKey | None = None
) -> bytes:
    """The certificate's DER with its TBS edited (DER in, DER out), signed again by `ca_key` when given
    (else it keeps the old signature, which no longer verifies)."""
    parsed = a_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    tbs = edit(parsed["tbs_certificate"].dump())
    signature = _sign(tbs, ca_key) if ca_key is not None else cert.signature
    return _tlv(0x30, tbs + parsed["signature_algorithm"].dump() + _tlv(0x03, b"\x00" + signature))


def duplicate_extension(index: int = 0) -> Callable[[bytes], bytes]:
    """The TBS with one of its extensions twice (RFC 5280 4.2: "MUST NOT include more than one")."""

    def edit(tbs_der: bytes) -> bytes:
        tbs = a_x509.TbsCertificate.load(tbs_der)
        extensions = list(tbs["extensions"])
        extensions.append(copy.deepcopy(extensions[index % len(extensions)]))
        tbs["extensions"] = extensions
        return tbs.dump()

    return edit


RSA_ENCRYPTION = bytes.fromhex("06092a864886f70d010101")  # 1.2.840.113549.1.1.1
EC_PUBLIC_KEY = bytes.fromhex("06072a8648ce3d0201")  # 1.2.840.10045.2.1
UNKNOWN_9 = bytes.fromhex("06092b0601040183b20301")  # 1.3.6.1.4.1.55555.1: no such key algorithm
DSA_7 = bytes.fromhex("06072a8648ce380401")  # 1.2.840.10040.4.1 dsa, same length as id-ecPublicKey


def key_algorithm(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    """Say the public key is of another algorithm (an OID of the same length; the key bits stay)."""

    def edit(tbs_der: bytes) -> bytes:
        assert len(old) == len(new) and tbs_der.count(old) == 1
        return tbs_der.replace(old, new)

    return edit


# --- mails a stranger can send -------------------------------------------------------------------------------
def forger() -> tuple[x509.Certificate, PrivateKey]:
    """Anyone's self-made certificate and key: no server key is needed to send these mails."""
    key = generate_key(KeyType.RSA2048)
    return _transport_certificate(key, "mallory@example.org", START), key


def odd_key_certificate(kind: str, signer: PrivateKey, like: x509.Certificate) -> x509.Certificate:
    """A certificate with the issuer and serial of `like` (so it is taken for the signer) whose key is
    of an algorithm mailkms does not use; `unknown` is an OID no library knows."""
    if kind == "unknown":
        return x509.load_der_x509_certificate(
            edited_certificate(like, key_algorithm(RSA_ENCRYPTION, UNKNOWN_9), signer)
        )
    public = ed448.Ed448PrivateKey.generate().public_key() if kind == "ed448" else _dsa_public()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd key")]))
        .issuer_name(like.issuer)
        .public_key(public)
        .serial_number(like.serial_number)
        .not_valid_before(START - dt.timedelta(days=1))
        .not_valid_after(START + dt.timedelta(days=30))
        .sign(signer, hashes.SHA256())
    )


def _dsa_public() -> dsa.DSAPublicKey:
    return dsa.generate_private_key(2048).public_key()


def jamming_mail(kit: Kit) -> bytes:
    """A stranger's signed mail whose signer certificate has a key of an unknown algorithm: before
    issue 12 it stopped `sync` and `logon` with UnsupportedAlgorithm."""
    cert, key = forger()
    odd = odd_key_certificate("unknown", key, cert)
    raw = kit.deliver()
    headers, _ = split(raw)
    return rebuilt(headers, sign_opaque(signed_content(raw), odd, key, []))
