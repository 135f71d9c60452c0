"""Well-behaved aiohttp backends: ``special_app`` has an endpoint per behaviour the request-path
tests need (statuses, HEAD, a gated stream, big downloads, streamed uploads, slow answers,
hop-by-hop headers, an early 413, WebSocket, echo). Serve one with ``tests.support.net.run_app``.
"""

from __future__ import annotations

import asyncio
import hashlib

from aiohttp import WSMsgType, web

#: The app key under which tests find the events that gate ``/stream``.
GATE = web.AppKey("gate", asyncio.Event)


def special_app(name: str = "special") -> web.Application:
    """An aiohttp backend with an endpoint per behaviour under test."""

    async def status(request: web.Request) -> web.StreamResponse:
        code = int(request.match_info["code"])
        return web.Response(status=code, headers={"X-Backend": name, "ETag": '"v1"'})

    async def head(request: web.Request) -> web.StreamResponse:
        # aiohttp answers HEAD for a GET route with the GET's headers and no body.
        return web.Response(body=b"x" * 1234, headers={"X-Backend": name})

    async def stream(request: web.Request) -> web.StreamResponse:
        """Chunked: the first chunk now, the rest only once the test sets the gate."""
        resp = web.StreamResponse(headers={"X-Backend": name})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"first chunk\n")
        await asyncio.wait_for(request.app[GATE].wait(), 10)
        await resp.write(b"second chunk\n")
        await resp.write_eof()
        return resp

    async def download(request: web.Request) -> web.StreamResponse:
        """``size`` bytes in 256 KiB writes (with Content-Length unless ``chunked``)."""
        size = int(request.query["size"])
        resp = web.StreamResponse(headers={"X-Backend": name})
        if "chunked" in request.query:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = size
        await resp.prepare(request)
        block = b"d" * (256 * 1024)
        left = size
        while left > 0:
            n = min(left, len(block))
            await resp.write(block[:n])
            left -= n
        await resp.write_eof()
        return resp

    async def upload(request: web.Request) -> web.StreamResponse:
        """Read the body as it streams (pausing once, if asked); answer its size and digest."""
        digest = hashlib.sha256()
        total = 0
        pause = float(request.query.get("pause", "0"))
        async for chunk in request.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            total += len(chunk)
            if pause and total >= 1 << 20:
                await asyncio.sleep(pause)
                pause = 0
        return web.json_response({"bytes": total, "sha256": digest.hexdigest()},
                                 headers={"X-Backend": name})

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(float(request.query.get("delay", "0.5")))
        return web.Response(text=name, headers={"X-Backend": name})

    async def hop(request: web.Request) -> web.StreamResponse:
        """An answer carrying hop-by-hop headers the proxy must not pass on."""
        return web.Response(text="hop", headers={
            "X-Backend": name, "Connection": "X-Internal", "X-Internal": "secret",
            "Keep-Alive": "timeout=5", "Proxy-Authenticate": "Basic", "Upgrade": "h2c",
            "X-Request-ID": "backend-made-this-up", "X-End-To-End": "kept"})

    async def echo_headers(request: web.Request) -> web.StreamResponse:
        return web.json_response([[k.decode("latin-1"), v.decode("latin-1")]
                                  for k, v in request.raw_headers], headers={"X-Backend": name})

    async def early(request: web.Request) -> web.StreamResponse:
        """Refuses without reading the body (like a 413 from an app with a size limit)."""
        return web.Response(status=413, text="too big for me", headers={"X-Backend": name})

    async def ws(request: web.Request) -> web.StreamResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str(f"{name}: {msg.data}")
            elif msg.type == WSMsgType.BINARY:
                await sock.send_bytes(msg.data)
        return sock

    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(body=await request.read(), headers={"X-Backend": name})

    async def default(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(text=name, headers={"X-Backend": name})

    app = web.Application(client_max_size=1 << 30)
    app[GATE] = asyncio.Event()
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/head", head)
    app.router.add_get("/stream", stream)
    app.router.add_get("/download", download)
    app.router.add_post("/upload", upload)
    app.router.add_get("/slow", slow)
    app.router.add_get("/hop", hop)
    app.router.add_get("/headers", echo_headers)
    app.router.add_post("/early", early)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/{tail:.*}", default)
    return app
