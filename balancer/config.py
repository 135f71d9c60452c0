"""YAML → frozen dataclasses.

Every problem is reported with its path (``pools.web.backends[1].weight: must be >= 0, got -3``)
and all problems are collected before raising, so an operator fixes a config in one pass.
Unknown keys are errors: a typo must never fall back silently to a default.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import urlsplit

import yaml

T = TypeVar("T")


class ConfigError(Exception):
    """A config that cannot be loaded; ``problems`` holds one line per mistake."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(problems))


class UnreadableConfig(ConfigError):
    """The file itself cannot be read (missing, a directory, no permission): not a config's
    mistake, so ``balancer check`` answers it like a usage error (exit 2)."""


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port to listen on or connect to."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active probes (issue: health)."""

    path: str = "/healthz"
    interval: float = 2.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    expect_status: tuple[int, int] = (200, 399)


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Passive health: eject a backend after consecutive failures seen in live traffic."""

    consecutive_failures: int = 5
    base_ejection: float = 10.0
    max_ejection: float = 300.0
    max_ejected_fraction: float = 0.5


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """Upstream timeouts: ``connect`` bounds a connect, ``read`` the wait for response bytes."""

    connect: float = 2.0
    read: float = 30.0


@dataclass(frozen=True, slots=True)
class StrategyConfig:
    """A strategy by registry name or ``package.module:ClassName``, with its options."""

    name: str = "round_robin"
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class BackendTlsConfig:
    """How to speak TLS to a pool's ``https://`` backends (balancer/tls.py builds the context).

    ``ca``: PEM file of CAs to trust instead of the system's; ``verify: false`` accepts any
    certificate (logged as a warning); ``server_name``: the name to send (SNI) and verify,
    when backends are addressed by IP but their certificates carry a DNS name.
    """

    ca: str | None = None
    verify: bool = True
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class BackendConfig:
    url: str
    name: str
    scheme: str
    host: str
    port: int
    weight: int = 1
    backup: bool = False
    max_connections: int | None = None
    #: ``"dns"``: ``host`` is a name whose every address is a backend (balancer/discovery.py).
    discovery: str | None = None
    resolve_interval: float = 5.0
    #: For a backend found by discovery: the entry it was found from (as written in the file).
    discovered_from: BackendConfig | None = None
    #: The pool's ``backend_tls`` (copied here so upstream.py reads it from the backend).
    tls: BackendTlsConfig = BackendTlsConfig()

    @property
    def active(self) -> bool:
        """Takes traffic in normal operation (backups and weight 0 do not)."""
        return self.weight > 0 and not self.backup


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    backends: tuple[BackendConfig, ...]
    strategy: StrategyConfig = StrategyConfig()
    max_connections: int | None = None
    queue_timeout: float = 1.0
    health_check: HealthCheckConfig | None = None
    outlier_detection: OutlierConfig = OutlierConfig()
    panic_threshold: float = 0.5
    timeouts: TimeoutsConfig = TimeoutsConfig()
    retries: int = 2
    allow_concentration: str | None = None
    backend_tls: BackendTlsConfig = BackendTlsConfig()


@dataclass(frozen=True, slots=True)
class RouteConfig:
    pool: str
    host: str | None = None
    path_prefix: str = "/"


@dataclass(frozen=True, slots=True)
class GuardConfig:
    max_share: float = 0.5
    min_backends: int = 2
    max_share_after_failure: float | None = None
    live_margin: float = 0.05
    #: Live concentration detection: sliding window length (s) and the fewest requests judged.
    live_window: float = 60.0
    live_min_requests: int = 100
    #: After every applied reload: how long a pool it changed is watched and the reload undone
    #: if that pool becomes concentrated (balancer/probation.py); 0 turns it off.
    probation: float = 30.0


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """What clients may send and how long they may take (``client:``; balancer/proxy.py).

    Timeouts: ``header_timeout`` for a whole request head (from the connection's start, or the
    head's first byte on a kept-alive connection), ``body_timeout`` between two reads of a
    request body, ``keepalive_timeout`` idle between requests, ``send_timeout`` for a client
    that reads none of its answer. ``max_clients``: concurrent client connections; beyond it a
    new one is answered 503 and closed (None: half the open-files limit, see proxy.py).
    """

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    send_timeout: float = 60.0
    max_clients: int | None = None
    max_body_size: int | None = None
    max_header_size: int = 32 * 1024
    max_url_size: int = 8 * 1024
    max_headers: int = 100


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS termination on ``listen``: a PEM certificate (chain) and its unencrypted key."""

    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """``access_log:``, either ``true``/``false`` or ``{enabled, record, digest_key}``.

    ``record``: inputs recorded (hashed) in every line besides each pool's ``consistent_hash``
    key, as labels (``header:x-tenant``, ``cookie:sid``), so that ``check --replay`` can judge a
    key planned for tomorrow on today's log. ``digest_key``: the secret the digests are keyed
    with (None: a random one per process). ``pools``: pool → the labels its lines carry,
    decided here at load time. False when disabled, so ``if config.access_log`` keeps working.
    """

    enabled: bool = True
    record: tuple[str, ...] = ()
    digest_key: str | None = field(default=None, repr=False)  # a secret: never printed
    pools: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))

    def __bool__(self) -> bool:
        return self.enabled


