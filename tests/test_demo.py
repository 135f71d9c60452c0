"""``balancer demo`` as a user runs it: a real subprocess, real requests, real signals."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from balancer.demo import demo_backend_names, demo_config
from balancer.demo_backends import DemoBackend

WAIT = 30.0
NAMES = {"alpha", "bravo", "charlie"}


class Demo:
    """``python -m balancer demo`` with stdout and stderr collected by reader threads."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "balancer", "demo", *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(s, into), daemon=True)
                        for s, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    @staticmethod
    def _read(stream: object, into: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(["--- stdout"] + self.out + ["--- stderr"] + self.err)

    async def printed(self, pattern: str) -> re.Match[str]:
        """The first stdout line matching ``pattern``, waiting for it (bounded)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for line in list(self.out):
                if m := rx.search(line):
                    return m
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"demo never printed {pattern!r}:\n{self.output()}")

    async def exit_code(self) -> int:
        deadline = time.monotonic() + WAIT
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"demo still running {WAIT}s later:\n{self.output()}")
            await asyncio.sleep(0.05)
        for t in self.readers:
            t.join(WAIT)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)


@pytest.fixture
def demo() -> Iterator[Callable[..., Demo]]:
    started: list[Demo] = []

    def start(*args: str) -> Demo:
        started.append(Demo(*args))
        return started[-1]

    yield start
    for d in started:
        d.kill()


async def test_demo_balances_streams_and_stops_on_sigterm(demo: Callable[..., Demo]) -> None:
    d = demo("--port", "0", "--admin-port", "0")
    url = (await d.printed(r"^Proxy: (http://127\.0\.0\.1:\d+)/"))[1]
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        seen = []
        for i in range(9):
            async with client.get(f"{url}/hello/{i}", headers={"X-Request-ID": f"t-{i}"}) as r:
                assert r.status == 200, await r.text()
                body = await r.json()
            assert body["path"] == f"/hello/{i}"
            assert body["request_id"] == f"t-{i}"  # passed through to the backend
            seen.append(body["backend"])
        assert set(seen) == NAMES, seen

        # /stream: the first lines arrive while the backend is still writing the rest.
        async with client.get(f"{url}/stream") as r:
            assert r.status == 200
            arrivals = []
            async for line in r.content:
                arrivals.append((time.monotonic(), line.decode()))
        assert len(arrivals) == 20, arrivals
        assert re.match(r"(alpha|bravo|charlie) line 1/20", arrivals[0][1])
        assert arrivals[-1][0] - arrivals[0][0] > 1.0, "the stream arrived all at once"

        for endpoint in ("/healthz", "/slow?ms=50"):
            async with client.get(url + endpoint) as r:
                assert r.status == 200, endpoint

        dashboard = next((ln.split(": ", 1)[1] for ln in d.out if ln.startswith("Dashboard: ")),
                         None)
        if dashboard is not None:  # printed once the admin app runs beside the proxy
            async with client.get(dashboard) as r:
                assert r.status == 200

    d.proc.send_signal(signal.SIGTERM)
    assert await d.exit_code() == 0, d.output()
    with pytest.raises(OSError):  # the proxy's port is closed
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=2).close()


async def test_demo_exits_0_on_ctrl_c(demo: Callable[..., Demo]) -> None:
    d = demo("--port", "0", "--admin-port", "0")
    await d.printed(r"^Proxy: ")
    d.proc.send_signal(signal.SIGINT)
    assert await d.exit_code() == 0, d.output()
    assert not [ln for ln in d.err if "Traceback" in ln], d.output()


async def test_demo_port_taken_is_one_clear_line(demo: Callable[..., Demo]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = demo("--port", str(port), "--admin-port", "0")
        assert await d.exit_code() == 1, d.output()
    assert not d.out or not any(ln.startswith("Proxy: ") for ln in d.out), d.output()
    last = d.err[-1]
    assert last.startswith("balancer demo: ") and str(port) in last, d.output()
    assert "in use" in last and "--port 0" in last, d.output()
    assert not [ln for ln in d.err if "Traceback" in ln], d.output()


def test_demo_config_fills_in_every_port(tmp_path: Path) -> None:
    """The shipped demo.yaml names the backends the demo starts; all ports come from the run."""
    names = demo_backend_names()
    assert set(names) == NAMES
    backends = [DemoBackend(n, 40000 + i, runner=None) for i, n in  # type: ignore[arg-type]
                enumerate(names)]
    data = demo_config(backends, 8123, 9123)
    assert data["listen"] == "127.0.0.1:8123" and data["admin"] == "127.0.0.1:9123"
    urls = [b["url"] for b in data["pools"]["demo"]["backends"]]
    assert urls == [f"http://127.0.0.1:{40000 + i}" for i in range(3)]
