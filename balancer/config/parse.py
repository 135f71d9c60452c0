"""YAML data → a Config, or ConfigError with every problem found.

Every problem is reported with its path (``pools.web.backends[1].weight: must be >= 0, got -3``)
and all problems are collected before raising, so an operator fixes a config in one pass.
Unknown keys are errors: a typo must never fall back silently to a default.

Pure: data in, dataclasses and problems out. The checks that need plug-ins or files come in as
``checks`` (config/checks.py) from balancer/loading.py, which also reads the file.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any, Mapping

import yaml

from balancer.config.checks import SHAPE_ONLY, PluginChecks
from balancer.config.model import (
    AccessLogConfig,
    Address,
    ClientConfig,
    Config,
    ConfigError,
    GuardConfig,
    PoolConfig,
    RouteConfig,
    TlsConfig,
    defaults,
)
from balancer.config.pools import parse_pools
from balancer.config.values import (
    Reader,
    boolean,
    fraction,
    is_ip,
    kind_of,
    nonempty_text,
    numeric_ip,
    parse_address,
    parse_duration,
    parse_size,
    positive_duration,
    size_between,
    whole_number,
    workers_count,
)
from balancer.gil import give_way

_TOP_KEYS = {"listen", "admin", "guard", "pools", "routes", "drain_timeout", "admin_token",
             "access_log", "resolver", "client", "tls", "workers"}
_CLIENT_KEYS = {"header_timeout", "body_timeout", "keepalive_timeout", "send_timeout",
                "max_clients", "max_body_size", "max_header_size", "max_url_size", "max_headers"}
_TLS_KEYS = {"cert", "key"}
_ACCESS_LOG_KEYS = {"enabled", "record", "digest_key"}

_GUARD_KEYS = {"max_share", "min_backends", "max_share_after_failure", "live_margin",
               "live_window", "live_min_requests", "probation"}


_ROUTE_KEYS = {"host", "path_prefix", "pool"}


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, letting a waiting event loop run (balancer/gil.py) between
    tokens and between nodes: a reload parses in a worker thread, and pure-Python YAML holds
    the GIL 3-7 ms for a 16-backend file. Not the C loader (``CSafeLoader``, 10× faster): it
    accepts what this one refuses (tabs between tokens, ``?`` and ``:`` in flow mappings), so
    a config's verdict would depend on how PyYAML was built."""

    def fetch_more_tokens(self) -> None:
        give_way()
        super().fetch_more_tokens()

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        give_way()
        return super().construct_object(node, deep)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text → data; ConfigError naming the line and column when it is not YAML."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{source}: {where}invalid YAML: {problem}"], source) from None


def parse_config(data: Any, source: str = "<config>",
                 checks: PluginChecks = SHAPE_ONLY) -> Config:
    """Turn already-loaded YAML data into a Config, or raise ConfigError with every problem.

    ``checks``: the plug-in and file checks (balancer/loading.py ``PIPELINE_CHECKS``); without
    them strategy names, record labels and TLS files are taken as written."""
    r = Reader(checks)
    top = r.mapping(data, "", _TOP_KEYS)
    if top is None:
        raise ConfigError([f"{source}: the config must be a mapping at the top level"], source)
    d = defaults(Config)
    listen = r.get(top, "listen", "", lambda v: parse_address(v, d["listen"].host), d["listen"])
    admin = r.get(top, "admin", "", lambda v: parse_address(v, d["admin"].host), d["admin"])
    drain = r.get(top, "drain_timeout", "", parse_duration, d["drain_timeout"])
    admin_token = r.get(top, "admin_token", "", nonempty_text, d["admin_token"])
    workers = r.get(top, "workers", "", workers_count, d["workers"])
    resolver = _resolver(r, top.get("resolver"))
    guard = _guard(r, top.get("guard"))
    pools = parse_pools(r, top.get("pools"))
    access_log = _access_log(r, top.get("access_log"), pools)
    routes = _routes(r, top.get("routes"), pools)
    client = _client(r, top.get("client"))
    tls = _tls(r, top.get("tls"))
    if _overlap(listen, admin):
        r.problem("admin", f"{admin} is where listen ({listen}) accepts clients: one port cannot "
                           f"serve both; give admin a port of its own")
    if r.problems:
        raise ConfigError(r.problems, source)
    return Config(pools=MappingProxyType(pools), routes=routes, listen=listen, admin=admin,
                  guard=guard, drain_timeout=drain, source=source, admin_token=admin_token,
                  access_log=access_log, resolver=resolver, client=client, tls=tls,
                  workers=workers)


