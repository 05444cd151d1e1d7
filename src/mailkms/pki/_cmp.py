"""CMP messages (RFC 4210 as updated by RFC 9480; the lightweight profile RFC 9483). Pure: no I/O.

pyasn1 with pyasn1-alt-modules' RFC 9480 / 4211 / 8018 types parses and builds every structure;
`cryptography` verifies and makes the signatures and MACs. What is checked here is what the bytes
alone can tell: the structure, the protection (PasswordBasedMac or PBMAC1 with a given secret, or
a signature by the first extraCerts certificate), the CRMF proof of possession. Who may do what is
the services' business.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import hmac
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from pyasn1.codec.der import decoder, encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ, useful
from pyasn1_alt_modules import rfc2986, rfc5280, rfc8018, rfc9480

from mailkms.errors import BadCMPMessage, BadCMPProtection, BadCSRSignature, BadKey, BadPOP, MailkmsError
from mailkms.pki._csr import check_csr
from mailkms.pki._est import inspect_csr
from mailkms.pki._keys import KeyType, PrivateKey, PublicKey, key_type_of

PBM = univ.ObjectIdentifier("1.2.840.113533.7.66.13")  # PasswordBasedMac (RFC 4211 §4.4)
PBMAC1 = rfc8018.id_PBMAC1
PBKDF2 = rfc8018.id_PBKDF2

_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "1.3.14.3.2.26": hashes.SHA1,  # only inside PBM/HMAC, as RFC 9481 allows for compatibility
    "2.16.840.1.101.3.4.2.1": hashes.SHA256,
    "2.16.840.1.101.3.4.2.2": hashes.SHA384,
    "2.16.840.1.101.3.4.2.3": hashes.SHA512,
}
_HMACS: dict[str, type[hashes.HashAlgorithm]] = {
    "1.3.6.1.5.5.8.1.2": hashes.SHA1,  # hmac-sha1 (RFC 2202 OID, what OpenSSL's PBM uses)
    str(rfc8018.id_hmacWithSHA1): hashes.SHA1,
    str(rfc8018.id_hmacWithSHA256): hashes.SHA256,
    str(rfc8018.id_hmacWithSHA384): hashes.SHA384,
    str(rfc8018.id_hmacWithSHA512): hashes.SHA512,
}
_SIGNATURES: dict[str, tuple[str, type[hashes.HashAlgorithm]]] = {
    "1.2.840.113549.1.1.11": ("rsa", hashes.SHA256),
    "1.2.840.113549.1.1.12": ("rsa", hashes.SHA384),
    "1.2.840.113549.1.1.13": ("rsa", hashes.SHA512),
    "1.2.840.10045.4.3.2": ("ec", hashes.SHA256),
    "1.2.840.10045.4.3.3": ("ec", hashes.SHA384),
    "1.2.840.10045.4.3.4": ("ec", hashes.SHA512),
}
_SIGNATURE_OIDS = {(kind, digest): oid for oid, (kind, digest) in _SIGNATURES.items()}
IMPLICIT_CONFIRM = univ.ObjectIdentifier("1.3.6.1.5.5.7.4.13")
P10_CERT_REQ_ID = -1  # RFC 9483 §4.1.4 (RFC 9480 §2.11): the cp and certConf of a p10cr use certReqId -1
MIN_ITERATIONS = 100  # OpenSSL's PBM default is 500
MAX_ITERATIONS = 100_000  # a request must not buy unbounded hashing


class FailInfo(enum.IntEnum):
    """PKIFailureInfo bits (RFC 4210 §5.2.3)."""

    BAD_ALG = 0
    BAD_MESSAGE_CHECK = 1
    BAD_REQUEST = 2
    BAD_TIME = 3
    BAD_CERT_ID = 4
    BAD_DATA_FORMAT = 5
    WRONG_AUTHORITY = 6
    INCORRECT_DATA = 7
    BAD_POP = 9
    CERT_REVOKED = 10
    CERT_CONFIRMED = 11
    BAD_RECIPIENT_NONCE = 13
    BAD_SENDER_NONCE = 18
    BAD_CERT_TEMPLATE = 19
    SIGNER_NOT_TRUSTED = 20
    TRANSACTION_ID_IN_USE = 21
    UNSUPPORTED_VERSION = 22
    NOT_AUTHORIZED = 23
    SYSTEM_FAILURE = 25


class Protection(enum.StrEnum):
    NONE = "none"
    MAC = "mac"
    SIGNATURE = "signature"


@dataclass(frozen=True)
class CertRequest:
    """One CRMF request: its id, the template's public key (POP checked), the names it asks for."""

    cert_req_id: int
    public_key: PublicKey
    mailboxes: tuple[str, ...]


