"""Where deliveries arrive: a local Maildir, or a folder on an IMAP server.

`Client.sync` sees only the `Mailbox` protocol: the keys of the delivery mails (the ones that
carry the X-Mailkms-Delivery header), the raw mail of one, and `settle` once it has decided.

Over IMAP the server does the looking (`UID SEARCH HEADER X-Mailkms-Delivery ""`), so a large
INBOX is never downloaded: only matching mails are fetched, with BODY.PEEK[] (nothing is marked
\\Seen implicitly). Installed deliveries (and duplicates of installed ones) are flagged \\Seen and
$MailkmsInstalled and moved into a folder of their own (`mailkms`); refused ones stay where they
are, flagged $MailkmsRefused, which the search leaves out from then on. Nothing else is touched:
no plain EXPUNGE is ever sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import imaplib
import mailbox as mbox
import re
import ssl
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote, unquote, urlsplit

from mailkms.client._store import ClientState, ImapAccount, open_secret, seal_secret
from mailkms.errors import (
    BadMailboxURL,
    MailboxError,
    MailboxFolderMissing,
    MailboxLoginFailed,
    MailboxTLSUntrusted,
    MailboxUnreachable,
    Malformed,
)
from mailkms.pki import DELIVERY_HEADER, parse_message

INSTALLED_KEYWORD = "$MailkmsInstalled"
REFUSED_KEYWORD = "$MailkmsRefused"
DEFAULT_DONE_FOLDER = "mailkms"
PASSWORD_PURPOSE = "mailkms imap password"
TIMEOUT = 30.0  # seconds for connecting and for each answer
_PORTS = {"imaps": 993, "imap": 143}


@dataclass(frozen=True)
class Found:
    """A delivery mail in the mailbox: its key in `state.processed`, and how to read it."""

    key: str
    fetch: Callable[[], bytes]


class Mailbox(Protocol):
    def deliveries(self, known: Container[str]) -> Iterator[Found]:
        """Delivery mails still in the mailbox, oldest first. Keys in `known` are yielded without
        being read (the caller already decided on them); others only if they carry the header."""
        ...

    def settle(self, key: str, refused: bool) -> None:
        """Put a decided delivery where it belongs (installed: filed away; refused: left, marked)."""
        ...


# --- Maildir ------------------------------------------------------------------------------------
class MaildirMailbox:
    """Today's behaviour: every file is read once; the processed map remembers what was decided."""

    def __init__(self, path: str) -> None:
        try:
            self._box = mbox.Maildir(path, factory=None, create=False)
        except mbox.NoSuchMailboxError:
            raise MailboxFolderMissing(f"the Maildir {path} does not exist") from None
        self.path = path

    def deliveries(self, known: Container[str]) -> Iterator[Found]:
        for key in sorted(self._box.keys()):
            if key in known:
                yield Found(key, lambda key=key: self._box.get_bytes(key))  # type: ignore[misc]
                continue
            try:
                raw = self._box.get_bytes(key)
            except KeyError:
                continue  # moved away by the user's mail program meanwhile
            if DELIVERY_HEADER in parse_message(raw):
                yield Found(key, lambda raw=raw: raw)  # type: ignore[misc]

    def settle(self, key: str, refused: bool) -> None:
        del key, refused  # the processed map is the record; the mail stays where it is


# --- IMAP ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImapURL:
    """imaps://user@host[:port]/FOLDER (TLS from the first byte) or imap://... (STARTTLS, required)."""

    scheme: str
    user: str
    host: str
    port: int
    folder: str = "INBOX"

    @property
    def starttls(self) -> bool:
        return self.scheme == "imap"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{quote(self.user, safe='')}@{host}:{self.port}/{quote(self.folder, safe='/')}"


