"""Live traffic shares and concentration detection: noticing uneven traffic before a server falls.

The guard judges a config before it loads; this module watches what the loaded config really does.
Once a second it samples each backend's ``requests_total`` (a plain counter the pool bumps
anyway, so the request path pays nothing) and keeps the per-second deltas for a sliding window
(``guard.live_window``, default 60 s). A backend's share is its requests in the window over its
pool's.

When is a pool *concentrated*? The rule, chosen so that noise never fires it:

- **by rotation** (health checks, passive ejection, discovery): a pool with at least
  ``guard.min_backends`` distinct active backends configured but fewer than that in rotation
  (healthy and not ejected) is concentrated at once, whatever its traffic: that is the
  postmortem itself (a maintenance change, a health-check path only one backend serves, and all
  traffic on one server). One warning names the cause (``pool web: 2 of 3 backends down (health
  check): all traffic on web1``); it clears when enough backends are back. The panic threshold
  still decides where traffic goes; this only makes sure someone is told.
- **by share**: the pool has two or more backends in rotation; backups count only while they
  serve, i.e. when no primary is in rotation;
- the window holds at least ``guard.live_min_requests`` requests of that pool;
- it **fires** when the 3-sigma Wilson lower bound of the top backend's share is above
  ``max_share + live_margin``: with ``max_share: 0.5`` that is "confidently above 55 %", so two
  equal backends hovering around 50 % never fire, not even on a small random sample, while a
  backend taking 90 % fires within a few seconds of traffic;
- it **clears** (hysteresis) when the top share falls to ``max_share + live_margin / 2`` or
  below (52.5 % in the example), or when fewer than two backends are left in rotation, or when
  the pool had no traffic at all for a whole window. Between the two lines, and while there are
  too few requests to judge, the state holds.

A pool with ``allow_concentration`` is judged like any other: the override lets such a config
load with a warning; live, it stays a warning too.

Each transition is logged once (one warning when it fires naming the pool, backend and share,
one when it clears). Everything here is pure bookkeeping driven by ``tick(pools, guard, now)``,
so tests run it with a fake clock; ``MonitorService`` is the thin asyncio loop around it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

from balancer.appview import AppView
from balancer.backend import LATENCY_BUCKETS, Backend
from balancer.config import GuardConfig
from balancer.pool import Pool

log = logging.getLogger("balancer.monitor")

#: Seconds between samples of the backends' counters.
SAMPLE_INTERVAL = 1.0
#: Standard deviations of confidence needed before concentration fires.
Z = 3.0


@dataclass(frozen=True, slots=True)
class Concentration:
    """A pool whose live traffic sits on one backend: who, how much, since when."""

    pool: str
    backend: str
    share: float
    requests: int
    since: float
    #: ``share`` (one backend above the live line) or ``rotation`` (too few backends in rotation)
    cause: str = "share"
    #: One line for people: what is concentrated and why.
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Series:
    """A pool's per-sample request counts over the live window, for the dashboard's chart.

    ``times`` are unix times (the monitor's clock shifted by the wall clock at the last sample,
    so their spacing is the monotonic one); ``counts[key][i]`` is what backend ``key`` answered
    in the second before ``times[i]``; ``names`` the backends' names as last seen.
    """

    times: list[float]
    counts: dict[Hashable, list[int]]
    names: dict[Hashable, str]


def bucket_quantile(counts: list[int], q: float) -> float | None:
    """The upper bound of the histogram bucket (``LATENCY_BUCKETS``, then +Inf) where the
    ``q`` quantile falls: "p99 at most 25 ms", not an interpolation. None for no samples."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = math.ceil(q * total)
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank:
            return LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else math.inf
    return math.inf


def wilson_lower(share: float, n: int, z: float = Z) -> float:
    """Lower bound of the Wilson score interval: how low ``share`` could truly be, given ``n``."""
    if n <= 0:
        return 0.0
    z2 = z * z
    centre = share + z2 / (2 * n)
    spread = z * math.sqrt(share * (1 - share) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n))