@dataclass(frozen=True)
class RevocationRequest:
    serial: int
    issuer: bytes | None  # DER
    reason_code: int | None


@dataclass(frozen=True)
class CertConfirm:
    cert_req_id: int
    cert_hash: bytes
    hash_oid: str | None
    accepted: bool


@dataclass
class CMPRequest:
    """A parsed request: the header fields the server acts on, the body, and the message itself."""

    body: str
    pvno: int
    transaction_id: bytes
    sender_nonce: bytes
    recip_nonce: bytes | None
    sender_kid: bytes | None
    sender: bytes | None  # DER of the directoryName, if one
    message_time: dt.datetime | None
    protection: Protection
    implicit_confirm: bool
    extra_certs: list[x509.Certificate] = field(default_factory=list)
    message: Any = None  # rfc9480.PKIMessage

    @property
    def reference(self) -> str | None:
        """The senderKID as text (the MAC reference: `openssl cmp -ref`)."""
        if self.sender_kid is None:
            return None
        try:
            return self.sender_kid.decode("utf-8")
        except UnicodeDecodeError:
            return None


def _name_der(rdn_sequence: Any) -> bytes:
    """DER of a Name from its decoded rdnSequence (names are compared as DER)."""
    name = rfc5280.Name()
    name["rdnSequence"] = rdn_sequence
    return bytes(encoder.encode(name))


def _sender_name(general_name: Any) -> bytes | None:
    if general_name.getName() != "directoryName":
        return None
    rdns = general_name["directoryName"]["rdnSequence"]
    return _name_der(rdns) if len(rdns) else None


def parse_request(data: bytes) -> CMPRequest:
    """Decode a PKIMessage (DER) and read its header; BadCMPMessage if it is not one we take."""
    try:
        message, rest = decoder.decode(data, asn1Spec=rfc9480.PKIMessage())
    except (PyAsn1Error, ValueError, TypeError) as exc:
        raise BadCMPMessage(f"not a DER PKIMessage ({exc.__class__.__name__})") from None
    if rest:
        raise BadCMPMessage("bytes follow the PKIMessage")
    try:
        header = message["header"]
        body = message["body"].getName()
        pvno = int(header["pvno"])
        if pvno not in (2, 3):
            raise BadCMPMessage(f"CMP version {pvno} is not supported (2 or 3)")
        transaction_id = bytes(header["transactionID"]) if header["transactionID"].isValue else b""
        sender_nonce = bytes(header["senderNonce"]) if header["senderNonce"].isValue else b""
        if not 16 <= len(transaction_id) <= 64 or not 16 <= len(sender_nonce) <= 64:
            raise BadCMPMessage("transactionID and senderNonce must be present, 16 to 64 bytes (RFC 9483 §3.1)")
        recip_nonce = bytes(header["recipNonce"]) if header["recipNonce"].isValue else None
        sender_kid = bytes(header["senderKID"]) if header["senderKID"].isValue else None
        message_time = header["messageTime"].asDateTime if header["messageTime"].isValue else None
        if message_time is not None and message_time.tzinfo is None:
            message_time = message_time.replace(tzinfo=dt.UTC)
        if not header["protectionAlg"].isValue or not message["protection"].isValue:
            protection = Protection.NONE
        elif header["protectionAlg"]["algorithm"] in (PBM, PBMAC1):
            protection = Protection.MAC
        else:
            protection = Protection.SIGNATURE
        implicit = header["generalInfo"].isValue and any(
            itav["infoType"] == IMPLICIT_CONFIRM for itav in header["generalInfo"]
        )
        extra: list[x509.Certificate] = []
        if message["extraCerts"].isValue:
            extra = [x509.load_der_x509_certificate(encoder.encode(c)) for c in message["extraCerts"]]
        sender = _sender_name(header["sender"])
    except BadCMPMessage:
        raise
    except (PyAsn1Error, ValueError, TypeError, KeyError) as exc:
        raise BadCMPMessage(f"the PKIMessage header cannot be read ({exc.__class__.__name__})") from None
    return CMPRequest(
        body=body,
        pvno=pvno,
        transaction_id=transaction_id,
        sender_nonce=sender_nonce,
        recip_nonce=recip_nonce,
        sender_kid=sender_kid,
        sender=sender,
        message_time=message_time,
        protection=protection,
        implicit_confirm=bool(implicit),
        extra_certs=extra,
        message=message,
    )


