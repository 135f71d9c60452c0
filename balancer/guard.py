"""The concentration guard: refuse a config that would send too much traffic to one backend.

Pure functions over a parsed ``Config`` that return *every* violation, not just the first.
The share a backend would receive is not computed from weights by a formula: the pool's real
strategy (a plug-in too) is run inside a real ``Pool`` on a seeded, synthetic stream of varied
requests with a simulated clock, so a strategy is judged by what it does. The same simulation
answers "if this backend fails, who takes its traffic?".

Used by ``balancer check`` and, before a config goes live, by ``run`` and every reload.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from balancer.config import BackendConfig, Config, PoolConfig, RouteConfig
from balancer.gil import give_way
from balancer.sameserver import resolve_hosts, servers_of
from balancer.simulation import SEED, Simulation, simulating
from balancer.strategies import PickContext, resolve_strategy

#: A share may exceed its limit by this much and still pass: a share equal to the limit (two
#: equal backends at 50%) passes, and the sampling noise of randomised strategies (one standard
#: deviation is 0.65 points for a fair coin over REQUESTS; this is three) cannot flip a verdict.
TOLERANCE = 0.02
#: Requests per simulated pass, and how many overlap in the concurrent pass.
REQUESTS = 6000
CONCURRENCY = 16
#: Mean service time (simulated seconds) and the slowdown of the one backend that is slow at a
#: time; the slow one rotates so every backend is slow equally long and latency-aware strategies
#: must both react and recover.
SERVICE_TIME = 0.010
SLOWDOWN = 1.5
ROTATIONS = 2


@dataclass(frozen=True)
class GuardReport:
    """The verdict on a config: refusals, warnings, and the simulated shares behind them."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: pool → backend name → simulated share of the pool's traffic (0.0 for unused backends)
    shares: dict[str, dict[str, float]] = field(default_factory=dict)
    #: pool → (failed backend, the backend taking the most, its share), None when not computed
    worst_failure: dict[str, tuple[str, str, float] | None] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The config may load."""
        return not self.errors


def evaluate(config: Config, *, resolve: bool = True) -> GuardReport:
    """Every concentration problem of ``config``. ``resolve=False`` skips DNS look-ups."""
    report = GuardReport()
    reached = _reaching_routes(config.routes)
    hosts = {b.host for p in config.pools.values() for b in p.backends}
    addresses = resolve_hosts(hosts) if resolve else {}
    for name, pool in config.pools.items():
        where = f"pools.{name}"
        routes = reached.get(name, [])
        if not routes:
            report.warnings.append(f"{where}: no route reaches this pool; it gets no traffic")
        hint = _hash_key_hint(pool, routes)
        if hint is not None:
            report.warnings.append(f"{where}: {hint}")
        servers, unresolved = servers_of(pool.backends, addresses, resolve)
        report.warnings.extend(
            f"{where}: backend {b.name}: host {b.host!r} does not resolve here; "
            f"compared with the other backends by name only" for b in unresolved)
        report.worst_failure[name] = None
        try:
            refusals = _judge_pool(config, pool, routes, servers, report)
        except Exception as exc:  # noqa: BLE001 - a plug-in that raises here raises live too
            report.errors.append(f"{where}: strategy {pool.strategy.name!r} failed on simulated "
                                 f"traffic: {type(exc).__name__}: {exc}")
            continue
        for text in refusals:
            if pool.allow_concentration:
                report.warnings.append(f"{where}: ALLOWED CONCENTRATION: {text}; accepted because "
                                       f"allow_concentration: {pool.allow_concentration!r}")
            else:
                report.errors.append(f"{where}: {text}")
    return report


def _judge_pool(config: Config, pool: PoolConfig, routes: Sequence[RouteConfig],
                servers: dict[str, object], report: GuardReport) -> list[str]:
    """Simulate one pool (filling its shares and worst failure in ``report``); its refusals."""
    traffic = synthetic_traffic(pool, routes)
    try:
        return _judge_traffic(config, pool, routes, servers, report, traffic)
    finally:
        release(traffic)


def _judge_traffic(config: Config, pool: PoolConfig, routes: Sequence[RouteConfig],
                   servers: dict[str, object], report: GuardReport,
                   traffic: Sequence[PickContext]) -> list[str]:
    """``_judge_pool`` on its synthetic ``traffic``."""
    g = config.guard
    shares, sequential = _worst_pass(pool, traffic)
    report.shares[pool.name] = shares
    if not any(shares.values()) and any(b.weight for b in pool.backends):
        raise RuntimeError("it chose no backend for any request")
    refusals = _min_backends(pool, servers, shares, g.min_backends)
    refusals += _duplicates(pool, servers, shares)
    refusals += _fixed_hash_key(pool, routes, shares)
    refusals += _concentration(shares, g.max_share, sequential)
    if len(_servers_active(pool, servers)) < 2:
        return refusals  # nothing to fail over to: already refused, or explicitly allowed
    worst = report.worst_failure[pool.name] = _worst_failure(pool, traffic)
    limit = g.max_share_after_failure
    if worst is not None and limit is not None and worst[2] > limit + TOLERANCE:
        refusals.append(f"if {worst[0]} fails, {worst[1]} takes {pct(worst[2])} of traffic "
                        f"(guard.max_share_after_failure {pct(limit)})")
    return refusals


# --------------------------------------------------------------------------- the rules


def _min_backends(pool: PoolConfig, servers: dict[str, object], shares: dict[str, float],
                  minimum: int) -> list[str]:
    """Fewer distinct active servers than ``guard.min_backends``."""
    active = _servers_active(pool, servers)
    if len(active) >= minimum:
        return []
    if not active:
        return [("no active backend (every backend is a backup or has weight 0); "
                 f"guard.min_backends is {minimum}")]
    names = [b.name for b in pool.backends if b.active]
    if len(active) == 1:
        total = sum(shares.get(n, 0.0) for n in names)
        who = (f"backend {names[0]}" if len(names) == 1
               else f"{_and(names)} are one server, which")
        return [(f"only 1 distinct active backend: {who} would receive {pct(total)} of "
                 f"traffic; guard.min_backends is {minimum}")]
    return [(f"only {len(active)} distinct active backends ({_and(names)}); "
             f"guard.min_backends is {minimum}")]


def _and(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]


def _servers_active(pool: PoolConfig, servers: dict[str, object]) -> set[object]:
    """The distinct servers behind a pool's active backends."""
    return {servers[b.name] for b in pool.backends if b.active}


