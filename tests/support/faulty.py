"""Backends that misbehave on purpose, a bounded load that checks what it got, and /proc probes.

``FaultyServer`` is a bare asyncio HTTP/1.1 server (aiohttp will not break the protocol on
purpose). It answers well, or fails the way a real backend fails: resets the connection, closes
it, accepts and never answers, answers slowly, sends garbage, a body shorter or longer than its
``Content-Length``, half a body and then dies or stalls. The fault is the server's current
``fault``, or chosen per request by an ``X-Fault: <name>=<kind>[:<arg>], ...`` header (the proxy
passes it on), so one pool of healthy backends can have one of them fail a given request.

Every request head a server reads is counted by request id (``received``): the truth about
what was sent twice. ``BackendProcess`` runs the same server in a subprocess (``python -m
tests.support.faulty``) so it can be SIGKILLed mid-response and restarted on its port; it logs
each request id to a file as it arrives, which survives the kill.

Bodies are checkable: ``body_for`` writes the backend's name and the request id, then a fixed
pattern up to the asked size, so ``check_body`` can tell a whole answer from a cut one.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Self

#: Kinds of misbehaviour (``X-Fault: b1=reset``; ``slow`` and ``hang`` take seconds: ``slow:0.5``).
FAULTS = ("ok", "slow", "hang", "reset", "close", "garbage", "badframe", "short", "long",
          "double", "midway", "stall")
#: Every wait in these helpers gives up after this long (seconds).
WAIT = 15.0
_PATTERN = b"0123456789abcdef" * 4096  # 64 KiB of filler
_BLOCK = _PATTERN * 4  # what /download sends, again and again (period 16: checkable anywhere)


# --------------------------------------------------------------------------- bodies


def body_for(name: str, rid: str, size: int) -> bytes:
    """The body a backend answers: ``<name> <rid>\\n`` then filler, exactly ``size`` bytes
    (or just the first line when it is longer)."""
    first = f"{name} {rid}\n".encode()
    if size <= len(first):
        return first
    rest = size - len(first)
    return first + (_PATTERN * (rest // len(_PATTERN) + 1))[:rest]


def check_body(body: bytes, rid: str, size: int) -> str | None:
    """The name of the backend that wrote ``body`` for ``rid``, or None if it is not exactly
    what ``body_for`` writes (cut short, padded, someone else's)."""
    first, _, _ = body.partition(b"\n")
    name, _, got_rid = first.decode("latin-1").partition(" ")
    if got_rid != rid or body != body_for(name, rid, size):
        return None
    return name


# --------------------------------------------------------------------------- the wire


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]

    @property
    def rid(self) -> str:
        return self.headers.get("x-request-id", "-")

    @property
    def query(self) -> dict[str, str]:
        _, _, q = self.target.partition("?")
        return dict(p.partition("=")[::2] for p in q.split("&") if p)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def fault_for(self, name: str) -> str | None:
        """The fault the ``X-Fault`` header asks of backend ``name`` (``*`` for any)."""
        spec = self.headers.get("x-fault")
        if not spec:
            return None
        for item in spec.split(","):
            who, _, kind = item.strip().partition("=")
            if who == name or who == "*":
                return kind
        return None


def parse_head(head: bytes) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return Request(method, target, headers)


async def read_body(reader: asyncio.StreamReader, req: Request) -> AsyncIterator[bytes]:
    """The request body as it arrives (Content-Length or chunked)."""
    if req.headers.get("transfer-encoding", "").lower() != "chunked":
        async for piece in _pieces(reader, int(req.headers.get("content-length", "0"))):
            yield piece
        return
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailer fields
            return
        async for piece in _pieces(reader, size):
            yield piece
        await reader.readexactly(2)


async def _pieces(reader: asyncio.StreamReader, n: int) -> AsyncIterator[bytes]:
    """The next ``n`` bytes, as they arrive."""
    while n:
        piece = await reader.read(min(n, 1 << 18))
        if not piece:
            raise asyncio.IncompleteReadError(b"", n)
        n -= len(piece)
        yield piece


def rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed process's kernel would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


# --------------------------------------------------------------------------- the server


