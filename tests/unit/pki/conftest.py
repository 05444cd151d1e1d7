"""Session CAs for the PKI unit tests: one RSA-3072 and one P-384 family, made once."""

from __future__ import annotations

import pytest
from cryptography import x509

from mailkms.pki import CertKind, KeyType, PrivateKey
from tests.testca import MAIL_FROM, MAILBOX, START, SessionCA, ca_of, key_of

CA_FAMILIES = [KeyType.RSA3072, KeyType.P384]


@pytest.fixture(scope="session", params=CA_FAMILIES, ids=[f"ca-{k}" for k in CA_FAMILIES])
def ca(request: pytest.FixtureRequest) -> SessionCA:
    key_type: KeyType = request.param
    return ca_of(key_type)


@pytest.fixture(scope="session")
def rsa_ca() -> SessionCA:
    return ca_of(KeyType.RSA3072)


@pytest.fixture(scope="session")
def mail_signer(rsa_ca: SessionCA) -> tuple[x509.Certificate, PrivateKey]:
    """The server's mail-signing identity under the RSA-3072 CA."""
    key = key_of(KeyType.RSA2048, tag=5)
    return rsa_ca.issue(CertKind.MAIL_SIGNER, key, MAIL_FROM), key


@pytest.fixture(scope="session")
def transport() -> tuple[x509.Certificate, PrivateKey]:
    """The client's self-signed transport certificate, as `mailkms-client enroll` makes it."""
    from mailkms.client._core import _transport_certificate

    key = key_of(KeyType.RSA2048, tag=7)
    return _transport_certificate(key, MAILBOX, START), key