@contextlib.contextmanager
def _readable(what: str) -> Iterator[None]:
    """A body structure that pyasn1 or `cryptography` cannot read is a malformed message."""
    try:
        yield
    except (PyAsn1Error, ValueError, TypeError, KeyError, IndexError) as exc:
        if isinstance(exc, MailkmsError):
            raise
        raise BadCMPMessage(f"the {what} cannot be read ({exc.__class__.__name__})") from None


def _protected_part(header: Any, body: Any) -> bytes:
    part = rfc9480.ProtectedPart()
    part["header"] = header
    part["body"] = body
    return bytes(encoder.encode(part))


# -- MAC protection ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MacParameters:
    """What a MAC-protected response reuses of the request (RFC 9483 §3.2: the same algorithm)."""

    algorithm: Any  # the request's AlgorithmIdentifier


def _pbm_key(secret: bytes, params: Any) -> tuple[bytes, type[hashes.HashAlgorithm]]:
    owf = _DIGESTS.get(str(params["owf"]["algorithm"]))
    mac = _HMACS.get(str(params["mac"]["algorithm"]))
    iterations = int(params["iterationCount"])
    if owf is None or mac is None:
        raise BadCMPProtection("PasswordBasedMac with an unsupported one-way function or MAC", fail=FailInfo.BAD_ALG)
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise BadCMPProtection(f"PBM iterationCount must be {MIN_ITERATIONS} to {MAX_ITERATIONS}")
    digest = hashes.Hash(owf())
    digest.update(secret + bytes(params["salt"]))
    key = digest.finalize()
    for _ in range(iterations - 1):
        digest = hashes.Hash(owf())
        digest.update(key)
        key = digest.finalize()
    return key, mac


def _pbmac1_key(secret: bytes, params: Any) -> tuple[bytes, type[hashes.HashAlgorithm]]:
    kdf, scheme = params["keyDerivationFunc"], params["messageAuthScheme"]
    mac = _HMACS.get(str(scheme["algorithm"]))
    if kdf["algorithm"] != PBKDF2 or mac is None:
        raise BadCMPProtection("PBMAC1 must use PBKDF2 and HMAC-SHA2", fail=FailInfo.BAD_ALG)
    pbkdf2, _ = decoder.decode(kdf["parameters"], asn1Spec=rfc8018.PBKDF2_params())
    prf = _HMACS.get(str(pbkdf2["prf"]["algorithm"]))
    iterations = int(pbkdf2["iterationCount"])
    if pbkdf2["salt"].getName() != "specified" or prf is None:
        raise BadCMPProtection("PBMAC1's PBKDF2 needs a specified salt and an HMAC PRF", fail=FailInfo.BAD_ALG)
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS * 10:
        raise BadCMPProtection("PBKDF2 iterationCount out of range")
    length = int(pbkdf2["keyLength"]) if pbkdf2["keyLength"].isValue else mac().digest_size
    if not 16 <= length <= 64:
        raise BadCMPProtection("PBKDF2 keyLength out of range")
    derived = PBKDF2HMAC(prf(), length, bytes(pbkdf2["salt"]["specified"]), iterations).derive(secret)
    return derived, mac


def _mac(secret: bytes, algorithm: Any, data: bytes) -> bytes:
    try:
        if algorithm["algorithm"] == PBM:
            params, _ = decoder.decode(algorithm["parameters"], asn1Spec=rfc9480.PBMParameter())
            key, mac = _pbm_key(secret, params)
        elif algorithm["algorithm"] == PBMAC1:
            params, _ = decoder.decode(algorithm["parameters"], asn1Spec=rfc8018.PBMAC1_params())
            key, mac = _pbmac1_key(secret, params)
        else:
            raise BadCMPProtection("not a MAC algorithm", fail=FailInfo.BAD_ALG)
    except PyAsn1Error:
        raise BadCMPProtection("the MAC parameters cannot be read", fail=FailInfo.BAD_DATA_FORMAT) from None
    tag = HMAC(key, mac())
    tag.update(data)
    return tag.finalize()


