"""The seed's loop through real mail and real mail programs' key stores (issue 11).

`mailkms serve` relays through Postfix (submission, STARTTLS, SASL login, certificate verified)
into Dovecot (LMTP); each user's client reads Dovecot over IMAPS and installs every generation into
the key store AND into the mail program's own store: NSS (Thunderbird, Evolution) for Alice, gpgsm
(KMail, mutt) for Bob. Under faketime at +12.5 months `logon --answer yes`; the reply travels
Postfix -> Dovecot -> IMAP; the next `logon` installs it. The mail programs' own tools judge:
cmsutil / gpgsm decrypt mail to the old and to the new certificate and sign with the new key,
openssl verifies that signature. 50 ordinary messages in each INBOX keep their count and flags.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from email.parser import BytesHeaderParser
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, CLIENT_PASSPHRASE, Deployment, _env, faketime_env, init_deployment
from tests.imap_support import Imap
from tests.mailstack import Postfix, mail_stack, mail_tools_missing

pytestmark = pytest.mark.e2e

ALICE, BOB = "alice@example.org", "bob@example.org"
LOGIN, RELAY_PASSWORD = "mailkms@example.org", "relay-password-made-for-this-run"
IMAP_PASSWORDS = {ALICE: "alice-imap-password-of-this-run", BOB: "bob-imap-password-of-this-run"}
NSS_PASSWORD = "nss-password-made-for-this-run"
GPGSM_PASSPHRASE = "gpgsm-passphrase-made-for-this-run"
DUE = 380  # days: past the 12-month reminder point, before the 18-month expiry
PLAIN = b"Content-Type: text/plain\r\n\r\nfor your eyes only\r\n"


def _wait(what: str, check: Callable[[], object], timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _ordinary(i: int) -> bytes:
    return (
        f"From: colleague{i}@example.org\r\nTo: someone@example.org\r\nSubject: ordinary {i}\r\n"
        f"Message-ID: <ordinary-{i}@example.org>\r\n\r\nbody {i}\r\n"
    ).encode()


class User:
    """One user's client, run as a process, with the passwords of their mail account and store."""

    def __init__(self, home: Path, mailbox: str, env: dict[str, str]) -> None:
        self.home, self.mailbox, self.env = home, mailbox, env

    def run(self, *args: str, offset_days: float | None = None) -> subprocess.CompletedProcess[str]:
        env = _env({"MAILKMS_CLIENT_PASSPHRASE": CLIENT_PASSPHRASE, **self.env}, offset_days)
        if offset_days:
            # the client waits on certutil/gpgsm with timeouts: under libfaketime Python's timed waits
            # fail (EINVAL) unless the monotonic clock is faked along with the wall clock
            env["FAKETIME_DONT_FAKE_MONOTONIC"] = "0"
        cmd = [str(BIN / "mailkms-client"), "--home", str(self.home), *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)

    def ok(self, *args: str, offset_days: float | None = None) -> str:
        done = self.run(*args, offset_days=offset_days)
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
        assert "was not updated" not in done.stderr, done.stderr  # the mail program's store followed
        return done.stdout


def _judge(cmd: list[str], offset_days: float | None = None, **kw: object) -> subprocess.CompletedProcess[bytes]:
    """The mail programs' tools, on the same clock as the user's client (the new certificates start
    in the faked future)."""
    env = {**os.environ, **faketime_env(offset_days)}
    return subprocess.run(cmd, env=env, capture_output=True, timeout=120, check=False, **kw)  # type: ignore[call-overload,no-any-return]


def _relay_env(postfix: Postfix, ca_pem: Path, password_file: Path) -> dict[str, str]:
    return {
        "MAILKMS_SMTP__MODE": "relay",
        "MAILKMS_SMTP__RELAY_HOST": "localhost",
        "MAILKMS_SMTP__RELAY_PORT": str(postfix.submission_port),
        "MAILKMS_SMTP__STARTTLS": "true",
        "MAILKMS_SMTP__USERNAME": LOGIN,
        "MAILKMS_SMTP__PASSWORD_FILE": str(password_file),
        "MAILKMS_SMTP__CA_FILE": str(ca_pem),
        "MAILKMS_SMTP__VERIFY": "true",
        "MAILKMS_SMTP__RETRY_BASE_SECONDS": "1",
        "MAILKMS_SMTP__RETRY_MAX_SECONDS": "5",
    }