@dataclass(frozen=True, slots=True)
class Config:
    pools: Mapping[str, PoolConfig]
    routes: tuple[RouteConfig, ...]
    listen: Address = Address("0.0.0.0", 8080)
    admin: Address = Address("127.0.0.1", 9100)
    guard: GuardConfig = GuardConfig()
    drain_timeout: float = 30.0
    source: str = ""
    #: When set, mutating admin endpoints need ``Authorization: Bearer <token>``.
    admin_token: str | None = None
    #: One JSON line per request on stderr (logger ``balancer.access``); false turns it off.
    access_log: AccessLogConfig = AccessLogConfig()
    #: Nameservers for ``discovery: dns`` backends; empty = the system's (/etc/resolv.conf).
    resolver: tuple[Address, ...] = ()
    #: Limits and timeouts for clients (``client:``).
    client: ClientConfig = ClientConfig()
    #: TLS termination on ``listen`` (``tls: {cert, key}``); None: plain HTTP.
    tls: TlsConfig | None = None


def defaults(cls: type) -> Mapping[str, Any]:
    """Field name → default of a model class above (required fields left out).

    The model is the one place a default is written: the loader, ``ProxySettings`` and the
    help texts read them from here, and tests/test_docs.py holds the docs to them."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return MappingProxyType(out)


# --------------------------------------------------------------------------- small parsers

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``500ms``, ``2s``, ``1m``, ``1h`` or a bare number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration like 500ms, 2s or 1m, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"must be >= 0, got {value}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"must be a duration like 500ms, 2s or 1m, got {value!r}")


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|[KMG]i?[bB]?|[bB])?\s*$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20,
               "mib": 1 << 20, "mb": 1000 ** 2, "g": 1 << 30, "gib": 1 << 30, "gb": 1000 ** 3}


def parse_size(value: Any) -> int:
    """Bytes: ``4096``, ``64k`` / ``64KiB`` (×1024), ``10MB`` (×1000²), ``1g`` / ``1GiB``…"""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = (m.group(2) or "").lower()
            if unit in _SIZE_UNITS:
                return int(m.group(1)) * _SIZE_UNITS[unit]
    raise ValueError(f"must be a size like 4096, 64KiB, 10MB or 1GiB, got {value!r}")


def parse_address(value: Any, default_host: str = "0.0.0.0") -> Address:
    """``host:port``, ``[v6]:port`` or ``:port`` → Address."""
    if isinstance(value, int) and not isinstance(value, bool):
        return Address(default_host, _port(value))
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be \"host:port\", got {value!r}")
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"must be \"[ipv6]:port\", got {value!r}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"must be \"host:port\", got {value!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets, like \"[::1]:8080\", got {value!r}")
    if not port.isdigit():
        raise ValueError(f"port must be a number, got {value!r}")
    return Address(host or default_host, _port(int(port)))


def _port(n: int) -> int:
    if not 0 <= n <= 65535:
        raise ValueError(f"port must be 0..65535, got {n}")
    return n


def parse_backend_url(url: Any) -> tuple[str, str, int]:
    """``http://host:port`` → (scheme, host, port); the default port follows the scheme."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"must be a URL like http://10.0.0.11:8000, got {url!r}")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http or https, got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"must not carry a path, query or fragment, got {url!r}")
    if parts.username or parts.password:
        raise ValueError(f"must not carry credentials, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"has an invalid port, got {url!r}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"has no host, got {url!r}")
    return parts.scheme, host.lower(), port or (443 if parts.scheme == "https" else 80)