def verify_mac(request: CMPRequest, secret: bytes) -> MacParameters:
    """Check the request's PasswordBasedMac / PBMAC1 with `secret` (BadCMPProtection if it fails)."""
    message = request.message
    algorithm = message["header"]["protectionAlg"]
    expected = _mac(secret, algorithm, _protected_part(message["header"], message["body"]))
    if not hmac.compare_digest(expected, message["protection"].asOctets()):
        raise BadCMPProtection("the message's MAC does not verify with the secret for this reference")
    return MacParameters(algorithm)


def _fresh_mac_algorithm(previous: Any) -> Any:
    """The request's MAC algorithm with a new salt (PBM) so no two messages share a key."""
    algorithm = rfc5280.AlgorithmIdentifier()
    algorithm["algorithm"] = previous["algorithm"]
    if previous["algorithm"] == PBM:
        params, _ = decoder.decode(previous["parameters"], asn1Spec=rfc9480.PBMParameter())
        params["salt"] = params["salt"].clone(os.urandom(16))
        algorithm["parameters"] = encoder.encode(params)
    else:
        params, _ = decoder.decode(previous["parameters"], asn1Spec=rfc8018.PBMAC1_params())
        pbkdf2, _ = decoder.decode(params["keyDerivationFunc"]["parameters"], asn1Spec=rfc8018.PBKDF2_params())
        pbkdf2["salt"]["specified"] = pbkdf2["salt"]["specified"].clone(os.urandom(16))
        params["keyDerivationFunc"]["parameters"] = encoder.encode(pbkdf2)
        algorithm["parameters"] = encoder.encode(params)
    return algorithm


# -- signature protection ------------------------------------------------------------------------------
def _verify(key: PublicKey, algorithm_oid: str, signature: bytes, data: bytes) -> None:
    found = _SIGNATURES.get(algorithm_oid)
    if found is None:
        raise BadCMPProtection(f"signature algorithm {algorithm_oid} is not accepted", fail=FailInfo.BAD_ALG)
    kind, digest = found
    try:
        if isinstance(key, rsa.RSAPublicKey) and kind == "rsa":
            key.verify(signature, data, padding.PKCS1v15(), digest())
        elif isinstance(key, ec.EllipticCurvePublicKey) and kind == "ec":
            key.verify(signature, data, ec.ECDSA(digest()))
        else:
            raise BadCMPProtection("the signature algorithm does not match the key", fail=FailInfo.BAD_ALG)
    except InvalidSignature:
        raise BadCMPProtection("the message's signature does not verify with its certificate") from None


def verify_signature(request: CMPRequest) -> x509.Certificate:
    """Check the signature with the first extraCerts certificate (RFC 9483 §3.3); return that certificate."""
    if not request.extra_certs:
        raise BadCMPProtection("a signed message must carry its signer's certificate first in extraCerts")
    signer = request.extra_certs[0]
    if request.sender is not None and request.sender != signer.subject.public_bytes():
        raise BadCMPProtection("the sender is not the subject of the signing certificate")
    message = request.message
    key = signer.public_key()
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise BadCMPProtection("the signer's key is neither RSA nor EC", fail=FailInfo.BAD_ALG)
    oid = str(message["header"]["protectionAlg"]["algorithm"])
    _verify(key, oid, message["protection"].asOctets(), _protected_part(message["header"], message["body"]))
    return signer


# -- bodies ------------------------------------------------------------------------------------------
def _mailboxes(template: Any) -> tuple[str, ...]:
    found: list[str] = []
    if template["subject"].isValue:
        subject = asn1_x509.Name.load(_name_der(template["subject"]["rdnSequence"])).native
        for key in ("email_address", "common_name"):
            value = subject.get(key)
            values = value if isinstance(value, list) else [value]
            found += [str(v) for v in values if isinstance(v, str) and "@" in v]
    if template["extensions"].isValue:
        for ext in template["extensions"]:
            if ext["extnID"] == rfc5280.id_ce_subjectAltName:
                names, _ = decoder.decode(ext["extnValue"], asn1Spec=rfc5280.SubjectAltName())
                found += [str(n["rfc822Name"]) for n in names if n.getName() == "rfc822Name"]
    return tuple(found)


