"""The ``pools:`` section: pools, their backends, strategy, health checks, timeouts, TLS.

Part of the pure parse (balancer/config/parse.py): a strategy's name and options and a CA file
are checked through ``Reader.checks`` (config/checks.py), which the loading pipeline fills.
"""

from __future__ import annotations

import re
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from balancer.config.model import (
    BackendConfig,
    BackendTlsConfig,
    HealthCheckConfig,
    OutlierConfig,
    PoolConfig,
    StrategyConfig,
    TimeoutsConfig,
    defaults,
)
from balancer.config.values import (
    Reader,
    boolean,
    default_backend_name,
    fraction,
    is_ip,
    kind_of,
    nonempty_text,
    parse_backend_url,
    parse_duration,
    positive_duration,
    unspecified_host_problem,
    whole_number,
)

_POOL_KEYS = {"strategy", "backends", "max_connections", "queue_timeout", "health_check",
              "outlier_detection", "panic_threshold", "timeouts", "retries",
              "allow_concentration", "backend_tls"}
_BACKEND_KEYS = {"url", "name", "weight", "backup", "max_connections", "discovery",
                 "resolve_interval"}
_HEALTH_KEYS = {"path", "interval", "timeout", "healthy_threshold", "unhealthy_threshold",
                "expect_status"}
_OUTLIER_KEYS = {"consecutive_failures", "base_ejection", "max_ejection", "max_ejected_fraction"}
_TIMEOUT_KEYS = {"connect", "read"}
_BACKEND_TLS_KEYS = {"ca", "verify", "server_name"}


def parse_pools(r: Reader, raw: Any) -> dict[str, PoolConfig]:
    if raw is None:
        r.problem("pools", "is required: at least one pool of backends")
        return {}
    if not isinstance(raw, dict) or not raw:
        r.problem("pools", f"must be a mapping of pool names to pools, got {kind_of(raw)}")
        return {}
    pools: dict[str, PoolConfig] = {}
    for name, body in raw.items():
        path = f"pools.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            r.problem(path, "pool names may use letters, digits, '_', '.' and '-'")
            continue
        pool = _pool(r, name, body, path)
        if pool is not None:
            pools[name] = pool
    return pools


def _pool(r: Reader, name: str, raw: Any, path: str) -> PoolConfig | None:
    p = r.mapping(raw, path, _POOL_KEYS)
    if p is None:
        return None
    d = defaults(PoolConfig)
    max_conn = r.get(p, "max_connections", path, whole_number(1), d["max_connections"])
    backends = _backends(r, p.get("backends"), f"{path}.backends")
    backend_tls = _backend_tls(r, p.get("backend_tls"), f"{path}.backend_tls", backends)
    if backend_tls != BackendTlsConfig():
        backends = tuple(replace(b, tls=backend_tls) for b in backends)
    hc = p.get("health_check")
    return PoolConfig(
        name=name,
        backends=backends,
        strategy=_strategy(r, p.get("strategy"), f"{path}.strategy"),
        max_connections=max_conn,
        queue_timeout=r.get(p, "queue_timeout", path, parse_duration, d["queue_timeout"]),
        health_check=None if hc is None or hc is False else _health(r, hc, f"{path}.health_check"),
        outlier_detection=_outlier(r, p.get("outlier_detection"), f"{path}.outlier_detection"),
        panic_threshold=r.get(p, "panic_threshold", path, fraction, d["panic_threshold"]),
        timeouts=_timeouts(r, p.get("timeouts"), f"{path}.timeouts"),
        retries=r.get(p, "retries", path, whole_number(0, 10), d["retries"]),
        allow_concentration=r.get(p, "allow_concentration", path, nonempty_text,
                                  d["allow_concentration"]),
        backend_tls=backend_tls,
    )


def _strategy(r: Reader, raw: Any, path: str) -> StrategyConfig:
    if raw is None:
        return StrategyConfig()
    if isinstance(raw, str):
        name, options = raw, {}
    elif isinstance(raw, dict):
        if "name" not in raw or not isinstance(raw["name"], str):
            r.problem(f"{path}.name", "is required: a strategy name or \"module:Class\"")
            return StrategyConfig()
        name, options = raw["name"], {k: v for k, v in raw.items() if k != "name"}
    else:
        r.problem(path, f"must be a strategy name or a mapping with a name, got {kind_of(raw)}")
        return StrategyConfig()
    try:
        problems = r.checks.strategy_options(name, options)
    except ValueError as exc:
        r.problem(path, str(exc))
        return StrategyConfig(name, MappingProxyType(options))
    # Each line names its option: "key: must be ...".
    for problem in problems:
        r.problems.append(f"{path}.{problem}")
    return StrategyConfig(name, MappingProxyType(options))


def _backend_tls(r: Reader, raw: Any, path: str,
                 backends: tuple[BackendConfig, ...]) -> BackendTlsConfig:
    t = r.mapping(raw, path, _BACKEND_TLS_KEYS)
    d = BackendTlsConfig()
    if t is None or not t:
        return d
    tls = BackendTlsConfig(
        ca=r.get(t, "ca", path, nonempty_text, d.ca),
        verify=r.get(t, "verify", path, boolean, d.verify),
        server_name=r.get(t, "server_name", path, nonempty_text, d.server_name),
    )
    if not any(b.scheme == "https" for b in backends) and backends:
        r.problem(path, "applies to https:// backends, and this pool has none")
    if tls.ca is not None:
        if not tls.verify:
            r.problem(f"{path}.ca", "is not used with verify: false (choose one)")
        else:
            try:
                r.checks.ca_file(tls.ca)
            except ValueError as exc:
                r.problem(f"{path}.ca", str(exc))
    return tls


