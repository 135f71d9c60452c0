"""Sending one request to its pool's backends: pick, connect, send, time out, retry.

``Forwarding`` is the backend half of an ``exchange.Exchange`` (its base class): it keeps what
the attempts need (the backends tried, the upstream connection in use, the request body kept for
a replay, the read deadline) and decides what follows a failure with ``after_failure``, a pure
function of what happened. The answer itself (relaying the response, our own error answers,
the access log) is the Exchange's, declared below as what this half calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from balancer.backend import Backend
from balancer.http1 import RequestHead
from balancer.pool import NoBackend, Pool
from balancer.proxystate import Deadlines
from balancer.strategies import PickContext
from balancer.upstream import UpstreamConnection, UpstreamPool

__all__ = ["ELSEWHERE", "GIVE_UP", "IDEMPOTENT", "P_BUFFER", "P_UPSTREAM", "REPLAY_LIMIT",
           "SAME", "Flow", "Forwarding", "after_failure", "now"]

log = logging.getLogger("balancer.proxy")

now = time.monotonic

#: Methods that may be sent twice (RFC 9110 §9.2.2).
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
#: Request body bytes kept to resend on another backend; a longer body is sent once.
REPLAY_LIMIT = 64 * 1024

# Why reading from a client is paused (a bit each; reading resumes when none is left).
P_UPSTREAM = 1  # the backend reads the request body slower than the client sends it
P_BUFFER = 2  # bytes wait here: a body before a backend is connected, pipelined requests

#: What to do after an attempt failed, before any of its answer reached the client.
GIVE_UP, ELSEWHERE, SAME = 0, 1, 2


def after_failure(kind: str, *, idempotent: bool, replayable: bool, reused: bool,
                  got_bytes: bool, stale_retried: bool, timed_out_before: bool, attempts: int,
                  retries: int) -> int:
    """The retry policy, as a function of what happened: ``GIVE_UP`` (answer 502/504),
    ``ELSEWHERE`` (another backend) or ``SAME`` (a fresh connection to the same backend, not
    counted against it).

    ``kind``: ``connect`` (no connection), ``unsent`` (the connection was dead before the
    request reached it), ``timeout`` (no answer within ``timeouts.read``), or how it broke
    after the request went out (``reset``, ``protocol``...). ``replayable``: the body sent so
    far is still kept; ``got_bytes``: the backend sent anything at all on this connection.
    """
    if kind == "unsent" and reused and not stale_retried:
        return SAME  # a pooled connection the backend had closed meanwhile
    if kind == "connect" or kind == "unsent":  # nothing was delivered: any method may move
        return ELSEWHERE if replayable and attempts <= retries else GIVE_UP
    safe = idempotent and replayable  # sent already: only what may be sent twice
    if kind == "timeout":  # once only, so that the wait is bounded by twice timeouts.read
        return ELSEWHERE if safe and not timed_out_before and attempts <= retries else GIVE_UP
    if safe and reused and not got_bytes and not stale_retried:
        return SAME  # a pooled connection the backend had closed: not the backend's failure
    return ELSEWHERE if safe and attempts <= retries else GIVE_UP


class Flow(Protocol):
    """What forwarding needs of the client connection: its flow control and the sweep of
    read deadlines (``exchange.ClientSide`` is the whole seam)."""

    write_paused: bool  # the client reads slower than we write
    paused: int  # reading from the client is paused (P_* bits)
    deadlines: Deadlines

    def pause(self, why: int) -> None: ...

    def resume(self, why: int) -> None: ...

    def check_buffers(self) -> None:
        """Request bytes waiting here went on: resume reading if it was paused for them."""


class Forwarding:
    """The attempts of one request on its pool's backends (the base of ``Exchange``)."""

    __slots__ = (
        # Request body not yet sent, and what was sent, kept for a retry while it is small
        "pending", "pending_size", "replay", "replay_size", "replayable",
        # Attempts
        "pool", "head", "ctx", "tried", "attempts", "backend", "backend_name", "upstream",
        "sent", "stale_retry", "last_error", "last_status", "timed_out", "deadline",
        "timer_mark", "task", "t_sent", "t_head",
    )

    # Kept by the Exchange, read here.
    conn: Flow
    req: RequestHead
    request_done: bool
    finished: bool
    committed: bool  # part of the answer reached the client
    status: int

    def __init__(self) -> None:
        self.pending: list[bytes] | None = None
        self.pending_size = self.replay_size = 0
        self.replay: list[bytes] | None = None
        self.replayable = True
        self.pool: Pool | None = None
        self.head = b""  # the request head the backends get (the same for every attempt)
        self.ctx: PickContext | None = None
        self.tried: tuple[Backend, ...] = ()
        self.attempts = 0
        self.backend: Backend | None = None
        self.backend_name: str | None = None
        self.upstream: UpstreamConnection | None = None
        self.sent = self.stale_retry = False
        self.last_error = ""
        self.last_status = 502  # the answer when no attempt is left: 504 after a timeout
        self.timed_out = False  # an attempt got no answer within timeouts.read
        self.deadline = 0.0  # > 0 while watched by the Deadlines sweep
        self.timer_mark = 0
        self.task: asyncio.Task[None] | None = None
        self.t_sent = self.t_head = 0.0

    # --- what the Exchange does ----------------------------------------------------------

    def respond_local(self, status: int, detail: str, retry_after: int | None = None) -> None:
        """Answer with our own short error response."""
        raise NotImplementedError

    def _done(self) -> None:
        """The request is over (answered, aborted or abandoned)."""
        raise NotImplementedError

    def _end(self, close: bool = False, abort: bool = False) -> None:
        """End the request now: after a WebSocket session (``close``), or with the client
        connection aborted because its answer was cut short (``abort``)."""
        raise NotImplementedError

    def _discard_answer(self) -> None:
        """Forget an answer begun but not sent yet (another attempt follows, or our own)."""
        raise NotImplementedError

    def _bug(self) -> None:
        """A bug while forwarding: log it, answer 500 if still possible."""
        raise NotImplementedError

    # --- choosing a backend --------------------------------------------------------------

    def _attempt(self) -> None:
        pool = self.pool
        assert pool is not None and self.ctx is not None
        try:
            backend = pool.pick(self.ctx, self.tried)
        except NoBackend as exc:
            if exc.reason == "overload" and pool.config.queue_timeout > 0:
                self._spawn(self._wait_for_slot())
            else:
                self._no_backend(exc.reason)
            return
        except Exception:  # a plug-in strategy's bug must cost one request, not the proxy
            log.exception("pool %s: choosing a backend failed", pool.name)
            self.respond_local(502, f"pool {pool.name}: choosing a backend failed")
            return
        pool.begin(backend)
        self._use(backend)

    async def _wait_for_slot(self) -> None:
        """Every backend is at its max_connections: wait (bounded) for a slot."""
        pool = self.pool
        assert pool is not None and self.ctx is not None
        try:
            try:
                backend = await pool.acquire(self.ctx, self.tried)
            except NoBackend as exc:
                if not self.finished:
                    self._no_backend(exc.reason)
                return
            if self.finished:  # the client left while we waited
                pool.release(backend)
                return
            self._use(backend)
        except Exception:
            self._bug()

    def _no_backend(self, reason: str) -> None:
        name = self.pool.name  # type: ignore[union-attr]
        if self.tried and self.last_status == 504:
            self.respond_local(504, self.last_error)
        elif self.tried:
            self.respond_local(502, f"no backend of pool {name} answered after "
                                    f"{self.attempts} attempt(s); last: {self.last_error}")
        elif reason == "overload":
            self.respond_local(503, f"every backend of pool {name} is at its connection limit",
                               retry_after=1)
        else:
            self.respond_local(503, f"no backend of pool {name} is available", retry_after=5)

    def _use(self, backend: Backend) -> None:
        """Send to ``backend`` (a slot is taken): on a pooled connection, else a new one."""
        self.backend = backend
        self.attempts += 1
        if self.tried:  # a retry: counted against the backend whose failure caused it
            self.tried[-1].retries += 1
        upool = backend.connections
        if upool is None:
            upool = backend.connections = UpstreamPool(backend)
        up = upool.get()
        if up is not None:
            self._send(up)
        else:
            self._spawn(self._open(backend))

    async def _open(self, backend: Backend) -> None:
        upool: UpstreamPool = backend.connections
        try:
            try:
                up = await upool.connect(self.pool.config.timeouts.connect)  # type: ignore
            except OSError as exc:
                if self.backend is backend and not self.finished:
                    self._connect_failed("connect timed out" if isinstance(exc, TimeoutError)
                                         else f"connect failed: {exc.strerror or exc}")
                return
            if self.backend is not backend or self.finished:  # the client left meanwhile
                upool.release(up, True)
                return
            self._send(up)
        except Exception:
            self._bug()

    def _connect_failed(self, detail: str) -> None:
        backend = self.backend
        assert backend is not None
        self._finish_backend(0, error="connect", latency=None)
        self.tried += (backend,)
        self.last_error = f"{backend.name}: {detail}"
        self.last_status = 502
        if self._policy("connect", None) == ELSEWHERE:
            self._attempt()
        else:
            self.respond_local(502, f"no backend of pool {self.pool.name} could be reached "  # type: ignore
                                    f"after {self.attempts} attempt(s); last: {self.last_error}")

    # --- sending -------------------------------------------------------------------------

    def _send(self, up: UpstreamConnection) -> None:
        """Write the head, and the body so far, to ``up``."""
        self.upstream = up
        up.begin(self, self.req.method == b"HEAD")  # type: ignore[arg-type]  # the Exchange
        transport = up.transport
        assert transport is not None
        conn = self.conn
        if conn.write_paused:
            transport.pause_reading()
        replay = self.replay
        pending = self.pending
        if replay or pending:
            parts = [self.head]
            if replay:
                parts += replay
            if pending:
                parts += pending
                self._keep(pending)
                self.pending = None
                self.pending_size = 0
            transport.writelines(parts)
        else:
            transport.write(self.head)
        self.t_sent = t = now()
        self.sent = False
        if transport.is_closing():
            self._write_failed(up)
            return
        if self.request_done:
            self.sent = True
            self._arm_timer(t)
        if conn.paused:
            conn.check_buffers()

    def flush_request(self) -> None:
        """Send request body bytes that arrived since; note when the request is all out."""
        up = self.upstream
        if up is None or up.spliced:
            return
        pending = self.pending
        if pending:
            up.transport.writelines(pending)  # type: ignore[union-attr]
            self._keep(pending)
            self.pending = None
            self.pending_size = 0
        if self.request_done and not self.sent:
            self.sent = True
            self._arm_timer(now())

    def _keep(self, chunks: list[bytes]) -> None:
        """Remember sent body bytes for a retry, while they fit the replay buffer."""
        if self.replayable:
            size = self.replay_size + self.pending_size
            if size > REPLAY_LIMIT:
                self.replayable = False
                self.replay = None
            else:
                self.replay_size = size
                if self.replay is None:
                    self.replay = list(chunks)
                else:
                    self.replay += chunks

    def _write_failed(self, up: UpstreamConnection) -> None:
        """The connection was dead before the request reached it: nothing was delivered."""
        self.upstream = None
        up.close()
        if self._policy("unsent", up) == SAME:
            self.stale_retry = True
            self._spawn(self._open(self.backend))  # type: ignore[arg-type]
        else:
            self._connect_failed("connection closed before the request was sent")

    def _arm_timer(self, t: float) -> None:
        """Wait at most ``timeouts.read`` (from ``t``) for the next bytes of the answer."""
        up = self.upstream
        assert up is not None and self.pool is not None
        self.timer_mark = up.received
        self.deadline = t + self.pool.config.timeouts.read
        self.conn.deadlines.watch(self)

    def read_deadline(self) -> None:
        """``timeouts.read`` passed: if no byte came meanwhile, give up on this backend."""
        up = self.upstream
        if up is None or self.finished:
            self._cancel_timer()
            return
        if up.received != self.timer_mark:
            self._arm_timer(now())  # bytes came: wait another full period from now
            return
        self._broke(up, "timeout", f"no answer within {self.pool.config.timeouts.read:g}s")  # type: ignore

    def _cancel_timer(self) -> None:
        if self.deadline:
            self.deadline = 0.0
            self.conn.deadlines.forget(self)

    def client_write_paused(self, paused: bool) -> None:
        """The client reads slower than the backend sends (or caught up): flow control."""
        up = self.upstream
        if up is not None and up.transport is not None:
            if paused:
                up.transport.pause_reading()
            else:
                up.transport.resume_reading()

    # --- failures (upstream.ResponseSink, in part) ---------------------------------------

    def client_raw(self, data: bytes) -> None:
        up = self.upstream
        if up is not None:
            up.transport.write(data)  # type: ignore[union-attr]

    def upstream_failed(self, kind: str, detail: str) -> None:
        up = self.upstream
        if up is not None:
            self._broke(up, kind, detail)

    def upstream_pause(self) -> None:
        self.conn.pause(P_UPSTREAM)

    def upstream_resume(self) -> None:
        self.conn.resume(P_UPSTREAM)

    def _broke(self, up: UpstreamConnection, kind: str, detail: str) -> None:
        """The attempt on ``up`` failed: retry where safe, else answer or abort."""
        self.upstream = None
        up.close()
        self._cancel_timer()
        if up.spliced:  # a WebSocket closed by the backend: the session is over
            self._finish_backend(101)
            self._end(close=True)
            return
        if self.committed:  # the client has part of the answer: it must see it fail
            self._finish_backend(self.status, error=kind)
            self._end(abort=True)
            return
        self._discard_answer()
        backend = self.backend
        assert backend is not None and self.pool is not None
        decision = self._policy(kind, up)
        if decision == SAME:
            self.stale_retry = True
            self._spawn(self._open(backend))
            return
        if kind == "timeout":
            self._finish_backend(0, error=kind, latency=now() - self.t_sent)
            self.last_error = (f"backend {backend.name} did not answer within "
                               f"{self.pool.config.timeouts.read:g}s")
            self.last_status = 504
            if decision == ELSEWHERE:
                self.timed_out = True
                self.tried += (backend,)
                self._attempt()  # another backend, or 504 when there is none (_no_backend)
                return
            self.respond_local(504, self.last_error)
            return
        self._finish_backend(0, error=kind, latency=None)
        self.last_error = f"{backend.name}: {detail}"
        self.last_status = 502
        if decision == ELSEWHERE:
            self.tried += (backend,)
            self._attempt()
            return
        self.respond_local(502, f"backend {backend.name} failed: {detail}")

    def _policy(self, kind: str, up: UpstreamConnection | None) -> int:
        """``after_failure`` for this request and the connection ``up`` it failed on."""
        return after_failure(
            kind, idempotent=self.req.method in IDEMPOTENT, replayable=self.replayable,
            reused=up is not None and up.reused, got_bytes=up is not None and up.received > 0,
            stale_retried=self.stale_retry, timed_out_before=self.timed_out,
            attempts=self.attempts, retries=self.pool.config.retries)  # type: ignore[union-attr]

    def _finish_backend(self, status: int, error: str | None = None,
                        latency: float | None | Any = ...) -> None:
        """Tell the pool this attempt is over (exactly once per acquired backend)."""
        backend = self.backend
        if backend is None:
            return
        self.backend = None
        self.backend_name = backend.name
        if status == 0 and error is None:  # the client left or was refused: nothing to count
            self.pool.release(backend)  # type: ignore[union-attr]
            return
        if latency is ...:
            latency = self.t_head - self.t_sent if self.t_head else None
        self.pool.finish(backend, status=status, latency=latency, error=error)  # type: ignore

    def _drop_upstream(self) -> None:
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.close()
        self._cancel_timer()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.task = asyncio.get_running_loop().create_task(coro)