def cert_requests(request: CMPRequest) -> list[CertRequest]:
    """The CRMF requests of an ir/cr/kur, each with its signature POP checked (RFC 4211 §4.1), or
    the PKCS#10 request of a p10cr (its self-signature is the POP)."""
    with _readable("certificate request"):
        if request.body == "p10cr":
            return [_p10_request(request)]
        if request.body not in ("ir", "cr", "kur"):
            raise BadCMPMessage(f"a {request.body} carries no certificate request")
        messages = request.message["body"][request.body]
        if len(messages) != 1:
            raise BadCMPMessage("send exactly one certificate request per message (RFC 9483 §4.1.1)")
        found: list[CertRequest] = []
        for msg in messages:
            cert_req = msg["certReq"]
            template = cert_req["certTemplate"]
            if not template["publicKey"].isValue:
                raise BadCMPMessage(
                    "the template has no public key: this server does not generate signing keys",
                    fail=FailInfo.BAD_CERT_TEMPLATE,
                )
            spki = rfc5280.SubjectPublicKeyInfo()
            spki["algorithm"] = template["publicKey"]["algorithm"]
            spki["subjectPublicKey"] = template["publicKey"]["subjectPublicKey"]
            try:
                key = serialization.load_der_public_key(encoder.encode(spki))
            except (ValueError, UnsupportedAlgorithm):
                raise BadCMPMessage(
                    "the template's public key cannot be read", fail=FailInfo.BAD_CERT_TEMPLATE
                ) from None
            if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
                raise BadKey("only RSA and ECDSA keys are accepted")
            key_type_of(key)
            _check_pop(msg["popo"], cert_req, key)
            found.append(CertRequest(int(cert_req["certReqId"]), key, _mailboxes(template)))
        return found


def _p10_request(request: CMPRequest) -> CertRequest:
    """A p10cr (RFC 9483 §4.1.4): the PKCS#10 request, checked as EST checks one."""
    plain = rfc2986.CertificationRequest()  # the body's [4] IMPLICIT tag off: the same fields, untagged
    for name, value in request.message["body"]["p10cr"].items():
        plain[name] = value
    der = bytes(encoder.encode(plain))
    try:
        checked = check_csr(der)
    except BadCSRSignature:
        raise BadPOP("the PKCS#10 request's signature does not verify with its key") from None
    return CertRequest(P10_CERT_REQ_ID, checked.public_key, tuple(inspect_csr(der).mailboxes))


def _check_pop(popo: Any, cert_req: Any, key: PublicKey) -> None:
    if not popo.isValue or popo.getName() != "signature":
        raise BadPOP("a signature proof of possession is required (the key signs its request)")
    signing = popo["signature"]
    if signing["poposkInput"].isValue:
        raise BadPOP("POPOSigningKeyInput is not accepted: the template must carry subject and key")
    _verify_pop(key, str(signing["algorithmIdentifier"]["algorithm"]), signing["signature"].asOctets(), cert_req)


def _verify_pop(key: PublicKey, oid: str, signature: bytes, cert_req: Any) -> None:
    try:
        _verify(key, oid, signature, bytes(encoder.encode(cert_req)))
    except BadCMPProtection as exc:
        raise BadPOP(f"the proof of possession does not verify: {exc.detail}") from None


def revocation_requests(request: CMPRequest) -> list[RevocationRequest]:
    with _readable("revocation request"):
        body = request.message["body"]["rr"]
        if len(body) != 1:
            raise BadCMPMessage("send exactly one revocation request per message (RFC 9483 §4.2)")
        found: list[RevocationRequest] = []
        for details in body:
            template = details["certDetails"]
            if not template["serialNumber"].isValue:
                raise BadCMPMessage("the revocation request names no serial number", fail=FailInfo.BAD_CERT_ID)
            issuer = _name_der(template["issuer"]["rdnSequence"]) if template["issuer"].isValue else None
            reason: int | None = None
            if details["crlEntryDetails"].isValue:
                for ext in details["crlEntryDetails"]:
                    if ext["extnID"] == rfc5280.id_ce_cRLReasons:
                        code, _ = decoder.decode(ext["extnValue"], asn1Spec=rfc5280.CRLReason())
                        reason = int(code)
            found.append(RevocationRequest(int(template["serialNumber"]), issuer, reason))
        return found


