"""The client reads its deliveries from a real Dovecot over IMAP (issue 11, part 2).

The delivery check itself (`Client._install`) is replaced here by a stand-in that decides from a
test header: these tests are about the mailbox (what is fetched, flagged, moved, left alone and
reported). tests/e2e/test_imap_e2e.py installs a real delivery over IMAP.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import imaplib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from mailkms.client._core import PROMPT, Client
from mailkms.client._mailbox import (
    INSTALLED_KEYWORD,
    REFUSED_KEYWORD,
    ImapMailbox,
    ImapSettings,
    parse_imap_url,
)
from mailkms.client._store import ClientState, Generation, KeyStore, cert_to_pem, signing_key_name
from mailkms.clock import SystemClock
from mailkms.errors import (
    DeliveryRefused,
    MailboxFolderMissing,
    MailboxLoginFailed,
    MailboxTLSUntrusted,
    MailboxUnreachable,
)
from mailkms.pki import KeyType, generate_key
from tests.imap_support import Imap, dovecot_alone, logout_figures, mail_tools_missing
from tests.mailstack import free_port

ALICE, BOB, CAROL = "alice@example.org", "bob@example.org", "carol@example.org"
PASSWORDS = {ALICE: "alice-imap-pw", BOB: "bob-imap-pw", CAROL: "carol-imap-pw"}
PASSPHRASE = "key-store-passphrase-of-the-test"
ORDINARY = 10_000
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(bool(mail_tools_missing()), reason="dovecot is not installed (make system-deps)")


@pytest.fixture(scope="module")
def imap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Imap]:
    with dovecot_alone(tmp_path_factory.mktemp("dovecot-logs"), PASSWORDS) as served:
        yield served


# --- mail -----------------------------------------------------------------------------------
def ordinary(i: int) -> tuple[bytes, str]:
    """An ordinary mail and its Maildir flags: a third read, some flagged, one marked deleted;
    every 100th mentions the delivery header in its body (the search is on headers only)."""
    body = "Minutes of the meeting.\r\n" * 8
    if i % 100 == 0:
        body += "Our mail carries an X-Mailkms-Delivery: header, they say.\r\n"
    raw = (
        f"From: colleague{i % 50}@example.org\r\nTo: {ALICE}\r\nSubject: ordinary {i}\r\n"
        f"Message-ID: <ordinary-{i}@example.org>\r\nDate: {email.utils.formatdate(1_700_000_000 + i)}\r\n\r\n{body}"
    ).encode()
    flags = "S" if i % 3 == 0 else ""
    if i % 7 == 0:
        flags = "F" + flags
    if i == 4242:
        flags += "T"  # \Deleted by the user's program, not yet expunged: must survive
    return raw, flags


def delivery(outcome: str, n: int) -> bytes:
    return (
        f"From: mailkms@kms.example.org\r\nTo: {ALICE}\r\nSubject: Your certificates\r\n"
        f"Message-ID: <delivery-{outcome}-{n}@kms.example.org>\r\nX-Mailkms-Delivery: enrolment\r\n"
        f"X-Test-Outcome: {outcome}\r\nContent-Type: text/plain\r\n\r\n" + "certificate bytes\r\n" * 200
    ).encode()


def fake_install(self: Client, state: ClientState, raw: bytes) -> str:
    """The stand-in for the delivery check: the test header decides."""
    del self, state
    outcome = email.message_from_bytes(raw)["X-Test-Outcome"]
    if outcome == "install":
        return "installed generation 2 (renewal), valid until 2027-07-15 09:30:00 UTC"
    if outcome == "duplicate":
        return "already installed (generation 2)"
    raise DeliveryRefused("the mail was not signed by the server's mail identity")


# --- key stores -------------------------------------------------------------------------------
def settings(imap: Imap, user: str, **kw: object) -> ImapSettings:
    url = kw.pop("url", None) or imap.url(user)
    values: dict[str, object] = {"password": PASSWORDS[user], "ca_pem": imap.tls.ca_pem.read_text()}
    values.update(kw)
    return ImapSettings(parse_imap_url(str(url)), **values)  # type: ignore[arg-type]


def key_store(home: Path, user: str, account: ImapSettings, *, due: bool = False) -> Client:
    """An enrolled key store (one generation, its signing key sealed with the passphrase) whose
    mailbox is `account`; `due`: the reminder point has passed."""
    now = SystemClock().now()
    key = generate_key(KeyType.P256)
    name = x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, user)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(0x1A)
        .not_valid_before(now - dt.timedelta(days=400))
        .not_valid_after(now + dt.timedelta(days=150))
        .sign(key, hashes.SHA256())
    )
    store = KeyStore(home)
    store.write_key(signing_key_name("1a"), key, PASSPHRASE.encode())
    reminder = now - dt.timedelta(days=30) if due else now + dt.timedelta(days=30)
    state = ClientState(
        # nothing listens on port 1: the Key Management Server is offline for these tests
        server="https://127.0.0.1:1",
        mailbox=user,
        root_fingerprint="",
        root_pem=cert_to_pem(cert),
        mail_from="mailkms@kms.example.org",
        maildir="",
        generations=[
            Generation(
                1,
                "1a",
                "2b",
                cert_to_pem(cert),
                cert_to_pem(cert),
                reminder.isoformat(),
                cert.not_valid_before_utc.isoformat(),
                cert.not_valid_after_utc.isoformat(),
                now.isoformat(),
                "req-1",
            ),
        ],
        imap=account.sealed(PASSPHRASE.encode()),
    )
    store.save(state)
    return Client(home, SystemClock(), lambda: PASSPHRASE.encode())


class Recorder:
    """Every UID command the client sends, seen at imaplib's door."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[tuple[str, ...]] = []
        real = imaplib.IMAP4.uid

        def uid(conn: imaplib.IMAP4, command: str, *args: str):  # type: ignore[no-untyped-def]
            self.sent.append((command.upper(), *args))
            return real(conn, command, *args)

        monkeypatch.setattr(imaplib.IMAP4, "uid", uid)

    def of(self, command: str) -> list[tuple[str, ...]]:
        return [c for c in self.sent if c[0] == command]