_LEGACY_IPV4 = re.compile(r"(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}", re.IGNORECASE)


def numeric_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host written as a number connects to, or None for a name.

    Besides the usual forms this reads the ones the C resolver also takes (``127.1``, ``0``,
    ``0x7f.1``, ``010.0.0.1``), so ``127.1`` is compared as the ``127.0.0.1`` it reaches.
    An IPv4-mapped IPv6 address is its IPv4 address; a zone (``%eth0``) is dropped.
    """
    text = host.split("%", 1)[0]
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text)
    except ValueError:
        if not _LEGACY_IPV4.fullmatch(text):
            return None
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def unspecified_host_problem(host: str) -> str | None:
    """Why ``host`` (0.0.0.0, ::, 0, …) cannot be a backend address, or None when it can.

    Connecting to the unspecified address reaches this machine on Linux, so ``0.0.0.0:9001``
    beside ``127.0.0.1:9001`` would be one server counted as two.
    """
    ip = numeric_ip(host)
    if ip is None or not ip.is_unspecified:
        return None
    loopback = "127.0.0.1" if ip.version == 4 else "::1"
    return (f"{host} is not an address to connect to (on Linux it reaches this machine's "
            f"loopback): write {loopback} for this machine, or the backend's own address")


def default_backend_name(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


# --------------------------------------------------------------------------- the loader


class _Reader:
    """Walks a mapping by path, collecting problems instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}" if path else message)

    def mapping(self, value: Any, path: str, allowed: set[str]) -> dict[str, Any] | None:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.problem(path, f"must be a mapping, got {_kind(value)}")
            return None
        for key in value:
            if key not in allowed:
                hint = _closest(str(key), allowed)
                extra = f" (did you mean {hint!r}?)" if hint else ""
                self.problem(_join(path, str(key)), f"unknown key{extra}")
        return value

    def get(self, m: Mapping[str, Any], key: str, path: str, conv: Callable[[Any], T],
            default: T) -> T:
        if key not in m or m[key] is None:
            return default
        try:
            return conv(m[key])
        except (ValueError, TypeError) as exc:
            self.problem(_join(path, key), str(exc))
            return default


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    kinds: dict[type, str] = {list: "a list", dict: "a mapping", str: "a string"}
    return kinds.get(type(value), repr(value))


