"""The root pin (issue 12): `enroll --fingerprint` with the wrong fingerprint, and after enrolment a
server on the same URL whose TLS certificate comes from another CA.

The other server is a TLS listener on the real server's port (the real one stopped), with a
certificate for `localhost` from a CA made here. It counts the connections and records every byte
that arrives after a handshake: a client that trusted it would send its request there.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from mailkms.pki import KeyType, SoftSigner, generate_key, make_tls_server
from tests.e2e.conftest import ClientHome, Deployment, enrolled
from tests.testca import ca_of

ALICE = "alice@example.org"


class OtherServer:
    """Answers TLS on `port` with a certificate from another CA; records what reaches it."""

    def __init__(self, port: int, tmp: Path) -> None:
        other = ca_of(KeyType.P256, tag="other")
        key = generate_key(KeyType.P256)
        now = dt.datetime.now(dt.UTC)
        cert = make_tls_server(SoftSigner(other.root, other.root_key), key.public_key(), ["localhost"], now)
        chain = tmp / "other-tls.pem"
        pem = serialization.Encoding.PEM
        chain.write_bytes(cert.public_bytes(pem) + other.root.public_bytes(pem))
        key_file = tmp / "other-tls.key"
        key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(chain, key_file)
        self.port = port
        self._sock = socket.create_server(("127.0.0.1", port))
        self._sock.settimeout(0.2)
        self.connections = 0
        self.received = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.settimeout(5)
            try:
                with self._ctx.wrap_socket(conn, server_side=True) as tls:
                    self.received += tls.recv(65536)
                    tls.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except (ssl.SSLError, OSError):
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


@pytest.fixture
def alice(deployment: Deployment, tmp_path: Path) -> ClientHome:
    deployment.start()
    return enrolled(deployment, tmp_path, ALICE)


@pytest.fixture
def other_server(deployment: Deployment, alice: ClientHome, tmp_path: Path) -> Iterator[OtherServer]:
    """The real server is gone; another one answers on its URL."""
    deployment.stop()
    server = OtherServer(deployment.https_port, tmp_path)
    yield server
    server.close()


def test_enroll_with_a_wrong_fingerprint_is_refused_and_writes_nothing(deployment: Deployment, tmp_path: Path) -> None:
    deployment.start()
    token = deployment.add_user(ALICE)
    home = ClientHome(tmp_path / "alice", ALICE)
    right = deployment.fingerprint()
    wrong = ("0" if right[0] != "0" else "1") + right[1:]  # one digit off
    res = home.run(
        "enroll", "--server", deployment.url, "--fingerprint", wrong, "--email", ALICE,
        "--token", token, "--maildir", str(deployment.maildir(ALICE)),
    )  # fmt: skip
    assert res.code == 11, res.out + res.err
    assert "does not match the fingerprint you were given: do not trust this server" in res.err
    assert not (home.home / "state.json").exists() and not (home.home / "keys").exists()
    assert sorted(p.name for p in home.home.iterdir()) == [".lock"]  # only the store's lock
    # nothing reached the enrolment: the token is unspent and enrols with the right fingerprint
    assert home.enroll(deployment, token).code == 0
    assert (home.home / "state.json").exists()


@pytest.mark.parametrize(
    "command", [("logon", "--answer", "yes"), ("renew",), ("resync",)], ids=["logon", "renew", "resync"]
)
def test_a_server_with_a_tls_certificate_from_another_ca_is_refused(
    alice: ClientHome, other_server: OtherServer, command: tuple[str, ...]
) -> None:
    state_before = (alice.home / "state.json").read_bytes()
    keys_before = sorted(p.name for p in (alice.home / "keys").iterdir())
    res = alice.run(*command)
    assert res.code == 11, res.out + res.err
    assert "is not the one you enrolled with: its TLS certificate does not come from your pinned CA" in res.err
    assert "nothing was sent" in res.err
    assert other_server.connections >= 1  # the client did knock ...
    assert other_server.received == b""  # ... and sent nothing over the untrusted connection
    assert (alice.home / "state.json").read_bytes() == state_before
    assert sorted(p.name for p in (alice.home / "keys").iterdir()) == keys_before
    # the listener would have seen a request from a client that trusted it
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"https://localhost:{other_server.port}/api/v1/nonce", verify=False).raise_for_status()
    assert other_server.received.startswith(b"GET /api/v1/nonce")
