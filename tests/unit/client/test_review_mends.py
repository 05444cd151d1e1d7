"""Mends from a review: a mailbox that cannot file a mail does not stop the sync, and the tools
that write the mail programs' stores never see the MAILKMS_* secrets in their environment."""

from __future__ import annotations

import contextlib
from collections.abc import Container, Iterator
from pathlib import Path

import pytest

from mailkms.client import _core
from mailkms.client._mailbox import Found, MaildirMailbox
from mailkms.client._mailstores import _run
from mailkms.errors import MailboxError
from tests.unit.client.delivery_kit import Kit, make_kit


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return make_kit(tmp_path / "home")


class CannotFile:
    """A mailbox that reads fine but refuses every flag or move (a quota, a server without keywords)."""

    def __init__(self, path: str) -> None:
        self.inner = MaildirMailbox(path)
        self.attempts = 0

    def deliveries(self, known: Container[str]) -> Iterator[Found]:
        return self.inner.deliveries(known)

    def settle(self, key: str, refused: bool) -> None:
        self.attempts += 1
        raise MailboxError("the server refused the MOVE")


def test_a_mail_that_cannot_be_filed_does_not_stop_the_sync(kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    box = CannotFile(str(kit.maildir))

    @contextlib.contextmanager
    def opened(*_args: object) -> Iterator[CannotFile]:
        yield box

    kit.add_mail(b"From: x@example.org\r\nX-Mailkms-Delivery: 1\r\nSubject: junk\r\n\r\nnot a delivery\r\n")
    kit.add_mail(kit.deliver())
    monkeypatch.setattr(_core, "open_mailbox", opened)
    report = kit.client.sync()
    # the junk is refused, the real reply after it still installs, and both filing failures are said
    assert len(report.refused) == 1 and len(report.installed) == 1
    assert box.attempts == 2
    assert sum("could not be filed" in note for note in report.notes) == 2
    again = kit.client.sync()  # the next sync tries the filing again and reads on
    assert again.installed == [] and box.attempts == 4


def test_the_store_tools_get_no_mailkms_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILKMS_CLIENT_PASSPHRASE", "key-store-passphrase-xyz")
    monkeypatch.setenv("MAILKMS_NSS_PASSWORD", "nss-password-xyz")
    seen = _run(["env"])
    assert seen.code == 0
    assert "PATH=" in seen.out  # the rest of the environment is there
    assert "MAILKMS_" not in seen.out and "xyz" not in seen.out


@pytest.mark.parametrize("which", ["root", "issuing"])
def test_only_a_root_is_pinned_at_enrolment(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fingerprint must name the root: the issuing CA's would pin a CA that TLS never ends in."""
    import httpx
    from cryptography.hazmat.primitives import serialization

    from mailkms.client import _http
    from mailkms.errors import FingerprintMismatch
    from mailkms.pki import KeyType, fingerprint_sha256
    from tests.testca import ca_of

    ca = ca_of(KeyType.P256)
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ca.issuing, ca.root))

    def server(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/ca/chain"
        return httpx.Response(200, content=chain_pem)

    def client(base: str, verify: object) -> httpx.Client:
        return httpx.Client(base_url=base, transport=httpx.MockTransport(server))

    monkeypatch.setattr(_http, "_client", client)
    pinned = ca.root if which == "root" else ca.issuing
    if which == "root":
        root, chain = _http.fetch_pinned_root("https://kms.example.org", fingerprint_sha256(pinned))
        assert root == ca.root and len(chain) == 2
    else:
        with pytest.raises(FingerprintMismatch, match="intermediate CA, not of the root"):
            _http.fetch_pinned_root("https://kms.example.org", fingerprint_sha256(pinned))
