"""Peak-EWMA, latency-aware (the idea of Finagle and linkerd): prefer backends that answer fast
and have little in flight, judged by two random choices.

Each backend's ``ewma`` is its peak-EWMA latency (``Backend.record``: jumps up to a
slow sample at once, decays towards faster ones). For two candidates the pool computes

    cost = ewma × (1 + in_flight / weight) / weight

and takes candidate *a* over *b* with probability cost_b / (cost_a + cost_b): ties are coin
flips weighted by cost, never a fixed winner.

Why not Finagle's hard rule (lowest ``ewma × (in_flight + 1) / weight`` always wins)? At low
load that rule is decided by the ``+1`` and the latency alone: with weights 3:1 and equal
latencies the heavier backend wins every pair and takes 100%, and with real (noisy) latencies
whichever measured faster last takes everything until its estimate moves — the pile-on the
guard refuses. With the soft choice below, and the first candidate drawn by weight and the
second uniformly among the others, every backend's share is exactly weight/total whenever
latencies and load per weight are equal (idle or busy); a backend k times slower gets about k
times fewer requests, and one with many requests in flight is almost never chosen.
"""

from __future__ import annotations

from collections.abc import Iterator

from balancer.backend import Backend
from balancer.strategies.base import PickContext
from balancer.strategies.weights import WeightedStrategy


class PeakEwma(WeightedStrategy):
    """Two choices (one by weight, one uniform), chosen between in inverse proportion to cost.

    O(log n) per pick. A backend with no latency observed yet (``ewma == 0``) is assumed as
    fast as the other candidate, so a new backend is judged by load and weight alone until
    its first answer, neither shunned nor flooded.
    """

    name = "ewma"

    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        backends, rng = self.backends, self.rng
        if len(backends) < 2:
            yield from backends
            return
        i = self.weighted.draw(rng)
        j = self.weighted.uniform_other(rng, i)
        a, b = backends[i], backends[j]
        la = a.ewma or b.ewma or 1.0
        lb = b.ewma or la
        # cost = latency × (weight + in_flight) / weight²; choose a with probability
        # cost_b / (cost_a + cost_b), without dividing.
        ca = la * (a.weight + a.in_flight) * b.weight * b.weight
        cb = lb * (b.weight + b.in_flight) * a.weight * a.weight
        if rng.random() * (ca + cb) >= cb:
            i = j
        yield backends[i]
        yield from self.others(i)
