"""Loading a config: read the file, parse it, expand DNS discovery, judge it under the guard.

One pipeline for ``balancer run`` at start and for every reload (``check_file``), so what is
accepted and refused, and the words used for it, are the same everywhere. Blocking (the guard
simulates traffic and resolves names): the app calls it off the event loop.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from balancer.config import BackendConfig, Config, ConfigError, parse_config_text, read_config
from balancer.discovery import expand
from balancer.guard import evaluate, format_diff, simulated_top_share


@dataclass(frozen=True)
class Applied:
    """A config as it runs: what the guard said, its text, its digest, when it was applied."""

    config: Config
    report: Any
    text: str
    sha256: str
    at: float  # unix time


class Refused(ConfigError):
    """A config that parses but that the guard refuses; ``report`` says why."""

    def __init__(self, report: Any, source: str) -> None:
        super().__init__(list(report.errors), source)
        self.report = report


def check_file(path: str) -> Applied:
    """Load ``path`` and judge it exactly as ``balancer check`` does, keeping the text as read
    (``GET /config``, its sha256). Raises ConfigError (invalid) or Refused."""
    text = read_config(path)
    config = expand(parse_config_text(text, path))  # ``discovery: dns`` → addresses now
    report = evaluate(config)
    if not report.ok:
        raise Refused(report, str(path))
    return Applied(config, report, text, hashlib.sha256(text.encode("utf-8")).hexdigest(),
                   time.time())


def top_share(config: Config, pool: Any) -> float:
    """The guard's simulated top share of ``pool`` under ``config`` (blocking)."""
    return simulated_top_share(config, pool)


def share_diff(old: Any, new: Any) -> str:
    """Each backend's simulated share before → after, for the audit trail."""
    return format_diff(old, new)


def describe_pools(config: Config) -> str:
    """One line: each pool with its strategy and backends (``web1 http://… weight=2 backup``)."""
    parts = []
    for pool in config.pools.values():
        backends = ", ".join(_describe_backend(b) for b in pool.backends)
        parts.append(f"pool {pool.name} ({pool.strategy.name}): {backends}")
    return "; ".join(parts)


def _describe_backend(b: BackendConfig) -> str:
    text = b.url if b.url.endswith("//" + b.name) else f"{b.name} {b.url}"
    if b.weight != 1:
        text += f" weight={b.weight}"
    return text + (" backup" if b.backup else "")
