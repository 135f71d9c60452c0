"""The proxy as a real subprocess: ``python -m balancer run -c FILE``.

Lifecycle tests need a real process: real signals, a real exit code, a listening socket that
really goes away. ``BalancerProcess`` starts one, collects its stderr line by line (a reader
thread, so the test's event loop, which also runs the test backends, is never blocked), waits
for log lines with a timeout on every wait, and always kills the process at the end.
``RunningBalancer`` is one on kernel-chosen ports with its /metrics at hand, for load tests;
``fd_count``, ``memory`` and ``settle_fds`` read what a process holds from /proc.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

import yaml

#: Every wait in these helpers gives up after this long unless told otherwise (seconds).
WAIT = 15.0

#: The start line of balancer.app (other parts, like the admin server, log their own).
READY = re.compile(r"balancer\.app: balancer \S+ listening on (\S+)")


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as YAML to ``path`` (atomically: a reload never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def pool_config(ports: list[int], **pool: Any) -> dict[str, Any]:
    """A pool of loopback backends named ``b<port>``."""
    return {"backends": [{"url": f"http://127.0.0.1:{p}", "name": f"b{p}"} for p in ports],
            **pool}


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m balancer ARGS`` to completion (for commands that exit by themselves)."""
    return subprocess.run([sys.executable, "-m", "balancer", *args], capture_output=True,
                          check=False,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=_env())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("BALANCER_LOG_LEVEL", None)
    return env


class BalancerProcess:
    """``balancer run -c CONFIG`` in a subprocess; use as a (sync or async) context manager."""

    def __init__(self, config: Path, *args: str) -> None:
        self.config = config
        self.args = args  # more ``run`` options, e.g. ``--watch``
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "balancer", "run", "-c", str(self.config), *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=_env())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def kill(self) -> None:
        """Kill the process if it still runs, and reap it. Safe to call twice."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=WAIT)
        finally:
            if self._reader is not None:
                self._reader.join(timeout=WAIT)  # EOF once its children are gone too
                if not self._reader.is_alive() and self.proc.stderr is not None:
                    self.proc.stderr.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    async def __aenter__(self) -> Self:
        self.start()
        try:
            await self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.kill()

    # --- reading -------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def mark(self) -> int:
        """The number of log lines so far: pass it to ``wait_for`` to see only newer ones."""
        with self._lock:
            return len(self.lines)

    def lines_since(self, mark: int) -> list[str]:
        with self._lock:
            return self.lines[mark:]

    async def wait_for(self, pattern: str, since: int = 0, timeout: float = WAIT) -> str:
        """The first log line after ``since`` that matches ``pattern`` (a regex)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines_since(since):
                if rx.search(line):
                    return line
            if self.returncode is not None:
                await asyncio.sleep(0.1)  # let the reader thread take the last lines
                for line in self.lines_since(since):
                    if rx.search(line):
                        return line
                raise AssertionError(f"balancer exited ({self.returncode}) before logging "
                                     f"{pattern!r}; its log:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line {pattern!r} within {timeout}s; log:\n"
                                     f"{self.log}")
            await asyncio.sleep(0.02)

    async def wait_ready(self, timeout: float = WAIT) -> str:
        """Wait for the start line; returns the address it listens on."""
        line = await self.wait_for(READY.pattern, timeout=timeout)
        m = READY.search(line)
        assert m is not None
        return m.group(1)

    # --- acting --------------------------------------------------------------------------

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = WAIT) -> int:
        """Wait (without blocking the event loop) for the process to exit; its exit code."""
        deadline = time.monotonic() + timeout
        while self.returncode is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"balancer still running {timeout}s later; log:\n{self.log}")
            await asyncio.sleep(0.02)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, WAIT)
        rc = self.returncode
        assert rc is not None
        return rc


class RunningBalancer:
    """``balancer run`` on a config written from ``pools``: its proxy URL, admin URL, pid and
    /metrics. Ports are the kernel's (listen and admin on port 0, read back from the start
    lines), so nothing races for a free port."""

    def __init__(self, workdir: Path, pools: dict[str, Any], **top: Any) -> None:
        data = {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "pools": pools, **top}
        self.path = write_config(workdir / "balancer.yaml", data)
        self.proc = BalancerProcess(self.path)
        self.url = self.admin = ""

    async def __aenter__(self) -> Self:
        await self.proc.__aenter__()
        try:
            self.url = "http://" + await self.proc.wait_ready()
            line = await self.proc.wait_for(r"admin: dashboard at http://(\S+)/")
            self.admin = "http://" + re.search(r"http://(\S+?)/", line).group(1)  # type: ignore
        except BaseException:
            self.proc.kill()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.proc.kill()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """Every sample of /metrics: (name, labels, value)."""
        import aiohttp
        from prometheus_client.parser import text_string_to_metric_families

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as s, \
                s.get(self.admin + "/metrics") as r:
            text = await r.text()
        return [(x.name, x.labels, x.value) for f in text_string_to_metric_families(text)
                for x in f.samples]

    async def counter(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(v for n, lb, v in await self.metrics()
                   if n == name and all(lb.get(k) == x for k, x in labels.items()))


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid``, in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


async def settle_fds(pid: int, at_most: int, timeout: float = 10.0) -> int:
    """Wait until ``pid`` holds at most ``at_most`` fds (idle upstream connections age out
    after upstream.IDLE_TIMEOUT); the last count seen."""
    deadline = time.monotonic() + timeout
    while True:
        n = fd_count(pid)
        if n <= at_most or time.monotonic() > deadline:
            return n
        await asyncio.sleep(0.1)
