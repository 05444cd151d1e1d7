"""One-time tokens sent by mail, in process: from the console's add-user form, the CSV import, the
admin API and `mailkms user add --mail-token`. The mail reaches a real SMTP server (mailkms's
aiosmtpd Maildir sink) with the token in it and signed by the server (checked with openssl smime);
the outbox row holds the body sealed (the token is nowhere in the database); with the relay down
the row stays, sealed, and goes out once the relay is back; another CA passphrase cannot open it."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import select
from typer.testing import CliRunner

from mailkms.cli._main import app
from mailkms.mail import MailSink, OutboxWorker, SMTPSender
from mailkms.services import (
    SEALED_MAGIC,
    OutboxSealer,
    PoolKeyring,
    Role,
    SealedBodyError,
    Services,
    is_sealed,
)
from mailkms.store import OutboxMessage
from tests.integration.test_console_pages import _client, _wait_done
from tests.mailstack import free_port


def _maildir_messages(root: Path, address: str) -> list[bytes]:
    folder = root / address / "new"
    return [p.read_bytes() for p in sorted(folder.iterdir())] if folder.is_dir() else []


def _text_of(raw: bytes) -> str:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    parts = [p.get_content() for p in message.walk() if p.get_content_type() == "text/plain"]
    return "\n".join(str(p) for p in parts)


def _rows(services: Services) -> list[OutboxMessage]:
    with services.db.read_only() as session:
        rows = list(session.execute(select(OutboxMessage).order_by(OutboxMessage.id)).scalars())
        session.expunge_all()
    return rows


def _whole_database_has(services: Services, needle: str) -> bool:
    """Every text and binary column of every table, searched for `needle` (SQLite and PostgreSQL)."""
    data = needle.encode()
    with services.db.read_only() as session:
        tables = [t for t in OutboxMessage.metadata.sorted_tables]
        for table in tables:
            for row in session.execute(select(table)).all():
                for value in row:
                    if isinstance(value, bytes | memoryview) and data in bytes(value):
                        return True
                    if isinstance(value, str) and needle in value:
                        return True
    return False


def _worker(services: Services, port: int, clock) -> OutboxWorker:  # type: ignore[no-untyped-def]
    return OutboxWorker(
        services.db,
        SMTPSender("127.0.0.1", port, timeout=3),
        clock,
        services.audit,
        retry_base=2,
        retry_max=60,
        opener=services.outbox_sealer.open,
    )


def _verify_signed(raw: bytes, tmp_path: Path, services: Services) -> None:
    """openssl smime -verify: the token mail is signed by the server's mail key under its CA."""
    mail = tmp_path / "mail.eml"
    mail.write_bytes(raw)
    chain = tmp_path / "ca.pem"
    chain.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in services.ca.chain))
    done = subprocess.run(
        ["openssl", "smime", "-verify", "-in", str(mail), "-CAfile", str(chain), "-purpose", "any", "-out", "-"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_console_add_user_mails_the_token_sealed_and_it_arrives_after_an_outage(  # type: ignore[no-untyped-def]
    services, clock, tmp_path
) -> None:
    op, csrf = _client(services, "olga", Role.OPERATOR, clock.now())
    form = op.get("/admin/users/new")
    assert form.status_code == 200 and 'name="mail_token"' in form.text and '<label for="mail_token"' in form.text
    page = op.post(
        "/admin/users",
        data={"email": "Alice@Example.org", "name": "Alice A", "group": "", "mail_token": "1", "csrf": csrf},
    )
    assert page.status_code == 200, page.text
    token = page.text.split('class="token mono">', 1)[1].split("<", 1)[0]
    assert len(token) >= 26 and "queued as a signed mail" in page.text

    rows = _rows(services)
    assert [(r.recipient, r.purpose) for r in rows] == [("alice@example.org", "token")]
    assert is_sealed(rows[0].body) and token.encode() not in rows[0].body
    assert not _whole_database_has(services, token)  # the token itself: nowhere in the store
    assert services.outbox.list().entries[0].subject == "(sealed: carries a secret)"

    # the relay is down: the row stays, still sealed, and waits
    down = _worker(services, free_port(), clock)
    assert down.run_once() == 0
    (row,) = _rows(services)
    assert row.sent_at is None and row.attempts == 1 and row.last_error_kind == "connect" and is_sealed(row.body)

    # the relay is back: the mail arrives, with the token, signed by the server
    port = free_port()
    with MailSink(tmp_path / "mailboxes", "127.0.0.1", port):
        clock.advance(dt.timedelta(seconds=5))
        assert _worker(services, port, clock).run_once() == 1
    (raw,) = _maildir_messages(tmp_path / "mailboxes", "alice@example.org")
    assert token in _text_of(raw) and b"multipart/signed" in raw
    assert email.message_from_bytes(raw)["Message-ID"] == row.message_id
    _verify_signed(raw, tmp_path, services)
    (sent,) = _rows(services)
    assert sent.sent_at is not None and is_sealed(sent.body)  # it stays sealed after sending too
    actions = [r.action for r in services.audit_records(subject="alice@example.org", limit=20)]
    assert "token.mailed" in actions and "mail.sent" in actions


def test_without_the_checkbox_nothing_is_mailed(services, clock) -> None:  # type: ignore[no-untyped-def]
    op, csrf = _client(services, "olga", Role.OPERATOR, clock.now())
    page = op.post("/admin/users", data={"email": "bob@example.org", "name": "Bob", "csrf": csrf})
    assert page.status_code == 200 and "queued as a signed mail" not in page.text
    assert _rows(services) == []


def test_csv_import_and_admin_api_and_cli_send_tokens_by_mail(  # type: ignore[no-untyped-def]
    services, clock, tmp_path, cli_env
) -> None:
    op, csrf = _client(services, "olga", Role.OPERATOR, clock.now())
    form = op.get("/admin/users/import")
    assert 'name="mail_tokens"' in form.text and '<label for="mail_tokens"' in form.text
    upload = {"csv_file": ("users.csv", b"email,name\nann@example.org,Ann\nben@example.org,Ben\n", "text/csv")}
    started = op.post("/admin/users/import", files=upload, data={"csrf": csrf, "mail_tokens": "1"})
    assert started.status_code == 200, started.text
    _wait_done(op, str(started.url).replace("https://testserver", ""))

    api_token = services.admins.new_api_token("olga", "admin:test")
    added = op.post(
        "/api/v1/admin/users",
        json={"email": "cy@example.org", "name": "Cy", "mail_token": True},
        headers={"Authorization": f"Bearer {api_token}"},
    )
    assert added.status_code == 201, added.text
    assert added.json()["mailed"] is True

    result = CliRunner().invoke(app, ["user", "add", "dee@example.org", "--name", "Dee", "--mail-token", "--json"])
    assert result.exit_code == 0, result.output

    rows = _rows(services)
    assert sorted(r.recipient for r in rows) == [
        "ann@example.org",
        "ben@example.org",
        "cy@example.org",
        "dee@example.org",
    ]
    assert all(is_sealed(r.body) and r.purpose == "token" for r in rows)
    assert not _whole_database_has(services, added.json()["token"])
    cli_token = json.loads(result.output)["token"]
    assert not _whole_database_has(services, cli_token)

    port = free_port()
    lag = dt.datetime.now(dt.UTC) - clock.now()  # the CLI queued on the system clock
    clock.advance(max(lag, dt.timedelta(0)) + dt.timedelta(minutes=1))
    with MailSink(tmp_path / "mailboxes", "127.0.0.1", port):
        assert _worker(services, port, clock).run_once() == 4
    assert added.json()["token"] in _text_of(_maildir_messages(tmp_path / "mailboxes", "cy@example.org")[0])
    assert cli_token in _text_of(_maildir_messages(tmp_path / "mailboxes", "dee@example.org")[0])
    for who in ("ann@example.org", "ben@example.org"):
        (raw,) = _maildir_messages(tmp_path / "mailboxes", who)
        assert "one-time enrolment code" in _text_of(raw)


def test_sealed_bodies_bind_the_row_and_need_the_passphrase(services, clock) -> None:  # type: ignore[no-untyped-def]
    sealer = services.outbox_sealer
    sealed = sealer.seal("<a@x>", b"Subject: s\r\n\r\nsecret-token\r\n")
    assert sealed.startswith(SEALED_MAGIC) and b"secret-token" not in sealed
    assert sealer.open("<a@x>", sealed) == b"Subject: s\r\n\r\nsecret-token\r\n"
    with pytest.raises(SealedBodyError):  # moved to another row
        sealer.open("<b@x>", sealed)
    with pytest.raises(SealedBodyError):  # altered
        sealer.open("<a@x>", sealed[:-1] + bytes([sealed[-1] ^ 1]))
    old = b"Subject: old\r\n\r\nclear\r\n"
    assert sealer.open("<old@x>", old) == old  # rows written before sealing existed
    other = OutboxSealer(PoolKeyring(services.db, b"another passphrase entirely", clock, scrypt_n=2**14))
    with pytest.raises(SealedBodyError):
        other.open("<a@x>", sealed)


def test_a_worker_without_the_key_keeps_the_mail_and_says_why(services, clock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mailkms.mail import token_mailer
    from mailkms.services import TokenMail

    mailer = token_mailer(services)
    mailer.send([TokenMail("eve@example.org", "Eve", "tok-" + "x" * 26, mailer.expiry())], "admin:test")
    port = free_port()
    with MailSink(tmp_path / "mailboxes", "127.0.0.1", port):
        blind = OutboxWorker(services.db, SMTPSender("127.0.0.1", port, timeout=3), clock, services.audit)
        assert blind.run_once() == 0
        (row,) = _rows(services)
        assert row.sent_at is None and row.last_error_kind == "sealed"
        clock.advance(dt.timedelta(seconds=5))
        assert _worker(services, port, clock).run_once() == 1
    assert _maildir_messages(tmp_path / "mailboxes", "eve@example.org")


def test_sealing_cost_is_small(services) -> None:  # type: ignore[no-untyped-def]
    """A token mail is ~6 KB signed; sealing and opening it costs far below a millisecond."""
    body = b"x" * 8192
    sealer = services.outbox_sealer
    sealer.seal("<warm@x>", body)
    start = time.perf_counter()
    for i in range(1000):
        sealer.open(f"<m{i}@x>", sealer.seal(f"<m{i}@x>", body))
    per_mail = (time.perf_counter() - start) / 1000
    print(f"seal+open of 8 KiB: {per_mail * 1e6:.1f} µs")
    assert per_mail < 0.005


def test_a_token_mail_that_cannot_be_queued_still_shows_the_token(  # type: ignore[no-untyped-def]
    services, clock, monkeypatch
) -> None:
    """The user is stored before the mail is queued: when sealing fails (here a node whose CA
    passphrase does not open the at-rest key), the API and the console still give the token, say
    it was not mailed, and nothing is queued."""
    blind = OutboxSealer(PoolKeyring(services.db, b"another passphrase entirely", clock, scrypt_n=2**14))
    monkeypatch.setattr(services, "outbox_sealer", blind)
    op, csrf = _client(services, "olga", Role.OPERATOR, clock.now())
    api_token = services.admins.new_api_token("olga", "admin:test")
    added = op.post(
        "/api/v1/admin/users",
        json={"email": "fay@example.org", "name": "Fay", "mail_token": True},
        headers={"Authorization": f"Bearer {api_token}"},
    )
    assert added.status_code == 201, added.text
    assert added.json()["mailed"] is False and len(added.json()["token"]) >= 20
    page = op.post("/admin/users", data={"email": "gus@example.org", "name": "Gus", "csrf": csrf, "mail_token": "1"})
    assert page.status_code == 200, page.text
    assert 'id="token"' in page.text and "could not be queued as a mail" in page.text
    assert _rows(services) == []
    assert services.users.show("gus@example.org") is not None
