"""A pool: backends, a strategy over them, and the rules for who may take a request.

The strategy proposes, the pool disposes: it walks the strategy's candidates and takes the first
that is in rotation and below its connection limit. Around that it keeps the rules that protect
backends: backups only when every primary is out, the panic threshold (when too few primaries
are healthy, spread over all of them rather than crush the survivors), the per-backend
``max_connections`` with a bounded wait for a slot, and passive ejection of failing backends.

The guard's simulation drives this same class with a simulated clock.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from typing import Callable, Collection, Iterable

from balancer.backend import Backend
from balancer.config import PoolConfig
from balancer.strategies import PickContext, Prepared, Strategy, build_strategy, prepare_strategy

log = logging.getLogger("balancer.pool")

#: ``Pool.prepare``'s result: prepared builds of the primary and the backup strategy.
PreparedPool = tuple[Prepared | None, Prepared | None]

#: How long the pool trusts its summary of backend availability before recounting (seconds).
STATE_TTL = 0.1


class NoBackend(Exception):
    """No backend can take the request. ``reason`` is ``no_backend`` or ``overload``."""

    def __init__(self, pool: str, reason: str) -> None:
        super().__init__(f"pool {pool}: {reason}")
        self.pool = pool
        self.reason = reason


class _Waiter:
    """A request queued for a slot: what it needs to pick, and where the backend goes."""

    __slots__ = ("future", "ctx", "exclude")

    def __init__(self, future: asyncio.Future[Backend], ctx: PickContext,
                 exclude: Collection[Backend]) -> None:
        self.future = future
        self.ctx = ctx
        self.exclude = exclude


class Pool:
    """Backends of one pool and the strategy that chooses among them."""

    def __init__(self, config: PoolConfig, backends: Iterable[Backend],
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 prepared: PreparedPool = (None, None)) -> None:
        self.rng = rng or random.Random()
        self.clock = clock
        # Requests waiting for a backend below its max_connections, oldest first.
        self._waiters: deque[_Waiter] = deque()
        self.panic = False
        # Requests this pool turned away, by NoBackend reason (read by metrics.py).
        self.rejected: dict[str, int] = {"no_backend": 0, "overload": 0}
        # Why DNS discovery keeps this pool's last good set (the guard refused the new one);
        # None when it does not. Exported as balancer_pool_concentrated (balancer/discovery.py).
        self.discovery_refused: str | None = None
        self.update(config, backends, prepared)

    # --- membership ----------------------------------------------------------------------

    @staticmethod
    def prepare(config: PoolConfig) -> PreparedPool:
        """The costly part of building the strategies for ``config``'s backends, from the
        config alone (their url and weight), so a reload does it off the loop (in its check
        process, balancer/checker.py)."""
        primary = tuple((b.url, b.weight) for b in config.backends if b.active)
        backup = tuple((b.url, b.weight) for b in config.backends if b.weight > 0 and b.backup)
        return (prepare_strategy(config.strategy, primary),
                prepare_strategy(config.strategy, backup) if backup else None)

    def update(self, config: PoolConfig, backends: Iterable[Backend],
               prepared: PreparedPool = (None, None)) -> None:
        """Take a new backend set (reload, discovery) while traffic flows.

        The strategies are rebuilt (cheaply, from ``prepare``'s work when the fleet did it
        ahead), then swapped in by plain assignment: a request in the middle of a pick keeps
        the old objects, the next one sees the new ones.
        """
        members = list(backends)
        primary = [b for b in members if b.weight > 0 and not b.backup]
        backup = [b for b in members if b.weight > 0 and b.backup]
        strategy = build_strategy(config.strategy, primary, self.rng, prepared[0])
        backup_strategy = (build_strategy(config.strategy, backup, self.rng, prepared[1])
                           if backup else None)
        self.config = config
        self.name = config.name
        self.backends: tuple[Backend, ...] = tuple(members)
        self.primary: tuple[Backend, ...] = tuple(primary)
        self.backup: tuple[Backend, ...] = tuple(backup)
        self.strategy: Strategy = strategy
        self.backup_strategy: Strategy | None = backup_strategy
        self._checked_at = -1.0
        self._wake()

    # --- choosing ------------------------------------------------------------------------

    def judge(self, now: float) -> tuple[int, bool, bool]:
        """(primaries in rotation, whether a backup is, whether that is panic) as of ``now``.

        Records and logs nothing, so readers (/status, /metrics) judge with it and reading
        changes no state; ``_refresh`` records the verdict (requests, the monitor's tick)."""
        primary = self.primary
        up = sum(1 for b in primary if b.available(now))
        backup_up = any(b.available(now) for b in self.backup)
        panic = bool(primary) and up < len(primary) * self.config.panic_threshold and not (
            up == 0 and backup_up)
        return up, backup_up, panic

    def _refresh(self, now: float) -> None:
        """Recount how many primaries are in rotation; enter or leave panic."""
        self._checked_at = now
        primary = self.primary
        up, _, panic = self.judge(now)
        self._primary_up = up
        if panic != self.panic:
            self.panic = panic
            if panic:
                log.warning("pool %s: panic: only %d of %d backends healthy (threshold %.0f%%);"
                            " spreading traffic over all of them", self.name, up, len(primary),
                            self.config.panic_threshold * 100)
            else:
                log.warning("pool %s: panic cleared: %d of %d backends healthy",
                            self.name, up, len(primary))

    def state_changed(self) -> None:
        """Health changed (probe verdict, ejection): recount now, so that entering or leaving
        panic is logged (and exported) when it happens, not at the next request."""
        self._refresh(self.clock())
        self._wake()

    def pick(self, ctx: PickContext, exclude: Collection[Backend] = ()) -> Backend:
        """The backend for this request, or NoBackend. Does not reserve a slot: see begin()."""
        now = self.clock()
        if now - self._checked_at >= STATE_TTL:
            self._refresh(now)
        overloaded = False
        primaries = bool(self._primary_up or self.panic)
        if primaries:
            panic = self.panic
            strategy = self.strategy
            rest: Iterable[Backend]
            if strategy.split:  # the first choice without a generator (round robin)
                first = strategy.first(ctx)
                rest = ()
                if first >= 0:
                    b = strategy.backends[first]
                    if (panic or b.available(now)) and b not in exclude:
                        if not b.full:
                            return b
                        overloaded = True
                    rest = strategy.after(first, ctx)
            else:
                rest = strategy.candidates(ctx)
            for b in rest:
                if (panic or b.available(now)) and b not in exclude:
                    if not b.full:
                        return b
                    overloaded = True
        # A retry (``exclude``) that has been through every primary in rotation may go to a
        # backup: a primary that just died must not cost the client an error while a backup
        # is up. (First attempts, and the guard's simulation, never get here with primaries.)
        if self.backup_strategy is not None and (not primaries or (exclude and not overloaded)):
            for b in self.backup_strategy.candidates(ctx):
                if b.available(now) and b not in exclude:
                    if not b.full:
                        return b
                    overloaded = True
        # Counted here, where the verdict is final, so that the proxy needs no bookkeeping of
        # its own: no backend at all, or all full with no queue to wait in. (A full pool with a
        # queue is counted by acquire() once the wait fails; a retry, with ``exclude``, is
        # answered with the first attempt's error and is not a rejection.)
        if not exclude and (not overloaded or self.config.queue_timeout <= 0):
            reason = "overload" if overloaded else "no_backend"
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
        raise NoBackend(self.name, "overload" if overloaded else "no_backend")

    async def acquire(self, ctx: PickContext, exclude: Collection[Backend] = ()) -> Backend:
        """pick() + begin(), waiting up to ``queue_timeout`` for a slot when all are full.

        A request turned away is counted in ``rejected`` by reason (see pick()).
        """
        try:
            b = self.pick(ctx, exclude)
        except NoBackend as exc:
            if exc.reason != "overload" or self.config.queue_timeout <= 0:
                raise
            try:
                return await self._wait_for_slot(ctx, exclude)
            except NoBackend as exc:
                if exc.reason == "overload" and not exclude:
                    self.rejected["overload"] = self.rejected.get("overload", 0) + 1
                raise
        self.begin(b)
        return b

    async def _wait_for_slot(self, ctx: PickContext, exclude: Collection[Backend]) -> Backend:
        """Queue for a slot. A freed slot is handed to the oldest waiter that can use it, and
        begun on its behalf in the same step (``_wake``), so a request arriving just then
        cannot take it first and starve the queue: waiting is first come, first served."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), ctx, exclude)
        self._waiters.append(waiter)
        timer = loop.call_later(self.config.queue_timeout, self._expire, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            # The client went away; if a slot was handed over meanwhile, give it back.
            f = waiter.future
            if f.done() and not f.cancelled() and f.exception() is None:
                self.release(f.result())
            raise
        finally:
            timer.cancel()
            if not waiter.future.done():
                waiter.future.cancel()
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.future.done():
            self._waiters.remove(waiter)
            waiter.future.set_exception(NoBackend(self.name, "overload"))

    def _wake(self, slots: int | None = None) -> None:
        """Hand free slots to waiting requests, oldest first, up to ``slots`` of them (all
        that fit when None: the backend set or health changed). A waiter that cannot use what
        is free (its retry excludes that backend) keeps its place; one for which the pool has
        no backend at all any more is turned away at once."""
        if not self._waiters:
            return
        for waiter in list(self._waiters):
            if waiter.future.done():
                continue
            try:
                b = self.pick(waiter.ctx, waiter.exclude)
            except NoBackend as exc:
                if exc.reason == "overload":
                    continue
                self._waiters.remove(waiter)
                waiter.future.set_exception(exc)
                continue
            self._waiters.remove(waiter)
            self.begin(b)
            waiter.future.set_result(b)
            if slots is not None:
                slots -= 1
                if slots <= 0:
                    return

    # --- accounting around a request -----------------------------------------------------

    def begin(self, backend: Backend) -> None:
        """A request is now in flight to ``backend``."""
        backend.in_flight += 1

    def finish(self, backend: Backend, status: int = 0, latency: float | None = None,
               error: str | None = None) -> None:
        """A request to ``backend`` ended: with an answer (``status``) or an ``error`` kind.

        Counts it, feeds latency to the strategies' view of the backend, keeps passive health
        (consecutive failures eject the backend for a backoff that doubles on each repeat),
        and hands a freed slot to a waiting request.
        """
        backend.in_flight -= 1
        now = self.clock()
        failures = backend.record(status, latency, error, now)
        if failures and failures >= self.config.outlier_detection.consecutive_failures:
            self._maybe_eject(backend, now, error or f"status {status}")
        if self._waiters:
            self._wake(1)

    def release(self, backend: Backend) -> None:
        """Give back a slot taken by begin() without a request having run (nothing counted)."""
        backend.in_flight -= 1
        if self._waiters:
            self._wake(1)

    def _maybe_eject(self, backend: Backend, now: float, reason: str) -> None:
        od = self.config.outlier_detection
        if backend.ejected_until > now:
            return
        ejected = sum(1 for b in self.backends if b.ejected_until > now)
        if ejected + 1 > len(self.backends) * od.max_ejected_fraction:
            return
        if backend.ejections and now - backend.ejected_until > od.max_ejection:
            # Well behaved for longer than the longest ejection since it last came back:
            # forgive the past, so the next ejection starts short again (Envoy does the same).
            backend.ejections = 0
        duration = min(od.base_ejection * (2 ** backend.ejections), od.max_ejection)
        backend.ejections += 1
        backend.ejected_until = now + duration
        backend.consecutive_failures = 0
        log.warning("pool %s: backend %s ejected for %.0fs after %d consecutive failures (%s)",
                    self.name, backend.name, duration, od.consecutive_failures, reason)
        self.state_changed()

    # --- reading -------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return sum(b.in_flight for b in self.backends)

    @property
    def waiting(self) -> int:
        """Requests queued for a slot below max_connections."""
        return len(self._waiters)

    def __repr__(self) -> str:
        now = self.clock()
        counts: dict[str, int] = {}
        for b in self.backends:
            s = b.state(now)
            counts[s] = counts.get(s, 0) + 1
        parts = ", ".join(f"{n} {s}" for s, n in counts.items())
        panic = " PANIC" if self.panic else ""
        return f"<Pool {self.name} [{parts} | {self.in_flight} in flight]{panic}>"
