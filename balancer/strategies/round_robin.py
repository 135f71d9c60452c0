"""Smooth weighted round robin, as nginx does it: weights honoured and interleaved.

Weights 5:1:1 give a a b a c a a, not a a a a a b c. The cycle is computed once at build time
(see ``weights.SmoothCycle``) so that the first candidate costs O(1).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from balancer.backend import Backend
from balancer.strategies.base import PickContext
from balancer.strategies.weights import SmoothCycle, WeightedStrategy, smooth_cycle

__all__ = ["RoundRobin", "smooth_cycle"]


class RoundRobin(WeightedStrategy):
    """Each backend in turn, ``weight`` turns per cycle, turns interleaved; when the chosen
    one is not ready, its turn goes to the others by weight."""

    name = "round_robin"

    def __init__(self, backends: Sequence[Backend], options: Mapping[str, Any],
                 rng: random.Random) -> None:
        super().__init__(backends, options, rng)
        self._cycle = SmoothCycle(self.weighted.weights, rng)

    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        if not self.backends:
            return
        first = self._cycle.next()
        yield self.backends[first]
        yield from self.others(first)
