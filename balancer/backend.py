"""A backend: its identity (address, weight) and its live state.

State lives here, on one object per server, so that every reader (strategies, health checks,
metrics, the admin page) sees the same numbers without copies, and so that a reload that keeps
a server keeps its state (see ``key``). Counters are plain attributes: the request path bumps
them without a label lookup; ``metrics.py`` turns them into Prometheus samples at scrape time.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Any

from balancer.config import BackendConfig

#: Upper bounds (seconds) of the upstream latency histogram buckets; +Inf is implied.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

_FIRST_BUCKET = LATENCY_BUCKETS[0]
_bucket = bisect_left
_exp = math.exp

#: Peak-EWMA decay time constant (seconds): how fast a past latency spike is forgotten.
EWMA_DECAY = 10.0


class Backend:
    """One upstream server of one pool."""

    __slots__ = (
        "config", "pool", "name", "url", "scheme", "host", "port", "weight", "backup",
        "max_connections", "key",
        "healthy", "health_reason", "ejected_until", "ejections", "consecutive_failures",
        "in_flight", "ewma", "ewma_stamp",
        "requests_by_class", "requests_total", "errors", "latency_counts", "latency_sum",
        "retries",
        "connections", "draining",
    )

    def __init__(self, config: BackendConfig, pool: str, max_connections: int | None = None):
        # Identity and settings (replaced in place by ``reconfigure`` on reload)
        self.config = config
        self.pool = pool
        self.key = backend_key(config)
        self._apply(config, max_connections)

        # Health: ``healthy`` is the active probe's verdict, ``ejected_until`` passive ejection
        self.healthy = True
        self.health_reason = ""
        self.ejected_until = 0.0
        self.ejections = 0
        self.consecutive_failures = 0

        # Load: written by the pool around every request
        self.in_flight = 0
        self.ewma = 0.0
        self.ewma_stamp = 0.0

        # Counters, read by metrics.py at scrape time. Index = status class (1..5); 0 = no answer.
        self.requests_by_class = [0, 0, 0, 0, 0, 0]
        self.requests_total = 0
        self.errors: dict[str, int] = {}
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        # Requests that failed here before any answer reached the client and went to another
        # backend (exchange.py counts them; a stale pooled connection re-sent is not one).
        self.retries = 0

        # Owned by upstream.py (the connection pool to this server); opaque here.
        self.connections: Any = None
        # Set when a reload removed this backend: finish in-flight work, take no new requests.
        self.draining = False

    def _apply(self, config: BackendConfig, max_connections: int | None) -> None:
        self.config = config
        self.name = config.name
        self.url = config.url
        self.scheme = config.scheme
        self.host = config.host
        self.port = config.port
        self.weight = config.weight
        self.backup = config.backup
        self.max_connections = (config.max_connections if config.max_connections is not None
                                else max_connections)

    def reconfigure(self, config: BackendConfig, max_connections: int | None) -> None:
        """Take new settings (weight, name, limits) for the same server, keeping live state."""
        self._apply(config, max_connections)
        self.draining = False

    # --- state readers -------------------------------------------------------------------

    def available(self, now: float) -> bool:
        """In rotation: passing active checks and not ejected by passive health."""
        return self.healthy and self.ejected_until <= now and not self.draining

    @property
    def full(self) -> bool:
        """At its ``max_connections`` limit: one more request would push it past."""
        limit = self.max_connections
        return limit is not None and self.in_flight >= limit

    def state(self, now: float) -> str:
        """``up``, ``down`` (active checks), ``ejected`` (passive) or ``backup``."""
        if not self.healthy:
            return "down"
        if self.ejected_until > now:
            return "ejected"
        if self.backup:
            return "backup"
        return "up"

    # --- recording outcomes (request path) -----------------------------------------------

    def record(self, status: int, latency: float | None, error: str | None, now: float) -> int:
        """Count one finished attempt: an answer (``status``) and/or an ``error`` kind; feed
        ``latency`` to the histogram and the peak EWMA (which jumps up to a slower sample at
        once and decays towards faster ones over time). Returns the consecutive failures
        (errors and 5xx) so far, 0 after a success. One call per attempt: the request path
        runs it for every request."""
        if error is not None:
            self.record_error(error)
        if status:
            self.requests_total += 1
            self.requests_by_class[status // 100 if 100 <= status < 600 else 0] += 1
            sample = latency or 0.0
            self.latency_sum += sample
            # Most answers of a healthy backend fall in the first bucket: no search for them.
            self.latency_counts[0 if sample <= _FIRST_BUCKET else _bucket(LATENCY_BUCKETS,
                                                                          sample)] += 1
        if latency is not None:
            ewma = self.ewma
            if latency >= ewma:
                self.ewma = latency
            else:
                stamp = self.ewma_stamp
                w = _exp(-(now - stamp) / EWMA_DECAY) if stamp else 0.0
                self.ewma = ewma * w + latency * (1.0 - w)
            self.ewma_stamp = now
        if error is not None or status >= 500:
            self.consecutive_failures += 1
            return self.consecutive_failures
        self.consecutive_failures = 0
        return 0

    def record_error(self, kind: str) -> None:
        """Count an upstream failure (``connect``, ``timeout``, ``reset``, ``protocol``…)."""
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def __repr__(self) -> str:
        return (f"<Backend {self.pool}/{self.name} {self.url} w={self.weight}"
                f" {'up' if self.healthy else 'down'} in_flight={self.in_flight}>")


def backend_key(config: BackendConfig) -> tuple[str, str, int]:
    """What makes two entries the same server across reloads: scheme, host and port."""
    return (config.scheme, config.host, config.port)