def parse_imap_url(text: str) -> ImapURL:
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as exc:
        raise BadMailboxURL(f"{text!r} is not a valid IMAP URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in _PORTS:
        raise BadMailboxURL(
            f"{text!r}: the mailbox URL must start with imaps:// (TLS) or imap:// (STARTTLS);"
            " mailkms-client never logs in without TLS"
        )
    if parts.password is not None:
        raise BadMailboxURL("put the IMAP password in MAILKMS_IMAP_PASSWORD or type it at the prompt, not in the URL")
    if not parts.username or not parts.hostname:
        raise BadMailboxURL(
            f"{text!r}: the URL needs a user and a host (imaps://alice%40example.org@mail.example.org/)"
        )
    if parts.query or parts.fragment or ";" in parts.path:
        raise BadMailboxURL(f"{text!r}: only imaps://user@host[:port]/FOLDER is understood")
    folder = unquote(parts.path.lstrip("/")).rstrip("/") or "INBOX"
    return ImapURL(scheme, unquote(parts.username), parts.hostname, port or _PORTS[scheme], _check_folder(folder))


def same_folder(a: str, b: str) -> bool:
    """IMAP folder names are compared as written, except INBOX, which is INBOX in any case (RFC 3501 §5.1)."""
    return a == b or a.upper() == b.upper() == "INBOX"


def _check_folder(name: str) -> str:
    if not name.isascii() or not name.isprintable() or not name.strip():
        raise BadMailboxURL(f"the folder name {name!r} must be printable ASCII")
    return name


def normalise_pin(text: str) -> str:
    """`sha256:HEX`, `SHA256:AB:CD:..` or bare hex (openssl x509 -fingerprint -sha256) -> sha256:hex."""
    value = text.strip().lower().removeprefix("sha256:").removeprefix("sha-256:").removeprefix("sha256=")
    digits = value.replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", digits):
        raise Malformed("--imap-pin takes the SHA-256 fingerprint of the server's certificate: sha256:<64 hex digits>")
    return f"sha256:{digits}"


@dataclass(frozen=True)
class ImapSettings:
    """An IMAP account with its password in the clear: only ever in memory."""

    url: ImapURL
    password: str = field(repr=False)
    done_folder: str = DEFAULT_DONE_FOLDER
    ca_pem: str = ""
    pin: str = ""

    def __post_init__(self) -> None:
        _check_folder(self.done_folder)
        if same_folder(self.done_folder, self.url.folder):
            raise BadMailboxURL(
                f"the folder installed deliveries are moved into ({self.done_folder!r}) must differ from the one"
                f" read ({self.url.folder!r}); INBOX is one folder in any case"
            )
        if self.pin:
            object.__setattr__(self, "pin", normalise_pin(self.pin))

    def sealed(self, passphrase: bytes) -> ImapAccount:
        return ImapAccount(
            url=str(self.url),
            password=seal_secret(self.password, passphrase, PASSWORD_PURPOSE),
            done_folder=self.done_folder,
            ca_pem=self.ca_pem,
            pin=self.pin,
        )

    @classmethod
    def unsealed(cls, account: ImapAccount, passphrase: bytes) -> ImapSettings:
        return cls(
            url=parse_imap_url(account.url),
            password=open_secret(account.password, passphrase, PASSWORD_PURPOSE),
            done_folder=account.done_folder,
            ca_pem=account.ca_pem,
            pin=account.pin,
        )


@dataclass
class ImapStats:
    """What one session asked of the server (for tests and `--verbose` figures)."""

    commands: list[str] = field(default_factory=list)
    fetched: int = 0
    bytes_fetched: int = 0


def _quoted(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _server_text(data: Sequence[object]) -> str:
    parts = [d.decode(errors="replace") if isinstance(d, bytes) else str(d) for d in data if d is not None]
    return " ".join(parts).strip()


def tls_context(ca_pem: str, pin: str) -> ssl.SSLContext:
    """System CAs by default; only `ca_pem` when given; with a pin the chain is not checked, the
    certificate's fingerprint is (after the handshake, before the password is sent)."""
    if pin:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_pem:
        context = ssl.create_default_context(cadata=ca_pem)
    else:
        context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ImapMailbox:
    """One logged-in session on the folder of `settings.url`; `close()` logs out."""

    def __init__(self, settings: ImapSettings) -> None:
        self.settings = settings
        self.stats = ImapStats()
        self._conn = _login(settings)
        self._where = f"{settings.url.host}:{settings.url.port}"
        self._done_folder_ready = False
        try:
            self._uidvalidity = self._select(settings.url.folder)
            caps = self._call("CAPABILITY", self._conn.capability)
            self._caps = set(_server_text(caps).upper().split())
        except BaseException:
            self.close()
            raise

    # -- plumbing
    def _call(self, what: str, fn: Callable[..., tuple[str, Sequence[object]]], *args: object) -> Sequence[object]:
        self.stats.commands.append(what)
        try:
            typ, data = fn(*args)
        except imaplib.IMAP4.abort as exc:
            raise MailboxUnreachable(f"the IMAP server {self._where} broke the connection ({exc})") from None
        except imaplib.IMAP4.error as exc:
            raise MailboxError(f"the IMAP server {self._where} refused {what} ({exc})") from None
        except OSError as exc:
            raise MailboxUnreachable(f"the connection to the IMAP server {self._where} failed ({exc})") from None
        if typ != "OK":
            raise MailboxError(f"the IMAP server {self._where} refused {what}: {_server_text(data)}")
        return data

    def _uid(self, command: str, *args: str) -> Sequence[object]:
        return self._call(f"UID {command}", self._conn.uid, command, *args)

    def _select(self, folder: str) -> str:
        self.stats.commands.append("SELECT")
        try:
            typ, data = self._conn.select(_quoted(folder))
        except (imaplib.IMAP4.error, OSError) as exc:
            raise MailboxUnreachable(f"the IMAP server {self._where} broke the connection ({exc})") from None
        if typ != "OK":
            raise MailboxFolderMissing(
                f"the folder {folder!r} cannot be opened on {self._where}: {_server_text(data)}"
                " (check the folder at the end of the --imap URL)"
            )
        _, values = self._conn.response("UIDVALIDITY")
        return _server_text(values) or "0"

    def _key(self, uid: str) -> str:
        return f"imap:{self.settings.url.folder}:{self._uidvalidity}:{uid}"

    # -- the protocol
    def deliveries(self, known: Container[str]) -> Iterator[Found]:
        found = self._uid("SEARCH", "UNDELETED", "UNKEYWORD", REFUSED_KEYWORD, "HEADER", DELIVERY_HEADER, '""')
        uids = sorted(_server_text(found).split(), key=int)
        for uid in uids:
            yield Found(self._key(uid), lambda uid=uid: self.fetch(uid))  # type: ignore[misc]

    def fetch(self, uid: str) -> bytes:
        data = self._uid("FETCH", uid, "(BODY.PEEK[])")
        for item in data:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], bytes):
                self.stats.fetched += 1
                self.stats.bytes_fetched += len(item[1])
                return item[1]
        raise MailboxError(f"the IMAP server {self._where} sent no message for UID {uid} (removed meanwhile?)")

    def settle(self, key: str, refused: bool) -> None:
        uid = key.rsplit(":", 1)[-1]
        if refused:
            self._uid("STORE", uid, "+FLAGS.SILENT", f"({REFUSED_KEYWORD})")
            return
        self._uid("STORE", uid, "+FLAGS.SILENT", f"(\\Seen {INSTALLED_KEYWORD})")
        target = _quoted(self._done_folder())
        if "MOVE" in self._caps:
            self._uid("MOVE", uid, target)
            return
        self._uid("COPY", uid, target)
        self._uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)")
        if "UIDPLUS" in self._caps:
            self._uid("EXPUNGE", uid)  # this one UID only; without UIDPLUS the user's program expunges

    def _done_folder(self) -> str:
        folder = self.settings.done_folder
        if not self._done_folder_ready:
            listed = self._call("LIST", self._conn.list, '""', _quoted(folder))
            if not [entry for entry in listed if entry is not None]:
                self._call("CREATE", self._conn.create, _quoted(folder))
                with contextlib.suppress(MailboxError):
                    self._call("SUBSCRIBE", self._conn.subscribe, _quoted(folder))
            self._done_folder_ready = True
        return folder

    def close(self) -> None:
        # LOGOUT alone: CLOSE would expunge every \Deleted mail of the folder, the user's too
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            self._conn.logout()


