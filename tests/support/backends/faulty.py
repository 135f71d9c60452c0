"""``FaultyServer``: a loopback HTTP/1.1 backend that answers well, or fails the way a real
backend fails: resets the connection, closes it, accepts and never answers, answers slowly,
sends garbage, both framings at once, a body shorter or longer than its ``Content-Length``, a
second answer nobody asked for, half a body and then dies or stalls.

The fault is the server's current ``fault``, or chosen per request by an
``X-Fault: <name>=<kind>[:<arg>], ...`` header (the proxy passes it on), so one pool of healthy
backends can have one of them fail a given request. Every request head it reads is counted by
request id (``received``): the truth about what was sent twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections import Counter

from tests.support.backends.bodies import BLOCK, body_for
from tests.support.backends.server import LoopbackServer
from tests.support.backends.wire import (
    Request,
    drain_body,
    frame_chunk,
    parse_head,
    read_body,
    rst,
    until_closed,
)

#: Kinds of misbehaviour (``X-Fault: b1=reset``; ``slow`` and ``hang`` take seconds: ``slow:0.5``).
FAULTS = ("ok", "slow", "hang", "reset", "close", "garbage", "badframe", "short", "long",
          "double", "midway", "stall")


class FaultyServer(LoopbackServer):
    """A loopback HTTP/1.1 backend whose answers can be faulty (see the module docstring).

    Routes: ``/upload`` (reads the body, answers its size and sha256), ``/healthz``,
    ``/_fault/<kind>?arg=`` (sets ``fault``; for tests that cannot reach the object, like a
    subprocess), anything else: ``body_for(name, rid, size)`` with ``?size=`` (default 64) and
    ``?chunked=1``, ``?trickle=<s>`` (pause between 16 KiB blocks: a long answer to kill midway).
    """

    def __init__(self, name: str, port: int = 0, log_path: str | None = None) -> None:
        super().__init__(name, port)
        self.fault = "ok"  # the default for requests whose X-Fault does not name this server
        self.received: Counter[str] = Counter()  # request id → heads read
        self.methods: Counter[str] = Counter()
        self.answered = 0
        self._log_fd = (os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                        if log_path else None)
        if self._log_fd is not None:
            os.write(self._log_fd, f"# start {os.getpid()}\n".encode())

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests one after another on a kept-alive connection, until one ends it."""
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            req = parse_head(head)
            if req.path.startswith("/_fault/"):
                self.fault = req.path[len("/_fault/"):] + (
                    ":" + req.query["arg"] if "arg" in req.query else "")
                await drain_body(reader, req)
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
                continue
            if req.path != "/healthz":
                self._note(req)
            if not await self._answer(reader, writer, req):
                return

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
            await until_closed(reader, float(arg or "3600"))
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
            writer.write(head + (frame_chunk(body[:half]) if chunked else body[:half]))
            await writer.drain()
            await asyncio.sleep(0.05)
            if kind == "midway":
                rst(writer)
            elif kind == "stall":
                await until_closed(reader, float(arg or "3600"))
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
                writer.write(frame_chunk(block) if chunked else block)
                await writer.drain()
                if trickle:
                    await asyncio.sleep(trickle)
            writer.write(b"0\r\n\r\n" if chunked else b"")
        else:
            writer.write(head + (frame_chunk(body) + b"0\r\n\r\n" if chunked else body))
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
            block = BLOCK if left >= len(BLOCK) else BLOCK[:left]
            writer.write(frame_chunk(block) if chunked else block)
            left -= len(block)
            await writer.drain()
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        self.answered += 1