def _closest(key: str, allowed: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return match[0] if match else None


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"must be a whole number, got {v!r}")
        if lo is not None and v < lo:
            raise ValueError(f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise ValueError(f"must be <= {hi}, got {v}")
        return v
    return conv


def _fraction(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"must be a number between 0 and 1, got {v!r}")
    if not 0 <= v <= 1:
        raise ValueError(f"must be between 0 and 1, got {v}")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")
    return v


def _text(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"must be a non-empty string, got {v!r}")
    return v.strip()


def _positive_duration(v: Any) -> float:
    d = parse_duration(v)
    if d <= 0:
        raise ValueError(f"must be greater than 0, got {v!r}")
    return d


_TOP_KEYS = {"listen", "admin", "guard", "pools", "routes", "drain_timeout", "admin_token",
             "access_log", "resolver", "client", "tls"}
_CLIENT_KEYS = {"header_timeout", "body_timeout", "keepalive_timeout", "send_timeout",
                "max_clients", "max_body_size", "max_header_size", "max_url_size", "max_headers"}
_TLS_KEYS = {"cert", "key"}
_ACCESS_LOG_KEYS = {"enabled", "record", "digest_key"}
_BACKEND_TLS_KEYS = {"ca", "verify", "server_name"}
_GUARD_KEYS = {"max_share", "min_backends", "max_share_after_failure", "live_margin",
               "live_window", "live_min_requests", "probation"}
_POOL_KEYS = {"strategy", "backends", "max_connections", "queue_timeout", "health_check",
              "outlier_detection", "panic_threshold", "timeouts", "retries",
              "allow_concentration", "backend_tls"}
_BACKEND_KEYS = {"url", "name", "weight", "backup", "max_connections", "discovery",
                 "resolve_interval"}
_HEALTH_KEYS = {"path", "interval", "timeout", "healthy_threshold", "unhealthy_threshold",
                "expect_status"}
_OUTLIER_KEYS = {"consecutive_failures", "base_ejection", "max_ejection", "max_ejected_fraction"}
_TIMEOUT_KEYS = {"connect", "read"}
_ROUTE_KEYS = {"host", "path_prefix", "pool"}


def load_config(path: str | Path) -> Config:
    """Read and parse a YAML file; raises ConfigError with every problem found."""
    return parse_config_text(read_config(path), path)


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


def parse_config_text(text: str, path: str | Path) -> Config:
    """Parse the YAML ``text`` read from ``path`` (plug-ins may sit next to it)."""
    source = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{source}: {where}invalid YAML: {problem}"], source) from None
    # Plug-in strategies ("module:Class") may sit next to the config file. Appended, not
    # prepended, so that a file there never shadows an installed module.
    here = str(Path(path).resolve().parent)
    added = here not in sys.path
    if added:
        sys.path.append(here)
    try:
        return parse_config(data, source)
    finally:
        if added:
            sys.path.remove(here)


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Turn already-loaded YAML data into a Config, or raise ConfigError with every problem."""
    r = _Reader()
    top = r.mapping(data, "", _TOP_KEYS)
    if top is None:
        raise ConfigError([f"{source}: the config must be a mapping at the top level"], source)
    d = defaults(Config)
    listen = r.get(top, "listen", "", lambda v: parse_address(v, d["listen"].host), d["listen"])
    admin = r.get(top, "admin", "", lambda v: parse_address(v, d["admin"].host), d["admin"])
    drain = r.get(top, "drain_timeout", "", parse_duration, d["drain_timeout"])
    admin_token = r.get(top, "admin_token", "", _text, d["admin_token"])
    resolver = _resolver(r, top.get("resolver"))
    guard = _guard(r, top.get("guard"))
    pools = _pools(r, top.get("pools"))
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
                  access_log=access_log, resolver=resolver, client=client, tls=tls)


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


def _access_log(r: _Reader, raw: Any, pools: Mapping[str, PoolConfig]) -> AccessLogConfig:
    record: tuple[str, ...]
    if raw is None or isinstance(raw, bool):
        enabled, record, secret = raw is not False, (), None
    elif isinstance(raw, dict):
        a = r.mapping(raw, "access_log", _ACCESS_LOG_KEYS) or {}
        enabled = r.get(a, "enabled", "access_log", _bool, True)
        secret = r.get(a, "digest_key", "access_log", _text, None)
        record = _record(r, a.get("record"))
    else:
        r.problem("access_log", f"must be true, false or a mapping (enabled, record, "
                                f"digest_key), got {_kind(raw)}")
        return AccessLogConfig()
    labels = {name: _labels((*_hash_key(pool), *record)) for name, pool in pools.items()}
    return AccessLogConfig(enabled, record, secret,
                           MappingProxyType({n: ls for n, ls in labels.items() if ls}))


def _record(r: _Reader, raw: Any) -> tuple[str, ...]:
    """``access_log.record``: labels in the consistent_hash key forms, checked by its parser."""
    from balancer.strategies.consistent_hash import ConsistentHash  # as _strategy does

    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.problem("access_log.record", f"must be a list like [\"header:X-Tenant\", "
                                       f"\"cookie:session\"], got {_kind(raw)}")
        return ()
    out = []
    for i, item in enumerate(raw):
        try:
            kind, name = ConsistentHash.parse_key(item)
        except (TypeError, ValueError) as exc:
            r.problem(f"access_log.record[{i}]", str(exc))
            continue
        out.append(f"{kind}:{name}" if name is not None else kind)
    return tuple(out)


def _hash_key(pool: PoolConfig) -> tuple[str, ...]:
    """The label of a pool's consistent_hash key (``header:x-tenant``), if it has one."""
    from balancer.strategies import resolve_strategy
    from balancer.strategies.consistent_hash import ConsistentHash

    try:
        cls = resolve_strategy(pool.strategy.name)
        if not issubclass(cls, ConsistentHash):
            return ()
        kind, name = ConsistentHash.parse_key(pool.strategy.options.get("key", "client_ip"))
    except (ImportError, AttributeError, ValueError, TypeError):
        return ()  # reported by _strategy
    return (f"{kind}:{name}",) if name is not None else ()


def _labels(labels: tuple[str, ...]) -> tuple[str, ...]:
    """What a line must carry: header and cookie inputs, once each. ``client_ip`` and ``path``
    are in every line already, and ``header:host`` is the line's ``host``."""
    return tuple(dict.fromkeys(label for label in labels
                               if label.startswith(("header:", "cookie:"))
                               and label != "header:host"))


def _client(r: _Reader, raw: Any) -> ClientConfig:
    c = r.mapping(raw, "client", _CLIENT_KEYS)
    d = ClientConfig()
    if c is None:
        return d
    return ClientConfig(
        header_timeout=r.get(c, "header_timeout", "client", _positive_duration,
                             d.header_timeout),
        body_timeout=r.get(c, "body_timeout", "client", _positive_duration, d.body_timeout),
        keepalive_timeout=r.get(c, "keepalive_timeout", "client", _positive_duration,
                                d.keepalive_timeout),
        send_timeout=r.get(c, "send_timeout", "client", _positive_duration, d.send_timeout),
        max_clients=r.get(c, "max_clients", "client", _int(1), d.max_clients),
        max_body_size=r.get(c, "max_body_size", "client", parse_size, d.max_body_size),
        max_header_size=r.get(c, "max_header_size", "client", _size_between(1024, 1 << 20),
                              d.max_header_size),
        max_url_size=r.get(c, "max_url_size", "client", _size_between(256, 1 << 20),
                           d.max_url_size),
        max_headers=r.get(c, "max_headers", "client", _int(8, 10_000), d.max_headers),
    )


def _size_between(lo: int, hi: int) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        n = parse_size(v)
        if not lo <= n <= hi:
            raise ValueError(f"must be between {lo} and {hi} bytes, got {v!r}")
        return n
    return conv


def _tls(r: _Reader, raw: Any) -> TlsConfig | None:
    """``tls: {cert, key}``: both files must load as a pair now, not at the first handshake."""
    if raw is None:
        return None
    t = r.mapping(raw, "tls", _TLS_KEYS)
    if t is None:
        return None
    cert = r.get(t, "cert", "tls", _text, None)
    key = r.get(t, "key", "tls", _text, None)
    for name, value in (("cert", cert), ("key", key)):
        if value is None and name not in t:
            r.problem(f"tls.{name}", "is required: a PEM file")
    if cert is None or key is None:
        return None
    from balancer.tls import TlsError, check_server_pair

    try:
        check_server_pair(cert, key)
    except TlsError as exc:
        r.problem("tls", str(exc))
        return None
    return TlsConfig(cert=cert, key=key)


def _backend_tls(r: _Reader, raw: Any, path: str,
                 backends: tuple[BackendConfig, ...]) -> BackendTlsConfig:
    t = r.mapping(raw, path, _BACKEND_TLS_KEYS)
    d = BackendTlsConfig()
    if t is None or not t:
        return d
    tls = BackendTlsConfig(
        ca=r.get(t, "ca", path, _text, d.ca),
        verify=r.get(t, "verify", path, _bool, d.verify),
        server_name=r.get(t, "server_name", path, _text, d.server_name),
    )
    if not any(b.scheme == "https" for b in backends) and backends:
        r.problem(path, "applies to https:// backends, and this pool has none")
    if tls.ca is not None:
        if not tls.verify:
            r.problem(f"{path}.ca", "is not used with verify: false (choose one)")
        else:
            from balancer.tls import TlsError, check_ca_file

            try:
                check_ca_file(tls.ca)
            except TlsError as exc:
                r.problem(f"{path}.ca", str(exc))
    return tls


def _resolver(r: _Reader, raw: Any) -> tuple[Address, ...]:
    """``resolver: ["10.0.0.2:53", "[fd00::53]:53"]``: nameservers by IP (port 53 if omitted)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        r.problem("resolver", f"must be a non-empty list of \"ip:port\" nameservers, got "
                              f"{_kind(raw)}")
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
    if _is_ip(bare):
        return Address(bare, 53)
    try:
        addr = parse_address(v)
    except ValueError:
        addr = None
    if addr is None or not _is_ip(addr.host):
        raise ValueError(f"must be a nameserver's IP address, optionally with a port, like "
                         f"10.0.0.2 or 10.0.0.2:53 (a name would need a resolver itself), "
                         f"got {v!r}")
    return addr


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _guard(r: _Reader, raw: Any) -> GuardConfig:
    g = r.mapping(raw, "guard", _GUARD_KEYS)
    d = GuardConfig()
    if g is None:
        return d
    max_share = r.get(g, "max_share", "guard", _fraction, d.max_share)
    if max_share == 0:
        r.problem("guard.max_share", "must be greater than 0")
    return GuardConfig(
        max_share=max_share,
        min_backends=r.get(g, "min_backends", "guard", _int(1), d.min_backends),
        max_share_after_failure=r.get(g, "max_share_after_failure", "guard", _fraction,
                                      d.max_share_after_failure),
        live_margin=r.get(g, "live_margin", "guard", _fraction, d.live_margin),
        live_window=r.get(g, "live_window", "guard", _positive_duration, d.live_window),
        live_min_requests=r.get(g, "live_min_requests", "guard", _int(1), d.live_min_requests),
        probation=r.get(g, "probation", "guard", parse_duration, d.probation),
    )


def _pools(r: _Reader, raw: Any) -> dict[str, PoolConfig]:
    if raw is None:
        r.problem("pools", "is required: at least one pool of backends")
        return {}
    if not isinstance(raw, dict) or not raw:
        r.problem("pools", f"must be a mapping of pool names to pools, got {_kind(raw)}")
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


def _pool(r: _Reader, name: str, raw: Any, path: str) -> PoolConfig | None:
    p = r.mapping(raw, path, _POOL_KEYS)
    if p is None:
        return None
    d = defaults(PoolConfig)
    max_conn = r.get(p, "max_connections", path, _int(1), d["max_connections"])
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
        panic_threshold=r.get(p, "panic_threshold", path, _fraction, d["panic_threshold"]),
        timeouts=_timeouts(r, p.get("timeouts"), f"{path}.timeouts"),
        retries=r.get(p, "retries", path, _int(0, 10), d["retries"]),
        allow_concentration=r.get(p, "allow_concentration", path, _text,
                                  d["allow_concentration"]),
        backend_tls=backend_tls,
    )


def _strategy(r: _Reader, raw: Any, path: str) -> StrategyConfig:
    # Imported here: strategies import the model above, not the other way round.
    from balancer.strategies import resolve_strategy

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
        r.problem(path, f"must be a strategy name or a mapping with a name, got {_kind(raw)}")
        return StrategyConfig()
    try:
        cls = resolve_strategy(name)
    except (ImportError, AttributeError, ValueError) as exc:
        r.problem(path, str(exc))
        return StrategyConfig(name, MappingProxyType(options))
    # Each line names its option: "key: must be ...".
    for problem in cls.validate_options(options):
        r.problems.append(f"{path}.{problem}")
    return StrategyConfig(name, MappingProxyType(options))


def _backends(r: _Reader, raw: Any, path: str) -> tuple[BackendConfig, ...]:
    if raw is None:
        r.problem(path, "is required: a list of backends")
        return ()
    if not isinstance(raw, list):
        r.problem(path, f"must be a list of backends, got {_kind(raw)}")
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
        weight = r.get(b, "weight", bpath, _int(0, 10_000), d["weight"])
        backup = r.get(b, "backup", bpath, _bool, d["backup"])
        max_conn = r.get(b, "max_connections", bpath, _int(1), d["max_connections"])
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
        interval = r.get(b, "resolve_interval", bpath, _positive_duration, d["resolve_interval"])
        if discovery is None and "resolve_interval" in b:
            r.problem(f"{bpath}.resolve_interval", "only applies with discovery: dns")
        if discovery is not None and _is_ip(host):
            r.problem(f"{bpath}.url", f"discovery: dns needs a host name to resolve, got the "
                                      f"address {host!r}")
        # A discovered entry names the backends it finds ``<name>@<address>:<port>``.
        name = r.get(b, "name", bpath, _text,
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


def _health(r: _Reader, raw: Any, path: str) -> HealthCheckConfig | None:
    d = HealthCheckConfig()
    if raw is True:
        return d
    h = r.mapping(raw, path, _HEALTH_KEYS)
    if h is None:
        return None
    hc = HealthCheckConfig(
        path=r.get(h, "path", path, _text, d.path),
        interval=r.get(h, "interval", path, _positive_duration, d.interval),
        timeout=r.get(h, "timeout", path, _positive_duration, d.timeout),
        healthy_threshold=r.get(h, "healthy_threshold", path, _int(1), d.healthy_threshold),
        unhealthy_threshold=r.get(h, "unhealthy_threshold", path, _int(1),
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


def _outlier(r: _Reader, raw: Any, path: str) -> OutlierConfig:
    o = r.mapping(raw, path, _OUTLIER_KEYS)
    d = OutlierConfig()
    if o is None:
        return d
    return OutlierConfig(
        consecutive_failures=r.get(o, "consecutive_failures", path, _int(1),
                                   d.consecutive_failures),
        base_ejection=r.get(o, "base_ejection", path, _positive_duration, d.base_ejection),
        max_ejection=r.get(o, "max_ejection", path, _positive_duration, d.max_ejection),
        max_ejected_fraction=r.get(o, "max_ejected_fraction", path, _fraction,
                                   d.max_ejected_fraction),
    )


def _timeouts(r: _Reader, raw: Any, path: str) -> TimeoutsConfig:
    t = r.mapping(raw, path, _TIMEOUT_KEYS)
    d = TimeoutsConfig()
    if t is None:
        return d
    return TimeoutsConfig(
        connect=r.get(t, "connect", path, _positive_duration, d.connect),
        read=r.get(t, "read", path, _positive_duration, d.read),
    )


def _routes(r: _Reader, raw: Any, pools: Mapping[str, PoolConfig]) -> tuple[RouteConfig, ...]:
    if raw is None:
        if len(pools) == 1:
            return (RouteConfig(pool=next(iter(pools))),)
        if pools:
            r.problem("routes", f"is required when there is more than one pool "
                                f"({', '.join(sorted(pools))})")
        return ()
    if not isinstance(raw, list) or not raw:
        r.problem("routes", f"must be a non-empty list of routes, got {_kind(raw)}")
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
        prefix = r.get(m, "path_prefix", path, _text, _ROUTE_DEFAULTS["path_prefix"])
        if not prefix.startswith("/"):
            r.problem(f"{path}.path_prefix", f"must start with '/', got {prefix!r}")
        out.append(RouteConfig(pool=pool, host=host, path_prefix=prefix))
    return tuple(out)


_ROUTE_DEFAULTS = defaults(RouteConfig)


def _host_pattern(v: Any) -> str:
    host = _text(v).lower()
    name_or_ip = r"(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d+)?|\[[0-9a-f:.]+\](:\d+)?"
    if not re.fullmatch(name_or_ip, host):
        raise ValueError(f"must be a host name like api.example.com or *.example.com, got {v!r}")
    return host
