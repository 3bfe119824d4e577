"""Alembic migrations for the service database (see service/migrate.py)."""