def _overlap(a: Address, b: Address) -> bool:
    """Binding both would fail: one port (0 asks for any, so never clashes) and hosts that are
    the same, or a wildcard that covers the other (``::`` covers IPv4 too: dual-stack)."""
    if a.port != b.port or a.port == 0:
        return False
    x, y = numeric_ip(a.host), numeric_ip(b.host)
    for wild, other in ((x, y), (y, x)):
        # A name counts as covered by either wildcard: it may resolve to either family.
        if wild is not None and wild.is_unspecified and (
                other is None or wild.version == 6 or other.version == 4):
            return True
    if x is None or y is None:  # a name: only the same name is known to clash
        return a.host.lower().rstrip(".") == b.host.lower().rstrip(".")
    return x == y


def _access_log(r: Reader, raw: Any, pools: Mapping[str, PoolConfig]) -> AccessLogConfig:
    record: tuple[str, ...]
    if raw is None or isinstance(raw, bool):
        enabled, record, secret = raw is not False, (), None
    elif isinstance(raw, dict):
        a = r.mapping(raw, "access_log", _ACCESS_LOG_KEYS) or {}
        enabled = r.get(a, "enabled", "access_log", boolean, True)
        secret = r.get(a, "digest_key", "access_log", nonempty_text, None)
        record = _record(r, a.get("record"))
    else:
        r.problem("access_log", f"must be true, false or a mapping (enabled, record, "
                                f"digest_key), got {kind_of(raw)}")
        return AccessLogConfig()
    labels = {name: _labels((*r.checks.hash_labels(pool.strategy), *record))
              for name, pool in pools.items()}
    return AccessLogConfig(enabled, record, secret,
                           MappingProxyType({n: ls for n, ls in labels.items() if ls}))


def _record(r: Reader, raw: Any) -> tuple[str, ...]:
    """``access_log.record``: labels in the consistent_hash key forms, checked by its parser."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.problem("access_log.record", f"must be a list like [\"header:X-Tenant\", "
                                       f"\"cookie:session\"], got {kind_of(raw)}")
        return ()
    out = []
    for i, item in enumerate(raw):
        try:
            out.append(r.checks.record_label(item))
        except (TypeError, ValueError) as exc:
            r.problem(f"access_log.record[{i}]", str(exc))
    return tuple(out)


def _labels(labels: tuple[str, ...]) -> tuple[str, ...]:
    """What a line must carry: header and cookie inputs, once each. ``client_ip`` and ``path``
    are in every line already, and ``header:host`` is the line's ``host``."""
    return tuple(dict.fromkeys(label for label in labels
                               if label.startswith(("header:", "cookie:"))
                               and label != "header:host"))


def _client(r: Reader, raw: Any) -> ClientConfig:
    c = r.mapping(raw, "client", _CLIENT_KEYS)
    d = ClientConfig()
    if c is None:
        return d
    return ClientConfig(
        header_timeout=r.get(c, "header_timeout", "client", positive_duration,
                             d.header_timeout),
        body_timeout=r.get(c, "body_timeout", "client", positive_duration, d.body_timeout),
        keepalive_timeout=r.get(c, "keepalive_timeout", "client", positive_duration,
                                d.keepalive_timeout),
        send_timeout=r.get(c, "send_timeout", "client", positive_duration, d.send_timeout),
        max_clients=r.get(c, "max_clients", "client", whole_number(1), d.max_clients),
        max_body_size=r.get(c, "max_body_size", "client", parse_size, d.max_body_size),
        max_header_size=r.get(c, "max_header_size", "client", size_between(1024, 1 << 20),
                              d.max_header_size),
        max_url_size=r.get(c, "max_url_size", "client", size_between(256, 1 << 20),
                           d.max_url_size),
        max_headers=r.get(c, "max_headers", "client", whole_number(8, 10_000), d.max_headers),
    )


