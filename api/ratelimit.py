"""Per-key request rate limit: a sliding window over the last 60 seconds.

Each API key keeps the timestamps of its recent requests; a request beyond
`rate_limit_per_minute` inside the window is refused with 429 and a `Retry-After` telling when
the oldest request leaves the window. In the embedded mode the window lives in the API process
(`SlidingWindowLimiter`); in production, where several API replicas stand behind a load balancer,
it lives in Redis (`RedisSlidingWindowLimiter`, on the broker's server), so the limit is one limit
across all of them rather than one per replica.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from typing import Any

log = logging.getLogger(__name__)


class SlidingWindowLimiter:
    """Allow at most `limit` hits per key within any `window_s` seconds."""

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        if limit < 1:
            raise ValueError(f"rate limit must be >= 1, got {limit}")
        self.limit = limit
        self.window_s = window_s
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, now: float | None = None) -> float | None:
        """Record a request for `key`.

        Returns:
            None when allowed; otherwise the seconds until a request would be allowed.
        """
        t = time.monotonic() if now is None else now
        with self._lock:
            q = self._hits.setdefault(key, deque())
            while q and q[0] <= t - self.window_s:
                q.popleft()
            if len(q) >= self.limit:
                return max(q[0] + self.window_s - t, 0.0)
            q.append(t)
            return None


# KEYS[1]: the key's sorted set of hits (score: ms). ARGV: now_ms, window_ms, limit, member.
# Atomic in Redis: drop hits older than the window, then either add this one or answer how long
# until the oldest leaves the window.
_HIT_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tonumber(oldest[2]) + ARGV[2] - ARGV[1]
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return -1
"""


class RedisSlidingWindowLimiter:
    """The same window as SlidingWindowLimiter, kept in Redis and shared by every API process.

    The clock is Redis' own (`TIME`), so replicas whose clocks disagree still count one window. If
    Redis cannot be reached the request is let through (logged): the broker being down already
    stops new jobs, and refusing every API call over a limiter outage would be worse.
    """

    def __init__(self, url: str, limit: int, window_s: float = 60.0, prefix: str = "qlora:ratelimit:") -> None:
        import redis

        if limit < 1:
            raise ValueError(f"rate limit must be >= 1, got {limit}")
        self.limit, self.window_s, self.prefix = limit, window_s, prefix
        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._script: Any = self._redis.register_script(_HIT_SCRIPT)

    def hit(self, key: str, now: float | None = None) -> float | None:
        import redis

        try:
            if now is None:
                sec, usec = self._redis.time()
                now_ms = sec * 1000 + usec // 1000
            else:
                now_ms = int(now * 1000)
            wait_ms = self._script(keys=[self.prefix + key],
                                   args=[now_ms, int(self.window_s * 1000), self.limit,
                                         f"{now_ms}-{secrets.token_hex(4)}"])
        except redis.RedisError as e:
            log.warning("rate limit not checked (Redis: %s); letting the request through", e)
            return None
        return None if int(wait_ms) < 0 else max(int(wait_ms) / 1000, 0.0)


def make_limiter(broker_url: str, limit: int) -> SlidingWindowLimiter | RedisSlidingWindowLimiter:
    """Redis-backed when the broker is Redis (production), else in-process (embedded)."""
    if broker_url.startswith(("redis://", "rediss://")):
        return RedisSlidingWindowLimiter(broker_url, limit)
    return SlidingWindowLimiter(limit, 60.0)
