"""Consistent hashing: requests with the same key go to the same backend, and a change to the
backend set moves as few keys as it can.

The key (option ``key``) is one of ``client_ip`` (default), ``path``, ``header:NAME`` or
``cookie:NAME``. When a request lacks it (no such header or cookie), the client address is
used, and when that is empty too, the path: a request is always placed, and clients without
the key still spread by address rather than all landing on the backend of the empty string.

The table: ``SLOTS`` slots, each owned by the backend that wins it by weighted rendezvous
hashing (highest random weight: every backend draws an Exp(weight) score per slot from a
stream seeded by its own URL; the lowest score wins, which a backend does with probability
weight/total). A key hashes (blake2b, not ``hash()``, so every worker process and every run
agree) to a slot: one hash and one list index per request. Rendezvous rather than Maglev,
because it is strict: removing a backend moves exactly the slots it owned (to their runner-up,
which the table also keeps), and adding one moves only the slots it now wins, weight/total of
them — Maglev spreads better by construction but reshuffles a few other keys on every change.
Shares are within about sqrt(share / SLOTS) of weight/total (±0.4 points for two backends).

Bounded load (option ``balance_factor``, e.g. 1.25; "consistent hashing with bounded loads",
Mirrokni et al.): a backend may take a request only while its in-flight count stays within
``ceil(balance_factor × (total in flight + 1) × weight / total weight)``. One that is full is
passed over for the key's runner-up, then the next backends in table order, so a hot key (or a
whole population behind one NAT address) cannot pin one backend past its fair share. The total
in flight is an O(n) sum, paid only when the key's backend has requests in flight.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from hashlib import blake2b
from typing import Any

from balancer.backend import Backend
from balancer.gil import give_way
from balancer.strategies.base import Members, PickContext, Prepared, Strategy

#: Slots in the table for small pools, and the most table work (slots × backends) at build
#: time; beyond it the table shrinks (by powers of two, to ``MIN_SLOTS``) as pools grow.
SLOTS = 1 << 14
MIN_SLOTS = 1 << 11
MAX_BUILD_WORK = 1 << 18
#: How many slots a fallback walk looks at before yielding the remaining backends in order.
WALK_LIMIT = 256

KEY_KINDS = ("client_ip", "path", "header", "cookie")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_KEY_HELP = "must be client_ip, path, header:NAME or cookie:NAME"


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process and every run (unlike ``hash()``)."""
    return int.from_bytes(blake2b(text.encode("utf-8", "surrogatepass"),
                                  digest_size=8).digest(), "big")


def table_size(n: int) -> int:
    """Slots for ``n`` backends: ``SLOTS``, fewer for big pools so a rebuild stays cheap."""
    size = SLOTS
    while size > MIN_SLOTS and size * n > MAX_BUILD_WORK:
        size //= 2
    return size


def build_table(identities: Sequence[str], weights: Sequence[int],
                size: int) -> tuple[list[int], list[int]]:
    """(owner, runner_up) index per slot, by weighted rendezvous hashing.

    Backend k's score for a slot is an Exp(weight) draw from ``random.Random`` seeded by its
    identity: ``random()``'s sequence for a given integer seed is guaranteed stable across
    Python versions, so every process builds the same table. The lowest score wins.
    """
    inf = float("inf")
    if not identities:
        return [], []
    best = [inf] * size
    second = [inf] * size
    owner = [0] * size
    runner = [0] * size
    log = math.log
    for k, (ident, w) in enumerate(zip(identities, weights)):
        draw = random.Random(stable_hash(ident)).random
        for s in range(size):
            if not s & 127:
                give_way()  # built beside the serving loop (balancer/gil.py)
            score = -log(1.0 - draw()) / w
            if score < second[s]:
                if score < best[s]:
                    second[s], runner[s] = best[s], owner[s]
                    best[s], owner[s] = score, k
                else:
                    second[s], runner[s] = score, k
    return owner, runner


