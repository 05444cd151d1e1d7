"""`UserAdmin.add_many` (what `mailkms user import` runs per batch), on SQLite and PostgreSQL: one
transaction per batch, every user audited, refusals per row, the token of each user usable."""

from __future__ import annotations

from sqlalchemy import func, select

from mailkms.errors import Malformed, ReservedMailbox, UserExists
from mailkms.services import Services, token_hash
from mailkms.services._audit import verify_chain
from mailkms.store import AuditRecord, Token, User


def test_a_batch_registers_each_user_with_a_token_and_refuses_bad_rows_one_by_one(services: Services) -> None:
    services.users.add("taken@example.org", "Already Here", None, "admin:test")
    rows: list[tuple[str, str, str | None]] = [(f"User{i}@Example.org", f"User {i}", None) for i in range(300)]
    rows += [
        ("taken@example.org", "Again", None),
        ("user7@example.org", "Twice in the file", None),
        ("not-an-address", "Broken", None),
        (services.settings.server.effective_mail_from, "The server", None),
        ("grouped@example.org", "Grouped", "no-such-group"),
    ]
    results = services.users.add_many(rows, "admin:test")

    refused = {email: outcome for email, outcome in results if isinstance(outcome, Exception)}
    assert isinstance(refused["taken@example.org"], UserExists)
    assert isinstance(refused["user7@example.org"], UserExists)  # the first row of a mailbox wins
    assert isinstance(refused["not-an-address"], Malformed)
    assert isinstance(refused[services.settings.server.effective_mail_from], ReservedMailbox)
    assert isinstance(refused["grouped@example.org"], Malformed)
    tokens = {email: outcome for email, outcome in results if isinstance(outcome, str)}
    assert sorted(tokens) == sorted(f"user{i}@example.org" for i in range(300))
    assert len(set(tokens.values())) == 300

    with services.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(User)) == 301
        names = dict(session.execute(select(User.email, User.display_name)).all())
        assert names["user7@example.org"] == "User 7"
        # Each token is stored as its hash only and belongs to its own user.
        owner = dict(session.execute(select(Token.token_hash, User.email).join(User, Token.user_id == User.id)).all())
        assert all(owner[token_hash(token)] == email for email, token in tokens.items())
        added = session.scalar(select(func.count()).select_from(AuditRecord).where(AuditRecord.action == "user.added"))
        assert added == 301
        assert verify_chain(session).ok


def test_a_token_from_a_batch_enrols(services: Services) -> None:
    from tests.integration.test_tokens import enrol

    [(mailbox, token)] = services.users.add_many([("Dora@Example.org", "Dora", None)], "admin:test")
    assert mailbox == "dora@example.org" and isinstance(token, str)
    assert enrol(services, mailbox, token) == 1
