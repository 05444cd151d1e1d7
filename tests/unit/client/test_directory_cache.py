"""The client's directory cache: checked on every use, refreshed, forgotten when the server says 404."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from mailkms.client._mail import DirectoryClient
from mailkms.clock import FakeClock
from mailkms.errors import NotInDirectory, ServerRefused, ServerUnreachable, UntrustedCertificate
from mailkms.pki import certs_only
from tests.smime_support import NOW, Identity, SmimePKI, make_pki


class FakeDirectoryApi:
    """Answers like the server's /api/v1/directory, and records the calls."""

    def __init__(self) -> None:
        self.published: dict[str, bytes] = {}
        self.calls: list[str] = []
        self.down = False

    def directory(self, address: str) -> bytes:
        self.calls.append(address)
        if self.down:
            raise ServerUnreachable("down")
        if address not in self.published:
            raise ServerRefused(404, {"type": "urn:mailkms:problem:not-in-directory", "detail": "no"})
        return self.published[address]


@pytest.fixture(scope="module")
def pki(smime_pki: SmimePKI) -> SmimePKI:
    return smime_pki


@pytest.fixture(scope="module")
def bob(pki: SmimePKI) -> Identity:
    return pki.identity("bob@example.org")


def _client(tmp_path: Path, pki: SmimePKI, api: FakeDirectoryApi, clock: FakeClock) -> DirectoryClient:
    return DirectoryClient(tmp_path, api, pki.root, clock, [pki.issuing])  # type: ignore[arg-type]


def test_cached_then_refreshed_then_forgotten(tmp_path: Path, pki: SmimePKI, bob: Identity) -> None:
    api, clock = FakeDirectoryApi(), FakeClock(NOW)
    api.published["bob@example.org"] = certs_only([bob.encryption, pki.issuing])
    directory = _client(tmp_path, pki, api, clock)
    assert directory.lookup("Bob@Example.org") == bob.encryption
    assert directory.lookup("bob@example.org") == bob.encryption
    assert api.calls == ["bob@example.org"]  # the second came from the cache
    clock.advance(dt.timedelta(hours=25))
    directory.lookup("bob@example.org")
    assert len(api.calls) == 2  # stale cache: asked again
    api.down = True
    clock.advance(dt.timedelta(hours=25))
    assert directory.lookup("bob@example.org") == bob.encryption  # server down: the checked cache serves
    assert directory.notes
    api.down = False
    del api.published["bob@example.org"]  # revoked or expired: the server stops publishing
    with pytest.raises(NotInDirectory):
        directory.lookup("bob@example.org", refresh=True)
    assert not (tmp_path / "directory" / "bob@example.org.pem").exists()


def test_wrong_address_signing_certificate_and_foreign_ca_are_refused(
    tmp_path: Path, pki: SmimePKI, bob: Identity
) -> None:
    api, clock = FakeDirectoryApi(), FakeClock(NOW)
    directory = _client(tmp_path, pki, api, clock)
    api.published["carol@example.org"] = certs_only([bob.encryption, pki.issuing])
    with pytest.raises(UntrustedCertificate):
        directory.lookup("carol@example.org")
    api.published["bob@example.org"] = certs_only([bob.signing, pki.issuing])
    with pytest.raises(UntrustedCertificate, match="not an encryption certificate"):
        directory.lookup("bob@example.org")
    other = make_pki(tmp_path / "other")
    mallory = other.identity("bob@example.org")
    api.published["bob@example.org"] = certs_only([mallory.encryption, other.issuing])
    with pytest.raises(Exception, match="does not chain to the pinned mailkms CA"):
        directory.lookup("bob@example.org", refresh=True)


def test_a_cached_certificate_that_expired_is_not_used(tmp_path: Path, pki: SmimePKI, bob: Identity) -> None:
    api, clock = FakeDirectoryApi(), FakeClock(NOW)
    api.published["bob@example.org"] = certs_only([bob.encryption, pki.issuing])
    directory = _client(tmp_path, pki, api, clock)
    directory.lookup("bob@example.org")
    clock.set(bob.encryption.not_valid_after_utc + dt.timedelta(seconds=1))
    api.down = True
    with pytest.raises(Exception, match="not valid"):
        directory.lookup("bob@example.org")
