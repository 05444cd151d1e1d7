"""EST end to end: a real `mailkms serve`, with curl and openssl as the EST client and pkilint
and `openssl verify` as judges. The renewal part runs the server and the client a year (and
then 20 months) ahead under faketime, as a whole scenario."""

from __future__ import annotations

import email
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailkms.clock import SystemClock
from mailkms.config import load_settings
from mailkms.services import Services
from tests.e2e.conftest import faketime_env

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
EST = "/.well-known/est"
PKCS10 = "application/pkcs10"


def _faked(days: int) -> list[str]:
    """`env` execs in place (no wrapper process left behind), preloading Debian's libfaketime."""
    return ["env", *(f"{k}={v}" for k, v in faketime_env(days).items())]


YEAR_LATER = _faked(395)  # past the 12-month reminder point, before expiry
EXPIRED = _faked(600)  # past the 18-month notAfter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(command: Sequence[str], *, stdin: bytes | None = None, env: dict[str, str] | None = None) -> bytes:
    done = subprocess.run(list(command), input=stdin, capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} failed: {done.stderr.decode(errors='replace')}"
    return done.stdout


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


@dataclass
class World:
    tmp: Path
    data: Path
    env: dict[str, str]
    root: Path
    tokens: dict[str, str] = field(default_factory=dict)
    port: int = 0
    server: subprocess.Popen[bytes] | None = None
    clock: list[str] = field(default_factory=list)  # the faketime prefix of server and client
    calls: int = 0

    # -- the server --------------------------------------------------------------------------
    def start(self, clock: Sequence[str] = ()) -> None:
        self.clock = list(clock)
        self.port = free_port()
        command = [*self.clock, str(BIN / "mailkms"), "serve", "--port", str(self.port)]
        command += ["--http-port", str(free_port()), "--mail-sink-port", str(free_port())]
        log = (self.tmp / f"serve-{self.port}.log").open("wb")
        self.server = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # on failure the fixture's finally stops the server
            if self.server.poll() is not None:
                pytest.fail(f"mailkms serve exited: {(self.tmp / f'serve-{self.port}.log').read_text()}")
            try:
                if self.get("/healthz").status == 200:
                    return
            except AssertionError:
                pass
            time.sleep(0.3)
        pytest.fail("mailkms serve did not answer in time")

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait()
        self.server = None

    # -- the client: curl ----------------------------------------------------------------------
    def curl(self, path: str, extra: Sequence[str]) -> Reply:
        self.calls += 1
        head, out = self.tmp / f"h{self.calls}", self.tmp / f"o{self.calls}"
        command = [*self.clock, "curl", "-sS", "--cacert", str(self.root), "-D", str(head), "-o", str(out)]
        command += [*extra, f"https://localhost:{self.port}{path}"]
        subprocess.run(command, capture_output=True, timeout=60, check=False)
        assert head.exists() and head.stat().st_size, f"curl got no answer from {path}"
        lines = head.read_bytes().decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ":" in ln)}
        return Reply(status, headers, out.read_bytes() if out.exists() else b"")

    def get(self, path: str) -> Reply:
        return self.curl(path, [])

    def post(self, path: str, body: Path, content_type: str = PKCS10, user: str | None = None) -> Reply:
        extra = ["--data-binary", f"@{body}", "-H", f"Content-Type: {content_type}"]
        if user:
            extra += ["-u", user]
        return self.curl(path, extra)

    # -- the client: openssl -------------------------------------------------------------------
    def openssl(self, *args: str, stdin: bytes | None = None) -> bytes:
        return run([*self.clock, "openssl", *args], stdin=stdin)

    def request(self, name: str, mailbox: str, key: Path | None = None, nonce: str | None = None) -> Path:
        """`openssl req` for the EST client's key (made here when `key` does not exist yet); with
        `nonce`, the server's nonce as the challengePassword attribute (`-subj` would drop it)."""
        der = self.tmp / f"{name}.der"
        key = key or self.tmp / f"{name}.key"
        if not key.exists():
            self.openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key))
        if nonce is None:
            subject = ["-subj", f"/CN={mailbox}/emailAddress={mailbox}"]
        else:
            config = self.tmp / f"{name}.cnf"
            config.write_text(
                "[req]\nprompt = no\ndistinguished_name = dn\nattributes = attrs\n"
                f"[dn]\nCN = {mailbox}\nemailAddress = {mailbox}\n[attrs]\nchallengePassword = {nonce}\n"
            )
            subject = ["-config", str(config)]
        self.openssl("req", "-new", "-key", str(key), *subject, "-outform", "DER", "-out", str(der))
        b64 = self.tmp / f"{name}.b64"
        b64.write_bytes(self.openssl("base64", "-in", str(der)))
        return b64

    def renewal_request(self, name: str, mailbox: str, key: Path) -> Path:
        """A bare renewal as an EST client makes it: a fresh nonce (`curl /api/v1/nonce`) in the
        challengePassword of a request for the current key."""
        reply = self.get("/api/v1/nonce")
        assert reply.status == 204, reply.text
        return self.request(name, mailbox, key, reply.headers["replay-nonce"])

    def rekey_request(self, name: str, signer: Path, key: Path, request: Path) -> Path:
        """`openssl cms -sign` of the new key's DER request with the current certificate and key."""
        command = ["cms", "-sign", "-nodetach", "-binary", "-outform", "DER", "-in", str(request)]
        signed = self.openssl(*command, "-signer", str(signer), "-inkey", str(key))
        path = self.tmp / f"{name}.b64"
        path.write_bytes(self.openssl("base64", stdin=signed))
        return path

    def certs(self, reply: Reply, name: str) -> list[Path]:
        """`openssl base64 -d | openssl pkcs7 -print_certs`, one clean PEM file per certificate."""
        der = self.openssl("base64", "-d", stdin=reply.body)
        pems = self.openssl("pkcs7", "-inform", "DER", "-print_certs", stdin=der).decode()
        files = []
        for i, block in enumerate(pems.split("-----BEGIN CERTIFICATE-----")[1:]):
            path = self.tmp / f"{name}-{i}.pem"
            path.write_text(
                "-----BEGIN CERTIFICATE-----"
                + block.split("-----END CERTIFICATE-----")[0]
                + "-----END CERTIFICATE-----\n"
            )
            files.append(path)
        return files

    def pubkey_of_cert(self, cert: Path) -> bytes:
        return self.openssl("x509", "-in", str(cert), "-noout", "-pubkey")

    def pubkey_of_key(self, key: Path, der: bool = False) -> bytes:
        return self.openssl("pkey", "-in", str(key), *(["-inform", "DER"] if der else []), "-pubout")

    def judge(self, cert: Path, purpose: str) -> None:
        """pkilint's S/MIME linter finds nothing; openssl verifies the chain for the purpose."""
        lint = subprocess.run(
            [str(BIN / "lint_cabf_smime_cert"), "lint", "-d", "-s", "WARNING", str(cert)],
            capture_output=True,
            text=True,
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr
        chain = self.tmp / "chain.pem"
        out = self.openssl(
            "verify",
            "-x509_strict",
            "-purpose",
            purpose,
            "-CAfile",
            str(self.root),
            "-untrusted",
            str(chain),
            str(cert),
        )
        assert out.strip().endswith(b"OK")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("est")
    data = tmp / "data"
    env = {**os.environ, "MAILKMS_DATA": str(data)}
    env.pop("MAILKMS_CA_PASSPHRASE", None)
    run([str(BIN / "mailkms"), "init", "--hostname", "localhost", "--public-url", "http://kms.example.org/"], env=env)
    w = World(tmp, data, env, data / "ca" / "root.crt.pem")
    # the administrator's part, in process (the EST client is curl and openssl, never our code)
    services = Services.build(load_settings(data), SystemClock())
    for name in ("alice", "bob", "carol", "dave", "erin"):
        w.tokens[name] = services.users.add(f"{name}@example.org", name.title(), None, "admin:e2e")
    services.close()
    try:
        w.start()
        yield w
    finally:
        w.stop()


def enrol(world: World, name: str) -> tuple[Path, Path]:
    """simpleenroll then serverkeygen with the same token: (signing cert, encryption cert) files;
    the client's keys are tmp/<name>.key (signing) and tmp/<name>-enc.key (server-made)."""
    mailbox = f"{name}@example.org"
    user = f"{mailbox}:{world.tokens[name]}"
    reply = world.post(f"{EST}/simpleenroll", world.request(name, mailbox), user=user)
    assert reply.status == 200, reply.text
    assert reply.headers["content-type"].startswith("application/pkcs7-mime")
    assert "smime-type=certs-only" in reply.headers["content-type"]
    [signing] = world.certs(reply, f"{name}-sign")

    reply = world.post(f"{EST}/serverkeygen", world.request(f"{name}-kg", mailbox), user=user)
    assert reply.status == 200, reply.text
    content_type = reply.headers["content-type"]
    assert content_type.startswith("multipart/mixed")
    message = email.message_from_bytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + reply.body)
    key_part, cert_part = message.get_payload()  # type: ignore[misc]
    assert key_part.get_content_type() == "application/pkcs8"
    assert cert_part.get_content_type() == "application/pkcs7-mime"
    assert cert_part.get_param("smime-type") == "certs-only"
    enc_key = world.tmp / f"{name}-enc.key"
    enc_key.write_bytes(
        world.openssl(
            "pkey", "-inform", "DER", stdin=world.openssl("base64", "-d", stdin=key_part.get_payload().encode())
        )
    )
    [encryption] = world.certs(Reply(200, {}, cert_part.get_payload().encode()), f"{name}-enc")
    return signing, encryption


