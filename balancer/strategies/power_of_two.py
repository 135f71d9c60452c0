"""Power of two choices: draw two backends by weight, send to the less loaded one.

Two random choices get most of least-connections' benefit (Mitzenmacher) at O(log n) per pick,
and, unlike a full scan, many proxy processes do not all rush to the same momentarily idle
backend. Load is ``in_flight / weight``. On a tie (always, under sequential load) the *first*
draw wins: it was itself drawn by weight, so ties are random and weights hold exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

from balancer.backend import Backend
from balancer.strategies.base import PickContext
from balancer.strategies.weights import WeightedStrategy


class PowerOfTwo(WeightedStrategy):
    """Two distinct weighted draws; fewer in flight per weight wins; ties to the first draw."""

    name = "power_of_two"

    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        backends, weighted, rng = self.backends, self.weighted, self.rng
        if len(backends) < 2:
            yield from backends
            return
        i = weighted.draw(rng)
        j = weighted.draw_other(rng, i)
        a, b = backends[i], backends[j]
        if b.in_flight * a.weight < a.in_flight * b.weight:
            i, j, a, b = j, i, b, a
        yield a
        yield b
        yield from self.others(i, j)