def _tls(r: Reader, raw: Any) -> TlsConfig | None:
    """``tls: {cert, key}``: both files must load as a pair now, not at the first handshake."""
    if raw is None:
        return None
    t = r.mapping(raw, "tls", _TLS_KEYS)
    if t is None:
        return None
    cert = r.get(t, "cert", "tls", nonempty_text, None)
    key = r.get(t, "key", "tls", nonempty_text, None)
    for name, value in (("cert", cert), ("key", key)):
        if value is None and name not in t:
            r.problem(f"tls.{name}", "is required: a PEM file")
    if cert is None or key is None:
        return None
    try:
        r.checks.server_pair(cert, key)
    except ValueError as exc:
        r.problem("tls", str(exc))
        return None
    return TlsConfig(cert=cert, key=key)


def _resolver(r: Reader, raw: Any) -> tuple[Address, ...]:
    """``resolver: ["10.0.0.2:53", "[fd00::53]:53"]``: nameservers by IP (port 53 if omitted)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        r.problem("resolver", f"must be a non-empty list of \"ip:port\" nameservers, got "
                              f"{kind_of(raw)}")
        return ()
    out = []
    for i, item in enumerate(raw):
        try:
            out.append(_nameserver(item))
        except ValueError as exc:
            r.problem(f"resolver[{i}]", str(exc))
    return tuple(out)


def _nameserver(v: Any) -> Address:
    bare = v.strip().strip("[]") if isinstance(v, str) else ""
    if is_ip(bare):
        return Address(bare, 53)
    try:
        addr = parse_address(v)
    except ValueError:
        addr = None
    if addr is None or not is_ip(addr.host):
        raise ValueError(f"must be a nameserver's IP address, optionally with a port, like "
                         f"10.0.0.2 or 10.0.0.2:53 (a name would need a resolver itself), "
                         f"got {v!r}")
    return addr


def _guard(r: Reader, raw: Any) -> GuardConfig:
    g = r.mapping(raw, "guard", _GUARD_KEYS)
    d = GuardConfig()
    if g is None:
        return d
    max_share = r.get(g, "max_share", "guard", fraction, d.max_share)
    if max_share == 0:
        r.problem("guard.max_share", "must be greater than 0")
    return GuardConfig(
        max_share=max_share,
        min_backends=r.get(g, "min_backends", "guard", whole_number(1), d.min_backends),
        max_share_after_failure=r.get(g, "max_share_after_failure", "guard", fraction,
                                      d.max_share_after_failure),
        live_margin=r.get(g, "live_margin", "guard", fraction, d.live_margin),
        live_window=r.get(g, "live_window", "guard", positive_duration, d.live_window),
        live_min_requests=r.get(g, "live_min_requests", "guard", whole_number(1),
                                d.live_min_requests),
        probation=r.get(g, "probation", "guard", parse_duration, d.probation),
    )


def _routes(r: Reader, raw: Any, pools: Mapping[str, PoolConfig]) -> tuple[RouteConfig, ...]:
    if raw is None:
        if len(pools) == 1:
            return (RouteConfig(pool=next(iter(pools))),)
        if pools:
            r.problem("routes", f"is required when there is more than one pool "
                                f"({', '.join(sorted(pools))})")
        return ()
    if not isinstance(raw, list) or not raw:
        r.problem("routes", f"must be a non-empty list of routes, got {kind_of(raw)}")
        return ()
    out: list[RouteConfig] = []
    for i, item in enumerate(raw):
        path = f"routes[{i}]"
        m = r.mapping(item, path, _ROUTE_KEYS)
        if m is None:
            continue
        pool = m.get("pool")
        if not isinstance(pool, str):
            r.problem(f"{path}.pool", "is required: the name of a pool")
            continue
        if pool not in pools:
            known = ", ".join(sorted(pools)) or "none"
            r.problem(f"{path}.pool", f"no pool named {pool!r} (pools: {known})")
        host = r.get(m, "host", path, _host_pattern, _ROUTE_DEFAULTS["host"])
        prefix = r.get(m, "path_prefix", path, nonempty_text, _ROUTE_DEFAULTS["path_prefix"])
        if not prefix.startswith("/"):
            r.problem(f"{path}.path_prefix", f"must start with '/', got {prefix!r}")
        out.append(RouteConfig(pool=pool, host=host, path_prefix=prefix))
    return tuple(out)


_ROUTE_DEFAULTS = defaults(RouteConfig)


def _host_pattern(v: Any) -> str:
    host = nonempty_text(v).lower()
    name_or_ip = r"(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d+)?|\[[0-9a-f:.]+\](:\d+)?"
    if not re.fullmatch(name_or_ip, host):
        raise ValueError(f"must be a host name like api.example.com or *.example.com, got {v!r}")
    return host
