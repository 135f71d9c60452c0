"""Smooth weighted round robin, as nginx does it: weights honoured and interleaved.

Weights 5:1:1 give a a b a c a a, not a a a a a b c. The cycle is computed once at build time
(see ``weights.SmoothCycle``) so that the first candidate costs O(1).
"""

from __future__ import annotations

from collections.abc import Iterator

from balancer.backend import Backend
from balancer.strategies.base import PickContext
from balancer.strategies.weights import WeightedStrategy, smooth_cycle

__all__ = ["RoundRobin", "smooth_cycle"]


class RoundRobin(WeightedStrategy):
    """Each backend in turn, ``weight`` turns per cycle, turns interleaved; when the chosen
    one is not ready, its turn goes to the others by weight."""

    name = "round_robin"

    cycled = True
    split = True

    def first(self, ctx: PickContext) -> int:
        return self.cycle.next() if self.backends else -1

    def after(self, first: int, ctx: PickContext) -> Iterator[Backend]:
        return self.others(first)
