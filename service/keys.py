"""API keys: create, revoke, authenticate.

A key is shown once (`sk-qlora-` + 43 url-safe random characters, 256 bits) and stored only as
its SHA-256 hash plus a short prefix that finds the row; the hash comparison is constant time
(`hmac.compare_digest`), as in GitHub's and Stripe's token designs. SHA-256 without a salt or a
slow KDF is the usual choice for high-entropy machine tokens: nothing is gained by stretching a
256-bit random secret.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.database import session_scope
from service.db import ApiKey, Tenant, new_id, now
from service.settings import get_settings

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-qlora-"
PREFIX_LEN = 16  # stored, indexed, and safe to show: "sk-qlora-" plus 7 random characters


class InvalidApiKey(Exception):
    """The presented key is unknown, malformed or revoked (the message never echoes the key)."""


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as stored in `api_keys.key_hash`."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    """The tenant called `name`, created (with a fresh `org-…` id) if it does not exist yet."""
    if not name or len(name) > 128:
        raise ValueError(f"tenant name must be 1-128 characters, got {name!r}")
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=new_id("org"), name=name)
        session.add(tenant)
        session.flush()
    return tenant


def issue_key(session: Session, tenant: str, name: str | None = None) -> tuple[str, ApiKey]:
    """Create a key for `tenant` inside `session` (the caller commits).

    Returns:
        (plaintext key, ApiKey row).
    """
    t = get_or_create_tenant(session, tenant)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), tenant_id=t.id, prefix=key[:PREFIX_LEN], key_hash=hash_key(key), name=name)
    session.add(row)
    session.flush()
    return key, row


def create_key(tenant: str, name: str | None = None, database_url: str | None = None) -> str:
    """Create an API key for `tenant` (created if missing); the database is migrated first.

    Args:
        tenant: the tenant's name, e.g. "acme".
        name: an optional label for the key.
        database_url: default `get_settings().database_url`.

    Returns:
        The plaintext key. It is not stored anywhere and cannot be shown again.

    Raises:
        ValueError: the tenant name is empty or longer than 128 characters.
    """
    from service.migrate import upgrade

    url = database_url or get_settings().database_url
    upgrade(url)  # `qlora keys create` on a fresh data dir must not need a separate step
    with session_scope(url) as session:
        key, row = issue_key(session, tenant, name)
        log.info("created API key %s for tenant %s", row.id, tenant)
    return key


def revoke_key(key_or_id: str, database_url: str | None = None) -> int:
    """Revoke a key given as the plaintext key or as its `key-…` id.

    Returns:
        The number of keys revoked now (0 when unknown or already revoked).
    """
    url = database_url or get_settings().database_url
    if key_or_id.startswith(KEY_PREFIX):
        cond = ApiKey.key_hash == hash_key(key_or_id)
    else:
        cond = ApiKey.id == key_or_id
    with session_scope(url) as session:
        result = session.execute(update(ApiKey).where(cond, ApiKey.revoked_at.is_(None)).values(revoked_at=now()))
        return int(result.rowcount or 0)


def authenticate(session: Session, key: str) -> tuple[str, str]:
    """Check a presented key.

    Args:
        session: an open database session.
        key: the bearer token as sent by the client.

    Returns:
        (tenant_id, key_id) of the live key.

    Raises:
        InvalidApiKey: unknown, malformed or revoked.
    """
    if not key.startswith(KEY_PREFIX) or len(key) < PREFIX_LEN + 8 or len(key) > 256:
        raise InvalidApiKey("malformed API key")
    digest = hash_key(key)
    rows = session.scalars(select(ApiKey).where(ApiKey.prefix == key[:PREFIX_LEN])).all()
    for row in rows:
        if hmac.compare_digest(row.key_hash, digest):
            if row.revoked_at is not None:
                raise InvalidApiKey("API key has been revoked")
            return row.tenant_id, row.id
    raise InvalidApiKey("unknown API key")
