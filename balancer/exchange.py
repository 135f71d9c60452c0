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

import logging
import os
import re
from collections.abc import Iterable
from itertools import count
from typing import Any, Protocol

from balancer import accesslog
from balancer.forward import (
    ELSEWHERE,
    GIVE_UP,
    IDEMPOTENT,
    P_BUFFER,
    P_UPSTREAM,
    REPLAY_LIMIT,
    SAME,
    Flow,
    Forwarding,
    after_failure,
    now,
)
from balancer.http1 import (
    ANSWER_FRAMING,
    O_CHUNK,
    O_NONE,
    RequestHead,
    ResponseHead,
    drop_named,
    error_response,
    status_line,
)
from balancer.strategies import PickContext
from balancer.upstream import BadResponse

__all__ = ["ELSEWHERE", "GIVE_UP", "IDEMPOTENT", "P_BUFFER", "P_UPSTREAM", "REPLAY_LIMIT",
           "SAME", "ClientSide", "Exchange", "after_failure", "new_request_id", "now"]

log = logging.getLogger("balancer.proxy")


_RID_PREFIX = os.urandom(4).hex().encode()
_rid_seq = count(1)
_SANE_RID = re.compile(rb"[A-Za-z0-9._:+/=@-]{1,128}").fullmatch


def new_request_id() -> bytes:
    """Unique per process and cheap: a random prefix and a counter."""
    return b"%s%08x" % (_RID_PREFIX, next(_rid_seq))


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




#: The request head as the backends get it: request line, Host, the client's header lines
#: (hop-by-hop ones dropped), the forwarding headers, X-Request-ID, Via and the framing lines.
_HEAD = (b"%s %s HTTP/1.1\r\nHost: %s\r\n%sX-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n"
         b"X-Forwarded-Host: %s\r\nX-Request-ID: %s\r\n%s\r\n")
#: The same without a Host (an HTTP/1.0 request may have none).
_HEAD_NO_HOST = (b"%s %s HTTP/1.1\r\n%sX-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n"
                 b"X-Request-ID: %s\r\n%s\r\n")
#: The answer's head: status line, the backend's header lines (hop-by-hop ones dropped),
#: Via, X-Request-ID, then the lines that frame the answer for this client.
_ANSWER = b"HTTP/1.1 %d %s\r\n%s%sX-Request-ID: %s\r\n%s\r\n"


class ClientSide(Flow, Protocol):
    """What an Exchange needs of its client connection (``proxy.ClientConnection``): it reads
    these and calls these, and writes none of the connection's state."""

    client_ip: str
    client_addr: bytes  # client_ip, encoded once
    proto: bytes  # b"http" or b"https", for X-Forwarded-Proto
    closing: bool  # keep-alive is over: answer with Connection: close

    def send_all(self, parts: Iterable[bytes]) -> None:
        """Bytes of the answer, to the client as they are."""

    def send(self, data: bytes) -> None:
        """Write to the client unless its connection is closing."""

    def start_splice(self, ex: Exchange) -> list[bytes]:
        """``ex`` switched protocols: bytes pass through from now on; returns those held."""

    def exchange_done(self, ex: Exchange) -> None:
        """``ex`` has answered (or failed): close, or go on with the next request."""


