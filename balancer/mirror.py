"""What a worker and its supervisor say to each other, and the supervisor's mirror of the fleet.

With ``workers: N`` (balancer/supervisor.py) the request path runs in N worker processes
(balancer/worker.py) and everything that must happen once runs in the supervisor. The
supervisor keeps the same Pool and Backend objects as a single process does, but serves no
request with them: they are *mirrors*. Every ``REPORT_EVERY`` seconds each worker sends what its
counters gained since its last report (``Reporter``); the supervisor adds that to its objects
(``Mirror.fold``), so metrics.py, monitor.py and probation.py read the sum over all workers
without knowing there are workers. Nothing is sent per request.

Health travels the other way: the supervisor's health checks and every worker's passive
ejections are gathered into one ``HealthState`` per backend and pushed to all workers
(``health_state`` / ``apply_health``). An ejection one worker decides is taken by all: a push
never shortens an ejection a worker made itself since (the later end wins).

Messages travel over balancer/wire.py (pickled, framed by their length).
Backends are named across processes by their fleet slot: (pool, (scheme, host, port), n).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from balancer.backend import Backend
from balancer.config import Config
from balancer.pool import Pool

#: How often a worker reports its counters (seconds): the delay of /metrics and of the live
#: share behind the traffic, and the whole cost of the mirror (4 small messages a second).
REPORT_EVERY = 0.25

Slot = tuple[str, tuple[str, str, int], int]
#: (healthy, health_reason, ejected_until on the monotonic clock, ejections)
HealthState = tuple[bool, str, float, int]


# --------------------------------------------------------------------------- slots and limits


def slots(pools: Mapping[str, Pool]) -> dict[Slot, Backend]:
    """Every backend by its slot, numbered as balancer/fleet.py numbers them."""
    out: dict[Slot, Backend] = {}
    for name, pool in pools.items():
        seen: dict[tuple[str, str, int], int] = {}
        for b in pool.backends:
            n = seen.get(b.key, 0)
            seen[b.key] = n + 1
            out[(name, b.key, n)] = b
    return out


def share(limit: int, workers: int, index: int) -> int:
    """Worker ``index``'s part of a ``max_connections`` limit: the limit split as evenly as
    whole numbers allow (the first ``limit % workers`` workers take one more), so the parts add
    up to the limit exactly; but never 0, so below one per worker each worker has 1."""
    return max(1, limit // workers + (1 if index < limit % workers else 0))


def split_limits(config: Config, workers: int, index: int) -> Config:
    """``config`` as worker ``index`` of ``workers`` serves it: every ``max_connections`` (the
    pool's and each backend's) is its share, so the machine holds the limit, not N times it."""
    if workers <= 1:
        return config
    pools = {}
    for name, pool in config.pools.items():
        limit = pool.max_connections
        backends = tuple(
            b if b.max_connections is None
            else replace(b, max_connections=share(b.max_connections, workers, index))
            for b in pool.backends)
        pools[name] = replace(
            pool, backends=backends,
            max_connections=None if limit is None else share(limit, workers, index))
    return replace(config, pools=MappingProxyType(pools))


# --------------------------------------------------------------------------- worker side


class Reporter:
    """A worker's counters since its last report (only what changed: an idle worker's report
    is a few bytes), and its gauges as they are now."""

    def __init__(self) -> None:
        # Last reported counters per Backend / Pool object (a replaced object starts over).
        self._sent: dict[Backend, tuple[list[int], dict[str, int], list[int], float, int]] = {}
        self._rejected: dict[Pool, dict[str, int]] = {}

    def report(self, pools: Mapping[str, Pool], client: Mapping[str, Any]) -> dict[str, Any]:
        backends: dict[Slot, dict[str, Any]] = {}
        sent: dict[Backend, tuple[list[int], dict[str, int], list[int], float, int]] = {}
        for slot, b in slots(pools).items():
            now = (list(b.requests_by_class), dict(b.errors), list(b.latency_counts),
                   b.latency_sum, b.retries)
            before = self._sent.get(b)
            sent[b] = now
            entry: dict[str, Any] = {}
            if before is None or now != before:
                old = before or ([0] * 6, {}, [0] * len(now[2]), 0.0, 0)
                entry["by_class"] = [x - y for x, y in zip(now[0], old[0])]
                entry["errors"] = {k: v - old[1].get(k, 0) for k, v in now[1].items()
                                   if v != old[1].get(k, 0)}
                entry["latency"] = [x - y for x, y in zip(now[2], old[2])]
                entry["latency_sum"] = now[3] - old[3]
                entry["retries"] = now[4] - old[4]
            if b.in_flight:
                entry["in_flight"] = b.in_flight
            if b.ejected_until:
                entry["ejected"] = (b.ejected_until, b.ejections)
            if entry:
                backends[slot] = entry
        self._sent = sent
        rejected: dict[str, dict[str, int]] = {}
        kept: dict[Pool, dict[str, int]] = {}
        for name, pool in pools.items():
            old_r = self._rejected.get(pool, {})
            kept[pool] = dict(pool.rejected)
            gained = {k: v - old_r.get(k, 0) for k, v in pool.rejected.items()
                      if v != old_r.get(k, 0)}
            if gained:
                rejected[name] = gained
        self._rejected = kept
        return {"backends": backends, "rejected": rejected, "client": dict(client)}


def apply_health(pools: Mapping[str, Pool], pushed: Mapping[Slot, HealthState]) -> None:
    """Take the supervisor's verdicts: health checks as they are, ejections when they end
    later than the worker's own (a push never shortens an ejection decided here since)."""
    changed: set[Pool] = set()
    current = slots(pools)
    for slot, (healthy, reason, ejected_until, ejections) in pushed.items():
        b = current.get(slot)
        if b is None:
            continue
        if b.healthy != healthy or ejected_until > b.ejected_until:
            changed.add(pools[slot[0]])
        b.healthy, b.health_reason = healthy, reason
        if ejected_until > b.ejected_until:
            b.ejected_until = ejected_until
        b.ejections = max(b.ejections, ejections)
    for pool in changed:
        pool.state_changed()


