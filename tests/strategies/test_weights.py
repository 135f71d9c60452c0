"""The shared weighting helpers: draws by weight, distinct second draws, weighted orders."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.strategies.weights import Weights

DRAWS = 20_000


def test_draw_follows_weights() -> None:
    w, rng = Weights([5, 3, 2]), random.Random(3)
    seen = Counter(w.draw(rng) for _ in range(DRAWS))
    # sd ≤ 0.0035 per share at 20k draws; 0.02 is more than five of them.
    for i, want in enumerate((0.5, 0.3, 0.2)):
        assert seen[i] / DRAWS == pytest.approx(want, abs=0.02)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(weights=st.lists(st.integers(1, 10_000), min_size=2, max_size=8),
       first=st.integers(0, 7), seed=st.integers(0, 2**32))
def test_draw_other_is_never_the_first(weights: list[int], first: int, seed: int) -> None:
    w, rng = Weights(weights), random.Random(seed)
    first %= len(weights)
    assert all(w.draw_other(rng, first) != first for _ in range(200))
    assert all(w.uniform_other(rng, first) != first for _ in range(200))


def test_draw_other_follows_the_remaining_weights() -> None:
    w, rng = Weights([6, 3, 1]), random.Random(4)
    seen = Counter(w.draw_other(rng, 0) for _ in range(DRAWS))
    assert seen[1] / DRAWS == pytest.approx(0.75, abs=0.02)
    assert seen[2] / DRAWS == pytest.approx(0.25, abs=0.02)


def test_shuffled_is_a_weighted_order_without_replacement() -> None:
    w, rng = Weights([1, 2, 3, 4]), random.Random(5)
    heads: Counter[int] = Counter()
    for _ in range(DRAWS // 4):
        order = w.shuffled(rng, (3,))
        assert sorted(order) == [0, 1, 2]
        heads[order[0]] += 1
    for i, want in enumerate((1 / 6, 2 / 6, 3 / 6)):
        assert heads[i] / (DRAWS // 4) == pytest.approx(want, abs=0.03)
