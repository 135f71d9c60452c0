"""The live Pool and Backend objects, rebuilt for each config while keeping what stays.

A reload, a rollback or a discovery change goes in two steps. ``prepare`` does everything
costly from the config alone, while the loop serves: the strategies' tables and cycles
(``Pool.prepare``, built in the check process, balancer/checker.py: by the reload's check, or
asked by ``plan``) and the TLS contexts to ``https://`` backends (in a worker thread).
``apply`` then swaps the new pools in, in one synchronous step with no heavy work (no await,
so the event loop never runs a request against half of it). A server that stays keeps its
Backend object (health, counters, pooled connections), a pool that stays keeps its Pool
object; a removed backend drains and ``retire`` closes its upstream connections once its last
request is done. A kept backend whose ``backend_tls`` changed, or whose CA file was renewed in
place, gets a new connection pool, and the old one is retired the same way, so the next
connection uses the new settings.

Nothing ``prepare`` hands over can go stale: it reads no live object, and each prepared build
names the (url, weight) members it was made for; a strategy given a build made for other
members (a change applied in between: the app runs them one at a time under its reload lock,
so it does not happen there) builds its own on the spot, correct and merely slower.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass, field
from typing import Any

from balancer.backend import Backend, backend_key
from balancer.config import BackendConfig, Config
from balancer.pool import Pool, PreparedPool
from balancer.tls import TlsError, connect_options

log = logging.getLogger("balancer.app")

#: How often a retired backend looks again for requests still in flight (seconds).
POLL = 0.02

BackendSlot = tuple[str, tuple[str, str, int], int]
"""(pool, (scheme, host, port), n): the n-th entry for that server in that pool (normally 0)."""


@dataclass(frozen=True)
class Plan:
    """A config and the costly parts of applying it, built ahead by ``Fleet.prepare``."""

    config: Config
    pools: dict[str, PreparedPool] = field(default_factory=dict)


#: Runs a blocking function off the loop: ``await compute(fn, *args)`` (App.compute).
Compute = Callable[..., Awaitable[Any]]


def prepare_pools(config: Config, skip: Container[str] = ()) -> dict[str, PreparedPool]:
    """Each pool's strategy tables (``Pool.prepare``) for ``config``, but those in ``skip``."""
    return {name: Pool.prepare(pool) for name, pool in config.pools.items() if name not in skip}


class Fleet:
    """Every pool's Backend objects, kept across configs by their slot."""

    def __init__(self) -> None:
        self._backends: dict[BackendSlot, Backend] = {}
        self.pools: dict[str, Pool] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    async def plan(self, config: Config, compute: Compute) -> Plan:
        """``prepare`` for a change the reload's check did not build: the strategies' tables
        through ``compute`` (the check process, balancer/checker.py), or here in ``prepare``
        when it cannot build them."""
        try:
            prepared = await compute(prepare_pools, config)
        except Exception:  # a plug-in's bug, or one the check process cannot import
            prepared = None
        return await asyncio.to_thread(self.prepare, config, prepared)

    @staticmethod
    def prepare(config: Config, prepared: dict[str, PreparedPool] | None = None) -> Plan:
        """Build what applying ``config`` needs, off the event loop (blocking: call it in a
        worker thread), taking each pool's strategies from ``prepared`` when the check process
        built them (balancer/checker.py). Reads the config only, never the live objects."""
        pools = {**prepare_pools(config, skip=prepared or {}), **(prepared or {})}
        for pool in config.pools.values():
            for backend in pool.backends:
                try:  # tls.backend_context keeps one SSLContext per setting: load it now
                    connect_options(backend)
                except TlsError:  # the CA file changed since the check: said at connect time
                    pass
        return Plan(config, pools)

    def apply(self, plan: Plan | Config) -> list[Backend]:
        """Build ``self.pools`` for the plan's config, reusing the Backend and Pool objects
        that stay; returns the backends it removed (now draining). A bare Config (at start,
        before serving) is built here."""
        if isinstance(plan, Config):
            plan = Plan(plan)
        config = plan.config
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
                    tls_changed = (backend.config.tls != backend_cfg.tls
                                   or _ca_renewed(backend, backend_cfg))
                    backend.reconfigure(backend_cfg, pool_cfg.max_connections)
                    if tls_changed:
                        self._renew_connections(backend)
                kept[slot] = backend
                members.append(backend)
            prepared = plan.pools.get(name, (None, None))
            pool = self.pools.get(name)
            if pool is None:
                pool = Pool(pool_cfg, members, prepared=prepared)
            else:
                pool.update(pool_cfg, members, prepared)
            pools[name] = pool
        gone = [b for slot, b in old.items() if slot not in kept]
        for backend in gone:
            backend.draining = True
        self._backends = kept
        self.pools = pools
        return gone

    def _renew_connections(self, backend: Backend) -> None:
        """``backend_tls`` changed for a kept backend: its next connection must use the new
        SSL context and name, not a pooled one made with the old. New requests get a new
        connection pool, built the way the request path builds one (its own type, from the
        backend); the old pool closes its idle connections now and its busy ones when their
        request ends (``UpstreamPool.close``)."""
        conns: Any = backend.connections
        if conns is None:  # never connected: the first connection is made with the new settings
            return
        backend.connections = type(conns)(backend)
        self._spawn(close_connections(conns, backend.url))
        log.info("backend %s/%s (%s): backend_tls changed: new connections use it",
                 backend.pool, backend.name, backend.url)

    def retire(self, backend: Backend) -> None:
        """Close a removed backend's upstream connections once its last request is done."""

        async def retire() -> None:
            while backend.in_flight > 0:
                await asyncio.sleep(POLL)
            await close_connections(backend.connections, backend.url)
            log.info("backend %s/%s (%s) removed: connections closed",
                     backend.pool, backend.name, backend.url)

        self._spawn(retire())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        """At the end of a drain: stop retiring and close every upstream connection."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        backends = {id(b): b for pool in self.pools.values() for b in pool.backends}
        await asyncio.gather(*(close_connections(b.connections, b.url)
                               for b in backends.values()), return_exceptions=True)


async def close_connections(conns: Any, url: str) -> None:
    """Close an upstream connection pool (balancer/upstream.py), if there is one."""
    if conns is not None:
        try:
            await conns.close()
        except Exception:
            log.exception("closing connections to %s failed", url)


def _ca_renewed(backend: Backend, config: BackendConfig) -> bool:
    """The CA file of an unchanged ``backend_tls`` was renewed in place (same name, new
    content): its connections are made with a context of the old file."""
    conns: Any = backend.connections
    if conns is None or config.scheme != "https":
        return False
    try:
        return conns.ssl_context is not connect_options(config).get("ssl")
    except TlsError:  # unreadable now: keep what works, the check said why
        return False

