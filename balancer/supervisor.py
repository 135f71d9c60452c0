"""``balancer run --workers N``: one supervisor, N worker processes serving ``listen``.

The supervisor is the App (balancer/app.py) with everything that must happen once: loading and
checking the config under the guard, health checks, DNS discovery, the live monitor, probation
and rollback, the admin server, --watch and the signals. It serves no request. Its pools and
backends mirror the workers' (balancer/mirror.py): the workers report what their counters
gained four times a second and the supervisor adds it up, so /metrics, /status, the live share
and probation read the traffic of every worker, unchanged.

- **Listening.** The supervisor binds ``listen`` with SO_REUSEPORT without listening (so port 0
  becomes one real port, and a port taken by another program fails here, in one line), and
  each worker binds the same address with SO_REUSEPORT: the kernel spreads new connections.
- **One verdict.** A reload, a rollback or a discovery change is checked and applied once here;
  every worker is then sent the checked Config object (pickled, never a path to read again)
  and acknowledges it; /status lists each worker's ``config_sha256``. A worker that cannot
  apply it exits and is replaced by one started on it: no worker keeps serving an old config.
- **Health.** Health checks run here, and an ejection any worker decides comes back in its
  report; the verdicts are pushed to every worker within ``PUSH_EVERY``.
- **Limits.** Each worker holds its share of every ``max_connections`` (mirror.share: the limit
  split evenly, the remainder to the first workers, at least 1 each).
- **Faults.** A worker that exits while serving is started again at once (logged, counted in
  ``balancer_worker_restarts_total``); workers die with the supervisor (PR_SET_PDEATHSIG and
  the end of their socket pair). SIGTERM drains every worker, then the supervisor exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any

from balancer.app import App, StartError, _reason
from balancer.config import Address, Config
from balancer.loading import Applied
from balancer.mirror import Mirror, health_state, slots
from balancer.wire import frame, read_message

log = logging.getLogger("balancer.app")

#: How often the supervisor looks for health changes to push to the workers (seconds).
PUSH_EVERY = 0.1
#: How long a worker may take to start serving before the start fails (seconds).
START_TIMEOUT = 30.0
#: How long probation waits for every worker to apply a change before it counts (seconds).
CATCH_UP = 2.0
#: A worker that died sooner than this after its start is started again only after it.
RESPAWN_BACKOFF = 1.0


def count_workers(value: int | str) -> int:
    """``workers`` as a number: ``auto`` is the cores this process may run on."""
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    return int(value)


def reserve(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` with SO_REUSEPORT and do not listen: the port (the kernel's when 0)
    is ours for the workers to share, and no connection is queued on this socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class WorkerProcess:
    """One worker as the supervisor sees it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pid = 0
        self.up = False
        self.restarts = 0
        self.requests = 0  # answered by this worker (and those it replaced), as reported
        self.ejected: list[str] = []  # pool/backend it holds ejected, as last reported
        self.started = 0.0
        self.config_sha256: str | None = None
        self.generation = 0  # the last config message it applied (see Supervisor.caught_up)
        self.ready: asyncio.Future[None] | None = None
        #: Reads its messages until it exits (then starts the next one, unless draining).
        self.follow: asyncio.Task[None] | None = None

    def send(self, message: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(message)

    def describe(self) -> dict[str, Any]:
        return {"worker": self.index, "pid": self.pid, "up": self.up,
                "restarts": self.restarts, "requests": self.requests,
                "ejected": self.ejected, "config_sha256": self.config_sha256}


class Supervisor(App):
    """The App without a listener of its own: it runs ``count`` workers that serve."""

    def __init__(self, config_path: str, count: int, running: Applied | None = None) -> None:
        super().__init__(config_path, running)
        self.count = count
        self.mirror = Mirror()
        # The client side summed over the workers (balancer/appview.py ClientSideView): the
        # supervisor serves no client, so it has no ProxyState of its own to show.
        self.state = self.mirror.client  # type: ignore[assignment]
        self.procs = [WorkerProcess(i) for i in range(count)]
        self._reserved: socket.socket | None = None
        self._pushed: dict[Any, Any] = {}
        self._workers_key = self.config.workers
        self._generation = 0  # config changes sent to the workers so far

    # --- what /status and /metrics show ------------------------------------------------

    def _publish(self) -> None:
        self.workers = tuple(wp.describe() for wp in self.procs)

    @property
    def address(self) -> Address:
        if self._reserved is not None:
            host, port = self._reserved.getsockname()[:2]
            return Address(host, port)
        return self.config.listen

    # --- start -------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await super().start()
        except StartError:
            self._kill_all()  # a service that failed to start: the workers go too
            raise

    async def _listen(self) -> None:
        addr = self.config.listen
        try:
            self._reserved = reserve(addr.host, addr.port)
        except OSError as exc:
            raise StartError(f"listen {addr}: {_reason(exc)}") from None
        for wp in self.procs:
            await self._start_worker(wp)
        for wp in self.procs:
            assert wp.ready is not None
            try:
                await asyncio.wait_for(asyncio.shield(wp.ready), START_TIMEOUT)
            except (StartError, asyncio.TimeoutError) as exc:
                self._kill_all()
                raise StartError(str(exc) or f"worker {wp.index} did not start in "
                                 f"{START_TIMEOUT:g}s") from None
        self.spawn(self._push_loop())
        log.info("%d workers serving %s (pids %s)", self.count, self.address,
                 ", ".join(str(wp.pid) for wp in self.procs))

    async def _start_worker(self, wp: WorkerProcess) -> None:
        parent, child = socket.socketpair()
        wp.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "balancer.worker", str(wp.index), str(self.count),
            str(child.fileno()), pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        child.close()
        wp.pid, wp.up, wp.started = wp.proc.pid, False, time.monotonic()
        wp.config_sha256, wp.generation = None, self._generation  # it starts on the latest
        wp.ready = asyncio.get_running_loop().create_future()
        reader, wp.writer = await asyncio.open_connection(sock=parent)
        wp.send(self._config_message({"listen": (self.address.host, self.address.port)}))
        self._publish()
        wp.follow = task = asyncio.get_running_loop().create_task(
            self._follow(wp, reader, wp.proc))
        self._tasks.add(task)  # kept until it ends, like App.spawn's
        task.add_done_callback(self._tasks.discard)

    def _config_message(self, extra: dict[str, Any] | None = None) -> bytes:
        health = health_state(self.pools)
        self._pushed = health
        config: Config = self.config
        return frame({"config": config, "sha256": self.config_sha256, "health": health,
                      "generation": self._generation, **(extra or {})})

    async def caught_up(self) -> None:
        """Every live worker has applied the last config sent. A worker reports what it
        counted before it applies one, so from here the mirror counts only the new config's
        traffic: probation then judges what the change did, not the seconds before it."""
        deadline = asyncio.get_running_loop().time() + CATCH_UP
        while any(wp.up and wp.generation < self._generation for wp in self.procs):
            if asyncio.get_running_loop().time() > deadline:
                log.warning("probation: not every worker applied the change within %gs; "
                            "counting from now", CATCH_UP)
                return
            await asyncio.sleep(0.01)

    # --- the workers' messages and deaths ----------------------------------------------

    async def _follow(self, wp: WorkerProcess, reader: asyncio.StreamReader,
                      proc: asyncio.subprocess.Process) -> None:
        """Read ``wp``'s messages until it exits; then start another one unless draining."""
        try:
            while True:
                message = await read_message(reader)
                if "report" in message:
                    report = message["report"]
                    wp.requests += self.mirror.fold(wp.index, report, self.pools)
                    wp.ejected = self._ejected(report)
                    self._publish()
                elif "applied" in message:
                    wp.config_sha256 = message["applied"]
                    wp.generation = message.get("generation", wp.generation)
                    self._publish()
                elif "ready" in message:
                    wp.up, wp.config_sha256 = True, message["sha256"]
                    self._publish()
                    if wp.ready is not None and not wp.ready.done():
                        wp.ready.set_result(None)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        code = await proc.wait()
        if wp.proc is not proc:
            return
        wp.up = False
        self.mirror.forget(wp.index, self.pools)
        self._publish()
        if wp.ready is not None and not wp.ready.done():
            wp.ready.set_exception(StartError(
                f"worker {wp.index} exited ({_exit_reason(code)}) before serving"))
            return
        if self._draining:
            return
        log.error("worker %d (pid %d) exited (%s); starting a new one", wp.index, wp.pid,
                  _exit_reason(code))
        wp.restarts += 1
        if time.monotonic() - wp.started < RESPAWN_BACKOFF:  # no crash loop at full speed
            await asyncio.sleep(RESPAWN_BACKOFF)
        if self._draining:
            return
        await self._start_worker(wp)
        assert wp.ready is not None
        try:
            await asyncio.wait_for(asyncio.shield(wp.ready), START_TIMEOUT)
        except (StartError, asyncio.TimeoutError):
            return  # its _follow says why and starts another one
        log.info("worker %d serving again (pid %d)", wp.index, wp.pid)

    def _ejected(self, report: dict[str, Any]) -> list[str]:
        """``pool/backend`` of the backends the worker holds ejected now (its last report)."""
        now, current = time.monotonic(), slots(self.pools)
        return sorted(f"{slot[0]}/{current[slot].name}"
                      for slot, entry in report["backends"].items()
                      if slot in current and entry.get("ejected", (0.0,))[0] > now)

    async def _push_loop(self) -> None:
        """Push health verdicts (checks here, ejections from any worker) to every worker."""
        while not self._draining:
            await asyncio.sleep(PUSH_EVERY)
            health = health_state(self.pools)
            if health != self._pushed:
                self._pushed = health
                message = frame({"health": health})
                for wp in self.procs:
                    wp.send(message)

    # --- reload: one verdict, applied by every worker ----------------------------------

    def _tell_services(self, skip: object = None) -> None:
        """After every applied change (reload, rollback, discovery): the workers take it."""
        self._generation += 1  # a change: caught_up waits for every worker to apply it
        message = self._config_message()
        for wp in self.procs:
            wp.send(message)
        if self.config.workers != self._workers_key:
            log.warning("workers changed from %s to %s: takes effect on restart",
                        self._workers_key, self.config.workers)
            self._workers_key = self.config.workers
        super()._tell_services(skip)

    # --- drain -------------------------------------------------------------------------

    async def drain(self, timeout: float | None = None) -> None:
        """Tell every worker to drain (they stop accepting and finish their requests), wait
        for them to exit, then stop the services."""
        if self._draining:
            return
        self._draining = True
        async with self._reload_lock:
            pass
        p = self._probation
        if p is not None and not p.over:
            p.outcome.set_result({"result": "ended", "reason": "draining", "at": time.time()})
        timeout = self.config.drain_timeout if timeout is None else timeout
        log.info("draining: %d worker(s) stop accepting; %d request(s) in flight; waiting up "
                 "to %gs", self.count, self.mirror.client.in_flight, timeout)
        message = frame({"drain": timeout})
        for wp in self.procs:
            wp.send(message)
        waits = [wp.proc.wait() for wp in self.procs if wp.proc is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout + 5.0)
        except asyncio.TimeoutError:
            log.warning("workers still running %gs after the drain timeout: killing them", 5.0)
            self._kill_all()
            await asyncio.gather(*waits, return_exceptions=True)
        # The readers fold each worker's last report (sent as it exits) before they end.
        follows = [wp.follow for wp in self.procs if wp.follow is not None]
        if follows:
            await asyncio.wait(follows, timeout=5.0)
        if self._reserved is not None:
            self._reserved.close()
        await self.fleet.close()
        await self.checker.close()
        await self._stop_services()
        log.info("drained: stopped")

    def _kill_all(self) -> None:
        for wp in self.procs:
            if wp.proc is not None and wp.proc.returncode is None:
                wp.proc.kill()


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            import signal

            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
