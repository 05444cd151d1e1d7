"""Rows inserted at the end of a transaction, many in one statement.

A unit of group commit that only inserts what cannot clash (a certificate under a fresh random
serial, its audit record) may hand its rows to `defer_insert` instead of the ORM: they are kept in
the session and written by one multi-row INSERT per table just before the transaction commits
(or before the next savepoint of the batch begins, so later units see them). A rollback drops them
with the rest of the transaction. Each row is still a row of its own; only the round trips and the
ORM's per-object bookkeeping are shared.

Savepoint rule: a unit that defers rows inside a savepoint of its own (group commit's isolated
units) may still fail after deferring them; `GroupCommit` flushes every earlier unit's rows before
the savepoint opens and discards what is deferred when the savepoint rolls back, so a refused unit
leaves no row behind.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, insert
from sqlalchemy.orm import Session

_KEY = "mailkms_deferred_rows"


def defer_insert(session: Session, model: type[Any], row: dict[str, Any]) -> None:
    session.info.setdefault(_KEY, {}).setdefault(model, []).append(row)


def flush_deferred(session: Session) -> None:
    """Write the deferred rows now (in table order of their first row)."""
    pending: dict[type[Any], list[dict[str, Any]]] | None = session.info.pop(_KEY, None)
    for model, rows in (pending or {}).items():
        # Core, on the session's connection: a plain executemany (the ORM's bulk path costs about as
        # much again per row in bookkeeping we do not need: no object is made or refreshed).
        session.connection().execute(insert(model.__table__), rows)


def discard_deferred(session: Session) -> None:
    session.info.pop(_KEY, None)


def _before_commit(session: Session) -> None:
    if not session.in_nested_transaction():
        flush_deferred(session)


def _after_rollback(session: Session) -> None:
    discard_deferred(session)


event.listen(Session, "before_commit", _before_commit)
event.listen(Session, "after_rollback", _after_rollback)