def _login(settings: ImapSettings) -> imaplib.IMAP4:
    url = settings.url
    where = f"{url.host}:{url.port}"
    context = tls_context(settings.ca_pem, settings.pin)
    conn: imaplib.IMAP4 | None = None
    try:
        if url.starttls:
            conn = imaplib.IMAP4(url.host, url.port, timeout=TIMEOUT)
            if "STARTTLS" not in conn.capabilities:
                raise MailboxError(
                    f"the IMAP server {where} offers no STARTTLS; mailkms-client never sends a password"
                    " without TLS (use imaps:// if the server has it)"
                )
            try:
                conn.starttls(ssl_context=context)
            except imaplib.IMAP4.abort:
                raise
            except imaplib.IMAP4.error as exc:  # the server answered NO or BAD: not the login's fault
                raise MailboxError(
                    f"the IMAP server {where} refused STARTTLS ({_server_text([exc.args[0] if exc.args else ''])});"
                    " mailkms-client never sends a password without TLS (use imaps:// if the server has it)"
                ) from None
        else:
            conn = imaplib.IMAP4_SSL(url.host, url.port, ssl_context=context, timeout=TIMEOUT)
        if settings.pin:
            _check_pin(conn, settings.pin, where)
        if "AUTH=PLAIN" in conn.capabilities:  # UTF-8 user names and passwords
            conn.authenticate("PLAIN", lambda _: f"\0{url.user}\0{settings.password}".encode())
        elif not (url.user + settings.password).isascii():
            raise MailboxError(f"the IMAP server {where} offers only LOGIN, which takes ASCII user names and passwords")
        else:
            conn.login(url.user, settings.password)
        return conn
    except ssl.SSLCertVerificationError as exc:
        _drop(conn)
        raise MailboxTLSUntrusted(
            f"the TLS certificate of the IMAP server {where} does not verify ({exc.verify_message}):"
            " trust the CA that issued it with --imap-ca-file PEM, or pin the certificate with"
            " --imap-pin sha256:HEX"
        ) from None
    except ssl.SSLError as exc:
        _drop(conn)
        raise MailboxError(f"TLS with the IMAP server {where} failed ({exc.reason or exc})") from None
    except TimeoutError:
        _drop(conn)
        hint = " (is it an imaps:// port? imap:// means STARTTLS)" if url.starttls else ""
        raise MailboxUnreachable(f"the IMAP server {where} did not answer within {TIMEOUT:g} s{hint}") from None
    except OSError as exc:
        _drop(conn)
        raise MailboxUnreachable(f"cannot connect to the IMAP server {where} ({exc.strerror or exc})") from None
    except imaplib.IMAP4.abort as exc:
        _drop(conn)
        raise MailboxUnreachable(f"the IMAP server {where} broke the connection ({exc})") from None
    except imaplib.IMAP4.error as exc:
        _drop(conn)
        raise MailboxLoginFailed(
            f"the IMAP server {where} refused the login of {url.user} ({_server_text([exc.args[0] if exc.args else ''])}):"
            " check the user in the URL and the password (`mailkms-client mailbox set` stores a new one)"
        ) from None
    except BaseException:
        _drop(conn)
        raise


