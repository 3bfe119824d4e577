"""A migrated service database on both backends (SQLite file, private PostgreSQL database), and
a helper that inserts a tenant and a job the way the API does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert

from service.db import Job, Tenant, new_id
from tests.e2e.services import private_postgres


@pytest.fixture(params=["sqlite", "postgresql"], scope="module")
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """An engine on a freshly migrated database (Alembic head), one per backend and test module."""
    from service.database import make_engine
    from service.migrate import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'qlora.db'}"
        upgrade(url)
        eng = make_engine(url)
        yield eng
        eng.dispose()
        return
    with private_postgres() as url:
        upgrade(url)
        eng = make_engine(url)
        yield eng
        eng.dispose()


def make_job(engine: Engine, **values: Any) -> str:
    """Insert a tenant and a `validating_files` job; return the job id."""
    tenant_id = new_id("org")
    job_id = new_id("ftjob")
    row: dict[str, Any] = {
        "id": job_id,
        "tenant_id": tenant_id,
        "model": "tiny",
        "training_file": "file-x",
        "status": "validating_files",
        "seed": 0,
        "hyperparameters": {},
        "config": {},
    }
    row.update(values)
    with engine.begin() as conn:
        conn.execute(insert(Tenant.__table__).values(id=tenant_id, name=tenant_id))
        conn.execute(insert(Job.__table__).values(**row))
    return job_id


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"
