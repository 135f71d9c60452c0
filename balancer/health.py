"""Active health checks: probe each backend on its own schedule and move it in and out of rotation.

Only pools with ``health_check`` configured are probed. Each backend gets its own task that sends
``GET <path>`` every ``interval`` (with ±5 % jitter so that many backends, or many balancers, do
not probe in lockstep), on a fixed-rate schedule so that a slow probe does not stretch the time a
dead backend stays in rotation. A backend leaves rotation after ``unhealthy_threshold``
consecutive failures and returns after ``healthy_threshold`` consecutive successes; each
transition is logged once, with the reason (``timeout``, ``refused``, ``status 500``…). An
``https://`` backend is probed with its pool's ``backend_tls``, as the proxy connects to it.

The checker writes ``backend.healthy`` / ``backend.health_reason`` and calls
``pool.state_changed()``; it owns nothing else. Probe state lives with the checker, keyed by the
Backend object, so a backend the app keeps across a reload keeps its streaks; new backends start
probing and removed ones stop (``sync``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping

import aiohttp

from balancer.appview import AppView
from balancer.backend import Backend
from balancer.config import HealthCheckConfig
from balancer.pool import Pool
from balancer.tls import connect_options

log = logging.getLogger("balancer.health")

#: Relative jitter applied to every probe interval.
JITTER = 0.05


def failure_reason(exc: BaseException) -> str:
    """A short, operator-readable word for why a probe failed."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, ConnectionRefusedError):
            return "refused"
        return f"connect error: {os_error.strerror or os_error}"
    if isinstance(exc, (aiohttp.ServerDisconnectedError, ConnectionResetError)):
        return "reset"
    if isinstance(exc, aiohttp.ClientError):
        return f"error: {type(exc).__name__}"
    return f"error: {exc!r}"


class _Probe:
    """One backend's probing task and its streaks (survives reloads with the Backend)."""

    __slots__ = ("backend", "failures", "last_reason", "pool", "successes", "task")

    def __init__(self, backend: Backend, pool: Pool) -> None:
        self.backend = backend
        self.pool = pool
        self.task: asyncio.Task[None] | None = None
        self.successes = 0
        self.failures = 0
        self.last_reason = ""

    def record(self, ok: bool, reason: str, hc: HealthCheckConfig) -> None:
        """Feed one probe result; flip the backend's state once a threshold is reached."""
        b = self.backend
        if ok:
            self.successes += 1
            self.failures = 0
            if not b.healthy and self.successes >= hc.healthy_threshold:
                b.healthy = True
                b.health_reason = ""
                log.warning("pool %s: backend %s is UP again: %d health checks passed"
                            " (was down: %s)", self.pool.name, b.name, self.successes,
                            self.last_reason)
                self.pool.state_changed()
            return
        self.failures += 1
        self.successes = 0
        self.last_reason = reason
        if b.healthy and self.failures >= hc.unhealthy_threshold:
            b.healthy = False
            b.health_reason = reason
            log.warning("pool %s: backend %s is DOWN: %d health checks failed (%s)",
                        self.pool.name, b.name, self.failures, reason)
            self.pool.state_changed()
        elif not b.healthy:
            b.health_reason = reason


class HealthChecker:
    """Probes the backends of every pool that has ``health_check`` configured."""

    def __init__(self, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rng = rng or random.Random()
        self.clock = clock
        self._probes: dict[Backend, _Probe] = {}
        self._session: aiohttp.ClientSession | None = None

    # --- Service interface (app.py) ------------------------------------------------------

    async def start(self, app: AppView) -> None:
        # force_close: every probe makes a fresh connection, so a refused or hung connect is
        # seen at once rather than hidden behind a pooled keep-alive connection.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            auto_decompress=False,
        )
        self.sync(app.pools)

    def on_reload(self, app: AppView) -> None:
        self.sync(app.pools)

    async def stop(self) -> None:
        tasks = [p.task for p in self._probes.values() if p.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._probes.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- membership ----------------------------------------------------------------------

    def sync(self, pools: Mapping[str, Pool]) -> None:
        """Probe exactly the backends of health-checked pools: start new ones, stop removed."""
        wanted: dict[Backend, Pool] = {}
        for pool in pools.values():
            if pool.config.health_check is not None:
                for b in pool.backends:
                    wanted[b] = pool
        for b in [b for b in self._probes if b not in wanted]:
            probe = self._probes.pop(b)
            if probe.task is not None:
                probe.task.cancel()
            if not b.healthy:
                # Nothing probes it any more: the active verdict no longer applies.
                b.healthy = True
                b.health_reason = ""
                probe.pool.state_changed()
        for b, pool in wanted.items():
            known = self._probes.get(b)
            if known is None:
                known = self._probes[b] = _Probe(b, pool)
                known.task = asyncio.create_task(self._loop(known),
                                                 name=f"health {pool.name}/{b.name}")
            known.pool = pool

    # --- probing -------------------------------------------------------------------------

    async def _loop(self, probe: _Probe) -> None:
        hc = probe.pool.config.health_check
        # The first probe comes soon after start, at a random point so probes spread out.
        await asyncio.sleep(self.rng.uniform(0, min(hc.interval, 1.0) if hc else 0.1))
        while True:
            hc = probe.pool.config.health_check  # re-read: a reload may change it
            if hc is None:
                return
            started = self.clock()
            ok, reason = await self.probe(probe.backend, hc)
            probe.record(ok, reason, hc)
            delay = hc.interval * (1 + self.rng.uniform(-JITTER, JITTER))
            await asyncio.sleep(max(0.0, started + delay - self.clock()))

    async def probe(self, backend: Backend, hc: HealthCheckConfig) -> tuple[bool, str]:
        """One probe: (passed, reason). Never raises for a backend's failure."""
        assert self._session is not None, "HealthChecker.start() was not called"
        url = f"{backend.url}{hc.path}"
        # An https:// backend is probed as the proxy reaches it: the pool's backend_tls (its
        # CA, verify, the name sent and checked), not the system's defaults, or a backend
        # behind a private CA would fail every probe and leave rotation.
        tls = connect_options(backend.config)
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=hc.timeout),
                                         allow_redirects=False, ssl=tls.get("ssl", True),
                                         server_hostname=tls.get("server_hostname")) as resp:
                await resp.read()
                status = resp.status
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is a verdict, not a crash
            return False, failure_reason(exc)
        lo, hi = hc.expect_status
        if lo <= status <= hi:
            return True, ""
        return False, f"status {status}"

    def __repr__(self) -> str:
        down = sum(1 for b in self._probes if not b.healthy)
        return f"<HealthChecker {len(self._probes)} backends, {down} down>"