# genm / genp (RFC 9483 §4.3; RFC 4210 §5.3.19): the InfoTypes this server answers
IT_SIGN_KEY_PAIR_TYPES = str(rfc9480.id_it_signKeyPairTypes)
IT_CA_KEY_UPDATE_INFO = str(rfc9480.id_it_caKeyUpdateInfo)
IT_CURRENT_CRL = str(rfc9480.id_it_currentCRL)
IT_CA_CERTS = str(rfc9480.id_it_caCerts)
IT_ROOT_CA_CERT = str(rfc9480.id_it_rootCaCert)
IT_ROOT_CA_KEY_UPDATE = str(rfc9480.id_it_rootCaKeyUpdate)
IT_CERT_REQ_TEMPLATE = str(rfc9480.id_it_certReqTemplate)


def general_requests(request: CMPRequest) -> list[str]:
    """The InfoTypes a genm asks for (dotted OIDs, in order, each once)."""
    with _readable("genm"):
        found: list[str] = []
        for itav in request.message["body"]["genm"]:
            oid = str(itav["infoType"])
            if oid not in found:
                found.append(oid)
        return found


def certificates_value(certs: tuple[x509.Certificate, ...]) -> bytes:
    """CaCertsValue (RFC 9483 §4.3.1): SEQUENCE OF CMPCertificate."""
    value = rfc9480.CaCertsValue()
    for cert in certs:
        value.append(_cmp_cert(cert))
    return bytes(encoder.encode(value))


_RSA_ENCRYPTION = univ.ObjectIdentifier("1.2.840.113549.1.1.1")
_EC_PUBLIC_KEY = univ.ObjectIdentifier("1.2.840.10045.2.1")
_CURVE_OIDS = {KeyType.P256: "1.2.840.10045.3.1.7", KeyType.P384: "1.3.132.0.34"}


def key_pair_types_value(key_types: Sequence[KeyType]) -> bytes:
    """signKeyPairTypes (RFC 4210 §5.3.19.2): SEQUENCE OF AlgorithmIdentifier, one per key
    algorithm (RSA once, whatever its sizes; each curve by its namedCurve)."""
    value = univ.SequenceOf(componentType=rfc5280.AlgorithmIdentifier())
    if any(k.is_rsa for k in key_types):
        algorithm = rfc5280.AlgorithmIdentifier()
        algorithm["algorithm"] = _RSA_ENCRYPTION
        algorithm["parameters"] = encoder.encode(univ.Null(""))
        value.append(algorithm)
    for key_type, curve in _CURVE_OIDS.items():
        if key_type in key_types:
            algorithm = rfc5280.AlgorithmIdentifier()
            algorithm["algorithm"] = _EC_PUBLIC_KEY
            algorithm["parameters"] = encoder.encode(univ.ObjectIdentifier(curve))
            value.append(algorithm)
    return bytes(encoder.encode(value))


def cert_confirms(request: CMPRequest) -> list[CertConfirm]:
    with _readable("certConf"):
        found: list[CertConfirm] = []
        for status in request.message["body"]["certConf"]:
            info = status["statusInfo"]
            accepted = not info.isValue or int(info["status"]) in (0, 1)
            hash_oid = str(status["hashAlg"]["algorithm"]) if status["hashAlg"].isValue else None
            found.append(CertConfirm(int(status["certReqId"]), bytes(status["certHash"]), hash_oid, accepted))
        return found


def cert_hash(cert: x509.Certificate, hash_oid: str | None) -> bytes:
    """The certHash of a certConf: the hashAlg named, else the certificate's signature hash
    (RFC 4210 §5.3.18 as updated by RFC 9480 §2.10)."""
    if hash_oid is not None:
        algorithm = _DIGESTS.get(hash_oid)
        if algorithm is None or algorithm is hashes.SHA1:
            raise BadCMPMessage("certConf hashAlg is not SHA-2", fail=FailInfo.BAD_ALG)
        return cert.fingerprint(algorithm())
    used = cert.signature_hash_algorithm
    return cert.fingerprint(used if used is not None else hashes.SHA256())


# -- responses ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Signer:
    """Who signs signature-protected responses: the certificate (first in extraCerts) and its key."""

    certificate: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]  # after the signer's certificate in extraCerts


@dataclass(frozen=True)
class Status:
    """A PKIStatusInfo: 0 accepted, 2 rejection, with the failure bit and text when rejected."""

    status: int = 0
    text: str | None = None
    fail: FailInfo | None = None


