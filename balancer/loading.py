"""Loading a config: read the file, parse it, expand DNS discovery, judge it under the guard.

One pipeline for ``balancer run`` at start, for every reload and for ``balancer check``
(``check_file``), so what is accepted and refused, and the words used for it, are the same
everywhere. Blocking (the guard simulates traffic and resolves names): the app calls it off
the event loop.

The config package parses and validates data only; the checks that need plug-ins or files
(a strategy and its options, ``access_log.record`` keys, TLS and CA files) are here, in
``PIPELINE_CHECKS``, handed to its ``parse_config`` so their problems are in the same list.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from balancer.config import (
    BackendConfig,
    Config,
    ConfigError,
    PluginChecks,
    StrategyConfig,
    UnreadableConfig,
    parse_yaml,
)
from balancer.config import parse_config as parse_data
from balancer.discovery import expand
from balancer.guard import evaluate, format_diff, simulated_top_share
from balancer.strategies import resolve_strategy
from balancer.strategies.consistent_hash import ConsistentHash
from balancer.tls import TlsError, check_ca_file, check_server_pair, server_context


class PipelineChecks:
    """The checks ``parse_config`` leaves to the pipeline (balancer/config/checks.py)."""

    def strategy_options(self, name: str, options: Mapping[str, Any]) -> list[str]:
        try:
            cls = resolve_strategy(name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        return list(cls.validate_options(options))

    def record_label(self, item: Any) -> str:
        kind, name = ConsistentHash.parse_key(item)
        return f"{kind}:{name}" if name is not None else kind

    def hash_labels(self, strategy: StrategyConfig) -> tuple[str, ...]:
        try:
            cls = resolve_strategy(strategy.name)
            if not issubclass(cls, ConsistentHash):
                return ()
            kind, name = ConsistentHash.parse_key(strategy.options.get("key", "client_ip"))
        except (ImportError, AttributeError, ValueError, TypeError):
            return ()  # reported by strategy_options
        return (f"{kind}:{name}",) if name is not None else ()

    def server_pair(self, cert: str, key: str) -> None:
        check_server_pair(cert, key)  # TlsError is a ValueError naming the file

    def ca_file(self, path: str) -> None:
        check_ca_file(path)


PIPELINE_CHECKS: PluginChecks = PipelineChecks()


def parse_config(data: Any, source: str = "<config>") -> Config:
    """The whole parse of already-loaded data: the config package's, with the plug-in and file
    checks. Raises ConfigError with every problem."""
    return parse_data(data, source, PIPELINE_CHECKS)


def read_config(path: str | Path) -> str:
    """The file's text. UnreadableConfig (one line naming it) when it cannot be read; a
    ConfigError naming the line and column when it is not UTF-8 (a file read, but invalid)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UnreadableConfig([f"{path}: cannot read: {exc.strerror or exc}"],
                               str(path)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise ConfigError([f"{path}: line {line}, column {column}: not UTF-8 text (byte "
                           f"{raw[exc.start]:#04x})"], str(path)) from None


@contextmanager
def beside(path: str | Path) -> Iterator[None]:
    """Plug-in strategies ("module:Class") may sit next to the config file: its directory on
    ``sys.path`` meanwhile. Appended, not prepended, so that a file there never shadows an
    installed module."""
    here = str(Path(path).resolve().parent)
    added = here not in sys.path
    if added:
        sys.path.append(here)
    try:
        yield
    finally:
        if added:
            sys.path.remove(here)


def parse_config_text(text: str, path: str | Path) -> Config:
    """Parse the YAML ``text`` read from ``path`` (plug-ins may sit next to it)."""
    source = str(path)
    data = parse_yaml(text, source)
    with beside(path):
        return parse_config(data, source)


def import_strategies(config: Config, path: str | Path) -> None:
    """Import the strategies ``config`` (read from ``path``) names, as its check did, in a
    process that did not check it (balancer/checker.py): plug-ins next to the file too."""
    with beside(path):
        for pool in config.pools.values():
            resolve_strategy(pool.strategy.name)


def load_config(path: str | Path) -> Config:
    """Read and parse a YAML file (no discovery, no guard); ConfigError with every problem."""
    return parse_config_text(read_config(path), path)


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

    def __init__(self, report: Any, source: str, config: Config) -> None:
        super().__init__(list(report.errors), source)
        self.report = report
        #: The config refused (``check --replay`` judges it on the log all the same).
        self.config = config


def check_file(path: str) -> Applied:
    """Load ``path`` and judge it exactly as ``balancer check`` does, keeping the text as read
    (``GET /config``, its sha256). Raises ConfigError (invalid) or Refused."""
    text = read_config(path)
    config = expand(parse_config_text(text, path))  # ``discovery: dns`` → addresses now
    report = evaluate(config)
    if not report.ok:
        raise Refused(report, str(path), config)
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


def listener_tls(config: Config) -> Any:
    """The listener's SSLContext for ``config.tls``, or None for plain HTTP."""
    if config.tls is None:
        return None
    try:
        return server_context(config.tls.cert, config.tls.key)
    except TlsError as exc:  # the files changed since the config was checked
        raise ConfigError([f"tls: {exc}"], config.source) from None
