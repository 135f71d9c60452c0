"""``BackendProcess``: a ``FaultyServer`` in its own process (``python -m tests.support.backends``)
so that it can be SIGKILLed mid-answer, frozen, and restarted on its port. It logs each request
id to a file as it arrives, which survives the kill.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Self

from tests.support.backends.faulty import FaultyServer
from tests.support.backends.server import Addressed
from tests.support.proc import WAIT


class BackendProcess(Addressed):
    """A ``FaultyServer`` in its own process: SIGKILL it mid-answer, restart it on its port.

    What it received survives the kill in ``log_path`` (one ``<rid> <method>`` line per head).
    """

    def __init__(self, name: str, workdir: Path, port: int = 0) -> None:
        self.name = name
        self.port = port
        self.log_path = workdir / f"{name}.received"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    async def start(self) -> Self:
        """Start (or restart) the server; returns once it accepts connections."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.backends", "--name", self.name,
             "--port", str(self.port), "--log", str(self.log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[3])
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), WAIT)
        m = re.match(rb"ready (\d+)", line)
        if m is None:
            self.kill()
            raise AssertionError(f"backend {self.name} did not start: {line!r}")
        self.port = int(m.group(1))
        self.starts += 1
        return self

    def kill(self) -> None:
        """SIGKILL and reap: whatever it was doing stops mid-way, its sockets close."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(WAIT)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections for it, nothing is answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def set_fault(self, kind: str, arg: str | None = None) -> None:
        """Make every request fail with ``kind`` from now on (``ok`` to stop)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            q = f"?arg={arg}" if arg is not None else ""
            writer.write(f"GET /_fault/{kind}{q} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await writer.drain()
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)).startswith(
                b"HTTP/1.1 204")
        finally:
            writer.close()

    def received(self) -> Counter[str]:
        """Request id → times its head reached this backend, over every run."""
        total: Counter[str] = Counter()
        for run in self.runs():
            total.update(run)
        return total

    def runs(self) -> list[Counter[str]]:
        """What each run (start to kill) received: request id → times."""
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        runs: list[Counter[str]] = []
        for line in text.splitlines():
            if line.startswith("# start"):
                runs.append(Counter())
            elif line and runs:
                runs[-1][line.split(" ", 1)[0]] += 1
        return runs

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.kill()


def received_by_all(backends: list[BackendProcess] | list[FaultyServer]) -> Counter[str]:
    """Request id → times it reached any of ``backends``."""
    total: Counter[str] = Counter()
    for b in backends:
        total.update(b.received() if isinstance(b, BackendProcess) else b.received)
    return total


def main() -> None:
    """``python -m tests.support.backends --name N [--port P] [--log FILE]``: serve until killed;
    prints ``ready <port>`` once listening."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log")
    args = parser.parse_args()

    async def serve() -> None:
        server = await FaultyServer(args.name, args.port, args.log).start()
        print(f"ready {server.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    asyncio.run(serve())