# --- tests -----------------------------------------------------------------------------------------
def test_cacerts_gives_the_chain_to_the_pinned_root(world: World) -> None:
    reply = world.get(f"{EST}/cacerts")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("application/pkcs7-mime")
    assert reply.headers["content-transfer-encoding"] == "base64"
    files = world.certs(reply, "cacerts")
    subjects = [world.openssl("x509", "-in", str(f), "-noout", "-subject").decode() for f in files]
    assert len(files) == 2 and any("Root CA" in s for s in subjects) and any("Issuing CA" in s for s in subjects)
    (world.tmp / "chain.pem").write_bytes(b"".join(f.read_bytes() for f in files))
    assert world.get(f"{EST}/csrattrs").status == 204  # no attributes required (RFC 7030 §4.5.2)
    roots = [
        f
        for f in files
        if world.openssl("x509", "-in", str(f), "-outform", "DER")
        == world.openssl("x509", "-in", str(world.root), "-outform", "DER")
    ]
    assert len(roots) == 1


def test_simpleenroll_and_serverkeygen_give_a_clean_pair(world: World) -> None:
    test_cacerts_gives_the_chain_to_the_pinned_root(world)
    signing, encryption = enrol(world, "alice")
    assert world.pubkey_of_cert(signing) == world.pubkey_of_key(world.tmp / "alice.key")
    assert world.pubkey_of_cert(encryption) == world.pubkey_of_key(world.tmp / "alice-enc.key")
    world.judge(signing, "smimesign")
    world.judge(encryption, "smimeencrypt")
    text = world.openssl("x509", "-in", str(signing), "-noout", "-subject", "-ext", "subjectAltName,keyUsage").decode()
    assert "alice@example.org" in text and "Digital Signature" in text
    assert "Key Encipherment" in world.openssl("x509", "-in", str(encryption), "-noout", "-ext", "keyUsage").decode()
    # the token is spent: a second simpleenroll is refused, with a challenge and a readable reason
    again = world.post(
        f"{EST}/simpleenroll", world.tmp / "alice.b64", user=f"alice@example.org:{world.tokens['alice']}"
    )
    assert again.status == 401 and again.headers["www-authenticate"].startswith("Basic")
    assert "already been used" in again.text
    # not due: renewal is refused by policy
    reply = world.post(
        f"{EST}/simplereenroll", world.renewal_request("alice-re", "alice@example.org", world.tmp / "alice.key")
    )
    assert reply.status == 403 and "not yet due" in reply.text


