"""``balancer run``: set up logging, load and guard the config, serve until told to stop.

Exit 0 after a clean drain; 1 when the config is invalid or refused (the lines ``balancer
check`` prints) or when the proxy cannot bind.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from typing import Any

from balancer.app import App, StartError
from balancer.config import ConfigError
from balancer.loading import Refused, check_file
from balancer.supervisor import Supervisor, count_workers

log = logging.getLogger("balancer.app")


def main_run(config_path: str, *, watch: bool = False, workers: int | str | None = None) -> int:
    """``balancer run -c FILE [--watch] [--workers N]``: 0 after a clean drain, 1 when the
    config or the bind fails. ``watch``: reload when the file's content changes
    (balancer/watch.py). ``workers`` (else the config's ``workers``): more than 1 starts a
    supervisor and that many worker processes (balancer/supervisor.py)."""
    from balancer.logs import setup_logging

    setup_logging()
    try:
        app = build_app(config_path, workers)
    except ConfigError as exc:
        # The lines `balancer check` prints, so an operator sees one wording everywhere.
        warnings = exc.report.warnings if isinstance(exc, Refused) else []
        for prefix, problem in [("", p) for p in exc.problems] + [("warning: ", w)
                                                                  for w in warnings]:
            where = "" if problem.startswith(config_path) else f"{config_path}: "
            print(f"{prefix}{where}{problem}", file=sys.stderr)
        return 1
    if watch:
        from balancer.watch import ConfigWatcher

        app.services.append(ConfigWatcher(config_path))
    try:
        run_on_uvloop(serve(app))
    except StartError as exc:
        log.error("%s", exc)
        return 1
    return 0


def build_app(config_path: str, workers: int | str | None = None) -> App:
    """The App for ``config_path``: one process, or a Supervisor when more workers are asked
    for (the flag, else the config's key). The config is loaded and checked once, here."""
    running = check_file(config_path)
    count = count_workers(workers if workers is not None else running.config.workers)
    if count <= 1:
        return App(config_path, running)
    return Supervisor(config_path, count, running)


async def serve(app: App) -> None:
    """Start, serve until SIGTERM or SIGINT (SIGHUP reloads), then drain. A second SIGTERM or
    SIGINT while draining exits at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stop(sig: int) -> None:
        name = signal.Signals(sig).name
        if stop.is_set():
            log.warning("%s again while draining: exiting now", name)
            flush_logs()
            os._exit(128 + sig)
        log.info("%s: draining", name)
        stop.set()

    def on_hup() -> None:
        log.info("SIGHUP: reloading %s", app.config_path)
        app.spawn(app.reload())

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop, sig)
    except (NotImplementedError, RuntimeError):  # not the main thread, or no signals
        log.debug("signal handlers not installed")
    await app.checker.warm()  # before serving: its start competes with no request
    await app.start()
    freeze_heap()
    await stop.wait()
    await app.drain()


def flush_logs() -> None:
    """Write out what the log handlers hold (the access log batches lines)."""
    for h in (*logging.getLogger().handlers, *logging.getLogger("balancer.access").handlers):
        h.flush()
    sys.stderr.flush()


def freeze_heap() -> None:
    """Move start-up objects out of the collector's sight: fewer, cheaper collections."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def run_on_uvloop(coro: Any) -> None:
    """Run ``coro`` to the end on a uvloop event loop (asyncio's when uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)
