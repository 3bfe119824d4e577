"""The per-key rate limit in production mode lives in Redis (api/ratelimit.py), so two API processes
share one limit; the embedded mode keeps its in-process window. Real Redis on 127.0.0.1:6379."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from api.ratelimit import RedisSlidingWindowLimiter, SlidingWindowLimiter, make_limiter
from qlora_cli.probe import free_port, wait_until_ready
from tests.e2e.services import private_redis

pytestmark = pytest.mark.services


@pytest.fixture()
def redis_url() -> Iterator[str]:
    with private_redis() as url:
        yield url


def test_redis_window_counts_and_says_when(redis_url) -> None:
    limiter = RedisSlidingWindowLimiter(redis_url, limit=3, window_s=60)
    assert [limiter.hit("key-a", now=1000.0) for _ in range(3)] == [None, None, None]
    wait = limiter.hit("key-a", now=1010.0)
    assert wait == pytest.approx(50.0)  # the first hit leaves the window at 1060
    assert limiter.hit("key-b", now=1010.0) is None  # keys are counted apart
    assert limiter.hit("key-a", now=1060.5) is None  # the oldest has left


def test_the_mode_picks_the_limiter(redis_url) -> None:
    assert isinstance(make_limiter(redis_url, 5), RedisSlidingWindowLimiter)
    assert isinstance(make_limiter("sqla+sqlite:////tmp/broker.db", 5), SlidingWindowLimiter)


def test_two_api_processes_share_one_limit(redis_url, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update(QLORA_DATA_DIR=str(tmp_path / "data"), QLORA_BROKER_URL=redis_url, QLORA_RATE_LIMIT_PER_MINUTE="6")
    key = subprocess.run([sys.executable, "-m", "qlora_cli.main", "keys", "create", "--tenant", "rl"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    procs, urls = {}, []
    try:
        for name in ("a", "b"):
            port = free_port()
            procs[name] = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app",
                                            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                           env=env)
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_until_ready(url, procs, 120)
        headers = {"Authorization": f"Bearer {key}"}
        codes = [httpx.get(f"{urls[i % 2]}/v1/files", headers=headers, timeout=30).status_code for i in range(8)]
        assert codes == [200] * 6 + [429, 429], codes  # 3 on each replica, yet the 7th is refused
        refused = httpx.get(f"{urls[0]}/v1/files", headers=headers, timeout=30)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) >= 1
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(20)
