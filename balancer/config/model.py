"""The config model: frozen dataclasses, the one place a default is written.

Pure data: nothing here reads a file or imports a plug-in. balancer/config/parse.py builds
these from YAML data; every layer above reads them.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping


class ConfigError(Exception):
    """A config that cannot be loaded; ``problems`` holds one line per mistake."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(problems))


class UnreadableConfig(ConfigError):
    """The file itself cannot be read (missing, a directory, no permission): not a config's
    mistake, so ``balancer check`` answers it like a usage error (exit 2)."""




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
    #: Processes serving ``listen``: 1 serves in this process; N or ``"auto"`` (the cores this
    #: process may run on) start a supervisor and N workers (balancer/supervisor.py).
    workers: int | str = 1


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

