"""CA keys inside a PKCS#11 token (an HSM; SoftHSM2 in the tests), behind cryptography's key interface.

`TokenRSAKey` and `TokenECKey` are cryptography private-key classes whose `sign()` asks the token:
cryptography (>= 42) calls a key's own `sign()` when it builds certificates, CRLs, OCSP responses
and CMS, so every builder works unchanged and the private key never leaves the token
(made there with CKA_SENSITIVE true, CKA_EXTRACTABLE false).

A key store is named by an RFC 7512 URI, e.g.
`pkcs11:token=mailkms;object=ca?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/mailkms/pin`.
The PIN comes only from the pin-source file, read when a session is opened; the URI holds no PIN.
python-pkcs11 is imported on first use, so the client (which imports the PKI core) does not need it.
"""

from __future__ import annotations

import threading
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn
from urllib.parse import unquote

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.utils import Buffer

from mailkms.errors import ConfigError, KeyStoreUnavailable
from mailkms.pki._keys import KeyType, PublicKey

_CURVE_NAMES = {KeyType.P256: "secp256r1", KeyType.P384: "secp384r1"}
_RSA_BITS = {KeyType.RSA2048: 2048, KeyType.RSA3072: 3072, KeyType.RSA4096: 4096}


@dataclass(frozen=True)
class KeyStoreURI:
    """The parts of an RFC 7512 PKCS#11 URI that mailkms uses."""

    text: str
    token: str
    object: str
    module_path: str
    pin_source: str

    @property
    def pin_path(self) -> Path:
        return Path(self.pin_source.removeprefix("file://").removeprefix("file:"))


def parse_key_store_uri(text: str) -> KeyStoreURI:
    """`pkcs11:token=NAME;object=LABEL?module-path=/path/lib.so&pin-source=file:/path` (RFC 7512:
    path attributes split by `;`, query attributes by `&`, values percent-encoded). A PIN in the
    URI (pin-value) is refused: it would end in the configuration file and in `ps`."""
    if not text.startswith("pkcs11:"):
        raise ConfigError("a key store is a PKCS#11 URI (RFC 7512) starting with pkcs11:")
    path_part, _, query_part = text[len("pkcs11:") :].partition("?")
    path = _attributes(path_part, ";")
    query = _attributes(query_part, "&")
    if "pin-value" in query:
        raise ConfigError("the key store URI must not hold the PIN (pin-value): give pin-source=file:/path")
    missing = [
        n
        for n, have in (("token", path), ("object", path), ("module-path", query), ("pin-source", query))
        if n not in have
    ]
    if missing:
        raise ConfigError(
            f"the key store URI lacks {', '.join(missing)} (pkcs11:token=..;object=..?module-path=..&pin-source=file:..)"
        )
    pin_source = query["pin-source"]
    if pin_source.startswith("|"):
        raise ConfigError("pin-source must name a file (file:/path), not a command")
    return KeyStoreURI(text, path["token"], path["object"], query["module-path"], pin_source)


def _attributes(part: str, sep: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, part.split(sep)):
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ConfigError(f"the key store URI has a malformed attribute {item!r}")
        out[unquote(name)] = unquote(value)
    return out


@dataclass(frozen=True)
class TokenKeyRef:
    """What a process needs to open a token key itself (no secret: the PIN stays in its file)."""

    uri: str
    key_id: bytes


def _unavailable(uri: KeyStoreURI, what: str, exc: BaseException) -> NoReturn:
    raise KeyStoreUnavailable(
        f"the key store (PKCS#11 token {uri.token!r}) is not usable: {what} ({type(exc).__name__})"
    ) from None