def _encrypt_to(cert_pem: str, path: Path, tmp_path: Path) -> Path:
    cert = tmp_path / (path.name + ".recipient.pem")
    cert.write_text(cert_pem)
    done = subprocess.run(
        ["openssl", "cms", "-encrypt", "-aes256", "-binary", "-outform", "DER", "-out", str(path), str(cert)],
        input=PLAIN,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return path


def _gpgsm(
    home: Path, *args: str, offset_days: float | None = None, data: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    read, write = os.pipe()
    os.write(write, GPGSM_PASSPHRASE.encode() + b"\n")
    os.close(write)
    cmd = [
        "gpgsm", "--homedir", str(home), "--batch", "--disable-crl-checks",
        "--pinentry-mode", "loopback", "--passphrase-fd", str(read), *args,
    ]  # fmt: skip
    try:
        return _judge(cmd, offset_days, input=data, pass_fds=(read,))
    finally:
        os.close(read)


def test_renewal_through_postfix_dovecot_imap_into_nss_and_gpgsm(tmp_path: Path, gnupg_home: Path) -> None:
    if missing := [*mail_tools_missing(), *[t for t in ("certutil", "cmsutil", "gpgsm") if not shutil.which(t)]]:
        pytest.fail(f"{', '.join(missing)} not installed (scripts/system-deps.sh installs them)")
    with mail_stack(tmp_path / "mailstack-logs", {LOGIN: RELAY_PASSWORD, **IMAP_PASSWORDS}) as (postfix, dovecot, tls):
        imap = Imap(dovecot, tls)
        for user in (ALICE, BOB):
            for i in range(50):
                imap.append(user, _ordinary(i), flags=("\\Seen", "\\Flagged", "")[i % 3])
        inbox_before = {user: imap.flags(user) for user in (ALICE, BOB)}
        assert all(len(flags) == 50 for flags in inbox_before.values())

        password_file = tmp_path / "relay-password"
        password_file.write_text(RELAY_PASSWORD + "\n")
        password_file.chmod(0o600)
        dep: Deployment = init_deployment(tmp_path / "data")
        dep.server_env = _relay_env(postfix, tls.ca_pem, password_file)
        # what openssl trusts to judge signatures: the root, with the issuing CA beside it
        root_pem = tmp_path / "ca-bundle.pem"
        root_pem.write_bytes(
            (dep.data / "ca" / "root.crt.pem").read_bytes() + (dep.data / "ca" / "issuing.crt.pem").read_bytes()
        )
        nss = tmp_path / "thunderbird-profile"
        nss.mkdir()
        nss_pwfile = tmp_path / "nss-password"
        nss_pwfile.write_text(NSS_PASSWORD + "\n")
        made = subprocess.run(["certutil", "-N", "-d", f"sql:{nss}", "-f", str(nss_pwfile)], capture_output=True)
        assert made.returncode == 0, made.stderr
        users = {
            ALICE: User(tmp_path / "alice", ALICE, {"MAILKMS_NSS_PASSWORD": NSS_PASSWORD}),
            BOB: User(tmp_path / "bob", BOB, {"MAILKMS_GPGSM_PASSPHRASE": GPGSM_PASSPHRASE}),
        }
        targets = {ALICE: f"nss:{nss}", BOB: f"gpgsm:{gnupg_home}"}
        dep.start()
        try:
            # 1. Enrolment over IMAPS: the delivery goes out through Postfix and comes back by IMAP.
            fingerprint = dep.fingerprint()
            for mailbox, user in users.items():
                token = dep.add_user(mailbox)
                user.env["MAILKMS_IMAP_PASSWORD"] = IMAP_PASSWORDS[mailbox]
                user.ok(
                    "enroll", "--server", dep.url, "--fingerprint", fingerprint, "--email", mailbox,
                    "--token", token, "--imap", imap.url(mailbox), "--imap-ca-file", str(tls.ca_pem),
                    "--install-into", targets[mailbox],
                )  # fmt: skip
                del user.env["MAILKMS_IMAP_PASSWORD"]  # from now on the sealed copy in the key store
            _wait("both enrolment mails delivered by Postfix into Dovecot", lambda: postfix.delivered() >= 2)
            for user in users.values():
                out = user.ok("logon")
                assert "Installed" in out and "logged on" in out, out
            old_encryption = {m: u.ok("cert", "encryption") for m, u in users.items()}

            # 2. A year on: the question, Yes, and the reply by mail through the relay.
            dep.stop()
            dep.start(offset_days=DUE)
            for user in users.values():
                out = user.ok("logon", "--answer", "yes", offset_days=DUE)
                assert "approaching expiration" in out and "update request was sent" in out, out
            _wait("both renewal mails delivered into Dovecot", lambda: postfix.delivered() >= 4, timeout=120)
            for user in users.values():
                out = user.ok("logon", offset_days=DUE)
                assert "Installed: installed generation 2" in out, out
            new_encryption = {m: u.ok("cert", "encryption", offset_days=DUE) for m, u in users.items()}
            new_signing = {m: u.ok("cert", "signing", offset_days=DUE) for m, u in users.items()}
            assert all(old_encryption[m] != new_encryption[m] for m in users)
        finally:
            dep.stop()

        # 3. The mailboxes: the user's own mail untouched; the deliveries filed in `mailkms`.
        filed_ids = []
        for user in (ALICE, BOB):
            after = imap.flags(user)
            assert {uid: after.get(uid) for uid in inbox_before[user]} == inbox_before[user]
            # what else is in INBOX now is the server's reminder mail, for the user to read, not a delivery
            assert not any(b"X-Mailkms-Delivery" in body for body in imap.bodies(user, "INBOX"))
            filed = imap.bodies(user, "mailkms")
            assert len(filed) == 2 and all(b"X-Mailkms-Delivery" in body for body in filed)
            filed_ids += [str(BytesHeaderParser().parsebytes(body)["Message-ID"]) for body in filed]

        # 4. Counted at the relay, not in a mailbox: each of the four deliveries went through once
        # (the server's reminder mails at +12.5 months went through too, also once each).
        assert len(set(filed_ids)) == 4
        for message_id in filed_ids:
            assert len(postfix.accepted(message_id)) == 1, message_id
        everything = postfix.accepted_message_ids()
        assert len(everything) == len(set(everything)), everything

    # 5. Alice's Thunderbird profile (NSS), judged by NSS's own tools.
    listed = _judge(["certutil", "-K", "-d", f"sql:{nss}", "-f", str(nss_pwfile)]).stdout.decode()
    assert sum(1 for line in listed.splitlines() if line.startswith("<")) == 4  # 2 signing + 2 encryption
    for tag, cert_pem in (("old", old_encryption[ALICE]), ("new", new_encryption[ALICE])):
        enveloped = _encrypt_to(cert_pem, tmp_path / f"alice-{tag}.p7m", tmp_path)
        out = tmp_path / f"alice-{tag}.txt"
        opened = _judge(
            ["cmsutil", "-D", "-d", f"sql:{nss}", "-f", str(nss_pwfile), "-i", str(enveloped), "-o", str(out)], DUE
        )
        assert opened.returncode == 0, opened.stderr
        assert out.read_bytes() == PLAIN
    src = tmp_path / "alice-plain.txt"
    src.write_bytes(PLAIN)
    signed = tmp_path / "alice-signed.p7m"
    made_sig = _judge(
        ["cmsutil", "-S", "-N", ALICE, "-d", f"sql:{nss}", "-f", str(nss_pwfile), "-i", str(src), "-o", str(signed)],
        DUE,
    )
    assert made_sig.returncode == 0, made_sig.stderr
    _verified_by_openssl(signed, root_pem, new_signing[ALICE], tmp_path)

    # 6. Bob's gpgsm (KMail, mutt), judged by gpgsm.
    for tag, cert_pem in (("old", old_encryption[BOB]), ("new", new_encryption[BOB])):
        enveloped = _encrypt_to(cert_pem, tmp_path / f"bob-{tag}.p7m", tmp_path)
        opened = _gpgsm(gnupg_home, "--decrypt", str(enveloped), offset_days=DUE)
        assert opened.returncode == 0, opened.stderr
        assert opened.stdout == PLAIN
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    bob_new = x509.load_pem_x509_certificate(new_signing[BOB].encode())
    (tmp_path / "bob.eml").write_bytes(PLAIN)
    signed_by_bob = _gpgsm(
        gnupg_home, "-u", bob_new.fingerprint(hashes.SHA1()).hex(), "--sign", str(tmp_path / "bob.eml"), offset_days=DUE
    )
    assert signed_by_bob.returncode == 0, signed_by_bob.stderr
    (tmp_path / "bob-signed.p7m").write_bytes(signed_by_bob.stdout)
    _verified_by_openssl(tmp_path / "bob-signed.p7m", root_pem, new_signing[BOB], tmp_path)


def _verified_by_openssl(signed: Path, root_pem: Path, signer_pem: str, tmp_path: Path) -> None:
    """openssl accepts the signature, and the signer is the NEW signing certificate."""
    signer_out = tmp_path / (signed.name + ".signer.pem")
    done = _judge(
        [
            "openssl", "cms", "-verify", "-inform", "DER", "-in", str(signed), "-CAfile", str(root_pem),
            "-purpose", "smimesign", "-signer", str(signer_out), "-out", os.devnull,
        ],
        DUE,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    from cryptography import x509

    assert x509.load_pem_x509_certificate(signer_out.read_bytes()) == x509.load_pem_x509_certificate(
        signer_pem.encode()
    )
