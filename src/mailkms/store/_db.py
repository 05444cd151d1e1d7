"""Engine, migrations and units of work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x6D6B6D73  # "mkms": the advisory lock key held while migrating


def make_engine(url: str, *, read_only: bool = False, **kwargs: Any) -> Engine:
    """An engine; on SQLite `read_only` makes one whose transactions start DEFERRED (no write lock,
    a WAL snapshot) and whose connections refuse writes (PRAGMA query_only)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            if read_only:
                cursor.execute("PRAGMA query_only=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Writers: one at a time, taken at the start: no read-then-upgrade deadlocks.
            # Readers: a deferred BEGIN takes no lock; WAL gives them a snapshot beside the writer.
            conn.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent)."""
    cfg = alembic_config(engine)
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            # Several nodes may start at once: one migrates, the others wait, then find nothing to do.
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


class Database:
    """Holds the engine; hands out one unit of work (a transaction) per service call."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite: a second engine for reads (deferred BEGIN); PostgreSQL reads never block writers.
        self._read_engine = make_engine(url, read_only=True) if self.is_sqlite else None
        self._read_sessions = (
            sessionmaker(self._read_engine, expire_on_commit=False, autoflush=False)
            if self._read_engine is not None
            else self._sessions
        )

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def read_only(self) -> Iterator[Session]:
        """A unit of work that only reads: no write lock on SQLite, READ ONLY on PostgreSQL.
        A write inside it fails (SQLite: attempt to write a readonly database)."""
        with self._read_sessions() as session, session.begin():
            if not self.is_sqlite:
                session.execute(text("SET TRANSACTION READ ONLY"))
            yield session

    def migrate(self) -> None:
        migrate(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()
        if self._read_engine is not None:
            self._read_engine.dispose()