def serving(pool: Pool, now: float) -> int:
    """How many backends the pool spreads its traffic over right now, by the pool's own rules:
    the primaries in rotation (all of them in panic); the backups only when no primary is."""
    if pool.panic:
        return len(pool.primary)
    up = sum(1 for b in pool.primary if b.available(now))
    return up or sum(1 for b in pool.backup if b.available(now))


def share_reason(pool: str, backend: str, share: float, requests: int, max_share: float) -> str:
    """``pool web: web2 took 100% of 230 requests (max_share 50%)``."""
    return (f"pool {pool}: {backend} took {share:.0%} of {requests} requests "
            f"(max_share {max_share:.0%})")


def _in_rotation(pool: Pool, now: float) -> list[Backend]:
    return [b for b in pool.primary if b.available(now)]


def _distinct(backends: list[Backend]) -> dict[Hashable, Backend]:
    """One entry per server (two entries for one server are one backend for this rule)."""
    return {b.key: b for b in backends}


def rotation_shortfall(pool: Pool, min_backends: int,
                       now: float) -> tuple[list[Backend], str] | None:
    """(backends in rotation, one line of why) when a pool configured with at least
    ``min_backends`` distinct active backends has fewer than that in rotation; else None.

    In rotation means healthy, not ejected, not draining. The line names how many are out
    and why (``2 of 3 backends down (health check): all traffic on web1``).
    """
    configured = _distinct(list(pool.primary))
    if len(configured) < min_backends:
        return None  # the guard allowed fewer (allow_concentration): nothing new to say
    up = _in_rotation(pool, now)
    if len(_distinct(up)) >= min_backends:
        return None
    up_keys = {b.key for b in up}
    out = [b for b in configured.values() if b.key not in up_keys]
    causes: dict[str, int] = {}
    for b in out:
        cause = ("down (health check)" if not b.healthy else "draining" if b.draining
                 else "ejected (passive health)")
        causes[cause] = causes.get(cause, 0) + 1
    if len(causes) == 1:
        what = f"{len(out)} of {len(configured)} backends {next(iter(causes))}"
    else:
        what = (f"{len(out)} of {len(configured)} backends out of rotation ("
                + ", ".join(f"{n} {c}" for c, n in causes.items()) + ")")
    names = sorted(_distinct(up).values(), key=lambda b: b.name)
    if not names:
        where = "no backend in rotation"
    elif pool.panic:
        where = (f"panic: traffic spread over all {len(pool.primary)}, unhealthy ones too")
    else:
        where = "all traffic on " + ", ".join(b.name for b in names)
    return up, f"pool {pool.name}: {what}: {where} (guard.min_backends {min_backends})"


