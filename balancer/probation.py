"""Probation: after every applied reload, watch the pools it changed and undo it if one of them
becomes concentrated.

The guard judges a config file; outages come from traffic. A hash key clients never send, or a
health-check path only one backend serves, passes the guard and then puts all traffic on one
server. So for ``guard.probation`` (default 30 s) after a reload (SIGHUP, ``POST /reload``,
``--watch``, a DNS discovery change) every pool whose config changed is judged by the live
rules on the traffic since the reload:

- **share**: one backend took more than ``max_share + live_margin`` of at least
  ``live_min_requests`` requests since the reload (with the monitor's 3-sigma Wilson bound, so
  sampling noise never fires it);
- **rotation**: fewer than ``min_backends`` backends in rotation (monitor.rotation_shortfall).

A pool that was already concentrated when the reload came is not judged (the change did not
cause that), nor is one with ``allow_concentration`` (the config asks for it; the guard only
warns, and so does the monitor). Whether the *change* caused a new concentration is told
apart from a backend that died during probation like this (``blame``):

1. The backends that were in rotation at the reload and are out now are the suspects. One that
   the new config removed, or that fails the new health check but passes the previous one
   (probed once, now), or that the previous config did not health-check at all, left because
   of the change. Any other (down by an unchanged check, ejected by live failures) left on its
   own: the *environment*.
2. Rotation: the previous config, with only the environment's losses, would still have
   ``min_backends`` in rotation → the change is to blame. Otherwise the previous config would
   be as short, and nothing is rolled back.
3. Share: with no environmental loss, the previous config served this traffic evenly before the
   reload, so the change is to blame. With one, the previous pool is simulated without the lost
   backends (the guard's simulation): if it would concentrate the same way, nothing is rolled
   back.

When the change is to blame, the app restores the previous config by the same path as a reload
(App.rollback). Everything here is bookkeeping on a clock passed in, and ``blame`` takes the
probe and the simulation as functions, so it is tested with fakes and through ``balancer run``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from balancer.backend import Backend, backend_key
from balancer.config import Config, HealthCheckConfig, PoolConfig
from balancer.loading import Applied
from balancer.monitor import Monitor, rotation_shortfall, serving, share_reason, wilson_lower
from balancer.pool import Pool

log = logging.getLogger("balancer.probation")

#: Seconds between two looks at the changed pools.
TICK = 0.5

Probe = Callable[[Backend, HealthCheckConfig], Awaitable[tuple[bool, str]]]
"""One health probe of a backend with given settings: (passed, reason)."""
Simulate = Callable[[Config, PoolConfig], Awaitable[float]]
"""The top simulated share of a pool under a config (the guard's simulation, off the loop)."""


@dataclass(frozen=True)
class Finding:
    """A changed pool concentrated during probation: which way, and one line for people."""

    pool: str
    cause: str  # "share" or "rotation"
    reason: str


@dataclass
class _Before:
    """One pool at the moment of the reload."""

    in_rotation: set[Hashable]
    concentrated: bool
    counts: dict[Hashable, int] = field(default_factory=dict)


def changed_pools(old: Config, new: Config) -> list[str]:
    """Pools of ``new`` whose behaviour the change can alter: their own config, the routes
    that lead to them, or the guard's settings differ."""
    if old.guard != new.guard:
        return list(new.pools)

    def routes(config: Config, name: str) -> list[Any]:
        return [r for r in config.routes if r.pool == name]

    return [name for name, pool in new.pools.items()
            if old.pools.get(name) != pool or routes(old, name) != routes(new, name)]


class Probation:
    """One applied reload on probation. ``outcome`` resolves to ``kept`` or ``rolled_back``."""

    def __init__(self, previous: Applied, config: Config, pools: Mapping[str, Pool],
                 monitor: Monitor, now: float, wall: float) -> None:
        """Snapshot the live ``pools`` *before* ``config`` is applied."""
        self.previous = previous
        self.config = config
        self.pools = changed_pools(previous.config, config)
        self.started = now
        self.until = now + config.guard.probation
        self.until_wall = wall + config.guard.probation
        self.outcome: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future())
        self._told: set[tuple[str, str]] = set()
        self._before: dict[str, _Before] = {}
        for name in self.pools:
            pool = pools.get(name)
            up: set[Hashable] = ({b.key for b in pool.primary if b.available(now)} if pool
                                 else set())
            was = monitor.concentration(name) is not None or bool(
                pool is not None and pool.discovery_refused)
            self._before[name] = _Before(up, was)

    def started_counting(self, pools: Mapping[str, Pool]) -> None:
        """Right after the apply: each changed pool's request counters, to count from."""
        for name in self.pools:
            pool = pools.get(name)
            if pool is not None:
                self._before[name].counts = {b.key: b.requests_total for b in pool.backends}

    @property
    def over(self) -> bool:
        return self.outcome.done()

    def summary(self) -> dict[str, Any]:
        """What /status shows while it runs."""
        return {"until": self.until_wall, "pools": list(self.pools)}

    # --- judging -------------------------------------------------------------------------

    def findings(self, pools: Mapping[str, Pool], now: float) -> list[Finding]:
        """Changed pools concentrated now that were not at the reload."""
        guard = self.config.guard
        out = []
        for name in self.pools:
            pool, before = pools.get(name), self._before[name]
            if pool is None or before.concentrated or pool.config.allow_concentration:
                continue  # not the change's doing, or concentration the config asks for
            short = rotation_shortfall(pool, guard.min_backends, now)
            if short is not None:
                out.append(Finding(name, "rotation", short[1]))
                continue
            if serving(pool, now) < 2:
                continue
            counts = {b.key: b.requests_total - before.counts.get(b.key, 0)
                      for b in pool.backends}
            total = sum(counts.values())
            if total < guard.live_min_requests:
                continue
            top = max(counts, key=counts.__getitem__)
            share = counts[top] / total
            if wilson_lower(share, total) > guard.max_share + guard.live_margin:
                who = next(b.name for b in pool.backends if b.key == top)
                out.append(Finding(name, "share",
                                   share_reason(name, who, share, total, guard.max_share)))
        return out

    async def blame(self, finding: Finding, pools: Mapping[str, Pool], now: float,
                    probe: Probe, simulate: Simulate) -> tuple[bool, str]:
        """(the change caused ``finding``, why): see the module's docstring."""
        old = self.previous.config
        old_pool = old.pools.get(finding.pool)
        pool = pools.get(finding.pool)
        if old_pool is None or pool is None:
            return True, "the pool is new in this config"
        guard = self.config.guard
        environment = await self._left_on_their_own(pool, old_pool, now, probe)
        if finding.cause == "rotation":
            old_up = {backend_key(b) for b in old_pool.backends if b.active
                      and backend_key(b) in self._before[finding.pool].in_rotation
                      and backend_key(b) not in environment}
            if len(old_up) >= guard.min_backends:
                return True, (f"the previous config would have {len(old_up)} backends in "
                              f"rotation")
            return False, ("the previous config would be short of backends too ("
                           + ", ".join(sorted(environment.values())) + " left rotation)")
        if not environment:
            return True, "no backend left rotation since the reload"
        remaining = tuple(b for b in old_pool.backends if backend_key(b) not in environment)
        if not remaining:
            return False, "every backend of the previous config left rotation"
        top = await simulate(old, replace(old_pool, backends=remaining))
        if top > guard.max_share + guard.live_margin:
            return False, (f"the previous config would concentrate too without "
                           f"{', '.join(sorted(environment.values()))} ({top:.0%})")
        return True, (f"the previous config would spread this traffic even without "
                      f"{', '.join(sorted(environment.values()))} ({top:.0%} at most)")

    async def _left_on_their_own(self, pool: Pool, old_pool: PoolConfig, now: float,
                                 probe: Probe) -> dict[Hashable, str]:
        """Backends in rotation at the reload and out now, not because of the change:
        key → name."""
        was_up = self._before[pool.name].in_rotation
        new_hc, old_hc = pool.config.health_check, old_pool.health_check
        out: dict[Hashable, str] = {}
        for b in pool.primary:
            if b.key not in was_up or b.available(now) or b.draining:
                continue
            if not b.healthy and new_hc != old_hc:
                if old_hc is None:
                    continue  # the previous config did not health-check it: it would serve
                passed, _ = await probe(b, old_hc)
                if passed:
                    continue  # fails only the new check: the change's doing
            out[b.key] = b.name
        return out

    def tell_once(self, finding: Finding, text: str) -> None:
        """Log that a concentration is not the change's doing, once per pool and cause."""
        key = (finding.pool, finding.cause)
        if key not in self._told:
            self._told.add(key)
            log.warning("probation: %s; not rolling back: %s", finding.reason, text)
