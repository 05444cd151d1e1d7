"""Review items of issue 12 on the client: an IMAP server that refuses STARTTLS, INBOX in any case,
and the key store's files written whole by two writers at once."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailkms.client._mailbox import ImapSettings, check_imap, parse_imap_url
from mailkms.client._store import _atomic_write
from mailkms.errors import BadMailboxURL, MailboxError

PASSWORD = "never-on-the-wire-made-at-run-time"


class RefusingImap:
    """A real TCP IMAP peer that offers STARTTLS and then answers it with `answer` (NO or BAD);
    it records every line it is sent."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.lines: list[bytes] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._server.accept()
        with conn, conn.makefile("rwb") as stream:
            stream.write(b"* OK IMAP4rev1 ready\r\n")
            stream.flush()
            for line in stream:
                self.lines.append(line)
                tag, _, rest = line.strip().partition(b" ")
                command = rest.split(b" ", 1)[0].upper()
                if command == b"CAPABILITY":
                    stream.write(b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n" + tag + b" OK done\r\n")
                elif command == b"STARTTLS":
                    stream.write(tag + b" " + self.answer + b"\r\n")
                elif command == b"LOGOUT":
                    stream.write(b"* BYE\r\n" + tag + b" OK bye\r\n")
                    stream.flush()
                    return
                else:
                    stream.write(tag + b" BAD not here\r\n")
                stream.flush()

    def close(self) -> None:
        self._server.close()
        self._thread.join(timeout=5)


@pytest.fixture(params=[b"NO [UNAVAILABLE] TLS is down for maintenance", b"BAD STARTTLS not now"], ids=["NO", "BAD"])
def refusing(request: pytest.FixtureRequest) -> Iterator[RefusingImap]:
    server = RefusingImap(request.param)
    yield server
    server.close()


def test_starttls_refused_by_the_server_is_an_imap_failure_exit_12(refusing: RefusingImap) -> None:
    """Not "wrong password" (14): the server said NO/BAD to STARTTLS, before any login (README: 12 is
    "other IMAP failure ... TLS handshake failed")."""
    url = parse_imap_url(f"imap://carol%40example.org@127.0.0.1:{refusing.port}/INBOX")
    with pytest.raises(MailboxError) as caught:
        check_imap(ImapSettings(url=url, password=PASSWORD))
    assert type(caught.value) is MailboxError and caught.value.exit_code == 12
    assert "refused STARTTLS" in caught.value.detail and "imaps://" in caught.value.detail
    assert [line for line in refusing.lines if b"STARTTLS" in line.upper()]
    assert not any(PASSWORD.encode() in line or b"LOGIN" in line.upper() for line in refusing.lines)


@pytest.mark.parametrize(
    ("read", "done"),
    [("INBOX", "inbox"), ("inbox", "INBOX"), ("Inbox", "iNbOx"), ("Archive", "Archive")],
)
def test_the_done_folder_must_not_be_the_folder_read_inbox_in_any_case(read: str, done: str) -> None:
    url = parse_imap_url(f"imaps://carol%40example.org@mail.example.org/{read}")
    with pytest.raises(BadMailboxURL, match="must differ"):
        ImapSettings(url=url, password=PASSWORD, done_folder=done)


@pytest.mark.parametrize(("read", "done"), [("Archive", "archive"), ("INBOX", "INBOX.mailkms"), ("INBOX", "mailkms")])
def test_other_folder_names_are_compared_as_written(read: str, done: str) -> None:
    url = parse_imap_url(f"imaps://carol%40example.org@mail.example.org/{read}")
    assert ImapSettings(url=url, password=PASSWORD, done_folder=done).done_folder == done


def test_two_writers_of_the_state_file_at_once_leave_one_whole_file(tmp_path: Path) -> None:
    """Each write has a temporary file of its own: with one fixed `state.json.tmp`, writers truncate
    each other's half-written file and one rename finds nothing to rename."""
    target = tmp_path / "state.json"
    payloads = [bytes([65 + i]) * (2 * 1024 * 1024) for i in range(8)]
    barrier = threading.Barrier(len(payloads))
    errors: list[BaseException] = []

    def write(data: bytes) -> None:
        barrier.wait()
        try:
            for _ in range(5):
                _atomic_write(target, data, 0o600)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_bytes() in payloads  # one writer's bytes, whole
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # no temporary file left behind