class _PoolWindow:
    """Per-second request deltas of one pool's backends, and their running sums."""

    __slots__ = ("concentration", "last", "lat_last", "lat_samples", "lat_sums", "names",
                 "samples", "share_from", "sums", "wall_offset")

    def __init__(self) -> None:
        self.samples: deque[tuple[float, dict[Hashable, int]]] = deque()
        self.sums: dict[Hashable, int] = {}
        # Last seen requests_total per Backend object (a replaced object restarts at 0).
        self.last: dict[Backend, int] = {}
        self.names: dict[Hashable, str] = {}
        self.concentration: Concentration | None = None
        # The share rule judges no earlier than this: a window that holds the time when too
        # few backends were in rotation shows their forced share, not the strategy's.
        self.share_from = 0.0
        # For the dashboard: latency histogram deltas beside the request deltas (same times),
        # and unix time minus the monitor's clock at the last sample (to date the samples).
        self.lat_samples: deque[tuple[float, dict[Hashable, list[int]]]] = deque()
        self.lat_sums: dict[Hashable, list[int]] = {}
        self.lat_last: dict[Backend, list[int]] = {}
        self.wall_offset = 0.0

    def add(self, backends: tuple[Backend, ...], now: float) -> None:
        delta: dict[Hashable, int] = {}
        last: dict[Backend, int] = {}
        for b in backends:
            total = b.requests_total
            before = self.last.get(b, total)  # a backend seen for the first time adds nothing
            d = total - before if total >= before else total
            last[b] = total
            self.names[b.key] = b.name
            if d:
                delta[b.key] = delta.get(b.key, 0) + d
                self.sums[b.key] = self.sums.get(b.key, 0) + d
        self.last = last
        self.samples.append((now, delta))
        self._add_latency(backends, now)

    def _add_latency(self, backends: tuple[Backend, ...], now: float) -> None:
        """Sample each backend's latency histogram deltas, as ``add`` does its request counts."""
        self.wall_offset = time.time() - now
        delta: dict[Hashable, list[int]] = {}
        last: dict[Backend, list[int]] = {}
        for b in backends:
            counts = b.latency_counts
            before = self.lat_last.get(b)
            last[b] = list(counts)
            if before is None:
                continue  # first sight: a baseline, as for requests
            d = [c - p for c, p in zip(counts, before)]
            if any(d):
                if min(d) < 0:  # a counter that went back: take what it holds now
                    d = list(counts)
                mine = delta.setdefault(b.key, [0] * len(d))
                sums = self.lat_sums.setdefault(b.key, [0] * len(d))
                for i, n in enumerate(d):
                    mine[i] += n
                    sums[i] += n
        self.lat_last = last
        self.lat_samples.append((now, delta))

    def expire(self, horizon: float) -> None:
        samples, sums = self.samples, self.sums
        while samples and samples[0][0] <= horizon:
            _, delta = samples.popleft()
            for k, d in delta.items():
                left = sums[k] - d
                if left:
                    sums[k] = left
                else:
                    del sums[k]
        lat, lat_sums = self.lat_samples, self.lat_sums
        while lat and lat[0][0] <= horizon:
            for k, counts in lat.popleft()[1].items():
                rest = [s - n for s, n in zip(lat_sums[k], counts)]
                if any(rest):
                    lat_sums[k] = rest
                else:
                    del lat_sums[k]

    @property
    def total(self) -> int:
        return sum(self.sums.values())


