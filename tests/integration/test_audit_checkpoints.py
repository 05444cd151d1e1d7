"""Signed checkpoints of the audit chain's head, kept outside the store: a chain rewritten in the
database with every hash recomputed passes the hash check, and is caught by the checkpoints."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import text
from typer.testing import CliRunner

from mailkms.cli._main import app
from mailkms.pki import sign_checkpoint
from mailkms.services import Services, verify_chain
from mailkms.services._audit import record_hash
from tests.conftest import CA_PASSPHRASE

RECORDS = 5


@pytest.fixture
def chained(services: Services) -> Services:
    """Five records, a checkpoint after the third and one after the fifth."""
    for n in range(1, RECORDS + 1):
        with services.db.transaction() as session:
            services.audit.append(session, "admin:test", "test.action", f"user{n}@example.org", n=n)
        services.clock.advance(dt.timedelta(seconds=1))  # type: ignore[attr-defined]
        if n in (3, RECORDS):
            assert services.write_audit_checkpoint()
    return services


def rewrite_from(services: Services, seq: int, details: str) -> None:
    """What someone who can write the database does: edit one record, recompute every later hash and the head."""
    with services.db.engine.begin() as conn:
        rows = conn.execute(
            text("SELECT seq, at, actor, action, subject, details, prev_hash FROM audit_log ORDER BY seq")
        ).all()
        prev = None
        for row in rows:
            if row.seq < seq:
                continue
            body = details if row.seq == seq else row.details
            prev_hash = prev if prev is not None else row.prev_hash
            at = row.at if isinstance(row.at, dt.datetime) else dt.datetime.fromisoformat(str(row.at))
            at = at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at
            digest = record_hash(row.seq, at, row.actor, row.action, row.subject, body, prev_hash)
            conn.execute(
                text("UPDATE audit_log SET details = :d, prev_hash = :p, hash = :h WHERE seq = :s"),
                {"d": body, "p": prev_hash, "h": digest, "s": row.seq},
            )
            prev = digest
        conn.execute(text("UPDATE audit_head SET hash = :h"), {"h": prev})


def cli_verify(services: Services, *args: str) -> tuple[int, dict[str, object]]:
    env = {
        "MAILKMS_DATA": str(services.settings.data_dir),
        "MAILKMS_DATABASE_URL": services.settings.effective_database_url,
        "MAILKMS_CA_PASSPHRASE": CA_PASSPHRASE,
    }
    result = CliRunner().invoke(app, ["audit", "verify", "--json", *args], env=env)
    return result.exit_code, json.loads(result.stdout)


def test_an_intact_chain_with_its_checkpoints_verifies(chained: Services) -> None:
    report = chained.verify_audit()
    assert report.ok and report.records == RECORDS and report.checkpoints == 2
    code, out = cli_verify(chained)
    assert code == 0 and out["ok"] is True and out["checkpoints"] == 2


def test_a_rewritten_chain_with_recomputed_hashes_is_caught_by_the_checkpoints(chained: Services) -> None:
    rewrite_from(chained, 2, '{"n":99}')
    with chained.db.transaction() as session:
        assert verify_chain(session).ok  # the hash chain alone cannot tell
    problems = chained.verify_audit().problems
    assert len(problems) == 2
    assert all("no longer has the checkpointed hash (the chain was rewritten)" in p for p in problems)
    assert "record 3 " in problems[0] and f"record {RECORDS} " in problems[1]
    code, out = cli_verify(chained)
    assert code == 9 and out["ok"] is False and out["problems"] == list(problems)


def test_a_rewrite_after_the_last_checkpoint_is_not_caught_yet(chained: Services) -> None:
    """The checkpoints protect what they cover: hence at least hourly and at every stop."""
    with chained.db.transaction() as session:
        chained.audit.append(session, "admin:test", "test.action", "late@example.org")
    rewrite_from(chained, RECORDS + 1, '{"n":7}')
    assert chained.verify_audit().ok
    assert chained.write_audit_checkpoint()
    rewrite_from(chained, RECORDS + 1, '{"n":8}')
    assert not chained.verify_audit().ok


def test_a_truncated_chain_is_caught(chained: Services) -> None:
    with chained.db.engine.begin() as conn:
        head = conn.execute(text("SELECT hash FROM audit_log WHERE seq = 3")).scalar_one()
        conn.execute(text("DELETE FROM audit_log WHERE seq > 3"))
        conn.execute(text("UPDATE audit_head SET seq = 3, hash = :h"), {"h": head})
    with chained.db.transaction() as session:
        assert verify_chain(session).ok
    assert chained.verify_audit().problems == (
        f"checkpoint line 2 ({_at(chained, 2)} UTC): the chain no longer has record {RECORDS} (records removed)",
    )


def _at(services: Services, line: int) -> str:
    doc = json.loads(services.checkpoints.path.read_text().splitlines()[line - 1])
    return dt.datetime.strptime(doc["at"], "%Y-%m-%dT%H:%M:%S.%fZ").strftime("%Y-%m-%d %H:%M:%S")


def test_forged_and_altered_checkpoints_are_reported(chained: Services) -> None:
    path = chained.checkpoints.path
    lines = path.read_text().splitlines()
    altered = json.loads(lines[0])
    altered["seq"] = 2  # points the checkpoint elsewhere without re-signing
    stranger = ec.generate_private_key(ec.SECP256R1())
    forged = sign_checkpoint(stranger, RECORDS, "f" * 64, dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    path.write_text("\n".join([json.dumps(altered), lines[1], forged, "not json"]) + "\n")
    problems = chained.verify_audit().problems
    assert [p.split(":", 1)[0] for p in problems] == [f"checkpoint line {n} of {path}" for n in (1, 3, 4)]
    assert "the signature does not verify" in problems[0] and "signed with another key" in problems[1]


def test_checkpoints_elsewhere_and_the_key_at_rest(chained: Services, tmp_path) -> None:  # type: ignore[no-untyped-def]
    copy = tmp_path / "offsite.jsonl"
    copy.write_text(chained.checkpoints.path.read_text())
    chained.checkpoints.path.unlink()
    rewrite_from(chained, 1, "{}")
    missing = chained.verify_audit().problems  # nothing to compare with at the configured place...
    assert len(missing) == 1 and f"the checkpoints file {chained.checkpoints.path} is missing" in missing[0]
    code, out = cli_verify(chained, "--checkpoints", str(copy))
    assert code == 9 and out["checkpoints"] == 2  # ...but the copy kept elsewhere catches it
    key_file = chained.ca.paths.audit_key
    assert key_file.stat().st_mode & 0o777 == 0o600
    with pytest.raises(TypeError):  # encrypted under the CA passphrase, as the CA keys are
        serialization.load_pem_private_key(key_file.read_bytes(), None)


def test_a_removed_or_emptied_checkpoints_file_is_a_problem_not_a_silent_pass(chained: Services) -> None:
    path = chained.checkpoints.path
    kept = path.read_text()
    path.unlink()
    last = chained.clock.now().isoformat()  # type: ignore[attr-defined]
    code, out = cli_verify(chained)
    assert code == 9 and out["checkpoints"] == 0
    assert out["problems"] == [
        f"the checkpoints file {path} is missing, but checkpoints were written to it (the last one of record "
        f"{RECORDS} at {last}): restore it, or verify against a copy with --checkpoints"
    ]
    path.write_text("\n")
    assert [p.split(",")[0] for p in chained.verify_audit().problems] == [f"the checkpoints file {path} is empty"]
    path.write_text(kept.splitlines()[0] + "\n")  # the newer checkpoint cut off
    assert chained.verify_audit().problems == (
        f"the checkpoints file {path} ends at record 3, but a checkpoint of record {RECORDS} was written to it "
        f"at {last} (checkpoints removed)",
    )
    path.write_text(kept)
    assert chained.verify_audit().ok


def test_a_data_folder_that_never_wrote_a_checkpoint_verifies_on_the_chain_alone(services: Services) -> None:
    """Fresh from `init` (its records in the chain, the checkpoint key made), `serve` never run."""
    assert services.ca.paths.audit_public_key.exists() and not services.checkpoints.path.exists()
    with services.db.transaction() as session:
        services.audit.append(session, "admin:test", "test.action", "user@example.org")
    code, out = cli_verify(services)
    assert code == 0 and out["checkpoints"] == 0 and out["records"] >= 1  # type: ignore[operator]
    services.checkpoints.path.write_text("")  # an empty file nobody wrote to: nothing was lost either
    assert services.verify_audit().ok


def test_a_checkpoint_is_written_only_when_the_head_moved(chained: Services) -> None:
    assert not chained.write_audit_checkpoint()
    assert chained.write_audit_checkpoint(force=True)
    assert len(chained.checkpoints.path.read_text().splitlines()) == 3