def _duplicates(pool: PoolConfig, servers: dict[str, object],
                shares: dict[str, float]) -> list[str]:
    """Two entries that reach the same server: its real share is their sum."""
    groups: dict[object, list[BackendConfig]] = {}
    for b in pool.backends:
        if b.weight > 0:
            groups.setdefault(servers[b.name], []).append(b)
    out = []
    for members in groups.values():
        if len(members) > 1:
            total = sum(shares.get(b.name, 0.0) for b in members)
            urls = ", ".join(dict.fromkeys(b.url for b in members))
            out.append(f"backends {_and([b.name for b in members])} are the same server ({urls});"
                       f" together they would receive {pct(total)} of traffic")
    return out


def _concentration(shares: dict[str, float], max_share: float, sequential: bool) -> list[str]:
    when = " when requests arrive one at a time" if sequential else ""
    return [f"backend {n} would receive {pct(s)} of traffic{when} (max_share {pct(max_share)})"
            for n, s in shares.items() if s > max_share + TOLERANCE]


def _fixed_hash_key(pool: PoolConfig, routes: Sequence[RouteConfig],
                    shares: dict[str, float]) -> list[str]:
    """A consistent-hash key that every request shares sends every request to one backend."""
    key = _hash_key(pool)
    if key is None:
        return []
    kind, name = key
    if not (kind == "header" and name.lower() == "host" and _hosts_pinned(routes)):
        return []
    hosts = sorted({r.host or "" for r in routes})
    spread = ("every request hashes alike" if len(hosts) == 1
              else f"requests hash to at most {len(hosts)} backends")
    top = max(shares, key=shares.__getitem__)
    return [(f"consistent_hash key header:{name} only takes the values the routes to this pool "
            f"pin ({', '.join(hosts)}), so {spread}; {top} would receive {pct(shares[top])} "
            f"of traffic")]