class Monitor:
    """Sliding-window traffic shares of every pool, and live concentration detection."""

    def __init__(self) -> None:
        self._pools: dict[str, _PoolWindow] = {}
        self.window = 60.0

    # --- sampling and judging ------------------------------------------------------------

    def tick(self, pools: Mapping[str, Pool], guard: GuardConfig, now: float) -> None:
        """Take one sample of every pool's counters and re-judge concentration."""
        self.window = guard.live_window
        for gone in set(self._pools) - set(pools):
            del self._pools[gone]
        for name, pool in pools.items():
            w = self._pools.get(name)
            if w is None:
                w = self._pools[name] = _PoolWindow()
            w.add(pool.backends, now)
            w.expire(now - guard.live_window)
            self._judge(pool, w, guard, now)

    def _judge(self, pool: Pool, w: _PoolWindow, guard: GuardConfig, now: float) -> None:
        pool.state_changed()  # panic is judged lazily on the request path: judge it now
        current = w.concentration
        short = rotation_shortfall(pool, guard.min_backends, now)
        if short is not None:
            up, why = short
            if current is None or current.cause != "rotation" or current.reason != why:
                if current is None or current.cause != "rotation":
                    log.warning("%s", why)
                w.concentration = Concentration(
                    pool.name, ", ".join(b.name for b in up), 1.0, w.total,
                    now if current is None or current.cause != "rotation" else current.since,
                    "rotation", why)
            return
        if current is not None and current.cause == "rotation":
            self._clear(pool.name, w, f"{len(_distinct(_in_rotation(pool, now)))} backends in "
                                      f"rotation again (guard.min_backends {guard.min_backends})")
            current = None
            w.share_from = now + guard.live_window
        in_rotation = serving(pool, now)
        total = w.total
        if in_rotation < 2 or total == 0:
            if current is not None:
                why = ("fewer than two backends in rotation" if in_rotation < 2
                       else "no traffic in the window")
                self._clear(pool.name, w, f"{why}")
            return
        top_key, top = max(w.sums.items(), key=lambda kv: kv[1])
        share = top / total
        if current is None:
            if total < guard.live_min_requests or now < w.share_from:
                return
            line = guard.max_share + guard.live_margin
            if wilson_lower(share, total) > line:
                name = w.names.get(top_key, str(top_key))
                why = share_reason(pool.name, name, share, total, guard.max_share)
                c = Concentration(pool.name, name, share, total, now, "share", why)
                w.concentration = c
                log.warning("pool %s: traffic concentrated: backend %s took %.0f%% of %d requests"
                            " in the last %.0fs (max_share %.0f%% + margin %.0f%%)",
                            pool.name, c.backend, share * 100, total, guard.live_window,
                            guard.max_share * 100, guard.live_margin * 100)
            return
        if share <= guard.max_share + guard.live_margin / 2:
            self._clear(pool.name, w, f"top backend now {w.names.get(top_key, top_key)} at"
                                      f" {share:.0%}")
        else:
            w.concentration = Concentration(
                pool.name, current.backend, share, total, current.since, "share",
                share_reason(pool.name, current.backend, share, total, guard.max_share))

    def _clear(self, pool: str, w: _PoolWindow, why: str) -> None:
        log.warning("pool %s: traffic concentration cleared (%s)", pool, why)
        w.concentration = None

    # --- reading (metrics, status, dashboard) --------------------------------------------

    def shares(self, pool: str) -> dict[Hashable, float]:
        """Each backend key's share of the pool's requests in the window (absent = none)."""
        w = self._pools.get(pool)
        if w is None:
            return {}
        total = w.total
        return {k: n / total for k, n in w.sums.items()} if total else {}

    def window_requests(self, pool: str) -> int:
        """How many of the pool's requests the window holds."""
        w = self._pools.get(pool)
        return w.total if w is not None else 0

    def concentration(self, pool: str) -> Concentration | None:
        """The pool's live concentration, or None while its traffic is spread."""
        w = self._pools.get(pool)
        return w.concentration if w is not None else None

    def series(self, pool: str) -> Series:
        """The pool's per-second request counts per backend over the window (read-only)."""
        w = self._pools.get(pool)
        if w is None:
            return Series([], {}, {})
        offset = w.wall_offset
        times = [t + offset for t, _ in w.samples]
        counts: dict[Hashable, list[int]] = {}
        for i, (_, delta) in enumerate(w.samples):
            for k, n in delta.items():
                row = counts.get(k)
                if row is None:
                    row = counts[k] = [0] * len(times)
                row[i] = n
        return Series(times, counts, dict(w.names))

    def latency_p99(self, pool: str) -> dict[Hashable, float]:
        """Each backend key's p99 upstream latency over the window, as the upper bound of the
        histogram bucket it falls in (``math.inf`` above the last bound); absent = no answers."""
        w = self._pools.get(pool)
        if w is None:
            return {}
        out = {}
        for k, counts in w.lat_sums.items():
            p99 = bucket_quantile(counts, 0.99)
            if p99 is not None:
                out[k] = p99
        return out


class MonitorService:
    """Runs ``Monitor.tick`` once a second over the app's current pools and guard settings."""

    def __init__(self, monitor: Monitor, clock: Callable[[], float] = time.monotonic) -> None:
        self.monitor = monitor
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        self._app: AppView | None = None

    async def start(self, app: AppView) -> None:
        self._app = app
        self._task = asyncio.create_task(self._run(), name="balancer-monitor")

    def on_reload(self, app: AppView) -> None:
        self._app = app  # pools and guard are read afresh on every tick

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            app = self._app
            try:
                if app is not None:
                    self.monitor.tick(app.pools, app.config.guard, self.clock())
            except Exception:  # a bug here must never stop the sampling for good
                log.exception("traffic monitor: sampling failed")
            await asyncio.sleep(SAMPLE_INTERVAL)
