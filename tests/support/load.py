"""A bounded load that checks what it got, request by request, and the figures it records.

``run_load`` sends a fixed number of requests (each with its own request id, asking the
faulty backends of ``tests.support.backends`` for a checkable body) and says, per method, what
was answered whole, what failed and how, and who answered. ``record_figure`` keeps a test's
figures for scripts/reliability.py.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.support.backends import check_body
from tests.support.proc import WAIT


@dataclass
class LoadResult:
    """What a bounded load saw, request by request."""

    sent: Counter[str] = field(default_factory=Counter)  # by method
    ok: Counter[str] = field(default_factory=Counter)
    failed: dict[str, list[str]] = field(default_factory=dict)  # method → what went wrong
    failed_rids: set[str] = field(default_factory=set)
    truncated: list[str] = field(default_factory=list)  # 200s whose body was not whole
    answered_by: Counter[str] = field(default_factory=Counter)
    rids: dict[str, list[str]] = field(default_factory=dict)  # method → request ids sent
    ok_rids: set[str] = field(default_factory=set)

    def fail(self, method: str, rid: str, what: str) -> None:
        self.failed.setdefault(method, []).append(f"{rid}: {what}")
        self.failed_rids.add(rid)

    def failures(self, method: str) -> list[str]:
        return self.failed.get(method, [])

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def summary(self) -> dict[str, Any]:
        return {"sent": dict(self.sent), "ok": dict(self.ok),
                "failed": {m: len(v) for m, v in self.failed.items()},
                "truncated": len(self.truncated), "answered_by": dict(self.answered_by)}


def no_hidden_retries(session: Any) -> None:
    """aiohttp (>= 3.10) quietly resends an idempotent request once when a connection fails;
    a test that counts client-visible failures must see every one of them."""
    assert hasattr(session, "_retry_connection"), "aiohttp changed: check its retry knob"
    session._retry_connection = False


async def run_load(url: str, total: int, clients: int = 8, post_every: int = 0,
                   size: int = 64, prefix: str = "load", headers: dict[str, str] | None = None,
                   query: str = "", pace: float = 0.0,
                   timeout: float = WAIT, gate: asyncio.Event | None = None,
                   progress: list[int] | None = None) -> LoadResult:
    """Send ``total`` requests to ``url`` over ``clients`` keep-alive clients (aiohttp, no
    hidden retries); every ``post_every``-th is a POST (0: none). Each has its own request id
    ``<prefix>-<n>`` and asks for a ``size``-byte body, which is checked whole. ``gate``: when
    given, every request waits for it to be set (to pause the load). ``progress[0]`` counts
    finished requests, for a chaos task to pace itself by. ``pace``: each client starts a
    request at most every ``pace`` seconds (a rate, so that the load lasts long enough for what
    happens meanwhile whatever the machine's speed)."""
    import aiohttp

    result = LoadResult()
    counter = iter(range(total))
    body = b"p" * 1000
    async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(limit=clients)) as session:
        no_hidden_retries(session)

        async def client() -> None:
            loop = asyncio.get_running_loop()
            next_start = loop.time()
            for n in counter:
                if gate is not None:
                    await gate.wait()
                if pace:
                    await asyncio.sleep(max(0.0, next_start - loop.time()))
                    next_start = max(next_start + pace, loop.time())
                rid = f"{prefix}-{n}"
                method = "POST" if post_every and n % post_every == post_every - 1 else "GET"
                result.sent[method] += 1
                result.rids.setdefault(method, []).append(rid)
                h = {"X-Request-ID": rid, **(headers or {})}
                try:
                    async with session.request(method, f"{url}/item?size={size}{query}", headers=h,
                                               data=body if method == "POST" else None) as r:
                        got = await r.read()
                        if r.status != 200:
                            result.fail(method, rid, f"{r.status} {got[:120]!r}")
                        elif (name := check_body(got, rid, size)) is None:
                            result.truncated.append(f"{rid}: {len(got)} bytes")
                            result.fail(method, rid, f"200 with a bad body ({len(got)} bytes)")
                        else:
                            result.ok[method] += 1
                            result.ok_rids.add(rid)
                            result.answered_by[name] += 1
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    result.fail(method, rid, f"{type(exc).__name__}: {exc}"[:200])
                if progress is not None:
                    progress[0] += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return result


def record_figure(family: str, **figures: Any) -> None:
    """Append one JSON line of figures to ``$BALANCER_FIGURES`` when set (scripts/
    reliability.py sets it and turns the lines into docs/reliability.md); no-op otherwise."""
    path = os.environ.get("BALANCER_FIGURES")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"family": family, "test": test, **figures}) + "\n")