class Token:
    """One logged-in session per process and token, reopened after the token was gone or locked.
    Calls are serialised: a PKCS#11 session runs one operation at a time."""

    _open: ClassVar[dict[str, Token]] = {}
    _libs: ClassVar[dict[str, Any]] = {}
    _guard = threading.Lock()

    def __init__(self, uri: KeyStoreURI) -> None:
        self.uri = uri
        self._lock = threading.RLock()
        self._session: Any = None
        self._private: dict[bytes, Any] = {}  # CKA_ID -> private key object of the open session

    @classmethod
    def for_uri(cls, text: str) -> Token:
        with cls._guard:
            token = cls._open.get(text)
            if token is None:
                token = cls._open[text] = Token(parse_key_store_uri(text))
            return token

    def _lib(self) -> Any:
        import pkcs11

        with Token._guard:
            lib = Token._libs.get(self.uri.module_path)
            if lib is None:
                if not Path(self.uri.module_path).exists():
                    raise ConfigError(f"the PKCS#11 module {self.uri.module_path} does not exist")
                lib = Token._libs[self.uri.module_path] = pkcs11.lib(self.uri.module_path)
            return lib

    def _pin(self) -> str:
        try:
            return self.uri.pin_path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token PIN from {self.uri.pin_path}: {exc.strerror}") from None

    def session(self) -> Any:
        """The open session, or a new one (log-in with the PIN from its file)."""
        import pkcs11.exceptions as p11

        with self._lock:
            if self._session is not None:
                return self._session
            pin = self._pin()
            lib = self._lib()
            try:
                found = lib.get_token(token_label=self.uri.token)
            except p11.PKCS11Error:
                # A token that was gone shows again only after C_Finalize + C_Initialize.
                try:
                    lib.reinitialize()
                    found = lib.get_token(token_label=self.uri.token)
                except p11.PKCS11Error as exc:
                    _unavailable(self.uri, "the token is not present", exc)
            try:
                try:
                    self._session = found.open(user_pin=pin, rw=True)
                except p11.UserAlreadyLoggedIn:  # the log-in is per process: another URI of this token did it
                    self._session = found.open(rw=True)
            except p11.PinLocked as exc:  # CKR_PIN_LOCKED: too many wrong tries; SoftHSM2 never locks
                _unavailable(
                    self.uri,
                    "the user PIN is locked after too many wrong tries: unlock it with the SO PIN "
                    "(C_InitPIN, e.g. `pkcs11-tool --login --login-type so --init-pin`), then put the new "
                    f"PIN in {self.uri.pin_path}",
                    exc,
                )
            except p11.PinIncorrect as exc:
                _unavailable(self.uri, f"log-in failed: the PIN in {self.uri.pin_path} is wrong", exc)
            except p11.PKCS11Error as exc:
                _unavailable(self.uri, "log-in failed (PIN wrong or locked?)", exc)
            return self._session

    def forget(self) -> None:
        """Drop the session (after a failure): the next call opens a new one."""
        with self._lock:
            session, self._session = self._session, None
            self._private.clear()
        if session is not None:
            with suppress(Exception):  # the session is already broken; a new one is opened next
                session.close()

    def call(self, what: str, fn: Any) -> Any:
        """fn(session) with one retry on a fresh session; KeyStoreUnavailable when the token fails twice."""
        import pkcs11.exceptions as p11

        with self._lock:
            for attempt in (1, 2):
                session = self.session()
                try:
                    return fn(session)
                except p11.PKCS11Error as exc:
                    self.forget()
                    if attempt == 2:
                        _unavailable(self.uri, what, exc)
        raise AssertionError("unreachable")

    # --- keys ------------------------------------------------------------------------------------
    def generate(self, kind: KeyType, key_id: bytes, label: str) -> TokenRSAKey | TokenECKey:
        """A new key pair made inside the token: the private half sensitive and not extractable."""
        import pkcs11
        from pkcs11 import Attribute
        from pkcs11.util.ec import encode_named_curve_parameters

        private_template = {
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
        }
        public_template = {Attribute.VERIFY: True, Attribute.TOKEN: True}

        def make(session: Any) -> None:
            if kind.is_rsa:
                session.generate_keypair(
                    pkcs11.KeyType.RSA,
                    _RSA_BITS[kind],
                    id=key_id,
                    label=label,
                    store=True,
                    public_template=public_template,
                    private_template=private_template,
                )
            else:
                params = session.create_domain_parameters(
                    pkcs11.KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVE_NAMES[kind])},
                    local=True,
                )
                params.generate_keypair(
                    id=key_id,
                    label=label,
                    store=True,
                    public_template=public_template,
                    private_template=private_template,
                )

        self.call("making a key", make)
        return self.key(key_id)

    def find_label(self, label: str) -> TokenRSAKey | TokenECKey | None:
        """The key pair whose private key has this label (CKA_LABEL), if the token holds one."""
        import pkcs11

        def find(session: Any) -> bytes | None:
            found = list(
                session.get_objects(
                    {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY, pkcs11.Attribute.LABEL: label}
                )
            )
            if len(found) > 1:
                raise ConfigError(f"the token {self.uri.token!r} holds {len(found)} keys labelled {label!r}")
            return bytes(found[0][pkcs11.Attribute.ID]) if found else None

        key_id = self.call("looking for a key", find)
        return None if key_id is None else self.key(key_id)

    def key(self, key_id: bytes) -> TokenRSAKey | TokenECKey:
        """The token's key pair with this CKA_ID, as a cryptography private key."""
        import pkcs11
        from pkcs11.util.ec import encode_ec_public_key
        from pkcs11.util.rsa import encode_rsa_public_key

        def find(session: Any) -> bytes:
            try:
                public = session.get_key(object_class=pkcs11.ObjectClass.PUBLIC_KEY, id=key_id)
            except pkcs11.exceptions.NoSuchKey:
                raise ConfigError(f"the token {self.uri.token!r} has no key with id {key_id.hex()}") from None
            if public.key_type == pkcs11.KeyType.RSA:
                return bytes(encode_rsa_public_key(public))
            return bytes(encode_ec_public_key(public))

        der = self.call("reading a public key", find)
        loaded = serialization.load_der_public_key(der)
        if isinstance(loaded, rsa.RSAPublicKey):
            return TokenRSAKey(self, key_id, loaded)
        if isinstance(loaded, ec.EllipticCurvePublicKey):
            return TokenECKey(self, key_id, loaded)
        raise ConfigError("the token key is neither RSA nor EC")

    def sign(self, key_id: bytes, mechanism_name: str, data: bytes) -> bytes:
        import pkcs11

        mechanism = getattr(pkcs11.Mechanism, mechanism_name)

        def run(session: Any) -> bytes:
            private = self._private.get(key_id)
            if private is None:  # looked up once per session, not per signature (C_FindObjects is slow)
                private = self._private[key_id] = session.get_key(
                    object_class=pkcs11.ObjectClass.PRIVATE_KEY, id=key_id
                )
            return bytes(private.sign(data, mechanism=mechanism))

        return bytes(self.call("signing", run))

    def import_key(
        self, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, key_id: bytes, label: str
    ) -> TokenRSAKey | TokenECKey:
        """A soft key put into the token (C_CreateObject) as CKA_SENSITIVE, not extractable, for signing
        only. The token will say CKA_ALWAYS_SENSITIVE / CKA_NEVER_EXTRACTABLE false: it was outside."""
        from pkcs11 import Attribute
        from pkcs11.util.ec import decode_ec_private_key, decode_ec_public_key
        from pkcs11.util.rsa import decode_rsa_private_key, decode_rsa_public_key

        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        if isinstance(key, rsa.RSAPrivateKey):
            private = decode_rsa_private_key(der)
            public = decode_rsa_public_key(
                key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
            )
        else:
            private = decode_ec_private_key(der)
            public = decode_ec_public_key(
                key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        common = {Attribute.ID: key_id, Attribute.LABEL: label, Attribute.TOKEN: True}
        private.update(common)
        private.update(
            {
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.DECRYPT: False,
                Attribute.UNWRAP: False,
            }
        )
        public.update({**common, Attribute.VERIFY: True})

        def run(session: Any) -> None:
            session.create_object(public)
            session.create_object(private)

        self.call("importing a key", run)
        return self.key(key_id)

    def destroy(self, key_id: bytes) -> int:
        """Destroy the key pair with this CKA_ID (private and public objects) in the token: a retired
        key no certificate in force needs any more. Returns how many objects were destroyed."""
        import pkcs11

        def run(session: Any) -> int:
            found = list(session.get_objects({pkcs11.Attribute.ID: key_id}))
            for obj in found:
                obj.destroy()
            return len(found)

        with self._lock:
            self._private.pop(key_id, None)
            return int(self.call("destroying a retired key", run))


def open_token_key(ref: TokenKeyRef) -> TokenRSAKey | TokenECKey:
    return Token.for_uri(ref.uri).key(ref.key_id)


_RSA_MECHANISMS = {"sha256": "SHA256_RSA_PKCS", "sha384": "SHA384_RSA_PKCS", "sha512": "SHA512_RSA_PKCS"}


class _TokenKey:
    def __init__(self, token: Token, key_id: bytes, public: PublicKey) -> None:
        self._token = token
        self._id = key_id
        self._public = public

    @property
    def reference(self) -> TokenKeyRef:
        return TokenKeyRef(self._token.uri.text, self._id)

    def private_bytes(self, *args: object, **kwargs: object) -> bytes:
        raise TypeError("a key in a PKCS#11 token cannot be exported")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a key in a PKCS#11 token is not pickled: pass its TokenKeyRef")


class TokenRSAKey(_TokenKey, rsa.RSAPrivateKey):
    """RSA PKCS#1 v1.5 signatures made by the token (CKM_SHA256_RSA_PKCS and friends)."""

    _public: rsa.RSAPublicKey

    def sign(
        self,
        data: bytes,
        padding: padding.AsymmetricPadding,
        algorithm: utils.Prehashed | hashes.HashAlgorithm | utils.NoDigestInfo,
    ) -> bytes:
        if not isinstance(padding, _PKCS1v15) or not isinstance(algorithm, hashes.HashAlgorithm):
            raise TypeError("a token RSA key signs PKCS#1 v1.5 over the whole message only")
        mechanism = _RSA_MECHANISMS.get(algorithm.name)
        if mechanism is None:
            raise TypeError(f"no token mechanism for {algorithm.name}")
        return self._token.sign(self._id, mechanism, bytes(data))

    def __copy__(self) -> TokenRSAKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TokenRSAKey:
        return self

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise TypeError("CA keys in the token only sign")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        raise TypeError("a key in a PKCS#11 token cannot be exported")


_PKCS1v15 = padding.PKCS1v15


class TokenECKey(_TokenKey, ec.EllipticCurvePrivateKey):
    """ECDSA made by the token over the digest (CKM_ECDSA), returned DER-encoded as X.509 wants."""

    _public: ec.EllipticCurvePublicKey

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("a token EC key signs ECDSA only")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            raise TypeError("a token EC key signs the whole message")
        digest = hashes.Hash(algorithm)
        digest.update(data)
        raw = self._token.sign(self._id, "ECDSA", digest.finalize())
        half = len(raw) // 2
        return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def __copy__(self) -> TokenECKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TokenECKey:
        return self

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise TypeError("CA keys in the token only sign")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise TypeError("a key in a PKCS#11 token cannot be exported")


def is_token_key(key: PrivateKeyTypes) -> bool:
    return isinstance(key, _TokenKey)
