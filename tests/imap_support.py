"""Dovecot alone (no Postfix) for the client's IMAP tests, and helpers that look at a mailbox
from the outside: a session of the test's own, never the client's code."""

from __future__ import annotations

import contextlib
import imaplib
import os
import re
import shutil
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.mailstack import MAIL_GID, MAIL_UID, Dovecot, TLSFiles, mail_tools_missing

__all__ = ["Imap", "dovecot_alone", "mail_tools_missing"]


class QuickDovecot(Dovecot):
    """The mail stack's Dovecot without its brute-force brakes: a refused login is answered at once
    and does not slow the next ones from 127.0.0.1 (the wrong-password tests would otherwise wait
    2, 4, 8, then 15 s a login)."""

    def _config(self) -> str:
        return (
            super()._config()
            + """
auth_failure_delay = 0
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
"""
        )


@dataclass
class Imap:
    """The test's view of one Dovecot: log in as a user, put mail in, read flags."""

    dovecot: Dovecot
    tls: TLSFiles

    def session(self, user: str) -> imaplib.IMAP4_SSL:
        context = ssl.create_default_context(cafile=str(self.tls.ca_pem))
        conn = imaplib.IMAP4_SSL("localhost", self.dovecot.imaps_port, ssl_context=context, timeout=30)
        conn.login(user, self.dovecot.users[user])
        return conn

    def url(self, user: str, folder: str = "INBOX", starttls: bool = False) -> str:
        quoted = user.replace("@", "%40")
        if starttls:
            return f"imap://{quoted}@localhost:{self.dovecot.imap_port}/{folder}"
        return f"imaps://{quoted}@localhost:{self.dovecot.imaps_port}/{folder}"

    def append(self, user: str, raw: bytes, folder: str = "INBOX", flags: str = "") -> None:
        with contextlib.closing(_Closing(self.session(user))) as s:
            typ, data = s.conn.append(folder, f"({flags})" if flags else None, None, raw)
            assert typ == "OK", data

    def flags(self, user: str, folder: str = "INBOX") -> dict[int, frozenset[bytes]]:
        """UID -> flags, read with EXAMINE (read-only: the look changes nothing); \\Recent left out."""
        with contextlib.closing(_Closing(self.session(user))) as s:
            typ, data = s.conn.select(f'"{folder}"', readonly=True)
            assert typ == "OK", data
            if int(data[0] or 0) == 0:
                return {}
            typ, data = s.conn.uid("FETCH", "1:*", "(FLAGS)")
            assert typ == "OK", data
            out: dict[int, frozenset[bytes]] = {}
            for line in data:
                assert isinstance(line, bytes), line
                uid = re.search(rb"UID (\d+)", line)
                assert uid, line
                # \Recent belongs to a session, not to the mail
                out[int(uid.group(1))] = frozenset(imaplib.ParseFlags(line)) - {b"\\Recent"}
            return out

    def folders(self, user: str) -> list[str]:
        with contextlib.closing(_Closing(self.session(user))) as s:
            typ, data = s.conn.list()
            assert typ == "OK"
            return [line.decode().rsplit(" ", 1)[-1].strip('"') for line in data if isinstance(line, bytes)]

    def bodies(self, user: str, folder: str) -> list[bytes]:
        with contextlib.closing(_Closing(self.session(user))) as s:
            typ, data = s.conn.select(f'"{folder}"', readonly=True)
            assert typ == "OK", data
            typ, data = s.conn.uid("FETCH", "1:*", "(BODY.PEEK[])")
            return [item[1] for item in data if isinstance(item, tuple)]

    def fill_maildir(self, user: str, count: int, make: object) -> float:
        """`count` mails written straight into the user's Maildir (as Dovecot's own files, owned by
        the mail user), then indexed by one SELECT; APPEND costs ~17 ms a mail (fsync) here."""
        maildir = self.dovecot.maildir(user)
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        for path in (maildir.parent, maildir, maildir / "cur", maildir / "new", maildir / "tmp"):
            os.chown(path, MAIL_UID, MAIL_GID)
        assert callable(make)
        cur = maildir / "cur"
        for i in range(count):
            raw, flags = make(i)
            path = cur / f"{1_700_000_000 + i}.M{i}P1.mailstack:2,{flags}"
            path.write_bytes(raw)
            os.chown(path, MAIL_UID, MAIL_GID)
        started = time.monotonic()
        with contextlib.closing(_Closing(self.session(user))) as s:
            typ, data = s.conn.select("INBOX", readonly=True)
            assert typ == "OK" and int(data[0] or 0) >= count, data
        return time.monotonic() - started

    def logouts(self) -> list[str]:
        """Dovecot's own account of each IMAP session at logout (in=, out=, body_count=, ...)."""
        return [line for line in self.dovecot.log().splitlines() if "Disconnected: Logged out" in line]

    def wait_logouts(self, count: int, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.logouts()
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"Dovecot logged {len(self.logouts())} logouts, not {count}")


class _Closing:
    def __init__(self, conn: imaplib.IMAP4_SSL) -> None:
        self.conn = conn

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.logout()


def logout_figures(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line.split("Logged out", 1)[1])}


@contextlib.contextmanager
def dovecot_alone(log_dir: Path, users: dict[str, str]) -> Iterator[Imap]:
    """Dovecot with IMAPS and IMAP+STARTTLS, in a folder of its own under /tmp (its daemons cannot
    enter pytest's 0700 folders); its log is copied into `log_dir` at the end."""
    base = Path(tempfile.mkdtemp(prefix="mailkms-dovecot-"))
    os.chmod(base, 0o711)
    tls = TLSFiles.make(base / "tls")
    os.chmod(base / "tls", 0o755)
    dovecot = QuickDovecot(base / "dovecot", tls, dict(users))
    try:
        dovecot.start()
        yield Imap(dovecot, tls)
    finally:
        dovecot.stop()
        log_dir.mkdir(parents=True, exist_ok=True)
        log = dovecot.root / "dovecot.log"
        if log.exists():
            shutil.copy(log, log_dir / "dovecot.log")
        shutil.rmtree(base, ignore_errors=True)
