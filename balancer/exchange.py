"""One request on its way through the proxy: to a backend (again, where that is safe) and back.

An ``Exchange`` is created when a request starts arriving on a ``ClientConnection`` and lives
until its answer is written. It is also the *sink* of the upstream connection it uses
(``upstream.ResponseSink``), so the response path is direct callbacks, no queue or task.

Failure rules (each answer is a short JSON body carrying the request id):

- no route → 404; the pool has no backend for it → 503 with ``Retry-After``;
- a connection cannot be made → another backend (any method: nothing was sent), up to
  ``retries`` more attempts; all fail → 502;
- the backend fails after the request went out → another backend only for idempotent methods
  whose body so far fits the replay buffer (``REPLAY_LIMIT``); otherwise 502. A pooled
  keep-alive connection the backend had already closed (no byte came back) is retried on a
  fresh connection to the same backend without counting against it;
- nothing comes back within ``timeouts.read`` → an idempotent request is tried once more on
  another backend (a hung backend costs its clients one wait, not an error); a second timeout,
  a non-idempotent request, or no other backend → 504. Once only, so that the wait is bounded
  by twice ``timeouts.read``;
- an answer cut short after bytes reached the client → the client connection is aborted, so a
  truncated body is never taken for a complete one.

The pool hears of every attempt exactly once (``Pool.finish``), with its latency or its error
kind (``connect``, ``timeout``, ``reset``, ``protocol``), which feeds counters, the EWMA and
passive ejection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Coroutine, Iterable
from itertools import count
from typing import Any, Protocol

from balancer import accesslog
from balancer.backend import Backend
from balancer.http1 import RequestHead, drop_named, error_response, status_line
from balancer.pool import NoBackend, Pool
from balancer.strategies import PickContext
from balancer.upstream import LENGTH, NO_BODY, BadResponse, UpstreamConnection, UpstreamPool

__all__ = ["ELSEWHERE", "GIVE_UP", "SAME", "after_failure", "IDEMPOTENT", "P_BUFFER",
           "P_UPSTREAM", "REPLAY_LIMIT", "ClientSide", "Deadlines",
           "Exchange", "now"]

log = logging.getLogger("balancer.proxy")

now = time.monotonic

#: Methods that may be sent twice (RFC 9110 §9.2.2).
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
#: Request body bytes kept to resend on another backend; a longer body is sent once.
REPLAY_LIMIT = 64 * 1024

# Why reading from a client is paused (a bit each; reading resumes when none is left).
P_UPSTREAM = 1  # the backend reads the request body slower than the client sends it
P_BUFFER = 2  # bytes wait here: a body before a backend is connected, pipelined requests

# How the answer's body goes to the client.
O_NONE, O_RAW, O_CHUNK = 0, 1, 2

_RID_PREFIX = os.urandom(4).hex()
_rid_seq = count(1)
_SANE_RID = re.compile(rb"[A-Za-z0-9._:+/=@-]{1,128}").fullmatch


def new_request_id() -> bytes:
    """Unique per process and cheap: a random prefix and a counter."""
    return f"{_RID_PREFIX}{next(_rid_seq):08x}".encode()


#: IP addresses (with a port) and ('host', port) tuples in OS error texts.
_ADDRESS = re.compile(r"\[[0-9A-Fa-f:.]+\](?::\d+)?|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"
                      r"|\('[^']*', \d+\)")


def public_detail(detail: str, backends: Any) -> str:
    """``detail`` as a client may read it: where backends are (URL, host:port, host, any IP
    address) is replaced by their place in the pool (``backend #2``). Client-side hardening:
    error pages must not map the inside; the full text goes to the log."""
    for i, b in enumerate(backends, 1):
        for text in (b.url, f"[{b.host}]:{b.port}", f"{b.host}:{b.port}", b.host):
            if text in detail:
                detail = detail.replace(text, f"backend #{i}")
    return _ADDRESS.sub("<address>", detail)


class Deadlines:
    """The read deadlines of requests waiting for a backend, checked by one periodic sweep.

    Cheaper than a timer per request (a set add and discard instead of scheduling and
    cancelling a TimerHandle, for every request); a deadline fires up to ``interval`` late.
    """

    __slots__ = ("waiting", "interval", "_handle")

    def __init__(self, interval: float = 0.1) -> None:
        self.waiting: set[Exchange] = set()
        self.interval = interval
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, ex: Exchange) -> None:
        self.waiting.add(ex)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.interval, self._sweep)

    def forget(self, ex: Exchange) -> None:
        self.waiting.discard(ex)

    def _sweep(self) -> None:
        self._handle = None
        t = now()
        for ex in [ex for ex in self.waiting if ex.deadline <= t]:
            self.waiting.discard(ex)
            try:
                ex.read_deadline()
            except Exception:
                log.exception("bug while timing out %r", ex)
        if self.waiting:
            self._handle = asyncio.get_running_loop().call_later(self.interval, self._sweep)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


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


class ClientSide(Protocol):
    """What an Exchange needs of its client connection (``proxy.ClientConnection``): it reads
    these and calls these, and writes none of the connection's state."""

    client_ip: str
    client_addr: bytes  # client_ip, encoded once
    proto: bytes  # b"http" or b"https", for X-Forwarded-Proto
    closing: bool  # keep-alive is over: answer with Connection: close
    write_paused: bool  # the client reads slower than we write
    paused: int  # reading from the client is paused (P_* bits)
    deadlines: Deadlines
    #: Bytes of the answer, to the client as they are (the transport's own writelines).
    send_all: Callable[[Iterable[bytes]], object]

    def send(self, data: bytes) -> None:
        """Write to the client unless its connection is closing."""

    def pause(self, why: int) -> None: ...

    def resume(self, why: int) -> None: ...

    def check_buffers(self) -> None:
        """Request bytes waiting here went on: resume reading if it was paused for them."""

    def start_splice(self, ex: Exchange) -> list[bytes]:
        """``ex`` switched protocols: bytes pass through from now on; returns those held."""

    def exchange_done(self, ex: Exchange) -> None:
        """``ex`` has answered (or failed): close, or go on with the next request."""


class Exchange:
    """One request and its answer."""

    __slots__ = (
        "conn", "settings", "req",
        # The request's progress (its head is ``req``, an http1.RequestHead)
        "request_done", "reject", "counted",
        # Request body not yet sent, and what was sent, kept for a retry while it is small
        "pending", "pending_size", "replay", "replay_size", "replayable",
        # Forwarding
        "rid", "pool", "head", "ctx", "tried", "attempts", "backend", "backend_name", "upstream",
        "sent", "stale_retry", "last_error", "last_status", "timed_out", "deadline",
        "timer_mark", "task", "started",
        # The answer
        "status", "out", "out_framing", "head_built", "committed", "close", "abort",
        "bytes_out", "finished", "client_gone",
        # Times (monotonic seconds)
        "t_start", "t_sent", "t_head",
    )

    def __init__(self, conn: ClientSide, req: RequestHead, settings: Any,
                 counted: bool = False) -> None:
        self.conn = conn
        self.settings = settings  # proxy.ProxySettings, as the request arrived
        self.req = req
        self.counted = counted  # in ProxyState.in_flight (the connection counts)
        self.rid: bytes | None = None
        self.request_done = False
        self.reject: tuple[int, str] | None = None
        self.pending: list[bytes] | None = None
        self.pending_size = self.replay_size = 0
        self.replay: list[bytes] | None = None
        self.replayable = True
        self.pool: Pool | None = None
        self.head = b""
        self.ctx: PickContext | None = None
        self.tried: tuple[Backend, ...] = ()
        self.attempts = 0
        self.backend: Backend | None = None
        self.backend_name: str | None = None
        self.upstream: UpstreamConnection | None = None
        self.sent = self.stale_retry = self.started = False
        self.last_error = ""
        self.last_status = 502  # the answer when no attempt is left: 504 after a timeout
        self.timed_out = False  # an attempt got no answer within timeouts.read
        self.deadline = 0.0  # > 0 while watched by the Deadlines sweep
        self.timer_mark = 0
        self.task: asyncio.Task[None] | None = None
        self.status = 0
        self.out: list[bytes] = []
        self.out_framing = O_NONE
        self.head_built = self.committed = self.close = self.abort = False
        self.finished = self.client_gone = False
        self.bytes_out = 0
        self.t_start = self.t_sent = self.t_head = 0.0

    # --- starting ------------------------------------------------------------------------

    def start(self) -> None:
        """Its turn on the connection: answer it ourselves, or pick a backend and send."""
        self.started = True
        rid = self.req.rid_in
        self.rid = rid if rid is not None and _SANE_RID(rid) else new_request_id()
        if self.reject is not None:
            self.respond_local(*self.reject)
            return
        if self.pool is None:
            self.respond_local(404, "no route for this host and path")
            return
        self._build_head()
        self.ctx = PickContext(self.conn.client_ip, self.req.path.decode("latin-1"),
                               self.req.method.decode("ascii"), self.req.headers)
        self._attempt()

    def _build_head(self) -> None:
        """The request head the backends get (the same for every attempt)."""
        conn = self.conn
        settings = self.settings
        lines = self.req.lines
        if self.req.named is not None:
            lines = drop_named(lines, self.req.named)
        ip = conn.client_addr
        parts = [self.req.method, b" ", self.req.target, b" HTTP/1.1\r\n"]
        host = self.req.host_raw
        if host is not None:
            parts += (b"Host: ", host, b"\r\n")
        parts += lines
        parts += (b"X-Forwarded-For: ", ip if self.req.xff is None else self.req.xff + b", " + ip,
                  b"\r\nX-Forwarded-Proto: ", conn.proto, b"\r\n")
        if host is not None:
            parts += (b"X-Forwarded-Host: ", host, b"\r\n")
        rid = self.rid
        assert rid is not None
        parts += (b"X-Request-ID: ", rid, b"\r\n",
                  settings.via_request_10 if self.req.http10 else settings.via_request)
        if self.req.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if self.req.expect_continue:
            parts.append(b"Expect: 100-continue\r\n")
        if self.req.websocket:
            parts += (b"Connection: Upgrade\r\nUpgrade: ", self.req.upgrade, b"\r\n")  # type: ignore
        parts.append(b"\r\n")
        self.head = b"".join(parts)

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
        up.begin(self, self.req.method == b"HEAD")
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

    def request_body(self, body: bytes) -> None:
        """Body bytes from the client: kept until sent, re-chunked when the request is."""
        size = len(body)
        pending = self.pending
        if pending is None:
            pending = self.pending = []
        if self.req.chunked:
            pending += (b"%x\r\n" % size, body, b"\r\n")
            size += 8
        else:
            pending.append(body)
        self.pending_size += size

    def request_end(self) -> None:
        """The client sent the whole request (it goes out with the next flush)."""
        if self.req.chunked:
            if self.pending is None:
                self.pending = []
            self.pending.append(b"0\r\n\r\n")
        self.request_done = True

    def client_write_paused(self, paused: bool) -> None:
        """The client reads slower than the backend sends (or caught up): flow control."""
        up = self.upstream
        if up is not None and up.transport is not None:
            if paused:
                up.transport.pause_reading()
            else:
                up.transport.resume_reading()

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

    # --- the answer (upstream.ResponseSink) ----------------------------------------------

    def upstream_head(self, up: UpstreamConnection) -> None:
        status = up.status
        if status == 101 and not self.req.websocket:
            raise BadResponse("101 Switching Protocols to a request that asked for no upgrade")
        self.status = status
        self.t_head = now()
        settings = self.settings
        req = self.req
        close = not req.keep_alive or self.conn.closing or (req.websocket and status != 101)
        parts = [status_line(status, up.reason)]
        parts += up.lines
        parts += (settings.via_response, b"X-Request-ID: ", self.rid, b"\r\n")  # type: ignore
        framing = up.framing
        if framing == NO_BODY:
            self.out_framing = O_NONE
        elif framing == LENGTH:
            self.out_framing = O_RAW
        elif self.req.http10:
            self.out_framing = O_RAW  # HTTP/1.0 has no chunks: the body ends with the connection
            close = True
        else:
            self.out_framing = O_CHUNK
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if status == 101:
            parts.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
        elif close:
            parts.append(b"Connection: close\r\n")
        elif self.req.http10:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self.close = close
        self.out.append(b"".join(parts))
        self.head_built = True

    def upstream_informational(self, up: UpstreamConnection) -> None:
        if not self.req.http10:  # HTTP/1.0 clients do not expect 1xx
            self.out.append(b"".join([status_line(up.status, up.reason), *up.lines, b"\r\n"]))

    def upstream_body(self, data: bytes) -> None:
        size = len(data)
        self.bytes_out += size
        if self.out_framing == O_CHUNK:
            self.out += (b"%x\r\n" % size, data, b"\r\n")
        else:
            self.out.append(data)

    def upstream_data_done(self) -> None:
        up = self.upstream
        if up is None:
            return
        out = self.out
        if up.complete and self.out_framing == O_CHUNK:
            trailers = up.trailers
            out.append(b"0\r\n" + b"".join(trailers) + b"\r\n" if trailers else b"0\r\n\r\n")
        if out:
            self.conn.send_all(out)
            out.clear()
            self.committed = self.head_built
        if up.complete:
            self.upstream = None
            self._cancel_timer()
            up.upstream.release(up, up.keep_alive and self.sent)
            self._finish_backend(self.status)
            if not self.request_done:
                self.close = True  # answered before the body was read: cannot go on
            self._done()

    def upstream_upgraded(self, rest: bytes) -> None:
        """101: from now on, bytes pass through both ways until either side closes."""
        self._cancel_timer()
        out = self.out
        if rest:
            out.append(rest)
        conn = self.conn
        held = conn.start_splice(self)
        conn.send_all(out)
        out.clear()
        self.committed = True
        if held and self.upstream is not None:
            self.upstream.transport.writelines(held)  # type: ignore[union-attr]

    def upstream_raw(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.conn.send_all((data,))

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
            self.close = True
            self._done()
            return
        if self.committed:  # the client has part of the answer: it must see it fail
            self._finish_backend(self.status, error=kind)
            self.abort = True
            self._done()
            return
        self.out.clear()
        self.head_built = False
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

    # --- ending --------------------------------------------------------------------------

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

    def respond_local(self, status: int, detail: str, retry_after: int | None = None) -> None:
        """Answer with our own short error response."""
        conn = self.conn
        if self.rid is None:
            self.rid = new_request_id()
        close = (not self.req.keep_alive or conn.closing or not self.request_done
                 or self.req.websocket or self.reject is not None)
        self.status = status
        self.close = close
        if status >= 500 and self.pool is not None:  # no backend addresses to the client
            public = public_detail(detail, self.pool.backends)
            if public != detail:
                log.info("request %s answered %d: %s", self.rid.decode("latin-1"), status,
                         detail)
                detail = public
        conn.send(error_response(status, self.rid, detail, close, retry_after))
        self.committed = True
        self._done()

    def refuse_late(self, status: int, detail: str) -> None:
        """The request broke in its body (too large, bad chunk): stop forwarding it."""
        self.request_done = False
        if not self.started:
            self.reject = (status, detail)
            return
        if not self.finished:
            self.reject = (status, detail)
            self._give_up(status, detail, None)  # the client's fault, not the backend's

    def client_lost(self) -> None:
        """The client's connection is gone."""
        if self.finished:
            return
        self.client_gone = True
        self._drop_upstream()
        self._finish_backend(self.status)
        self._done()

    def _drop_upstream(self) -> None:
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.close()
        self._cancel_timer()

    def _give_up(self, status: int, detail: str, error: str | None) -> None:
        """Stop this attempt and answer ``status``, or abort when the answer has begun."""
        self._drop_upstream()
        self._finish_backend(0, error=error, latency=None)
        if self.committed:
            self.abort = True
            self._done()
        else:
            self.respond_local(status, detail)

    def _bug(self) -> None:
        log.exception("bug while forwarding %s %s", self.req.method.decode("latin-1"),
                      self.req.target.decode("latin-1"))
        if not self.finished:
            self._give_up(500, "internal error", "protocol")

    def _done(self) -> None:
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        if self.settings.access_log and accesslog.enabled():
            try:
                self._log()
            except Exception:  # a failing log handler must not wedge the connection
                try:
                    log.exception("access log failed")
                except Exception:
                    pass
        conn.exchange_done(self)

    def _log(self) -> None:
        pool = self.pool
        keys = ""
        recorders = self.settings.access_keys  # None unless a pool records hashed inputs
        if recorders is not None and pool is not None and self.ctx is not None:
            recorder = recorders.get(pool.name)
            if recorder is not None:
                keys = recorder(self.ctx)
        accesslog.write(
            self.rid or b"-", self.conn.client_ip, self.req.method, self.req.url,
            pool.name if pool is not None else None, self.backend_name,
            499 if self.client_gone and not self.committed else self.status,
            self.t_head - self.t_sent if self.t_head else None,
            now() - self.t_start if self.t_start else 0.0, self.bytes_out, self.req.host, keys)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.task = asyncio.get_running_loop().create_task(coro)

    def __repr__(self) -> str:
        return (f"<Exchange {self.req.method.decode('latin-1')} {self.req.url.decode('latin-1')}"
                f" status={self.status}{' finished' if self.finished else ''}>")
