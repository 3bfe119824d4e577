"""Bring the service database to the latest schema with Alembic (`qlora db upgrade`, `qlora serve`).

The configuration is built in code so that the installed package works from any directory (no
`alembic.ini` lookup relative to the current directory); `alembic.ini` at the repository root
describes the same thing for people who run `alembic` by hand.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

from service.settings import get_settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str | None = None) -> Config:
    """An Alembic `Config` for `database_url` (default: the settings' database URL).

    Args:
        database_url: SQLAlchemy URL, e.g. `sqlite:///...` or `postgresql+psycopg://...`.

    Returns:
        A configuration whose script location is this package's `migrations/` directory.
    """
    url = database_url or get_settings().database_url
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # `%` is ConfigParser's interpolation character; a password may contain one.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _ensure_sqlite_dir(url: str) -> None:
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    """Apply every migration up to `revision` (idempotent: a no-op when already there).

    Args:
        database_url: the database to migrate; default `get_settings().database_url`.
        revision: the target revision, `head` by default.

    Raises:
        sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    url = database_url or get_settings().database_url
    _ensure_sqlite_dir(url)
    log.info("migrating %s to %s", url.split("@")[-1], revision)
    command.upgrade(alembic_config(url), revision)


def current_revision(database_url: str | None = None) -> str | None:
    """The revision the database is at, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    from service.database import get_engine

    with get_engine(database_url or get_settings().database_url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