class FaultyServer:
    """A loopback HTTP/1.1 backend whose answers can be faulty (see the module docstring).

    Routes: ``/upload`` (reads the body, answers its size and sha256), ``/healthz``,
    ``/_fault/<kind>?arg=`` (sets ``fault``; for tests that cannot reach the object, like a
    subprocess), anything else: ``body_for(name, rid, size)`` with ``?size=`` (default 64) and
    ``?chunked=1``, ``?trickle=<s>`` (pause between 16 KiB blocks: a long answer to kill midway).
    """

    def __init__(self, name: str, port: int = 0, log_path: str | None = None) -> None:
        self.name = name
        self.port = port
        self.fault = "ok"  # the default for requests whose X-Fault does not name this server
        self.received: Counter[str] = Counter()  # request id → heads read
        self.methods: Counter[str] = Counter()
        self.answered = 0
        self.connections = 0
        self._log_fd = (os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                        if log_path else None)
        if self._log_fd is not None:
            os.write(self._log_fd, f"# start {os.getpid()}\n".encode())
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  reuse_address=True, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and drop every connection (reset)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def entry(self) -> dict[str, Any]:
        """This server as a backend entry of a balancer config."""
        return {"url": self.url, "name": self.name}

    # --- serving -------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                req = parse_head(head)
                if req.path.startswith("/_fault/"):
                    self.fault = req.path[len("/_fault/"):] + (
                        ":" + req.query["arg"] if "arg" in req.query else "")
                    await _drain_body(reader, req)
                    writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                    await writer.drain()
                    continue
                if req.path != "/healthz":
                    self._note(req)
                if not await self._answer(reader, writer, req):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    def _note(self, req: Request) -> None:
        self.received[req.rid] += 1
        self.methods[req.method] += 1
        if self._log_fd is not None:  # one write per line: whole lines even if killed
            os.write(self._log_fd, f"{req.rid} {req.method}\n".encode())

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      req: Request) -> bool:
        """Answer ``req`` (or fail to); False when the connection is over."""
        kind, _, arg = (req.fault_for(self.name) or self.fault).partition(":")
        if req.path == "/healthz":
            kind = "ok"
        if req.path == "/download":
            await self._download(writer, int(req.query["size"]), req.query.get("chunked") == "1")
            return True
        digest = hashlib.sha256()
        total = 0
        pause = float(req.query.get("pause", "0"))
        async for chunk in read_body(reader, req):
            total += len(chunk)
            if req.path == "/upload":
                digest.update(chunk)
                if pause and total >= 1 << 20:  # stop reading for a while: a slow backend
                    await asyncio.sleep(pause)
                    pause = 0
        if req.path == "/upload":
            body = json.dumps({"bytes": total, "sha256": digest.hexdigest(),
                               "backend": self.name}).encode()
        else:
            body = body_for(self.name, req.rid, int(req.query.get("size", "64")))
        chunked = req.query.get("chunked") == "1"
        if kind == "slow":
            await asyncio.sleep(float(arg or "0.5"))
        elif kind == "hang":
            await _until_closed(reader, float(arg or "3600"))
            return False
        elif kind == "reset":
            rst(writer)
            return False
        elif kind == "close":
            return False
        elif kind == "garbage":
            writer.write(b"SURPRISE, this is not HTTP\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            return False
        elif kind == "badframe":
            # Both framings at once: what a smuggling-prone backend would send.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                         % (len(body), len(body), body))
            await writer.drain()
            await asyncio.sleep(0.05)
            return False
        head = b"HTTP/1.1 200 OK\r\nX-Backend: %s\r\n" % self.name.encode()
        head += b"Transfer-Encoding: chunked\r\n\r\n" if chunked else \
            b"Content-Length: %d\r\n\r\n" % len(body)
        half = len(body) // 2
        if kind in ("short", "midway", "stall"):
            writer.write(head + (_chunk(body[:half]) if chunked else body[:half]))
            await writer.drain()
            await asyncio.sleep(0.05)
            if kind == "midway":
                rst(writer)
            elif kind == "stall":
                await _until_closed(reader, float(arg or "3600"))
            return False  # "short": a clean close, half a body sent
        if kind == "long":
            writer.write(head + body + b"EXTRA BYTES PAST THE LENGTH")
            await writer.drain()
            await asyncio.sleep(0.05)
            return False
        if kind == "double":  # a second, unasked-for answer: must never reach a client
            writer.write(head + body + head + body_for(self.name, "surplus", len(body)))
            await writer.drain()
            await asyncio.sleep(0.05)
            return False
        trickle = float(req.query.get("trickle", "0"))
        if trickle or len(body) > 1 << 20:
            writer.write(head)
            for i in range(0, len(body), 1 << 14 if trickle else 1 << 18):
                block = body[i:i + (1 << 14 if trickle else 1 << 18)]
                writer.write(_chunk(block) if chunked else block)
                await writer.drain()
                if trickle:
                    await asyncio.sleep(trickle)
            writer.write(b"0\r\n\r\n" if chunked else b"")
        else:
            writer.write(head + (_chunk(body) + b"0\r\n\r\n" if chunked else body))
        await writer.drain()
        self.answered += 1
        return req.headers.get("connection", "").lower() != "close"


    async def _download(self, writer: asyncio.StreamWriter, size: int, chunked: bool) -> None:
        """``size`` bytes of the periodic pattern, streamed (never held whole)."""
        writer.write(b"HTTP/1.1 200 OK\r\nX-Backend: %s\r\n%s\r\n" % (
            self.name.encode(), b"Transfer-Encoding: chunked\r\n" if chunked
            else b"Content-Length: %d\r\n" % size))
        left = size
        while left > 0:
            block = _BLOCK if left >= len(_BLOCK) else _BLOCK[:left]
            writer.write(_chunk(block) if chunked else block)
            left -= len(block)
            await writer.drain()
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        self.answered += 1


_REFERENCE = _BLOCK * 9  # 2.25 MiB: any piece of up to 2 MiB, at any offset, is in here


def pattern_ok(data: bytes, offset: int) -> bool:
    """Whether ``data`` (up to 2 MiB), found at ``offset`` of a /download body, is what was
    sent there."""
    start = offset % 16
    return len(data) <= 2 << 20 and data == _REFERENCE[start:start + len(data)]


def upload_blocks(size: int, block: int = 1 << 18) -> tuple[AsyncIterator[bytes], Any]:
    """An upload body of ``size`` pattern bytes as an async iterator, and the sha256 object
    that is fed as it is sent (compare its hexdigest with the backend's answer)."""
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        left = size
        while left > 0:
            data = _BLOCK[:min(block, left)]
            digest.update(data)
            left -= len(data)
            yield data

    return body(), digest


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


async def _until_closed(reader: asyncio.StreamReader, limit: float) -> None:
    """Hold the connection, answering nothing, until the peer closes it (or ``limit`` s)."""
    try:
        await asyncio.wait_for(reader.read(), limit)
    except asyncio.TimeoutError:
        pass


async def _drain_body(reader: asyncio.StreamReader, req: Request) -> None:
    async for _ in read_body(reader, req):
        pass


# --------------------------------------------------------------------------- in a subprocess


class BackendProcess:
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
            [sys.executable, "-m", "tests.support.faulty", "--name", self.name,
             "--port", str(self.port), "--log", str(self.log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[2])
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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def entry(self) -> dict[str, Any]:
        return {"url": self.url, "name": self.name}

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


# --------------------------------------------------------------------------- the proxy


class RunningBalancer:
    """``balancer run`` in a subprocess (tests/support/proc.py) on a config written from
    ``pools``: its proxy URL, admin URL, pid and /metrics. Ports are the kernel's (listen and
    admin on port 0, read back from the start lines), so nothing races for a free port."""

    def __init__(self, workdir: Path, pools: dict[str, Any], **top: Any) -> None:
        from tests.support.proc import BalancerProcess, write_config

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


# --------------------------------------------------------------------------- load


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


# --------------------------------------------------------------------------- /proc


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


# --------------------------------------------------------------------------- figures


def record_figure(family: str, **figures: Any) -> None:
    """Append one JSON line of figures to ``$BALANCER_FIGURES`` when set (scripts/
    reliability.py sets it and turns the lines into docs/reliability.md); no-op otherwise."""
    path = os.environ.get("BALANCER_FIGURES")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"family": family, "test": test, **figures}) + "\n")


# --------------------------------------------------------------------------- main


def main() -> None:
    """``python -m tests.support.faulty --name N [--port P] [--log FILE]``: serve until killed;
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


if __name__ == "__main__":
    main()
