"""Power of two choices: two distinct weighted draws, the less loaded per weight wins."""

from __future__ import annotations

from collections import Counter

import pytest

from balancer.strategies import PickContext
from tests.strategies.support import make_backends, make_strategy

CTX = PickContext()


def test_the_two_choices_are_distinct_and_the_loaded_one_loses() -> None:
    """With two backends both are always drawn, so the busy one is never first."""
    backends = make_backends([1, 1])
    backends[0].in_flight = 3
    strategy = make_strategy("power_of_two", backends)
    for _ in range(200):
        assert [b.name for b in strategy.candidates(CTX)] == ["b1", "b0"]


def test_load_is_judged_per_weight() -> None:
    """b0 has 5 in flight on weight 10 (0.5 each); b1 has 1 on weight 1: b0 is less loaded."""
    backends = make_backends([10, 1])
    backends[0].in_flight, backends[1].in_flight = 5, 1
    strategy = make_strategy("power_of_two", backends)
    assert Counter(next(strategy.candidates(CTX)).name for _ in range(200)) == {"b0": 200}


def test_the_most_loaded_of_many_is_never_chosen_first() -> None:
    """It can only be drawn with someone less loaded, and then it loses."""
    backends = make_backends([1, 1, 1, 1, 1])
    backends[2].in_flight = 9
    strategy = make_strategy("power_of_two", backends)
    firsts = Counter(next(strategy.candidates(CTX)).name for _ in range(2000))
    assert "b2" not in firsts
    for name in ("b0", "b1", "b3", "b4"):
        assert firsts[name] == pytest.approx(500, abs=100), firsts


def test_a_dominant_weight_still_draws_a_distinct_second() -> None:
    """Weight 10000 against 1: the second draw must not spin on the heavy one."""
    backends = make_backends([10_000, 1])
    backends[0].in_flight = 1
    strategy = make_strategy("power_of_two", backends)
    assert [b.name for b in strategy.candidates(CTX)] == ["b1", "b0"]