def _hosts_pinned(routes: Sequence[RouteConfig]) -> bool:
    """Every route to the pool names one exact host: its requests carry only those."""
    return bool(routes) and all(r.host and not r.host.startswith("*.") for r in routes)


def _hash_key_hint(pool: PoolConfig, routes: Sequence[RouteConfig]) -> str | None:
    """What simulated traffic cannot show about a hash key: how real requests carry it."""
    key = _hash_key(pool)
    if key is None:
        return None
    kind, name = key
    written = str(pool.strategy.options.get("key", "client_ip")).strip()  # as the config has it
    see = "see how real traffic splits with balancer check --replay LOG"
    if not pool.strategy.options.get("balance_factor"):
        see = f"balance_factor (e.g. 1.25) bounds any one backend's load; {see}"
    if kind == "client_ip":
        return (f"consistent_hash key client_ip: clients behind one NAT or proxy (or a CDN "
                f"edge) share an address, and so one backend; {see}")
    if kind == "path":
        return (f"consistent_hash key path: requests for one path share one backend, so a site "
                f"where most requests are for / sends most of them to one; {see}")
    if name.lower() == "host":  # pinned by the routes: refused by _fixed_hash_key instead
        return None if _hosts_pinned(routes) else (
            f"consistent_hash key {written}: a site served under one name sends every "
            f"request to one backend; {see}")
    return (f"consistent_hash key {written}: requests without it fall back to the client "
            f"address, and clients behind one NAT or proxy share one backend; {see}")


def _hash_key(pool: PoolConfig) -> tuple[str, str] | None:
    """(kind, name) of the pool's consistent-hash key, or None for other strategies."""
    try:
        from balancer.strategies.consistent_hash import ConsistentHash
    except ImportError:
        return None
    try:
        cls = resolve_strategy(pool.strategy.name)
    except (ImportError, AttributeError, ValueError):
        return None
    if not issubclass(cls, ConsistentHash):
        return None
    return _parse_key(ConsistentHash, pool.strategy.options.get("key", "client_ip"))


def _parse_key(cls: type, raw: object) -> tuple[str, str] | None:
    """The strategy's own key parser, normalised to (kind, name). A constant key never gets
    here: the parser refuses it when the config loads. None for a form the guard does not
    know (a subclass's own kind), which the simulation alone then judges."""
    try:
        kind, name = cls.parse_key(raw)  # type: ignore[attr-defined]
    except (ValueError, TypeError):
        return None
    if kind in ("client_ip", "path", "header", "cookie"):
        return kind, name or ""
    return None


# --------------------------------------------------------------------------- routes


def _reaching_routes(routes: Sequence[RouteConfig]) -> dict[str, list[RouteConfig]]:
    """Pool → the routes that can send it traffic (first match wins: later twins are dead)."""
    out: dict[str, list[RouteConfig]] = {}
    for i, route in enumerate(routes):
        if not any(_covers(earlier, route) for earlier in routes[:i]):
            out.setdefault(route.pool, []).append(route)
    return out


def _covers(a: RouteConfig, b: RouteConfig) -> bool:
    """Every request ``b`` matches is matched by ``a`` (conservatively: only clear cases)."""
    if a.host is not None and a.host != b.host:
        return False
    pa, pb = a.path_prefix, b.path_prefix
    return pa == "/" or pa == pb or pb.startswith(pa.rstrip("/") + "/")


# --------------------------------------------------------------------------- simulation

class _Synthetic(PickContext):
    """A synthetic request whose headers are a dict already (as ``header`` indexes raw ones). A
    dict of strings is not tracked by the collector; the 8 header tuples of a request were:
    6,000 requests were 54,000 objects for young collections (in a reload's thread) to scan
    and move into the middle generation, whose collections then scanned them again (~3 ms)."""

    __slots__ = ()

    def __init__(self, client_ip: str, path: str, method: str,
                 headers: dict[str, str]) -> None:
        super().__init__(client_ip, path, method)
        self._headers = headers


_WORDS = ("home", "cart", "api", "search", "img", "user", "items", "login", "static", "feed")