def _backends(r: Reader, raw: Any, path: str) -> tuple[BackendConfig, ...]:
    if raw is None:
        r.problem(path, "is required: a list of backends")
        return ()
    if not isinstance(raw, list):
        r.problem(path, f"must be a list of backends, got {kind_of(raw)}")
        return ()
    out: list[BackendConfig] = []
    names: dict[str, int] = {}
    d = defaults(BackendConfig)
    for i, item in enumerate(raw):
        bpath = f"{path}[{i}]"
        if isinstance(item, str):
            item = {"url": item}
        b = r.mapping(item, bpath, _BACKEND_KEYS)
        if b is None:
            continue
        weight = r.get(b, "weight", bpath, whole_number(0, 10_000), d["weight"])
        backup = r.get(b, "backup", bpath, boolean, d["backup"])
        max_conn = r.get(b, "max_connections", bpath, whole_number(1), d["max_connections"])
        if "url" not in b:
            r.problem(f"{bpath}.url", "is required")
            continue
        try:
            scheme, host, port = parse_backend_url(b["url"])
        except ValueError as exc:
            r.problem(f"{bpath}.url", str(exc))
            continue
        unspecified = unspecified_host_problem(host)
        if unspecified is not None:
            r.problem(f"{bpath}.url", unspecified)
            continue
        discovery = r.get(b, "discovery", bpath, _discovery, d["discovery"])
        interval = r.get(b, "resolve_interval", bpath, positive_duration, d["resolve_interval"])
        if discovery is None and "resolve_interval" in b:
            r.problem(f"{bpath}.resolve_interval", "only applies with discovery: dns")
        if discovery is not None and is_ip(host):
            r.problem(f"{bpath}.url", f"discovery: dns needs a host name to resolve, got the "
                                      f"address {host!r}")
        # A discovered entry names the backends it finds ``<name>@<address>:<port>``.
        name = r.get(b, "name", bpath, nonempty_text,
                     host if discovery else default_backend_name(host, port))
        if name in names:
            r.problem(f"{bpath}.name", f"{name!r} is already the name of {path}[{names[name]}]")
        names[name] = i
        out.append(BackendConfig(
            url=f"{scheme}://{default_backend_name(host, port)}",
            name=name, scheme=scheme, host=host, port=port,
            weight=weight, backup=backup, max_connections=max_conn,
            discovery=discovery, resolve_interval=interval,
        ))
    return tuple(out)


def _discovery(v: Any) -> str:
    if v != "dns":
        raise ValueError(f"must be \"dns\" (the only kind of discovery), got {v!r}")
    return "dns"


def _health(r: Reader, raw: Any, path: str) -> HealthCheckConfig | None:
    d = HealthCheckConfig()
    if raw is True:
        return d
    h = r.mapping(raw, path, _HEALTH_KEYS)
    if h is None:
        return None
    hc = HealthCheckConfig(
        path=r.get(h, "path", path, nonempty_text, d.path),
        interval=r.get(h, "interval", path, positive_duration, d.interval),
        timeout=r.get(h, "timeout", path, positive_duration, d.timeout),
        healthy_threshold=r.get(h, "healthy_threshold", path, whole_number(1), d.healthy_threshold),
        unhealthy_threshold=r.get(h, "unhealthy_threshold", path, whole_number(1),
                                  d.unhealthy_threshold),
        expect_status=r.get(h, "expect_status", path, _status_range, d.expect_status),
    )
    if not hc.path.startswith("/"):
        r.problem(f"{path}.path", f"must start with '/', got {hc.path!r}")
    return hc


def _status_range(v: Any) -> tuple[int, int]:
    """``200``, ``"200-299"`` or ``[200, 299]`` → inclusive range."""
    if isinstance(v, int) and not isinstance(v, bool):
        lo = hi = v
    elif isinstance(v, str) and re.fullmatch(r"\s*\d{3}\s*-\s*\d{3}\s*", v):
        lo, hi = (int(x) for x in v.split("-"))
    elif isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v):
        lo, hi = v
    else:
        raise ValueError(f"must be a status like 200 or a range like \"200-399\", got {v!r}")
    if not (100 <= lo <= hi <= 599):
        raise ValueError(f"must be within 100-599 and low <= high, got {v!r}")
    return lo, hi


def _outlier(r: Reader, raw: Any, path: str) -> OutlierConfig:
    o = r.mapping(raw, path, _OUTLIER_KEYS)
    d = OutlierConfig()
    if o is None:
        return d
    return OutlierConfig(
        consecutive_failures=r.get(o, "consecutive_failures", path, whole_number(1),
                                   d.consecutive_failures),
        base_ejection=r.get(o, "base_ejection", path, positive_duration, d.base_ejection),
        max_ejection=r.get(o, "max_ejection", path, positive_duration, d.max_ejection),
        max_ejected_fraction=r.get(o, "max_ejected_fraction", path, fraction,
                                   d.max_ejected_fraction),
    )


def _timeouts(r: Reader, raw: Any, path: str) -> TimeoutsConfig:
    t = r.mapping(raw, path, _TIMEOUT_KEYS)
    d = TimeoutsConfig()
    if t is None:
        return d
    return TimeoutsConfig(
        connect=r.get(t, "connect", path, positive_duration, d.connect),
        read=r.get(t, "read", path, positive_duration, d.read),
    )
