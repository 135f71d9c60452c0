"""``balancer check --replay LOG``: judge a config on recorded traffic, not on simulated traffic.

The guard (balancer/guard.py) judges a config on varied synthetic requests, so it cannot see a
hash key that real clients never send, a site with one host, or a path that most requests
share: all of these send every request to one backend. Replay sends the requests of a real
log (balancer/replaylog.py reads it) through the config's real ``Router`` and, per pool, the
guard's ``Simulation``: a real ``Pool`` with the real strategy over real ``Backend`` objects on
a simulated clock. Requests go in log order, each held for the time the log recorded (so
least_connections and ewma see the load they would have), and the verdict uses the guard's
rules: a backend above ``guard.max_share`` (+ ``guard.TOLERANCE``), or fewer than
``guard.min_backends`` backends taking traffic, is a problem; ``allow_concentration`` turns it
into a warning. A pool with fewer than ``guard.live_min_requests`` requests is not judged.

What a strategy keys on: the client address, the path and the host are in every log line; a
header or cookie key is in ``keys`` as a digest when the config of the log recorded it (the
pool's hash key, or ``access_log.record``). Digests stand for the values: equal values hash
alike, and the distribution is what matters. A key the log never recorded counts as absent for
every request, as for clients that never send it, and the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

from balancer.config import Config
from balancer.guard import SERVICE_TIME, TOLERANCE, pct
from balancer.pool import Pool
from balancer.replaylog import LogReader, ReplayError, Request
from balancer.router import Router, host_without_port
from balancer.simulation import Simulation, simulating
from balancer.strategies import PickContext
from balancer.strategies.consistent_hash import ConsistentHash

__all__ = ["Replayer", "ReplayError", "judge", "replay", "run"]


class _Context(PickContext):
    """A PickContext whose headers are already a dict (the log's digests, and the host)."""

    __slots__ = ()

    def __init__(self, client_ip: str, path: str, method: str,  # noqa: D107
                 headers: dict[str, str]) -> None:  # no super(): one call less per line
        self.client_ip = client_ip
        self._path = path
        self._method = method
        self._raw = ()
        self._headers = headers
        self._cookies = None


class Replayer:
    """One config replayed: its router over one Simulation per pool, and what it counted."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.sims = {name: Simulation(pool) for name, pool in config.pools.items()}
        self._sim_of: dict[Pool, Simulation] = {s.pool: s for s in self.sims.values()}
        self.router = Router(config.routes, {name: s.pool for name, s in self.sims.items()})
        self.unrouted = 0
        self.unserved = dict.fromkeys(self.sims, 0)  # no backend could take them

    def feed(self, when: float, ctx: PickContext, host: bytes, path: bytes, hold: float,
             latency: float) -> None:
        """Route one request, let its pool pick at ``when``, hold the backend ``hold`` s."""
        pool = self.router.route(host, path)
        if pool is None:
            self.unrouted += 1
            return
        sim = self._sim_of[pool]
        sim.advance(when)
        backend = sim.pick(ctx)
        if backend is None:
            self.unserved[pool.name] += 1
        else:
            sim.start(backend, hold, latency)

    def counts(self, pool: str) -> dict[str, int]:
        """Backend name → requests it took in the replay."""
        return {b.name: n for b, n in self.sims[pool].counts.items()}

    def key_label(self, pool: str) -> str | None:
        """The ``keys`` label of a pool's header or cookie hash key (None: it has none)."""
        strategy = self.sims[pool].pool.strategy
        if isinstance(strategy, ConsistentHash) and strategy.key_kind in ("header", "cookie"):
            return f"{strategy.key_kind}:{strategy.key_name}"
        return None


def replay(configs: Sequence[Config], logs: Sequence[str], host: str | None,
           reader: LogReader) -> list[Replayer]:
    """Replay ``logs`` (in order) under each of ``configs`` at once; ReplayError for a log that
    cannot be read. ``host``: the host of requests whose line has none (nginx's format)."""
    replayers = [Replayer(c) for c in configs]
    default = host_without_port(host.strip().lower().encode("ascii", "replace")) if host else b""
    context = _Contexts(default)
    feeds = [r.feed for r in replayers]
    clock = 0.0
    with simulating():
        for path in logs:
            offset: float | None = None
            for req in reader.read(path):
                hold = req.hold
                start = req.when - (hold or 0.0)
                if offset is None:  # each log starts where the one before ended
                    offset = clock - start
                clock = max(clock, start + offset)
                ctx, host_b, path_b = context(req)
                held = hold if hold is not None else 0.0
                latency = req.latency if req.latency is not None else SERVICE_TIME
                for feed in feeds:
                    feed(clock, ctx, host_b, path_b, held, latency)
    return replayers


class _Contexts:
    """Makes what a strategy sees of a request (the digests stand for header and cookie
    values), and the host and path the router matches; labels and hosts parsed once each."""

    def __init__(self, default_host: bytes) -> None:
        self.default = default_host
        self.default_text = default_host.decode("latin-1")
        self._hosts: dict[str, bytes] = {}
        self._labels: dict[str, tuple[str, str]] = {}

    def __call__(self, req: Request) -> tuple[PickContext, bytes, bytes]:
        text = req.host
        if text is None:
            host, text = self.default, self.default_text
        else:
            cached = self._hosts.get(text)
            if cached is None:
                if len(self._hosts) > 10_000:
                    self._hosts.clear()
                cached = self._hosts[text] = text.encode("latin-1", "replace")
            host = cached
        headers: dict[str, str] = {"host": text} if text else {}
        keys = req.keys
        if keys:
            cookies = []
            for label, value in keys.items():
                if type(value) is str:
                    parsed = self._labels.get(label)
                    if parsed is None:
                        kind, _, name = label.partition(":")
                        parsed = self._labels[label] = (kind, name)
                    if parsed[0] == "header":
                        headers[parsed[1]] = value
                    elif parsed[0] == "cookie":
                        cookies.append(f"{parsed[1]}={value}")
            if cookies:
                headers["cookie"] = "; ".join(cookies)
        path = req.path
        if path[:1] != "/":  # absolute form, as the proxy routes it: the authority is the host
            path = "/" + path.partition("://")[2].partition("/")[2]
        return (_Context(req.client, path, req.method, headers), host,
                path.encode("latin-1", "replace"))


# --------------------------------------------------------------------------- the verdict


def judge(r: Replayer) -> tuple[list[str], list[str]]:
    """(problems, warnings) of one replayed config, by the guard's rules, one line each."""
    g = r.config.guard
    problems: list[str] = []
    warnings: list[str] = []
    for name, pool in r.config.pools.items():
        counts = r.counts(name)
        total = sum(counts.values())
        if total < g.live_min_requests:
            continue
        found = [f"backend {b} took {pct(n / total)} of {total} requests "
                 f"(max_share {pct(g.max_share)})"
                 for b, n in counts.items() if n / total > g.max_share + TOLERANCE]
        took = [b for b, n in counts.items() if n]
        if len(took) < g.min_backends:
            found.append(f"only {len(took)} backend{'s' if len(took) != 1 else ''} "
                         f"({', '.join(took)}) took the {total} requests "
                         f"(min_backends {g.min_backends})")
        for text in found:
            if pool.allow_concentration:
                warnings.append(f"replay: pool {name}: ALLOWED CONCENTRATION: {text}; accepted "
                                f"because allow_concentration: {pool.allow_concentration!r}")
            else:
                problems.append(f"replay: pool {name}: {text}")
    return problems, warnings


def _notes(r: Replayer, reader: LogReader, host: str | None) -> list[str]:
    """What the log could not show this config: unrecorded keys, missing hosts, few requests."""
    notes = []
    g = r.config.guard
    for name in r.config.pools:
        total = sum(r.counts(name).values())
        label = r.key_label(name)
        if total and label == "header:host":
            if not reader.hosts and not host:
                notes.append(f"pool {name}: the log has no host and no --host was given: every "
                             f"request counts as without a Host header")
        elif total and label is not None and label not in reader.labels:
            notes.append(f"pool {name}: the log never recorded {label} (access_log.record): "
                         f"every request counts as without it, so the key falls back to the "
                         f"client address")
        if 0 < total < g.live_min_requests:
            notes.append(f"pool {name}: {total} requests, too few to judge "
                         f"(guard.live_min_requests {g.live_min_requests})")
        if r.unserved[name]:
            notes.append(f"pool {name}: {r.unserved[name]} requests found no backend")
    return notes


def _table(new: Replayer, old: Replayer | None) -> list[str]:
    """Per pool, each backend's requests and share (before → after with ``old``)."""
    lines = []
    pools = list(new.config.pools) + [p for p in (old.config.pools if old else ()) if
                                      p not in new.config.pools]
    for pool in pools:
        after = new.counts(pool) if pool in new.sims else {}
        before = old.counts(pool) if old is not None and pool in old.sims else None
        n_after, n_before = sum(after.values()), sum((before or {}).values())
        head = f"pool {pool}: {n_after} requests"
        if before is not None or old is not None:
            head = f"pool {pool}: {n_before} → {n_after} requests"
        lines.append(head)
        names = list(before or {}) + [n for n in after if n not in (before or {})]
        width = max((len(n) for n in names), default=0)
        for name in names:
            right = _cell(after, name, n_after)
            if old is None:
                lines.append(f"  {name:<{width}}  {right}")
            else:
                left = _cell(before or {}, name, n_before)
                mark = "  *" if left.split()[0] != right.split()[0] else ""
                lines.append(f"  {name:<{width}}  {left} → {right}{mark}")
    return lines


def _cell(counts: dict[str, int], name: str, total: int) -> str:
    if name not in counts:
        return "   -"
    n = counts[name]
    return f"{(n / total if total else 0.0) * 100:3.0f}% ({n})"


def run(new: Config, logs: Sequence[str], *, host: str | None = None, old: Config | None = None,
        new_name: str = "NEW", old_name: str = "OLD", out: TextIO, err: TextIO) -> int:
    """Replay ``logs`` under ``new`` (and ``old``), print the shares and every problem of
    ``new``: 0 when it passes, 1 when it concentrates, 2 when a log cannot be read."""
    reader = LogReader()
    try:
        replayers = replay([new] if old is None else [new, old], logs, host, reader)
    except ReplayError as exc:
        print(f"replay: {exc}", file=err)
        return 2
    r_new = replayers[0]
    r_old = replayers[1] if old is not None else None
    problems, warnings = judge(r_new)
    for line in problems:
        print(line, file=err)
    for line in warnings:
        print(f"warning: {line}", file=err)
    print(f"\nreplay of {', '.join(logs)}: {reader.requests} requests ({reader.json} balancer "
          f"JSON, {reader.combined} nginx combined), {reader.skipped} other lines skipped, "
          f"{r_new.unrouted} routed nowhere", file=out)
    for note in _notes(r_new, reader, host):
        print(f"  note: {note}", file=out)
    if r_old is not None:
        print(f"replayed shares before ({old_name}) → after ({new_name}):", file=out)
    print("\n".join(_table(r_new, r_old)), file=out)
    verdict = "accepted" if not problems else f"refused ({len(problems)} problem" \
                                              f"{'s' if len(problems) != 1 else ''})"
    print(f"{new_name}: replay {verdict}", file=out)
    return 1 if problems else 0
