"""Test CAs and keys made at run time, once per session (CA keys are slow to make).

`ca_of(KeyType.RSA3072)` and `ca_of(KeyType.P384)` are the two CA families the profiles are
judged under; `ca_of(..., tag="other")` is an unrelated CA, and `tag="impostor"` one with the
very same names as the real CA but keys of its own. Everything is built with mailkms's own
`make_root` / `make_issuing_ca` / `Issuer`, so the tests judge exactly what the server makes.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509

from mailkms.clock import UTC
from mailkms.pki import (
    CertKind,
    Issuer,
    KeyType,
    PrivateKey,
    PublicURLs,
    SoftSigner,
    Validity,
    generate_key,
    make_issuing_ca,
    make_root,
    subscriber_validity,
)

if TYPE_CHECKING:
    from mailkms.clock import Clock
    from mailkms.services import CAPaths

START = dt.datetime(2026, 1, 15, 9, 30, 0, tzinfo=UTC)
URLS = PublicURLs("http://kms.example.org/")
MAILBOX = "alice@example.org"
MAIL_FROM = "mailkms@kms.example.org"
ORGANIZATION = "mailkms test"
COUNTRY = "DE"  # S/MIME BR 7.1.4.3.1 and the TLS ROOT-CA linter want a country in CA names
ALL_KEY_TYPES = tuple(KeyType)


@dataclass(frozen=True)
class SessionCA:
    key_type: KeyType
    root: x509.Certificate
    root_key: PrivateKey
    issuing: x509.Certificate
    issuing_key: PrivateKey

    @property
    def root_signer(self) -> SoftSigner:
        return SoftSigner(self.root, self.root_key)

    @property
    def issuer(self) -> Issuer:
        return Issuer(SoftSigner(self.issuing, self.issuing_key), URLS)

    def issue(
        self,
        kind: CertKind,
        key: PrivateKey,
        mailbox: str = MAILBOX,
        validity: Validity | None = None,
    ) -> x509.Certificate:
        issuer = self.issuer
        prepared = issuer.prepare_subscriber(
            kind, mailbox, key.public_key(), validity or subscriber_validity(START, 18), ALL_KEY_TYPES
        )
        return issuer.issue(prepared)


@functools.cache
def ca_of(key_type: KeyType, tag: str = "main", country: str | None = COUNTRY) -> SessionCA:
    organization = ORGANIZATION if tag in ("main", "impostor") else f"{ORGANIZATION} {tag}"
    root_key = generate_key(key_type)
    root = make_root(root_key, organization, country, START - dt.timedelta(days=30))
    issuing_key = generate_key(key_type)
    issuing = make_issuing_ca(
        SoftSigner(root, root_key), issuing_key, organization, country, URLS, START - dt.timedelta(days=30)
    )
    return SessionCA(key_type, root, root_key, issuing, issuing_key)


@functools.cache
def key_of(key_type: KeyType, tag: int = 0) -> PrivateKey:
    """A subscriber key per (type, tag), made once per session."""
    return generate_key(key_type)


def init_server_ca(paths: CAPaths, clock: Clock, key_type: KeyType = KeyType.P256, **extra: Any) -> None:
    """`mailkms init` in process (services.init_ca) for kms.example.org, with the arguments the tests
    share; `extra`: offline_root, root_passphrase, key_store, country..."""
    from mailkms.services import init_ca

    init_ca(
        paths,
        passphrase_env="",
        key_type=key_type,
        organization=ORGANIZATION,
        country=extra.pop("country", COUNTRY),
        urls=URLS,
        hostnames=["kms.example.org"],
        mail_from="mailkms@kms.example.org",
        clock=clock,
        recovery_passphrase="recovery passphrase for this test run",
        **extra,
    )
