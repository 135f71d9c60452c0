"""The guard's simulated traffic engine: a real Pool over real Backends on a simulated clock.

Used by the guard (balancer/guard.py: synthetic traffic, a closed loop) and by replay
(balancer/replay.py: recorded traffic, in log order). Kept apart so both drive the same loop.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from balancer.backend import Backend
from balancer.config import PoolConfig
from balancer.gil import give_way
from balancer.pool import NoBackend, Pool
from balancer.strategies import PickContext

__all__ = ["SEED", "Simulation", "simulating"]

#: Seed for the traffic stream and the strategies' randomness: same config, same numbers.
SEED = 20_261_127
#: The simulation asks every this many + 1 requests whether to let the event loop run (gil.py).
YIELD_EVERY = 15

_simulating = threading.local()


def _not_simulated(record: logging.LogRecord) -> bool:
    """Drop the log lines of simulated pools ("panic", "ejected"): they are not real events.
    Per thread, so a reload simulating in a worker thread never hides the live pools' lines."""
    return not getattr(_simulating, "active", False)


logging.getLogger("balancer.pool").addFilter(_not_simulated)

@contextmanager
def simulating() -> Iterator[None]:
    """Simulated pools' log lines ("panic", "ejected") are dropped meanwhile, in this thread."""
    _simulating.active = True
    try:
        yield
    finally:
        _simulating.active = False


class _Clock:
    """The simulated time, as the Pool reads it. Its own object, not a bound method of the
    Simulation: that would make Simulation → Pool → Simulation a cycle, so every pass's Pool,
    Backends and held requests (~90 objects a pass, 34 passes a check) would wait for the
    collector, whose next young collection then took 2 ms holding the GIL."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Simulation:
    """A real Pool over real Backends on a simulated clock (the guard's, and replay's).

    A request is picked, ``start``-ed for a simulated hold, and reported back through
    ``pool.finish`` with its latency when the clock reaches its end; ``counts`` is what each
    backend took. The clock only moves forward, to the end of a held request or to ``advance``.
    """

    __slots__ = ("clock", "backends", "pool", "counts", "held", "_seq", "_pick", "_begin")

    def __init__(self, pool: PoolConfig, down: str | None = None, seed: int = SEED) -> None:
        self.clock = _Clock()
        self.backends = [Backend(b, pool.name, pool.max_connections) for b in pool.backends]
        for b in self.backends:
            b.healthy = b.name != down
        self.pool = Pool(pool, self.backends, rng=random.Random(seed), clock=self.clock)
        self.counts = dict.fromkeys(self.backends, 0)
        self.held: list[tuple[float, int, Backend, float]] = []
        self._seq = 0
        self._pick, self._begin = self.pool.pick, self.pool.begin

    @property
    def now(self) -> float:
        """The simulated time (seconds since the start)."""
        return self.clock.now

    def pick(self, ctx: PickContext) -> Backend | None:
        """The backend ``ctx`` goes to; while every one is at max_connections, held requests
        finish first (as ``acquire`` waits). None when nothing can take it."""
        while True:
            try:
                return self._pick(ctx)
            except NoBackend as exc:
                if exc.reason != "overload" or not self.held:
                    return None
                self.finish_next()

    def start(self, backend: Backend, hold: float, latency: float) -> None:
        """``backend`` takes a request for ``hold`` seconds; ``latency`` is what finish hears."""
        self._begin(backend)
        self.counts[backend] += 1
        self._seq += 1
        if not self._seq & YIELD_EVERY:
            give_way()  # beside the serving loop: let it run (balancer/gil.py)
        heapq.heappush(self.held, (self.clock.now + hold, self._seq, backend, latency))

    def finish_next(self) -> None:
        """The held request due first finishes; the clock moves to its end."""
        self.clock.now, _, b, latency = heapq.heappop(self.held)
        self.pool.finish(b, status=200, latency=latency)

    def advance(self, when: float) -> None:
        """Move the clock to ``when``, finishing every request held until then."""
        held = self.held
        while held and held[0][0] <= when:
            self.finish_next()
        if when > self.clock.now:
            self.clock.now = when

    def shares(self) -> dict[str, float]:
        """Backend name → its fraction of the requests started (0.0 for none)."""
        served = sum(self.counts.values())
        return {b.name: (n / served if served else 0.0) for b, n in self.counts.items()}