def _check_pin(conn: imaplib.IMAP4, pin: str, where: str) -> None:
    sock = conn.sock
    der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
    if not der:
        raise MailboxTLSUntrusted(f"the IMAP server {where} showed no certificate")
    seen = "sha256:" + hashlib.sha256(der).hexdigest()
    if seen != pin:
        raise MailboxTLSUntrusted(
            f"the IMAP server {where} showed a certificate ({seen}) other than the one pinned ({pin}):"
            " if the server's certificate was replaced, pin the new one with"
            " `mailkms-client mailbox set --imap URL --imap-pin sha256:HEX`"
        )


def _drop(conn: imaplib.IMAP4 | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.shutdown()


def check_imap(settings: ImapSettings) -> None:
    """Log in and open the folder, as sync will (at enrolment, before the token is spent)."""
    ImapMailbox(settings).close()


@contextlib.contextmanager
def open_mailbox(state: ClientState, passphrase: Callable[[], bytes]) -> Iterator[Mailbox]:
    if state.imap is None:
        if not state.maildir:
            raise MailboxFolderMissing("no mailbox is set: `mailkms-client mailbox set --imap URL` or `--maildir DIR`")
        yield MaildirMailbox(state.maildir)
        return
    box = ImapMailbox(ImapSettings.unsealed(state.imap, passphrase()))
    try:
        yield box
    finally:
        box.close()


def describe(state: ClientState) -> str:
    if state.imap is not None:
        extra = " (pinned certificate)" if state.imap.pin else (" (own CA)" if state.imap.ca_pem else "")
        return f"{state.imap.url}{extra}, installed deliveries filed in {state.imap.done_folder!r}"
    return f"Maildir {state.maildir}" if state.maildir else "none"