class Exchange(Forwarding):
    """One request and its answer (its attempts on backends: ``forward.Forwarding``)."""

    __slots__ = (
        "conn", "settings", "req",
        # The request's progress (its head is ``req``, an http1.RequestHead)
        "request_done", "reject", "counted", "rid", "started",
        # The answer
        "status", "out", "out_framing", "head_built", "committed", "close", "abort",
        "bytes_out", "finished", "client_gone", "t_start",
    )
    conn: ClientSide

    def __init__(self, conn: ClientSide, req: RequestHead, settings: Any,
                 counted: bool = False) -> None:
        Forwarding.__init__(self)
        self.conn = conn
        self.settings = settings  # proxy.ProxySettings, as the request arrived
        self.req = req
        self.counted = counted  # in ProxyState.in_flight (the connection counts)
        self.rid: bytes | None = None
        self.request_done = self.started = False
        self.reject: tuple[int, str] | None = None
        self.status = 0
        self.out: list[bytes] = []
        self.out_framing = O_NONE
        self.head_built = self.committed = self.close = self.abort = False
        self.finished = self.client_gone = False
        self.bytes_out = 0
        self.t_start = 0.0

    # --- starting ------------------------------------------------------------------------

    def start(self) -> None:
        """Its turn on the connection: answer it ourselves, or pick a backend and send."""
        self.started = True
        req = self.req
        rid = req.rid_in
        self.rid = rid if rid is not None and _SANE_RID(rid) else new_request_id()
        if self.reject is not None:
            self.respond_local(*self.reject)
            return
        if self.pool is None:
            self.respond_local(404, "no route for this host and path")
            return
        self._build_head()
        self.ctx = PickContext(self.conn.client_ip, req.path, req.method, req.headers)
        self._attempt()

    def _build_head(self) -> None:
        """The request head the backends get (the same for every attempt): one formatting
        operation, which costs half of building it from a list of parts."""
        conn = self.conn
        req = self.req
        lines = req.lines
        if req.named is not None:
            lines = drop_named(lines, req.named)
        ip = conn.client_addr
        tail = self.settings.via_request_10 if req.http10 else self.settings.via_request
        if req.chunked:
            tail += b"Transfer-Encoding: chunked\r\n"
        if req.expect_continue:
            tail += b"Expect: 100-continue\r\n"
        if req.websocket:
            tail += b"Connection: Upgrade\r\nUpgrade: " + req.upgrade + b"\r\n"  # type: ignore
        xff = ip if req.xff is None else req.xff + b", " + ip
        host = req.host_raw
        if host is None:
            self.head = _HEAD_NO_HOST % (req.method, req.target, b"".join(lines), xff, conn.proto,
                                         self.rid, tail)
        else:
            self.head = _HEAD % (req.method, req.target, host, b"".join(lines), xff, conn.proto,
                                 host, self.rid, tail)

    # --- choosing a backend --------------------------------------------------------------







    # --- sending -------------------------------------------------------------------------



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







    # --- the answer (upstream.ResponseSink) ----------------------------------------------

    def upstream_head(self, head: ResponseHead) -> None:
        status = head.status
        req = self.req
        if status == 101 and not req.websocket:
            raise BadResponse("101 Switching Protocols to a request that asked for no upgrade")
        self.status = status
        self.t_head = now()
        close = not req.keep_alive or self.conn.closing or (req.websocket and status != 101)
        if status == 101:
            self.out_framing = O_NONE
            framing = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        else:
            self.out_framing, close, framing = ANSWER_FRAMING[head.framing][req.http10][close]
        self.close = close
        self.out.append(_ANSWER % (status, head.reason, b"".join(head.lines),
                                   self.settings.via_response, self.rid, framing))
        self.head_built = True

    def upstream_informational(self, head: ResponseHead) -> None:
        if not self.req.http10:  # HTTP/1.0 clients do not expect 1xx
            self.out.append(b"".join([status_line(head.status, head.reason), *head.lines,
                                      b"\r\n"]))

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







    # --- ending --------------------------------------------------------------------------


    def _end(self, close: bool = False, abort: bool = False) -> None:
        if close:
            self.close = True
        if abort:
            self.abort = True
        self._done()

    def _discard_answer(self) -> None:
        self.out.clear()
        self.head_built = False

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
        settings = self.settings
        if settings.access_log and accesslog.enabled():
            # The line's fields are gathered here, not in a method of their own: a call less
            # per request. A failing log handler must not wedge the connection.
            try:
                pool = self.pool
                req = self.req
                keys = ""
                recorders = settings.access_keys  # None unless a pool records hashed inputs
                if recorders is not None and pool is not None and self.ctx is not None:
                    recorder = recorders.get(pool.name)
                    if recorder is not None:
                        keys = recorder(self.ctx)
                t_head = self.t_head
                t_start = self.t_start
                accesslog.write(
                    self.rid or b"-", conn.client_ip, req.method, req.url,
                    pool.name if pool is not None else None, self.backend_name,
                    499 if self.client_gone and not self.committed else self.status,
                    t_head - self.t_sent if t_head else None,
                    now() - t_start if t_start else 0.0, self.bytes_out, req.host, keys)
            except Exception:
                try:
                    log.exception("access log failed")
                except Exception:
                    pass
        conn.exchange_done(self)

    def __repr__(self) -> str:
        return (f"<Exchange {self.req.method.decode('latin-1')} {self.req.url.decode('latin-1')}"
                f" status={self.status}{' finished' if self.finished else ''}>")
