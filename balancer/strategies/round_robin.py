"""Smooth weighted round robin, as nginx does it: weights honoured and interleaved.

Weights 5:1:1 give a b a a c a a, not a a a a a b c. The cycle is computed once at build time
so that a pick is O(1); very long cycles (huge co-prime weights) fall back to nginx's O(n) step.
"""

from __future__ import annotations

import math
import random
from typing import Any, Iterator, Mapping, Sequence

from balancer.backend import Backend
from balancer.strategies.base import PickContext, Strategy

#: Longest precomputed cycle; beyond it each pick runs the O(n) smooth step.
MAX_CYCLE = 65_536


def smooth_cycle(weights: Sequence[int], length: int) -> list[int]:
    """Indices picked by smooth weighted round robin over ``length`` steps."""
    total = sum(weights)
    current = [0] * len(weights)
    out = []
    for _ in range(length):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=current.__getitem__)
        current[best] -= total
        out.append(best)
    return out


class RoundRobin(Strategy):
    name = "round_robin"

    def __init__(self, backends: Sequence[Backend], options: Mapping[str, Any],
                 rng: random.Random) -> None:
        super().__init__(backends, options, rng)
        weights = [b.weight for b in self.backends]
        g = math.gcd(*weights) if weights else 1
        cycle_len = sum(w // g for w in weights)
        self._current = [0] * len(weights)
        self._weights = weights
        self._total = sum(weights)
        self._cycle: list[int] | None = (
            smooth_cycle([w // g for w in weights], cycle_len) if cycle_len <= MAX_CYCLE else None
        )
        # Start at a random point of the cycle so that many proxies do not move in lockstep.
        self._pos = rng.randrange(cycle_len) if cycle_len else 0

    def _next_index(self) -> int:
        cycle = self._cycle
        if cycle is not None:
            i = cycle[self._pos]
            self._pos = (self._pos + 1) % len(cycle)
            return i
        current, weights = self._current, self._weights
        for j, w in enumerate(weights):
            current[j] += w
        i = max(range(len(weights)), key=current.__getitem__)
        current[i] -= self._total
        return i

    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        backends = self.backends
        n = len(backends)
        if not n:
            return
        first = self._next_index()
        yield backends[first]
        # The first choice was not ready: walk the others once, in ring order.
        for k in range(1, n):
            yield backends[(first + k) % n]
