"""Weighted random: each request goes to a backend drawn with probability weight/total.

Stateless, so it is the simplest strategy to reason about across many proxy processes: each
draws independently and the shares still add up. O(log n) per pick (bisect over precomputed
cumulative weights).
"""

from __future__ import annotations

from collections.abc import Iterator

from balancer.backend import Backend
from balancer.strategies.base import PickContext
from balancer.strategies.weights import WeightedStrategy


class WeightedRandom(WeightedStrategy):
    """A weighted draw; fallbacks are the others in weighted random order."""

    name = "random"

    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        if not self.backends:
            return
        first = self.weighted.draw(self.rng)
        yield self.backends[first]
        yield from self.others(first)
