"""Smooth weighted round robin: weights exact per cycle, and interleaved rather than bursted."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.strategies import PickContext
from balancer.strategies.weights import MAX_CYCLE_WORK, SmoothCycle
from tests.strategies.support import make_backends, make_strategy


def picks(weights: list[int], count: int, seed: int = 0) -> list[str]:
    strategy = make_strategy("round_robin", make_backends(weights), seed=seed)
    return [next(strategy.candidates(PickContext())).name for _ in range(count)]


def longest_runs(sequence: list[str]) -> dict[str, int]:
    runs: dict[str, int] = {}
    for name, group in itertools.groupby(sequence):
        runs[name] = max(runs.get(name, 0), len(list(group)))
    return runs


def test_five_one_one_is_interleaved_as_nginx_does() -> None:
    """nginx documents 5:1:1 as a a b a c a a; from any starting point we see that cycle."""
    for seed in range(7):
        seq = picks([5, 1, 1], 70, seed)
        cycle = seq[:7]
        nginx = ["a", "a", "b", "a", "c", "a", "a"]
        rotations = {tuple(nginx[k:] + nginx[:k])
                     for k in range(7)}
        assert tuple(n.replace("b0", "a").replace("b1", "b").replace("b2", "c")
                     for n in cycle) in rotations
        assert seq == cycle * 10
        # A burst (a a a a a b c) runs 5; the light ones are never back to back, and b0's run,
        # even across the cycle boundary, stays within ceil(5 / 2) + 1.
        runs = longest_runs(seq)
        assert runs == {"b0": 4, "b1": 1, "b2": 1}, runs


@settings(max_examples=40, deadline=None, derandomize=True)
@given(weights=st.lists(st.integers(1, 20), min_size=2, max_size=6),
       seed=st.integers(0, 1000))
def test_every_window_is_within_two_of_its_fair_count(weights: list[int], seed: int) -> None:
    """Smoothness: in any run of consecutive picks of length L, each backend got within 2 of
    L × weight/total (a bursting round robin with weights 10:10 is 5 off after 10 picks)."""
    total = sum(weights)
    seq = picks(weights, 2 * total, seed)
    for i, w in enumerate(weights):
        lead, high, low = 0.0, 0.0, 0.0  # prefix of (picked - fair): a window is a difference
        for name in seq:
            lead += (name == f"b{i}") - w / total
            high, low = max(high, lead), min(low, lead)
        assert high - low < 2, (weights, i, seq)
    assert sorted(seq[:total]) == sorted(f"b{i}" for i, w in enumerate(weights)
                                         for _ in range(w))


def test_a_bursting_order_fails_the_window_rule() -> None:
    """The rule above can fail: check it on the order a naive weighted round robin gives."""
    seq = ["b0"] * 10 + ["b1"] * 10
    lead = [sum((n == "b0") - 0.5 for n in seq[:k]) for k in range(len(seq) + 1)]
    assert max(lead) - min(lead) >= 2


def test_many_proxies_do_not_start_in_lockstep() -> None:
    firsts = {picks([1, 1, 1, 1], 1, seed)[0] for seed in range(40)}
    assert len(firsts) == 4


def test_huge_cycles_step_without_precomputing() -> None:
    """Co-prime weights whose cycle is too long to precompute still follow the weights."""
    weights = [9973, 9967, 9949, 9941, 9931, 9929]
    assert sum(weights) * len(weights) > MAX_CYCLE_WORK
    cycle = SmoothCycle(weights, random.Random(0))
    counts = [0] * len(weights)
    for _ in range(sum(weights)):
        counts[cycle.next()] += 1
    assert counts == weights