def _cmp_cert(cert: x509.Certificate) -> Any:
    decoded, _ = decoder.decode(cert.public_bytes(serialization.Encoding.DER), asn1Spec=rfc9480.CMPCertificate())
    return decoded


def _status_info(status: Status) -> Any:
    info = rfc9480.PKIStatusInfo()
    info["status"] = status.status
    if status.text:
        info["statusString"].append(status.text[:500])
    if status.fail is not None:
        bits = [0] * (int(status.fail) + 1)
        bits[int(status.fail)] = 1
        info["failInfo"] = rfc9480.PKIFailureInfo(tuple(bits))
    return info


def _general_name(name: x509.Name | None) -> Any:
    """A directoryName GeneralName (the NULL-DN when `name` is None, as RFC 9483 §3.1 allows)."""
    general = rfc5280.GeneralName()
    directory = general["directoryName"]
    rdns = rfc5280.RDNSequence()
    if name is not None:
        decoded, _ = decoder.decode(name.public_bytes(), asn1Spec=rfc5280.Name())
        rdns = decoded["rdnSequence"]
    directory["rdnSequence"] = rdns
    return general


def _header(
    request: CMPRequest, sender: x509.Name | None, now: dt.datetime, algorithm: Any, kid: bytes | None, nonce: bytes
) -> Any:
    header = rfc9480.PKIHeader()
    header["pvno"] = request.pvno
    header["sender"] = _general_name(sender)
    recipient = request.message["header"]["sender"]
    header["recipient"] = recipient
    header["messageTime"] = header["messageTime"].clone(
        useful.GeneralizedTime.fromDateTime(now.astimezone(dt.UTC).replace(microsecond=0, tzinfo=None))
    )
    header["protectionAlg"]["algorithm"] = algorithm["algorithm"]
    if algorithm["parameters"].isValue:
        header["protectionAlg"]["parameters"] = algorithm["parameters"]
    if kid is not None:
        header["senderKID"] = header["senderKID"].clone(kid)
    header["transactionID"] = header["transactionID"].clone(request.transaction_id)
    header["senderNonce"] = header["senderNonce"].clone(nonce)
    header["recipNonce"] = header["recipNonce"].clone(request.sender_nonce)
    if request.implicit_confirm and request.body in ("ir", "cr", "p10cr", "kur"):
        itav = header["generalInfo"].getComponentType().clone()
        itav["infoType"] = IMPLICIT_CONFIRM
        itav["infoValue"] = encoder.encode(univ.Null(""))
        header["generalInfo"].append(itav)
    return header


def _signature_algorithm(key: PrivateKey) -> tuple[Any, Any]:
    digest: type[hashes.HashAlgorithm] = hashes.SHA256
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        digest = hashes.SHA384
    kind = "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ec"
    algorithm = rfc5280.AlgorithmIdentifier()
    algorithm["algorithm"] = univ.ObjectIdentifier(_SIGNATURE_OIDS[(kind, digest)])
    if kind == "rsa":
        algorithm["parameters"] = encoder.encode(univ.Null(""))
    return algorithm, digest


