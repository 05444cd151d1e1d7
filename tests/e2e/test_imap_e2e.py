"""A real enrolment whose certificates arrive over IMAP (issue 11, part 2).

The server still delivers into its mail sink (relay through Postfix is another piece of work): the
test carries each sink delivery into the user's Dovecot INBOX by IMAP APPEND, as the relay would,
and `mailkms-client` reads it with `--imap imaps://...`.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, CLIENT_PASSPHRASE, Deployment, Result, _env
from tests.imap_support import Imap, dovecot_alone, mail_tools_missing

ALICE, BOB = "alice@example.org", "bob@example.org"
PASSWORDS = {ALICE: "alice-imap-password-e2e", BOB: "bob-imap-password-e2e"}

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(mail_tools_missing()), reason="dovecot is not installed (make system-deps)"),
]


@pytest.fixture
def imap(tmp_path: Path) -> Iterator[Imap]:
    with dovecot_alone(tmp_path / "dovecot-logs", PASSWORDS) as served:
        yield served


def client(home: Path, *args: str, password: str | None = None) -> Result:
    extra = {"MAILKMS_CLIENT_PASSPHRASE": CLIENT_PASSPHRASE}
    if password is not None:
        extra["MAILKMS_IMAP_PASSWORD"] = password
    cmd = [str(BIN / "mailkms-client"), "--home", str(home), *args]
    proc = subprocess.run(cmd, env=_env(extra, None), capture_output=True, text=True, timeout=120)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def enroll(dep: Deployment, imap: Imap, home: Path, mailbox: str, token: str, password: str) -> Result:
    return client(
        home,
        "enroll",
        "--server",
        dep.url,
        "--fingerprint",
        dep.fingerprint(),
        "--email",
        mailbox,
        "--token",
        token,
        "--imap",
        imap.url(mailbox),
        "--imap-ca-file",
        str(imap.tls.ca_pem),
        password=password,
    )


def test_enrol_and_resync_over_imap(deployment: Deployment, imap: Imap, tmp_path: Path) -> None:
    deployment.start()
    home = tmp_path / "alice"
    res = enroll(deployment, imap, home, ALICE, deployment.add_user(ALICE), PASSWORDS[ALICE])
    assert res.code == 0, res.err
    state_text = (home / "state.json").read_text()
    assert PASSWORDS[ALICE] not in state_text
    for path in home.rglob("*"):
        if path.is_file():
            assert PASSWORDS[ALICE].encode() not in path.read_bytes(), path
    stored = json.loads(state_text)["imap"]
    assert stored["url"] == imap.url(ALICE) and stored["done_folder"] == "mailkms"
    assert stored["password"]["alg"] == "pbkdf2-sha256+aes-256-gcm"

    # The relay's part: the delivery lands in the INBOX beside the user's own mail and a forgery.
    first = deployment.wait_for_mails(ALICE, 1)[0]
    imap.append(ALICE, b"From: bob@example.org\r\nSubject: lunch?\r\n\r\nnoon\r\n")
    imap.append(ALICE, first.read_bytes())
    imap.append(
        ALICE,
        b"From: mailkms@kms.example.org\r\nTo: alice@example.org\r\nMessage-ID: <forged@x>\r\n"
        b"X-Mailkms-Delivery: enrolment\r\nSubject: x\r\n\r\nhello\r\n",
    )
    res = client(home, "sync")
    assert res.code == 0, res.out + res.err
    assert "Installed: installed generation 1" in res.out
    assert res.err.count("Refused and left in the mailbox") == 1 and "<forged@x>" in res.err
    status = client(home, "status", "--json")
    assert json.loads(status.out)["state"] == "ACTIVE"
    inbox = imap.bodies(ALICE, "INBOX")
    assert [b"lunch?" in m for m in inbox] == [True, False] and b"<forged@x>" in inbox[1]
    assert list(imap.flags(ALICE).values()) == [frozenset(), {b"$MailkmsRefused"}]
    filed = [m.replace(b"\r\n", b"\n") for m in imap.bodies(ALICE, "mailkms")]
    assert filed == [first.read_bytes().replace(b"\r\n", b"\n")]

    # Lost mail: the server sends its reply again; the client files it as already installed.
    res = client(home, "resync")
    assert res.code == 0, res.err
    again = deployment.wait_for_mails(ALICE, 2)[1]
    imap.append(ALICE, again.read_bytes())
    res = client(home, "sync")
    assert res.code == 0, res.out + res.err
    assert "No new certificates" in res.out and "Refused" not in res.err, "the forgery is reported once"
    assert len(imap.flags(ALICE, "mailkms")) == 2
    assert len(imap.flags(ALICE)) == 2

    # The log-on reads the same mailbox.
    res = client(home, "logon")
    assert res.code == 0 and "You are logged on" in res.out, res.out + res.err


def test_wrong_imap_password_refused_before_the_token_is_spent(
    deployment: Deployment, imap: Imap, tmp_path: Path
) -> None:
    deployment.start()
    token = deployment.add_user(BOB)
    res = enroll(deployment, imap, tmp_path / "bob", BOB, token, "not-bobs-password")
    assert res.code == 14, res.out + res.err
    assert "refused the login of bob@example.org" in res.err
    assert not (tmp_path / "bob" / "state.json").exists()
    res = enroll(deployment, imap, tmp_path / "bob", BOB, token, PASSWORDS[BOB])
    assert res.code == 0, res.err
