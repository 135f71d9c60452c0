"""The balancing strategies: one module per algorithm, and this registry.

The registry is a plain dict from a name to a ``"module:Class"`` string, resolved lazily, so the
whole list is visible here. A config may also name a plug-in as ``"package.module:ClassName"``;
plug-ins implement ``balancer.strategies.base.Strategy``.
"""

from __future__ import annotations

import importlib
import random
from typing import Sequence

from balancer.backend import Backend
from balancer.config import StrategyConfig
from balancer.strategies.base import Members, PickContext, Prepared, Strategy

__all__ = ["STRATEGIES", "PickContext", "Prepared", "Strategy", "build_strategy",
           "prepare_strategy", "resolve_strategy"]

STRATEGIES: dict[str, str] = {
    "round_robin": "balancer.strategies.round_robin:RoundRobin",
    "least_connections": "balancer.strategies.least_connections:LeastConnections",
    "random": "balancer.strategies.weighted_random:WeightedRandom",
    "power_of_two": "balancer.strategies.power_of_two:PowerOfTwo",
    "consistent_hash": "balancer.strategies.consistent_hash:ConsistentHash",
    "ewma": "balancer.strategies.ewma:PeakEwma",
}


def resolve_strategy(name: str) -> type[Strategy]:
    """A strategy class from a registry name or a ``module:Class`` import path."""
    target = STRATEGIES.get(name)
    if target is None:
        if ":" not in name:
            known = ", ".join(STRATEGIES)
            raise ValueError(f"unknown strategy {name!r} (built in: {known}; "
                             f"or a plug-in as \"package.module:ClassName\")")
        target = name
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import strategy module {module_name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise AttributeError(f"module {module_name!r} has no strategy class {attr!r}")
    if not (isinstance(cls, type) and callable(getattr(cls, "candidates", None))
            and callable(getattr(cls, "build", None))):
        raise ValueError(f"{name!r} is not a strategy: it needs build() and candidates() "
                         f"(subclass balancer.strategies.base.Strategy)")
    if not callable(getattr(cls, "validate_options", None)):
        raise ValueError(f"{name!r} is not a strategy: it needs validate_options()")
    return cls


def build_strategy(config: StrategyConfig, backends: Sequence[Backend],
                   rng: random.Random | None = None, prepared: Prepared | None = None
                   ) -> Strategy:
    """Resolve and build ``config`` over ``backends`` (the caller passes weight > 0 only),
    from ``prepare_strategy``'s work for them when given."""
    cls = resolve_strategy(config.name)
    if prepared is None:  # a plug-in may override build() with the three-argument form
        return cls.build(backends, config.options, rng)
    return cls.build(backends, config.options, rng, prepared)


def prepare_strategy(config: StrategyConfig, members: Members) -> Prepared | None:
    """The costly part of building ``config`` over ``members`` ((url, weight) each, in the
    order the backends will be passed), done ahead: blocking, for a worker thread."""
    return resolve_strategy(config.name).prepare(members, config.options)