def synthetic_traffic(pool: PoolConfig, routes: Sequence[RouteConfig] = (),
                      count: int = REQUESTS, seed: int = SEED) -> list[PickContext]:
    """Varied requests as the pool's routes would deliver them.

    Client addresses, paths, user and session headers and cookies all vary (whatever a hash
    key names, it sees many values) except where a route pins them: a pool reached only by
    routes for exact hosts sees only those ``Host`` values, and paths start with a route prefix.
    """
    rng = random.Random(seed)
    pinned = [r.host for r in routes if r.host and not r.host.startswith("*.")]
    fixed_hosts = pinned if routes and len(pinned) == len(routes) else None
    prefixes = [r.path_prefix.rstrip("/") for r in routes] or [""]
    key = _hash_key(pool)
    extra_header = key[1] if key and key[0] == "header" and key[1].lower() != "host" else None
    by_host = bool(key and key[0] == "header" and key[1].lower() == "host")
    extra_cookie = key[1] if key and key[0] == "cookie" else None
    out: list[PickContext] = []
    for i in range(count):
        if not i & 15:
            give_way()  # beside the serving loop (balancer/gil.py)
        n = rng.getrandbits(32)
        ip = (f"10.{n >> 24}.{(n >> 16) & 255}.{n & 255}" if i % 8
              else f"2001:db8::{n >> 16:x}:{n & 0xffff:x}")
        if fixed_hosts:
            host = rng.choice(fixed_hosts)
        elif by_host:  # hashed on Host: as many values as the other keys get, or 50 sites'
            host = f"site{rng.getrandbits(32):x}.example.com"  # noise would decide the verdict
        else:
            host = f"site{rng.randrange(50)}.example.com"
        path = (f"{rng.choice(prefixes)}/{rng.choice(_WORDS)}/{rng.randrange(100_000)}"
                f"?q={rng.randrange(1000)}")
        user, session = rng.randrange(1_000_000), rng.getrandbits(48)
        cookie = f"session={session:x}; theme={'dark' if n & 1 else 'light'}"
        if extra_cookie:
            cookie += f"; {extra_cookie}={rng.getrandbits(40):x}"
        headers = {  # as PickContext.header indexes raw headers: lower-cased, the first wins
            "host": host,
            "user-agent": f"client/{rng.randrange(40)}.{rng.randrange(10)}",
            "x-user-id": str(user),
            "x-session-id": f"{session:x}",
            "x-request-id": f"{rng.getrandbits(64):016x}",
            "authorization": f"Bearer t{rng.getrandbits(48):x}",
            "cookie": cookie,
        }
        if extra_header:
            headers.setdefault(extra_header.lower(), f"v{rng.getrandbits(40):x}")
        out.append(_Synthetic(ip, path, "GET" if n % 5 else "POST", headers))
    return out


def simulate(pool: PoolConfig, traffic: Sequence[PickContext], *, concurrency: int,
             down: str | None = None, seed: int = SEED) -> dict[str, float]:
    """Each backend's share of ``traffic`` sent through a real Pool with the pool's strategy.

    A discrete-event loop: ``concurrency`` requests are in flight at once (a closed loop: each
    completion lets the next request in), service times vary per request and per backend,
    and every outcome is reported back through ``pool.finish`` so that stateful strategies
    (connection counts, latency) see what live traffic would show them. ``down`` names a
    backend marked unhealthy, as a failed health check would.
    """
    with simulating():
        return _run(pool, traffic, concurrency, down, seed)


