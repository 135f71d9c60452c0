"""Weighting, written once and shared by the algorithms (an idea from pingora).

``Weights`` draws an index with probability weight/total in O(log n) (bisect over cumulative
weights, in C), draws a distinct second one for two-choice strategies, and orders the rest for
fallbacks. ``SmoothCycle`` is nginx's smooth weighted round robin, precomputed so that a step is
O(1). Both are built once per backend set and never allocate on the first pick.
``WeightedStrategy`` is the base the built-in strategies share: the weights, built once, and
fallbacks in weighted random order.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Container, Iterator, Mapping, Sequence
from itertools import accumulate
from typing import Any, ClassVar

from balancer.backend import Backend
from balancer.strategies.base import Members, Prepared, Strategy

#: Most work (cycle length × backends) spent precomputing a smooth cycle at build time; beyond
#: it (huge co-prime weights over many backends) each step runs nginx's O(n) step instead.
MAX_CYCLE_WORK = 1 << 18


class Weights:
    """Cumulative weights over indices ``0..n-1`` (all weights > 0)."""

    __slots__ = ("cumulative", "n", "total", "weights")

    def __init__(self, weights: Sequence[int]) -> None:
        self.weights: tuple[int, ...] = tuple(weights)
        self.cumulative: list[int] = list(accumulate(self.weights))
        self.total: int = self.cumulative[-1] if self.cumulative else 0
        self.n = len(self.weights)

    def draw(self, rng: random.Random) -> int:
        """One index, with probability weight/total (n ≥ 1)."""
        i = bisect_right(self.cumulative, rng.random() * self.total)
        return i if i < self.n else self.n - 1  # float rounding at the very top

    def draw_other(self, rng: random.Random, first: int) -> int:
        """An index other than ``first`` (n ≥ 2), with probability weight/(total − w[first]).

        ``first``'s interval is cut out of the line before drawing, so there is no rejection
        loop (which would spin when ``first`` carries nearly all the weight).
        """
        w = self.weights[first]
        x = rng.random() * (self.total - w)
        if x >= self.cumulative[first] - w:
            x += w
        j = bisect_right(self.cumulative, x)
        if j >= self.n:
            j = self.n - 1
        if j == first:  # only float rounding at an interval edge lands here
            j = first - 1 if first else first + 1
        return j

    def uniform_other(self, rng: random.Random, first: int) -> int:
        """An index other than ``first`` (n ≥ 2), each equally likely."""
        j = rng.randrange(self.n - 1)
        return j + 1 if j >= first else j

    def shuffled(self, rng: random.Random, skip: Container[int] = ()) -> list[int]:
        """The indices not in ``skip`` in weighted random order, without replacement.

        Efraimidis–Spirakis keys (u^(1/w), largest first): each next index is drawn with
        probability weight / weight still left. Fallbacks use it, so a backend that is not
        ready hands its traffic to the others in proportion to their weights, rather than
        to whichever happens to sit next to it.
        """
        weights = self.weights
        keyed = [(rng.random() ** (1.0 / weights[i]), i) for i in range(self.n) if i not in skip]
        keyed.sort(reverse=True)
        return [i for _, i in keyed]


def smooth_cycle(weights: Sequence[int], length: int) -> list[int]:
    """Indices picked by smooth weighted round robin over ``length`` steps (ties: lowest)."""
    total = sum(weights)
    current = [0] * len(weights)
    indices = range(len(weights))
    out = []
    for _ in range(length):
        for i in indices:
            current[i] += weights[i]
        best = max(indices, key=current.__getitem__)
        current[best] -= total
        out.append(best)
    return out


def _reduced(weights: Sequence[int]) -> list[int]:
    g = math.gcd(*weights) if weights else 1
    return [w // g for w in weights]


class SmoothCycle:
    """nginx's smooth weighted round robin: 5:1:1 gives a a b a c a a, interleaved, not bursts.

    The whole cycle (sum of weights / their gcd) is computed once, so ``next()`` is O(1);
    when that would be too much work it falls back to nginx's O(n) step per call.
    """

    __slots__ = ("_current", "_cycle", "_len", "_pos", "_total", "_weights")

    def __init__(self, weights: Sequence[int], rng: random.Random,
                 cycle: list[int] | None = None) -> None:
        """``cycle``: ``SmoothCycle.precompute(weights)``, when done ahead (off the loop)."""
        reduced = _reduced(weights)
        length = sum(reduced)
        self._weights = reduced
        self._total = length
        self._current = [0] * len(reduced)
        self._cycle = cycle if cycle is not None else self.precompute(weights)
        self._len = length
        # Start at a random point of the cycle so that many proxies (or workers) do not move in
        # lockstep and send their first requests to the same backend.
        self._pos = rng.randrange(length) if length else 0
        if self._cycle is None:
            for _ in range(self._pos % 1024):
                self._step()

    @staticmethod
    def precompute(weights: Sequence[int]) -> list[int] | None:
        """The whole cycle for ``weights``, or None when it is too much work to keep."""
        reduced = _reduced(weights)
        length = sum(reduced)
        if length and length * len(reduced) <= MAX_CYCLE_WORK:
            return smooth_cycle(reduced, length)
        return None

    def next(self) -> int:
        """The next index of the cycle (n ≥ 1)."""
        cycle = self._cycle
        if cycle is None:
            return self._step()
        pos = self._pos
        self._pos = pos + 1 if pos + 1 < self._len else 0
        return cycle[pos]

    def _step(self) -> int:
        current, weights = self._current, self._weights
        for j, w in enumerate(weights):
            current[j] += w
        i = max(range(len(weights)), key=current.__getitem__)
        current[i] -= self._total
        return i


class WeightedStrategy(Strategy):
    """A strategy over ``self.weighted`` (its backends' weights, index for index); with
    ``cycled`` set, also a smooth weighted round robin over them (``self.cycle``), whose
    precomputed cycle is the costly part of the build."""

    #: Keeps ``self.cycle`` (round robin, least connections' tie-break).
    cycled: ClassVar[bool] = False

    def __init__(self, backends: Sequence[Backend], options: Mapping[str, Any],
                 rng: random.Random, prepared: Prepared | None = None) -> None:
        super().__init__(backends, options, rng)
        self.weighted = Weights([b.weight for b in self.backends])
        if self.cycled:
            self.cycle = SmoothCycle(self.weighted.weights, rng, self.precomputed(prepared))

    @classmethod
    def precompute(cls, members: Members, options: Mapping[str, Any]) -> Any:
        return SmoothCycle.precompute([w for _, w in members]) if cls.cycled else None

    def others(self, *skip: int) -> Iterator[Backend]:
        """The backends not in ``skip``, in weighted random order: the fallbacks. A backend
        that is not ready thus hands its requests to the rest in proportion to their weights,
        rather than to whichever happens to be listed next to it (which would double that
        one's load)."""
        backends = self.backends
        for i in self.weighted.shuffled(self.rng, skip):
            yield backends[i]
