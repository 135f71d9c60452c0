"""Memory per idle keep-alive client connection: open N, one request each, hold them.

(RSS of the proxy's tree with them − RSS before) / N, measured on a freshly started proxy so
that memory freed by an earlier load run cannot hide what the connections cost.
"""

from __future__ import annotations

import socket
import time

from bench.procstat import rss_kib

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: balancer-bench-idle\r\n\r\n"


def read_response(sock: socket.socket) -> bytes:
    """One whole small response (Content-Length or chunked) from a blocking socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response headers")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    headers = head.lower()
    if b"transfer-encoding: chunked" in headers:
        while not body.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside a chunked body")
            body += chunk
    else:
        length = 0
        for line in headers.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside the body")
            body += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"unexpected answer: {head.splitlines()[0]!r}")
    return body


def bytes_per_idle_connection(pid: int, port: int, n: int, settle: float = 1.0) -> float:
    """Open ``n`` keep-alive connections to ``port``, one request each, and hold them."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as warm:
        for _ in range(10):  # the proxy's upstream connections exist before we measure
            warm.sendall(REQUEST)
            read_response(warm)
    time.sleep(settle)
    before = rss_kib(pid)
    held: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            held.append(s)
            s.sendall(REQUEST)
            read_response(s)
        time.sleep(settle)
        after = rss_kib(pid)
    finally:
        for s in held:
            s.close()
    return (after - before) * 1024 / n
