"""service.keys: keys are shown once, stored hashed, scoped to a tenant, and revocable."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select

from service.database import session_scope
from service.db import ApiKey, Tenant
from service.keys import InvalidApiKey, authenticate, create_key, revoke_key


@pytest.fixture()
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/keys.db"


def test_create_stores_only_a_hash_and_authenticates(url):
    key = create_key("acme", name="ci", database_url=url)  # migrates a fresh database first
    assert key.startswith("sk-qlora-") and len(key) > 40
    with session_scope(url) as s:
        row = s.scalar(select(ApiKey))
        assert row.key_hash == hashlib.sha256(key.encode()).hexdigest() and key not in (row.prefix, row.key_hash)
        tenant_id, key_id = authenticate(s, key)
        assert (tenant_id, key_id) == (row.tenant_id, row.id)
        assert s.scalar(select(Tenant.name).where(Tenant.id == tenant_id)) == "acme"


def test_same_tenant_shares_an_org_and_keys_differ(url):
    k1, k2 = create_key("acme", database_url=url), create_key("acme", database_url=url)
    k3 = create_key("other", database_url=url)
    assert len({k1, k2, k3}) == 3
    with session_scope(url) as s:
        t1, t2, t3 = (authenticate(s, k)[0] for k in (k1, k2, k3))
    assert t1 == t2 != t3


@pytest.mark.parametrize("bad", ["", "sk-other-123", "sk-qlora-short", "sk-qlora-" + "A" * 43])
def test_unknown_or_malformed_keys_are_refused(url, bad):
    create_key("acme", database_url=url)
    with session_scope(url) as s, pytest.raises(InvalidApiKey):
        authenticate(s, bad)


def test_revoke_by_key_or_id(url):
    k1, k2 = create_key("acme", database_url=url), create_key("acme", database_url=url)
    assert revoke_key(k1, database_url=url) == 1
    assert revoke_key(k1, database_url=url) == 0  # already revoked
    with session_scope(url) as s:
        with pytest.raises(InvalidApiKey, match="revoked"):
            authenticate(s, k1)
        key_id = authenticate(s, k2)[1]
    assert revoke_key(key_id, database_url=url) == 1
    with session_scope(url) as s, pytest.raises(InvalidApiKey):
        authenticate(s, k2)