# --- the large INBOX ------------------------------------------------------------------------------
def test_large_inbox_only_deliveries_fetched_others_untouched(
    imap: Imap, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    indexed = imap.fill_maildir(ALICE, ORDINARY, ordinary)
    filled = time.monotonic() - started
    for outcome, n in (("install", 1), ("refuse", 2), ("duplicate", 3)):
        imap.append(ALICE, delivery(outcome, n))
    before = imap.flags(ALICE)
    assert len(before) == ORDINARY + 3
    ordinary_before = {uid: f for uid, f in before.items() if uid <= ORDINARY}
    assert sum(1 for f in ordinary_before.values() if b"\\Seen" in f) == len(range(0, ORDINARY, 3))
    delivery_uids = sorted(set(before) - set(ordinary_before))

    monkeypatch.setattr(Client, "_install", fake_install)
    recorder = Recorder(monkeypatch)
    client = key_store(tmp_path / "home", ALICE, settings(imap, ALICE))
    logouts = len(imap.logouts())
    t0 = time.monotonic()
    report = client.sync()
    took = time.monotonic() - t0
    session = logout_figures(imap.wait_logouts(logouts + 1)[logouts])

    assert report.installed == ["installed generation 2 (renewal), valid until 2027-07-15 09:30:00 UTC"]
    assert len(report.refused) == 1 and "<delivery-refuse-2@kms.example.org>" in report.refused[0]
    assert report.already == 1
    # Only the three deliveries were fetched, each once, by UID, with BODY.PEEK.
    fetched = recorder.of("FETCH")
    assert sorted(int(c[1]) for c in fetched) == delivery_uids
    assert all(c[2] == "(BODY.PEEK[])" for c in fetched)
    assert len(recorder.of("SEARCH")) == 1
    # Dovecot's own account of the session: three bodies sent, and little else.
    assert session["body_count"] == 3, session
    assert session["out"] < 60_000, session  # 10,000 mails would be megabytes

    after = imap.flags(ALICE)
    assert {uid: f for uid, f in after.items() if uid <= ORDINARY} == ordinary_before, "ordinary mail changed"
    assert b"\\Deleted" in after[4243], "the user's \\Deleted mail is still there, not expunged"
    # the refused delivery stays, marked, still unread; the installed one and the duplicate moved
    assert set(after) - set(ordinary_before) == {delivery_uids[1]}
    assert after[delivery_uids[1]] == {REFUSED_KEYWORD.encode()}
    assert "mailkms" in imap.folders(ALICE)
    filed = imap.flags(ALICE, "mailkms")
    assert len(filed) == 2
    assert all(f == {b"\\Seen", INSTALLED_KEYWORD.encode()} for f in filed.values()), filed
    subjects = sorted(email.message_from_bytes(b)["Message-ID"] for b in imap.bodies(ALICE, "mailkms"))
    assert subjects == ["<delivery-duplicate-3@kms.example.org>", "<delivery-install-1@kms.example.org>"]
    state = client.state()
    assert sorted(state.processed) == sorted(
        f"imap:INBOX:{k}" for k in (f"{_uidvalidity(imap, ALICE)}:{u}" for u in delivery_uids)
    )

    # A second sync: nothing new to report, nothing fetched (the refused one is searched out).
    recorder.sent.clear()
    t0 = time.monotonic()
    again = client.sync()
    took_again = time.monotonic() - t0
    assert (again.installed, again.refused) == ([], [])
    assert recorder.of("FETCH") == []
    assert imap.flags(ALICE) == after

    print(
        f"\n10,000-mail INBOX: written in {filled:.1f} s (Dovecot indexed it in {indexed:.1f} s);"
        f" sync took {took:.2f} s (the next one {took_again:.2f} s); session in={session['in']} out={session['out']} bytes,"
        f" body_count={session['body_count']} body_bytes={session['body_bytes']};"
        f" UID commands: {[c[0] for c in recorder.sent] or 'none on the 2nd sync'}"
    )


def _uidvalidity(imap: Imap, user: str) -> str:
    conn = imap.session(user)
    try:
        typ, data = conn.status("INBOX", "(UIDVALIDITY)")
        assert typ == "OK"
        return data[0].decode().split("UIDVALIDITY", 1)[1].strip(" )")  # type: ignore[union-attr]
    finally:
        conn.logout()


def test_without_move_copy_then_expunge_of_that_uid_only(
    imap: Imap, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server without MOVE: COPY, \\Deleted and UID EXPUNGE of the one UID (UIDPLUS); the user's
    own \\Deleted mail is not expunged. Over STARTTLS, and into a folder named with --imap-folder."""
    imap.append(BOB, b"Subject: mine, deleted but kept\r\n\r\nx\r\n", flags="\\Deleted")
    imap.append(BOB, b"Subject: mine\r\n\r\ny\r\n", flags="\\Flagged")
    imap.append(BOB, delivery("install", 4))
    before = imap.flags(BOB)
    real_init = ImapMailbox.__init__

    def without_move(self: ImapMailbox, settings: ImapSettings) -> None:
        real_init(self, settings)
        self._caps.discard("MOVE")

    monkeypatch.setattr(ImapMailbox, "__init__", without_move)
    monkeypatch.setattr(Client, "_install", fake_install)
    recorder = Recorder(monkeypatch)
    account = settings(imap, BOB, url=imap.url(BOB, starttls=True), done_folder="Certificates/mailkms")
    report = key_store(tmp_path / "home", BOB, account).sync()
    assert len(report.installed) == 1
    assert recorder.of("MOVE") == []
    assert recorder.of("EXPUNGE") == [("EXPUNGE", "3")]
    after = imap.flags(BOB)
    assert after == {1: before[1], 2: before[2]}
    assert list(imap.flags(BOB, "Certificates/mailkms").values()) == [{b"\\Seen", INSTALLED_KEYWORD.encode()}]


# --- refusals, in process and at the command line ------------------------------------------------
def _server_cert_pin(imap: Imap) -> str:
    leaf = x509.load_pem_x509_certificates(imap.tls.cert_pem.read_bytes())[0]
    return "sha256:" + hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"password": "not-the-password"}, MailboxLoginFailed, "refused the login"),
        ({"ca_pem": ""}, MailboxTLSUntrusted, "--imap-ca-file"),  # the system CAs do not know the test CA
        ({"ca_pem": "", "pin": "00" * 32}, MailboxTLSUntrusted, "other than the one pinned"),
        ({"url": "imaps://carol%40example.org@localhost:{imaps}/Nope"}, MailboxFolderMissing, "'Nope'"),
        ({"url": "imaps://carol%40example.org@127.0.0.1:{down}/INBOX"}, MailboxUnreachable, "cannot connect"),
        ({"url": "imap://carol%40example.org@localhost:{imaps}/INBOX"}, MailboxUnreachable, "is it an imaps:// port"),
    ],
    ids=["wrong-password", "unknown-ca", "wrong-pin", "missing-folder", "server-down", "starttls-on-tls-port"],
)
def test_mailbox_refusals(
    imap: Imap, change: dict[str, str], error: type[Exception], words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mailkms.client._mailbox.TIMEOUT", 1.0)  # the STARTTLS-on-993 case waits for it
    if "url" in change:
        change = {**change, "url": change["url"].format(imaps=imap.dovecot.imaps_port, down=free_port())}
    with pytest.raises(error, match=words):
        ImapMailbox(settings(imap, CAROL, **change)).close()


def test_pinned_certificate_is_enough(imap: Imap) -> None:
    box = ImapMailbox(settings(imap, CAROL, ca_pem="", pin=_server_cert_pin(imap)))
    try:
        assert list(box.deliveries(set())) == []
    finally:
        box.close()


def _cli(home: Path, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILKMS_")}
    env["MAILKMS_CLIENT_PASSPHRASE"] = PASSPHRASE
    if password is not None:
        env["MAILKMS_IMAP_PASSWORD"] = password
    return subprocess.run(
        [str(BIN / "mailkms-client"), "--home", str(home), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({}, 0, "No new certificates"),
        ({"url": "imap://carol%40example.org@localhost:{starttls}/INBOX"}, 0, "No new certificates"),
        ({"ca_pem": "", "pin": "pin"}, 0, "No new certificates"),
        ({"password": "not-the-password"}, 14, "refused the login of carol@example.org"),
        ({"ca_pem": ""}, 15, "--imap-ca-file PEM"),
        ({"ca_pem": "", "pin": "ab" * 32}, 15, "other than the one pinned"),
        ({"url": "imaps://carol%40example.org@localhost:{imaps}/Nope"}, 16, "'Nope' cannot be opened"),
        ({"url": "imaps://carol%40example.org@127.0.0.1:{down}/INBOX"}, 13, "cannot connect to the IMAP server"),
    ],
    ids=["ok", "starttls", "right-pin", "wrong-password", "unknown-ca", "wrong-pin", "missing-folder", "down"],
)
def test_sync_exit_codes(imap: Imap, tmp_path: Path, change: dict[str, str], code: int, words: str) -> None:
    if "url" in change:
        ports = {"imaps": imap.dovecot.imaps_port, "starttls": imap.dovecot.imap_port, "down": free_port()}
        change = {**change, "url": change["url"].format(**ports)}
    if change.get("pin") == "pin":
        change = {**change, "pin": _server_cert_pin(imap)}
    key_store(tmp_path / "home", CAROL, settings(imap, CAROL, **change))
    res = _cli(tmp_path / "home", "sync")
    assert res.returncode == code, res.stdout + res.stderr
    assert words in (res.stdout + res.stderr)
    assert PASSWORDS[CAROL] not in res.stdout + res.stderr


def test_logon_with_the_mailbox_offline_still_asks_when_due(imap: Imap, tmp_path: Path) -> None:
    down = f"imaps://carol%40example.org@127.0.0.1:{free_port()}/INBOX"
    key_store(tmp_path / "home", CAROL, settings(imap, CAROL, url=down), due=True)
    res = _cli(tmp_path / "home", "logon", "--answer", "no")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Your mailbox could not be read: cannot connect to the IMAP server" in res.stderr
    assert res.stderr.count("\n") == 1, res.stderr  # one line
    assert PROMPT in res.stdout and "No update request was sent" in res.stdout
    # not due: the same offline log-on just logs on
    key_store(tmp_path / "home2", CAROL, settings(imap, CAROL, password="wrong"), due=False)
    res = _cli(tmp_path / "home2", "logon")
    assert res.returncode == 0 and "You are logged on" in res.stdout, res.stdout + res.stderr
    assert "refused the login" in res.stderr


def test_mailbox_set_checks_then_seals_the_new_password(imap: Imap, tmp_path: Path) -> None:
    home = tmp_path / "home"
    key_store(home, CAROL, settings(imap, CAROL, password="old-and-wrong"))
    assert _cli(home, "sync").returncode == 14
    url = imap.url(CAROL)
    ca = ["--imap-ca-file", str(imap.tls.ca_pem)]
    refused = _cli(home, "mailbox", "set", "--imap", url, *ca, password="still-wrong")
    assert refused.returncode == 14, refused.stderr
    done = _cli(home, "mailbox", "set", "--imap", url, *ca, password=PASSWORDS[CAROL])
    assert done.returncode == 0, done.stderr
    assert _cli(home, "sync").returncode == 0
    assert PASSWORDS[CAROL] not in (home / "state.json").read_text()
    shown = _cli(home, "mailbox", "show")
    assert url in shown.stdout
    assert PASSWORDS[CAROL] not in shown.stdout
    both = _cli(home, "mailbox", "set", "--imap", url, "--maildir", str(tmp_path))
    assert both.returncode == 2 and "exactly one" in both.stderr
    plain = _cli(home, "mailbox", "set", "--imap", f"http://carol@localhost:{imap.dovecot.imap_port}/")
    assert plain.returncode == 2 and "never logs in without TLS" in plain.stderr
    back = _cli(home, "mailbox", "set", "--maildir", str(tmp_path / "nowhere"))
    assert back.returncode == 0
    missing = _cli(home, "sync")
    assert missing.returncode == 16 and "does not exist" in missing.stderr
