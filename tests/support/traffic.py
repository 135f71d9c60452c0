"""Live client load and bounded polling, shared by the tests that change a running proxy.

A test that reloads, rescales or drains while requests flow needs the same two things: clients
that keep sending and record who answered and what failed (``Traffic``), and a wait for a
condition that gives up with a message naming what never happened (``until``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any, Self

import aiohttp

#: Every wait here gives up after this long (seconds).
WAIT = 10.0


class Traffic:
    """Clients that keep sending requests until stopped, counting who answered and failures.

    Who answered is the body (the tests' backends answer with their name), or the value of
    ``header`` when given (backends whose body says more, like the demo's ``X-Backend``).
    """

    def __init__(self, port: int, workers: int = 4, header: str | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}/"
        self.workers = workers
        self.header = header
        self.seen: Counter[str] = Counter()
        self.total = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT))
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), WAIT)
        await self._session.close()

    async def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                async with self._session.get(self.url) as r:
                    body = await r.text()
                    if r.status != 200:
                        self.failures.append(f"{r.status} {body[:200]}")
                    else:
                        self.seen[r.headers.get(self.header, "?") if self.header else body] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failures.append(repr(exc))
            self.total += 1

    async def sample(self, n: int) -> Counter[str]:
        """Who answered the next ``n`` successful requests (bounded wait)."""
        self.seen.clear()
        async with asyncio.timeout(WAIT):
            while sum(self.seen.values()) < n:
                await asyncio.sleep(0.01)
        return Counter(self.seen)


async def until(predicate: Callable[[], Any], what: str) -> None:
    """Poll ``predicate()`` until it is truthy; AssertionError naming ``what`` after WAIT s."""
    try:
        async with asyncio.timeout(WAIT):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"no {what} within {WAIT}s") from None