class Reply:
    """Builds the response to `request`, protected as RFC 9483 §3.2 asks: with the request's MAC
    secret when the request was MAC-protected and the secret is known, else signed by `signer`."""

    def __init__(self, request: CMPRequest, signer: Signer, now: dt.datetime, secret: bytes | None = None) -> None:
        self._request = request
        self._signer = signer
        self._now = now
        self._secret = secret
        self.nonce = os.urandom(16)  # this answer's senderNonce: the recipNonce of the next request

    def _message(self, body: Any, extra: tuple[x509.Certificate, ...] = ()) -> bytes:
        message = rfc9480.PKIMessage()
        if self._secret is not None and self._request.protection is Protection.MAC:
            algorithm = _fresh_mac_algorithm(self._request.message["header"]["protectionAlg"])
            header = _header(
                self._request,
                self._signer.certificate.subject,
                self._now,
                algorithm,
                self._request.sender_kid,
                self.nonce,
            )
            protection = _mac(self._secret, algorithm, _protected_part(header, body))
            certs = extra
        else:
            algorithm, digest = _signature_algorithm(self._signer.key)
            kid = self._signer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
            header = _header(self._request, self._signer.certificate.subject, self._now, algorithm, kid, self.nonce)
            data = _protected_part(header, body)
            key = self._signer.key
            if isinstance(key, rsa.RSAPrivateKey):
                protection = key.sign(data, padding.PKCS1v15(), digest())
            else:
                protection = key.sign(data, ec.ECDSA(digest()))
            certs = (self._signer.certificate, *self._signer.chain, *extra)
        message["header"] = header
        message["body"] = body
        message["protection"] = message["protection"].clone(univ.BitString.fromOctetString(protection))
        seen: set[bytes] = set()
        for cert in certs:
            der = cert.public_bytes(serialization.Encoding.DER)
            if der not in seen:
                seen.add(der)
                message["extraCerts"].append(_cmp_cert(cert))
        return bytes(encoder.encode(message))

    def certificate(
        self,
        cert_req_id: int,
        cert: x509.Certificate,
        chain: tuple[x509.Certificate, ...],
        ca_pubs: tuple[x509.Certificate, ...] = (),
    ) -> bytes:
        """ip / cp / kup with the issued certificate; the chain in extraCerts (RFC 9483 §4.1.1);
        `ca_pubs` (the trust anchor) only in a MAC-protected answer, where the secret vouches for it."""
        kind = {"ir": "ip", "cr": "cp", "p10cr": "cp", "kur": "kup"}[self._request.body]
        body = rfc9480.PKIBody()
        rep = body[kind]
        if ca_pubs and self._secret is not None and self._request.protection is Protection.MAC:
            for anchor in ca_pubs:
                entry = rep["caPubs"].getComponentType().clone()
                _fill_certificate(entry, anchor)
                rep["caPubs"].append(entry)
        response = rep["response"].getComponentType().clone()
        response["certReqId"] = cert_req_id
        response["status"] = _status_info(Status(0))
        pair = response["certifiedKeyPair"]
        _fill_certificate(pair["certOrEncCert"]["certificate"], cert)
        rep["response"].append(response)
        return self._message(body, (cert, *chain))

    def general(self, items: list[tuple[str, bytes | None]]) -> bytes:
        """genp: one InfoTypeAndValue per (infoType, DER value); a None value is sent absent, which
        RFC 9483 §4.3 reads as "nothing of that kind" (no root CA update, no template)."""
        body = rfc9480.PKIBody()
        for oid, value in items:
            itav = body["genp"].getComponentType().clone()
            itav["infoType"] = univ.ObjectIdentifier(oid)
            if value is not None:
                itav["infoValue"] = value
            body["genp"].append(itav)
        if not items:
            body["genp"] = body["genp"].clone([])
        return self._message(body)

    def revoked(self) -> bytes:
        body = rfc9480.PKIBody()
        body["rp"]["status"].append(_status_info(Status(0)))
        return self._message(body)

    def confirmed(self) -> bytes:
        body = rfc9480.PKIBody()
        body["pkiconf"] = body["pkiconf"].clone("")
        return self._message(body)

    def error(self, status: Status) -> bytes:
        body = rfc9480.PKIBody()
        body["error"]["pKIStatusInfo"] = _status_info(status)
        return self._message(body)


def _fill_certificate(target: Any, cert: x509.Certificate) -> None:
    """Copy a certificate into a (tagged) CMPCertificate component, field by field."""
    for name, value in _cmp_cert(cert).items():
        target[name] = value


def error_without_request(signer: Signer, now: dt.datetime, status: Status) -> bytes:
    """An error message when the request could not be parsed at all: nonces and transaction are
    unknown, so fresh ones are used (RFC 9483 §3.6.4); signed by `signer`."""
    placeholder = CMPRequest(
        body="error",
        pvno=2,
        transaction_id=os.urandom(16),
        sender_nonce=os.urandom(16),
        recip_nonce=None,
        sender_kid=None,
        sender=None,
        message_time=None,
        protection=Protection.NONE,
        implicit_confirm=False,
    )
    message = rfc9480.PKIMessage()
    message["header"]["sender"] = _general_name(None)
    placeholder.message = message
    return Reply(placeholder, signer, now).error(status)


__all__ = [
    "CMPRequest",
    "CertConfirm",
    "CertRequest",
    "FailInfo",
    "MacParameters",
    "Protection",
    "Reply",
    "RevocationRequest",
    "Signer",
    "Status",
    "cert_confirms",
    "cert_hash",
    "cert_requests",
    "certificates_value",
    "error_without_request",
    "general_requests",
    "key_pair_types_value",
    "parse_request",
    "revocation_requests",
    "verify_mac",
    "verify_signature",
]
