"""ACME test helpers shared by the unit and integration tests."""

from __future__ import annotations

import base64

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


class DKIMSigner:
    """A DKIM key made at run time, its DNS record served by a fake look-up (no network)."""

    def __init__(self, domain: str, selector: str = "sel") -> None:
        self.domain, self.selector = domain, selector
        self.key = rsa.generate_private_key(65537, 2048)
        spki = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(spki)

    def sign(self, data: bytes) -> bytes:
        pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        header = dkim.sign(
            data,
            self.selector.encode(),
            self.domain.encode(),
            pem,
            include_headers=[b"from", b"to", b"subject", b"in-reply-to"],
        )
        return bytes(header) + data

    def dns(self, name: bytes, timeout: int = 5) -> bytes | None:
        wanted = f"{self.selector}._domainkey.{self.domain}".encode()
        return self.record if name.rstrip(b".") == wanted else None
