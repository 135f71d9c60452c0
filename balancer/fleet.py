"""The live Pool and Backend objects, rebuilt for each config while keeping what stays.

A reload or a rollback hands the fleet a new config; ``apply`` builds the pools for it in one
synchronous step (no await, so the event loop never runs a request against half of it). A
server that stays keeps its Backend object (health, counters, pooled connections), a pool that
stays keeps its Pool object; a removed backend drains and ``retire`` closes its upstream
connections once its last request is done.
"""

from __future__ import annotations

import asyncio
import logging

from balancer.backend import Backend, backend_key
from balancer.config import Config
from balancer.pool import Pool

log = logging.getLogger("balancer.app")

#: How often a retired backend looks again for requests still in flight (seconds).
POLL = 0.02

BackendSlot = tuple[str, tuple[str, str, int], int]
"""(pool, (scheme, host, port), n): the n-th entry for that server in that pool (normally 0)."""


class Fleet:
    """Every pool's Backend objects, kept across configs by their slot."""

    def __init__(self) -> None:
        self._backends: dict[BackendSlot, Backend] = {}
        self.pools: dict[str, Pool] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    def apply(self, config: Config) -> list[Backend]:
        """Build ``self.pools`` for ``config``, reusing the Backend and Pool objects that stay;
        returns the backends it removed (now draining)."""
        old = self._backends
        kept: dict[BackendSlot, Backend] = {}
        pools: dict[str, Pool] = {}
        for name, pool_cfg in config.pools.items():
            members: list[Backend] = []
            for backend_cfg in pool_cfg.backends:
                server = backend_key(backend_cfg)
                n = sum(1 for b in members if b.key == server)
                slot = (name, server, n)
                backend = old.get(slot)
                if backend is None:
                    backend = Backend(backend_cfg, name, pool_cfg.max_connections)
                else:
                    backend.reconfigure(backend_cfg, pool_cfg.max_connections)
                kept[slot] = backend
                members.append(backend)
            pool = self.pools.get(name)
            if pool is None:
                pool = Pool(pool_cfg, members)
            else:
                pool.update(pool_cfg, members)
            pools[name] = pool
        gone = [b for slot, b in old.items() if slot not in kept]
        for backend in gone:
            backend.draining = True
        self._backends = kept
        self.pools = pools
        return gone

    def retire(self, backend: Backend) -> None:
        """Close a removed backend's upstream connections once its last request is done."""

        async def retire() -> None:
            while backend.in_flight > 0:
                await asyncio.sleep(POLL)
            await close_upstream(backend)
            log.info("backend %s/%s (%s) removed: connections closed",
                     backend.pool, backend.name, backend.url)

        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        """At the end of a drain: stop retiring and close every upstream connection."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        backends = {id(b): b for pool in self.pools.values() for b in pool.backends}
        await asyncio.gather(*(close_upstream(b) for b in backends.values()),
                             return_exceptions=True)


async def close_upstream(backend: Backend) -> None:
    conns = backend.connections
    if conns is not None:
        try:
            await conns.close()
        except Exception:
            log.exception("closing connections to %s failed", backend.url)
