"""A plug-in strategy that always prefers the first backend: the kind of strategy the guard
exists to catch. Used by plugin-first.yaml as ``always_first:AlwaysFirst``."""

from __future__ import annotations

from collections.abc import Iterator

from balancer.backend import Backend
from balancer.strategies.base import PickContext, Strategy


class AlwaysFirst(Strategy):
    name = "always_first"

    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        yield from self.backends