def _run(pool: PoolConfig, traffic: Sequence[PickContext], concurrency: int,
         down: str | None, seed: int) -> dict[str, float]:
    sim = Simulation(pool, down, seed)
    backends = sim.backends
    rng = random.Random(seed + concurrency)
    total, issued = len(traffic), 0
    phase = max(1, total // (len(backends) * ROTATIONS))
    pick, start, held = sim.pick, sim.start, sim.held
    while issued < total:
        if len(held) >= concurrency:
            sim.finish_next()
            continue
        b = pick(traffic[issued])
        issued += 1
        if b is None:
            continue  # nobody can take it: not counted for anyone
        slow = backends[((issued - 1) // phase) % len(backends)] is b
        latency = SERVICE_TIME * rng.uniform(0.5, 1.5) * (SLOWDOWN if slow else 1.0)
        start(b, latency, latency)
    return sim.shares()


def _worst_pass(pool: PoolConfig, traffic: Sequence[PickContext],
                down: str | None = None) -> tuple[dict[str, float], bool]:
    """The more concentrated of a concurrent and a sequential pass, and whether it was the
    sequential one: at low load, ties in a stateful strategy decide everything."""
    concurrent = simulate(pool, traffic, concurrency=CONCURRENCY, down=down)
    sequential = simulate(pool, traffic, concurrency=1, down=down)
    if max(sequential.values(), default=0.0) > max(concurrent.values(), default=0.0):
        return sequential, True
    return concurrent, False


def _worst_failure(pool: PoolConfig,
                   traffic: Sequence[PickContext]) -> tuple[str, str, float] | None:
    """Take each active backend out in turn; the case that loads one survivor the most.

    Each case runs on half the requests: it costs two passes per backend, and its verdict
    (``max_share_after_failure``) is about shares far from an even split.
    """
    worst: tuple[str, str, float] | None = None
    half = traffic[: len(traffic) // 2]
    for failed in (b.name for b in pool.backends if b.active):
        shares, _ = _worst_pass(pool, half, down=failed)
        shares.pop(failed, None)
        if not shares:
            continue
        taker = max(shares, key=shares.__getitem__)
        if worst is None or shares[taker] > worst[2]:
            worst = (failed, taker, shares[taker])
    return worst


def simulated_top_share(config: Config, pool: PoolConfig) -> float:
    """The largest share any backend of ``pool`` takes on simulated traffic under ``config``'s
    routes (probation asks it of the previous config, with the backends that died removed)."""
    routes = _reaching_routes(config.routes).get(pool.name, [])
    traffic = synthetic_traffic(pool, routes)
    try:
        shares, _ = _worst_pass(pool, traffic)
    finally:
        release(traffic)
    return max(shares.values(), default=0.0)


def release(items: list[PickContext]) -> None:
    """Free synthetic requests a few hundred at a time, giving way between (balancer/gil.py):
    dropped at once, 6,000 of them took 2-4 ms to free, holding the GIL the loop waits for."""
    while items:
        del items[-256:]
        give_way()


# --------------------------------------------------------------------------- formatting


def pct(share: float) -> str:
    """``0.5`` → ``50%``, ``1/3`` → ``33.3%``: whole numbers stay whole."""
    value = share * 100
    return f"{value:.0f}%" if abs(value - round(value)) < 0.05 else f"{value:.1f}%"


def _whole(share: float) -> str:
    return f"{share * 100:.0f}%"


def format_shares(report: GuardReport) -> str:
    """Per pool, each backend's simulated share, and the worst single failure."""
    lines = []
    for pool, shares in report.shares.items():
        lines.append(f"pool {pool}")
        width = max((len(n) for n in shares), default=0)
        for name, share in shares.items():
            lines.append(f"  {name:<{width}}  {_whole(share):>4}")
        worst = report.worst_failure.get(pool)
        if worst is not None:
            lines.append(f"  worst single failure: if {worst[0]} fails, {worst[1]} takes "
                         f"{pct(worst[2])}")
    return "\n".join(lines)


#: Under a share diff that marks any row: what the mark means.
DIFF_LEGEND = "* share changed"


def format_diff(old: GuardReport | None, new: GuardReport) -> str:
    """Each backend's share before → after (``web1  33% → 100%  *``); added and removed
    shown; under it, when any row is marked, the legend of the mark."""
    before = old.shares if old is not None else {}
    lines = []
    for pool in list(new.shares) + [p for p in before if p not in new.shares]:
        a, b = before.get(pool), new.shares.get(pool)
        status = " (new pool)" if a is None else " (removed)" if b is None else ""
        lines.append(f"pool {pool}{status}")
        a, b = a or {}, b or {}
        names = list(a) + [n for n in b if n not in a]
        width = max((len(n) for n in names), default=0)
        for name in names:
            left = _whole(a[name]) if name in a else "new"
            right = _whole(b[name]) if name in b else "removed"
            mark = "" if left == right else "  *"
            lines.append(f"  {name:<{width}}  {left:>4} → {right}{mark}")
    if any(line.endswith("  *") for line in lines):
        lines.append(DIFF_LEGEND)
    return "\n".join(lines)
