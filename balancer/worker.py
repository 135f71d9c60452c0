"""A worker process of ``balancer run --workers N``: the request path and nothing else.

Started by the supervisor (balancer/supervisor.py) as ``python -m balancer.worker INDEX COUNT
FD``, with FD one end of a socket pair. Everything arrives over it: the config to serve (already
checked by the supervisor's guard; the worker never reads a file), health verdicts, reloads,
the order to drain. The worker binds ``listen`` itself with SO_REUSEPORT, so the kernel spreads
new connections over the workers, and runs the request path (ProxyState, Fleet,
protocol_factory) exactly as a single process does. Every ``REPORT_EVERY`` seconds it reports
what its counters gained (balancer/mirror.py); nothing on the request path waits for the
supervisor or talks to it.

It dies with the supervisor: PR_SET_PDEATHSIG on Linux, and an end of file on the socket pair
everywhere. A config it cannot apply makes it exit (the supervisor starts a new one on the
config every other worker runs), so no worker serves a config the others left.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import select
import signal
import socket
import sys
from typing import Any, TextIO, cast

from balancer.config import Config
from balancer.fleet import Fleet
from balancer.loading import listener_tls
from balancer.mirror import (
    REPORT_EVERY,
    Reporter,
    apply_health,
    split_limits,
)
from balancer.proxy import ProxyState, protocol_factory
from balancer.proxystate import settings_for
from balancer.router import Router
from balancer.run import freeze_heap, run_on_uvloop
from balancer.wire import die_with_parent, frame, read_message

log = logging.getLogger("balancer.worker")

#: How often a drain looks again for requests still in flight (seconds).
POLL = 0.02


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` that shares the port with the other workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class WholeLines(io.TextIOBase):
    """stderr as N workers share it: every write(2) holds whole lines and at most PIPE_BUF
    bytes, which a pipe writes at once, so two workers' log lines never tear into each other
    (the access log writes its batches of lines in one call)."""

    def __init__(self, fd: int = 2) -> None:
        self.fd = fd

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "replace")
        start = 0
        while start < len(data):
            end = start + select.PIPE_BUF
            if end < len(data):
                cut = data.rfind(b"\n", start, end)
                end = cut + 1 if cut >= start else end
            start += os.write(self.fd, data[start:end])
        return len(text)


class Worker:
    """The request path of one worker, driven by the supervisor's messages."""

    def __init__(self, index: int, count: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.index, self.count = index, count
        self.reader, self.writer = reader, writer
        self.fleet = Fleet()
        self.reporter = Reporter()
        self.state: ProxyState | None = None
        self.server: asyncio.Server | None = None
        self.config: Config | None = None
        self.tls_context: Any = None
        self.done = asyncio.Event()
        self.draining = False

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(frame(message))

    async def run(self) -> int:
        """Serve the first config, then follow the supervisor until told to drain."""
        first = await read_message(self.reader)
        config: Config = first["config"]
        self._take(config, first["sha256"])
        apply_health(self.fleet.pools, first["health"])
        assert self.state is not None
        host, port = first["listen"]
        tls: dict[str, Any] = {}
        self.tls_context = listener_tls(config)
        if self.tls_context is not None:
            tls = {"ssl": self.tls_context,
                   "ssl_handshake_timeout": config.client.header_timeout}
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(protocol_factory(self.state),
                                               sock=reuseport_socket(host, port), **tls)
        self.send({"ready": os.getpid(), "sha256": first["sha256"]})
        freeze_heap()
        reporting = loop.create_task(self._report_loop())
        listening = loop.create_task(self._follow())
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(self.drain(None)))
        await self.done.wait()
        reporting.cancel()
        listening.cancel()
        self.send({"report": self._report()})
        await self.writer.drain()
        return 0

    def _take(self, config: Config, sha256: str) -> None:
        """Apply ``config`` (checked by the supervisor) with this worker's share of limits."""
        local = split_limits(config, self.count, self.index)
        gone = self.fleet.apply(local)
        settings = settings_for(local)
        if self.state is None:
            self.state = ProxyState(Router(local.routes, self.fleet.pools), settings)
        else:
            self.state.router = Router(local.routes, self.fleet.pools)
            self.state.settings = settings
        for backend in gone:
            self.fleet.retire(backend)
        old, self.config = self.config, config
        if old is not None and config.tls is not None and self.tls_context is not None \
                and config.tls != old.tls:
            from balancer.tls import reload_server_context

            reload_server_context(self.tls_context, config.tls.cert, config.tls.key)

    async def _follow(self) -> None:
        """Apply the supervisor's messages in order; its end of the pair closing ends us."""
        try:
            while True:
                message = await read_message(self.reader)
                if "config" in message:
                    if self.state is not None:  # what the old config served, counted as such
                        self.send({"report": self._report()})
                    try:
                        self._take(message["config"], message["sha256"])
                        apply_health(self.fleet.pools, message["health"])
                    except Exception:
                        log.exception("worker %d: cannot apply the config the supervisor sent;"
                                      " exiting so that a new worker starts on it", self.index)
                        os._exit(3)
                    self.send({"applied": message["sha256"],
                               "generation": message.get("generation", 0)})
                elif "health" in message:
                    apply_health(self.fleet.pools, message["health"])
                elif "drain" in message:
                    asyncio.get_running_loop().create_task(self.drain(message["drain"]))
        except (asyncio.IncompleteReadError, ConnectionError):
            if not self.draining:  # the supervisor is gone: so are we, at once
                os._exit(1)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            self.send({"report": self._report()})

    def _report(self) -> dict[str, Any]:
        state = self.state
        assert state is not None
        client = {"connections": len(state.connections), "in_flight": state.in_flight,
                  "turned_away": state.turned_away, "fired": dict(state.timers.fired)}
        return self.reporter.report(self.fleet.pools, client)

    async def drain(self, timeout: float | None) -> None:
        """Stop accepting, let requests in flight finish (up to ``timeout``), close all."""
        if self.draining:
            return
        self.draining = True
        state, config = self.state, self.config
        assert state is not None and config is not None
        timeout = config.drain_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        if self.server is not None:
            self.server.close()
        state.begin_drain()
        deadline = loop.time() + timeout
        while (state.in_flight or state.connections) and loop.time() < deadline:
            await asyncio.sleep(POLL)
        for conn in list(state.connections):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()
        state.timers.close()
        await self.fleet.close()
        self.done.set()


async def _main(index: int, count: int, fd: int) -> int:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    return await Worker(index, count, reader, writer).run()


def main(argv: list[str]) -> int:
    die_with_parent()
    index, count, fd = (int(a) for a in argv)
    # Ctrl-C reaches the whole process group: the supervisor decides when workers drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if os.getppid() == 1:  # the supervisor died before PDEATHSIG was set
        return 1
    from balancer.logs import setup_logging

    setup_logging(stream=cast(TextIO, WholeLines()))  # a text stream: all logs.py uses
    result: list[int] = []

    async def go() -> None:
        result.append(await _main(index, count, fd))

    run_on_uvloop(go())
    return result[0] if result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