@functools.lru_cache(maxsize=16)
def slot_table(members: Members) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(owner, runner-up) per slot for ``members`` ((url, weight) pairs), as indices into it.

    Remembered for the last few member sets: the guard simulates a pool dozens of times per
    check (two passes, then two per failed backend) over the same members, and a reload then
    builds the same table again; each build is 3-8 ms of pure Python, so without this a check
    of a 16-backend pool spent most of its time here, holding the GIL the serving loop needs.
    Tuples: the tables are shared, so nobody may change them.
    """
    n = len(members)
    # Built over the backends sorted by URL, so listing order in the config moves nothing.
    order = sorted(range(n), key=lambda k: (members[k][0], k))
    owner, runner = build_table([members[k][0] for k in order],
                                [members[k][1] for k in order], table_size(n))
    at = order.__getitem__  # mapped in C: a generator over 2 × 16,384 slots took 2-3 ms
    return tuple(map(at, owner)), tuple(map(at, runner))


class ConsistentHash(Strategy):
    """Same key, same backend; a changed backend set moves only the keys it has to."""

    name = "consistent_hash"
    options_allowed = frozenset({"key", "balance_factor"})

    def __init__(self, backends: Sequence[Backend], options: Mapping[str, Any],
                 rng: random.Random, prepared: Prepared | None = None) -> None:
        super().__init__(backends, options, rng)
        self.key_kind, self.key_name = self.parse_key(options.get("key", "client_ip"))
        factor = options.get("balance_factor")
        self.balance_factor: float | None = None if factor is None else float(factor)
        self._owner, self._runner = self.precomputed(prepared)
        self._size = table_size(len(self.backends))
        self._mask = self._size - 1
        self._total_weight = sum(b.weight for b in self.backends)

    @classmethod
    def precompute(cls, members: Members, options: Mapping[str, Any]) -> Any:
        """The slot table (owner, runner-up: indices into ``members``): the costly part."""
        return slot_table(members)

    # --- options -------------------------------------------------------------------------

    @staticmethod
    def parse_key(text: Any) -> tuple[str, str | None]:
        """``"header:X-User-ID"`` → ``("header", "x-user-id")``; ``"client_ip"`` →
        ``("client_ip", None)``. Header names are lower-cased (HTTP ignores their case), cookie
        names are kept as written. Raises ValueError (TypeError for a non-string) with the
        option's rule otherwise."""
        if not isinstance(text, str):
            raise TypeError(f"{_KEY_HELP}, got {text!r}")
        kind, sep, name = text.strip().partition(":")
        if not sep and kind in ("client_ip", "path"):
            return kind, None
        if sep and kind in ("header", "cookie"):
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"{kind} name must be a non-empty token like "
                                 f"{'X-User-ID' if kind == 'header' else 'session'}, got {text!r}")
            return kind, name.lower() if kind == "header" else name
        raise ValueError(f"{_KEY_HELP}, got {text!r}")

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> list[str]:
        problems = super().validate_options(options)
        if "key" in options:
            try:
                cls.parse_key(options["key"])
            except (TypeError, ValueError) as exc:
                problems.append(f"key: {exc}")
        factor = options.get("balance_factor")
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                                   or not factor > 1 or math.isinf(factor)):
            problems.append(f"balance_factor: must be a number greater than 1 (like 1.25), "
                            f"got {factor!r}")
        return problems

    # --- choosing ------------------------------------------------------------------------

    def key_of(self, ctx: PickContext) -> str:
        """The text hashed for ``ctx``: its key, else its client address, else its path."""
        kind = self.key_kind
        if kind == "client_ip":
            value: str | None = ctx.client_ip
        elif kind == "path":
            value = ctx.path
        elif kind == "header":
            value = ctx.header(self.key_name or "")
        else:
            value = ctx.cookie(self.key_name or "")
        return value or ctx.client_ip or ctx.path

    def slot_of(self, ctx: PickContext) -> int:
        return stable_hash(self.key_of(ctx)) & self._mask

    def candidates(self, ctx: PickContext) -> Iterator[Backend]:
        backends = self.backends
        if not backends:
            return
        slot = self.slot_of(ctx)
        first = backends[self._owner[slot]]
        if self.balance_factor is None or first.in_flight == 0:
            # An idle backend is always within its bound (which is at least 1).
            yield first
            yield from self._fallbacks(slot, first)
            return
        yield from self._bounded(slot)

    def _fallbacks(self, slot: int, first: Backend) -> Iterator[Backend]:
        """The rest: the slot's runner-up (where this key goes if ``first`` is removed), then
        the backends met walking the table onward, then any not met within the walk."""
        backends = self.backends
        n = len(backends)
        if n < 2:
            return
        seen = {first}
        runner = backends[self._runner[slot]]
        seen.add(runner)
        yield runner
        owner, mask = self._owner, self._mask
        for step in range(1, min(WALK_LIMIT, self._size)):
            if len(seen) == n:
                return
            b = backends[owner[(slot + step) & mask]]
            if b not in seen:
                seen.add(b)
                yield b
        for b in backends:
            if b not in seen:
                yield b

    def _bounded(self, slot: int) -> Iterator[Backend]:
        """Candidates in table order, those at their bound passed over (and yielded last, so
        the pool can still take one if every backend with room is down)."""
        factor = self.balance_factor or 1.0
        backends = self.backends
        room = factor * (sum(b.in_flight for b in backends) + 1) / self._total_weight
        first = backends[self._owner[slot]]
        full: list[Backend] = []
        for b in (first, *self._fallbacks(slot, first)):
            # Taking this request keeps b within ceil(room × weight); the epsilon keeps float
            # rounding (2.0000000001) from granting a slot the bound does not.
            if b.in_flight < math.ceil(room * b.weight - 1e-9):
                yield b
            else:
                full.append(b)
        yield from full