# --------------------------------------------------------------------------- supervisor side


def health_state(pools: Mapping[str, Pool]) -> dict[Slot, HealthState]:
    """What every worker must know of each backend's health, from the supervisor's objects."""
    return {slot: (b.healthy, b.health_reason, b.ejected_until, b.ejections)
            for slot, b in slots(pools).items()}


class ClientMirror:
    """The client side of all workers (balancer/appview.py ``ClientSideView``), summed."""

    def __init__(self) -> None:
        self.by_worker: dict[int, Mapping[str, Any]] = {}
        #: What workers that died had counted: a replacement counts from 0, the sum goes on.
        self.base: dict[str, Any] = {"turned_away": 0, "fired": {}}

    def retire(self, worker: int) -> None:
        """Worker ``worker`` died: keep its counters in the sum, drop its gauges."""
        last = self.by_worker.pop(worker, None)
        if last is None:
            return
        self.base["turned_away"] += last.get("turned_away", 0)
        fired = self.base["fired"]
        for kind, n in last.get("fired", {}).items():
            fired[kind] = fired.get(kind, 0) + n

    @property
    def connections(self) -> list[None]:
        """As many entries as the workers hold client connections (only its length is read)."""
        return [None] * sum(c.get("connections", 0) for c in self.by_worker.values())

    @property
    def turned_away(self) -> int:
        return self.base["turned_away"] + sum(c.get("turned_away", 0)
                                              for c in self.by_worker.values())

    @property
    def in_flight(self) -> int:
        return sum(c.get("in_flight", 0) for c in self.by_worker.values())

    @property
    def timers(self) -> ClientMirror:
        return self

    @property
    def fired(self) -> dict[str, int]:
        out: dict[str, int] = dict(self.base["fired"])
        for c in self.by_worker.values():
            for kind, n in c.get("fired", {}).items():
                out[kind] = out.get(kind, 0) + n
        return out


class Mirror:
    """Adds the workers' reports into the supervisor's Pool and Backend objects."""

    def __init__(self) -> None:
        self.client = ClientMirror()
        #: The latest in-flight count per worker and slot (a gauge: summed, never added up).
        self._in_flight: dict[int, dict[Slot, int]] = {}

    def fold(self, worker: int, report: Mapping[str, Any], pools: Mapping[str, Pool]) -> int:
        """Add ``report`` (from ``Reporter.report``); returns the answered requests it adds."""
        current = slots(pools)
        flights: dict[Slot, int] = {}
        ejected = False
        answered = 0
        for slot, entry in report["backends"].items():
            b = current.get(slot)
            if b is None:  # removed since the worker counted it: its counters went with it
                continue
            if "by_class" in entry:
                for i, n in enumerate(entry["by_class"]):
                    b.requests_by_class[i] += n
                b.requests_total += sum(entry["by_class"])
                answered += sum(entry["by_class"])
                for kind, n in entry["errors"].items():
                    b.errors[kind] = b.errors.get(kind, 0) + n
                for i, n in enumerate(entry["latency"]):
                    b.latency_counts[i] += n
                b.latency_sum += entry["latency_sum"]
                b.retries += entry["retries"]
            flights[slot] = entry.get("in_flight", 0)
            if "ejected" in entry:
                until, count = entry["ejected"]
                if until > b.ejected_until:
                    b.ejected_until = until
                    ejected = True
                b.ejections = max(b.ejections, count)
        for name, gained in report["rejected"].items():
            pool = pools.get(name)
            if pool is not None:
                for reason, n in gained.items():
                    pool.rejected[reason] = pool.rejected.get(reason, 0) + n
        self._in_flight[worker] = flights
        self.client.by_worker[worker] = report["client"]
        self._sum_in_flight(current.items())
        if ejected:
            for pool in pools.values():
                pool.state_changed()
        return answered

    def forget(self, worker: int, pools: Mapping[str, Pool]) -> None:
        """A worker died: its in-flight requests are gone; its counters stay counted."""
        self._in_flight.pop(worker, None)
        self.client.retire(worker)
        self._sum_in_flight(slots(pools).items())

    def _sum_in_flight(self, backends: Iterable[tuple[Slot, Backend]]) -> None:
        for slot, b in backends:
            b.in_flight = sum(f.get(slot, 0) for f in self._in_flight.values())


