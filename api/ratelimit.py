"""Per-key request rate limit: an in-process sliding window over the last 60 seconds.

Each API key keeps the timestamps of its recent requests; a request beyond
`rate_limit_per_minute` inside the window is refused with 429 and a `Retry-After` telling when
the oldest request leaves the window. The window lives in the API process: with several API
processes behind a load balancer each enforces the limit on its own share (a shared limit
would need Redis; noted in the README).
"""

from __future__ import annotations

import threading
import time
from collections import deque


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