def test_refusals_have_the_rfc_status_codes_and_spend_nothing(world: World) -> None:
    dave = f"dave@example.org:{world.tokens['dave']}"
    good = world.request("dave", "dave@example.org")
    cases: list[tuple[Path, str, str | None, int, str]] = []
    (world.tmp / "not-base64.b64").write_bytes(b"this is %% not base64 !!\n")
    (world.tmp / "not-der.b64").write_bytes(world.openssl("base64", stdin=b"\x30\x03\x02\x01"))
    raw = world.tmp / "raw.der"
    raw.write_bytes(world.openssl("base64", "-d", "-in", str(good)))
    pem = world.tmp / "req.pem"
    pem.write_bytes(world.openssl("req", "-inform", "DER", "-in", str(raw)))
    cases += [
        (good, PKCS10, "dave@example.org:wrong-token", 401, "not valid"),
        (good, PKCS10, f"erin@example.org:{world.tokens['dave']}", 401, "another mailbox"),
        (good, PKCS10, None, 401, "Basic credentials"),
        (good, "application/octet-stream", dave, 415, "application/pkcs10"),
        (good, "text/plain", dave, 415, "application/pkcs10"),
        (world.tmp / "not-base64.b64", PKCS10, dave, 400, "base64"),
        (raw, PKCS10, dave, 400, "base64"),
        (pem, PKCS10, dave, 400, "base64"),
        (world.tmp / "not-der.b64", PKCS10, dave, 400, "PKCS#10"),
    ]
    for body, content_type, user, status, words in cases:
        reply = world.post(f"{EST}/simpleenroll", body, content_type, user)
        assert reply.status == status, (content_type, user, reply.text)
        assert reply.headers["content-type"].startswith("text/plain")
        assert words in reply.text, reply.text
        if status == 401:
            assert reply.headers["www-authenticate"] == 'Basic realm="mailkms EST", charset="UTF-8"'
    # serverkeygen and simplereenroll check the same way
    assert world.post(f"{EST}/serverkeygen", good, "text/plain", dave).status == 415
    assert world.post(f"{EST}/serverkeygen", good, PKCS10, "dave@example.org:wrong").status == 401
    early = world.post(f"{EST}/serverkeygen", good, PKCS10, dave)
    assert early.status == 403 and "simpleenroll" in early.text
    assert world.post(f"{EST}/simplereenroll", good, "text/plain").status == 415
    assert world.post(f"{EST}/simplereenroll", world.tmp / "not-base64.b64").status == 400
    assert world.post(f"{EST}/simplereenroll", good).status == 403  # no nonce
    no_cert = world.renewal_request("dave-re", "dave@example.org", world.tmp / "dave.key")
    reply = world.post(f"{EST}/simplereenroll", no_cert)
    assert reply.status == 403 and "no certificate to renew" in reply.text
    # none of that spent dave's token
    enrol(world, "dave")


