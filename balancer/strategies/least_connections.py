"""Weighted least connections: the backend with the fewest requests in flight per unit of weight.

Ties matter more than the rule itself. Under sequential load every backend has 0 in flight at
every pick, so a scan that keeps the first minimum sends everything to the first backend
(Traefik's 3:1 weights turning into 10:0). Here the scan starts where a smooth weighted round
robin cycle points, and keeps the first strict minimum from there: when everything is tied the
choice *is* that round robin, so weights hold exactly; partial ties rotate.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from balancer.backend import Backend
from balancer.strategies.base import PickContext, Prepared
from balancer.strategies.weights import WeightedStrategy


class LeastConnections(WeightedStrategy):
    """Lowest ``in_flight / weight``; ties broken by smooth weighted round robin.

    The first candidate costs O(n): one pass over the backends, no allocation. Pools are
    small (tens of backends), where a pass is cheaper than keeping a heap in step with every
    begin/finish the pool does. Fallbacks sort the rest by load (O(n log n), rare path).
    """

    name = "least_connections"

    cycled = True

    def __init__(self, backends: Sequence[Backend], options: Mapping[str, Any],
                 rng: random.Random, prepared: Prepared | None = None) -> None:
        super().__init__(backends, options, rng, prepared)
        # Twice round, so a scan from any start is one contiguous range of indices.
        self._ring = self.backends + self.backends

    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        n = len(self.backends)
        if not n:
            return
        ring = self._ring
        start = self.cycle.next()
        best = ring[start]
        best_i = start
        # Compare in_flight/weight exactly, by cross-multiplying integers.
        bf, bw = best.in_flight, best.weight
        for i in range(start + 1, start + n):
            b = ring[i]
            if b.in_flight * bw < bf * b.weight:
                best, best_i, bf, bw = b, i, b.in_flight, b.weight
        yield best
        yield from self._rest(best_i % n)

    def _rest(self, first: int) -> Iterator[Backend]:
        """The others, least loaded first; ties in weighted random order, so that a backend
        that is not ready spreads its requests by weight instead of onto one neighbour."""
        backends = self.backends
        order = self.weighted.shuffled(self.rng, (first,))
        order.sort(key=lambda i: backends[i].in_flight / backends[i].weight)  # stable
        for i in order:
            yield backends[i]