def test_renewal_a_year_later_by_the_current_key(world: World) -> None:
    test_cacerts_gives_the_chain_to_the_pinned_root(world)
    bob_sign, bob_enc = enrol(world, "bob")
    carol_sign, _ = enrol(world, "carol")
    enrol(world, "erin")
    world.request("carol-new", "carol@example.org")
    stale = world.rekey_request("carol-stale", carol_sign, world.tmp / "carol.key", world.tmp / "carol-new.der")
    world.stop()
    world.start(YEAR_LATER)

    # renew: a request for the current key, signed by it, the server's nonce inside
    captured = world.request("bob-old", "bob@example.org", world.tmp / "bob.key")  # the bare form of old
    reply = world.post(f"{EST}/simplereenroll", captured)
    assert reply.status == 403 and "challengePassword" in reply.text and "nonce-required" in reply.text
    renew = world.renewal_request("bob-re", "bob@example.org", world.tmp / "bob.key")
    reply = world.post(f"{EST}/simplereenroll", renew)
    assert reply.status == 200, reply.text
    [renewed] = world.certs(reply, "bob-renewed")
    assert world.openssl("x509", "-in", str(renewed), "-noout", "-serial") != world.openssl(
        "x509", "-in", str(bob_sign), "-noout", "-serial"
    )
    assert world.pubkey_of_cert(renewed) == world.pubkey_of_key(world.tmp / "bob.key")
    world.judge(renewed, "smimesign")
    replayed = world.post(f"{EST}/simplereenroll", renew)  # captured and sent again: refused
    assert replayed.status == 403 and "replayed" in replayed.text and "nonce-reused" in replayed.text
    again = world.renewal_request("bob-again", "bob@example.org", world.tmp / "bob.key")
    repeat = world.post(f"{EST}/simplereenroll", again)  # a lost reply: the same certificate, nothing new
    assert repeat.status == 200 and world.certs(repeat, "bob-repeat")[0].read_bytes() == renewed.read_bytes()

    # the new encryption key comes by e-mail, enveloped to the current encryption certificate
    mails = []
    for _ in range(100):
        # the delivery only: at this time the server also sends its reminder mail
        box = (world.data / "mailboxes" / "bob@example.org" / "new").glob("*")
        mails = sorted(p for p in box if b"X-Mailkms-Delivery:" in p.read_bytes())
        if mails:
            break
        time.sleep(0.2)
    assert len(mails) == 1
    inner = world.openssl(
        "cms", "-verify", "-in", str(mails[0]), "-CAfile", str(world.root), "-certfile", str(world.tmp / "chain.pem")
    )
    parts = {
        p.get_filename(): p.get_payload(decode=True) for p in email.message_from_bytes(inner).walk() if p.get_filename()
    }
    [key_file] = [name for name in parts if name.startswith("key-")]
    (world.tmp / "bob-key.p7m").write_bytes(parts[key_file])
    new_key = world.openssl(
        "cms",
        "-decrypt",
        "-inform",
        "DER",
        "-in",
        str(world.tmp / "bob-key.p7m"),
        "-recip",
        str(bob_enc),
        "-inkey",
        str(world.tmp / "bob-enc.key"),
    )
    (world.tmp / "bob-enc2.der").write_bytes(new_key)
    mailed = world.certs(Reply(200, {}, world.openssl("base64", stdin=parts["certs.p7c"])), "bob-mailed")
    matching = [
        c for c in mailed if world.pubkey_of_cert(c) == world.pubkey_of_key(world.tmp / "bob-enc2.der", der=True)
    ]
    assert len(matching) == 1
    world.judge(matching[0], "smimeencrypt")

    # rekey: the request for a new key inside a CMS SignedData made with the current key
    signed = world.rekey_request("carol-rekey", carol_sign, world.tmp / "carol.key", world.tmp / "carol-new.der")
    refused = world.post(f"{EST}/simplereenroll", stale, "application/pkcs7-mime")
    assert refused.status == 403 and "signingTime" in refused.text
    reply = world.post(f"{EST}/simplereenroll", signed, "application/pkcs7-mime")
    assert reply.status == 200, reply.text
    [rekeyed] = world.certs(reply, "carol-rekeyed")
    assert world.pubkey_of_cert(rekeyed) == world.pubkey_of_key(world.tmp / "carol-new.key")
    world.judge(rekeyed, "smimesign")

    # 20 months after enrolment: expired, re-enrolment by an administrator is required
    world.stop()
    world.start(EXPIRED)
    renew = world.renewal_request("erin-re", "erin@example.org", world.tmp / "erin.key")
    reply = world.post(f"{EST}/simplereenroll", renew)
    assert reply.status == 403 and "enrol you again" in reply.text
