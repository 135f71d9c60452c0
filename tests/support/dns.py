"""A real DNS server on loopback for the discovery tests, whose records a test changes live.

It answers A and AAAA questions over UDP (and TCP, for a client that falls back to it) from a
table the test edits with ``set`` while the proxy runs, so discovery is tested against real
DNS packets, real sockets and real TTLs, never a mocked resolver. dnslib parses and builds the
packets; the sockets are plain, served from one daemon thread: the code under test resolves
names synchronously at load time (``App()`` inside the test's event loop), so the server must
not depend on that loop. It can also misbehave on demand (``fail``): ``servfail`` answers
SERVFAIL, ``drop`` never answers (a resolver that is down), and every question is recorded
(``queries``) so a test can see when the balancer asked.
"""

from __future__ import annotations

import ipaddress
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Self

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord

#: How often the serving thread looks at its stop flag (seconds).
TICK = 0.05


@dataclass(frozen=True)
class Query:
    """One question the server received: when (monotonic), the name, the type (``A``…)."""

    at: float
    name: str
    qtype: str


class DNSServer:
    """Authoritative answers for the names in its table; NXDOMAIN for any other name."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.mode = "answer"  # or "servfail", "drop"
        self.queries: list[Query] = []
        self._records: dict[str, tuple[tuple[str, ...], int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None

    # --- the table -----------------------------------------------------------------------

    def set(self, name: str, addresses: list[str], ttl: int = 1) -> None:
        """``name`` now resolves to ``addresses`` (IPv4 → A, IPv6 → AAAA) with ``ttl``."""
        for a in addresses:
            ipaddress.ip_address(a)  # a typo in a test fails here, not as a silent NXDOMAIN
        with self._lock:
            self._records[_key(name)] = (tuple(addresses), ttl)

    def remove(self, name: str) -> None:
        """``name`` no longer exists (NXDOMAIN)."""
        with self._lock:
            self._records.pop(_key(name), None)

    def fail(self, mode: str) -> None:
        """``servfail``, ``drop`` (no answer at all) or ``answer`` (normal again)."""
        if mode not in ("answer", "servfail", "drop"):
            raise ValueError(mode)
        self.mode = mode

    def queries_for(self, name: str, since: float = 0.0) -> list[Query]:
        with self._lock:
            return [q for q in self.queries if q.name == _key(name) and q.at >= since]

    @property
    def nameserver(self) -> str:
        """The ``resolver:`` entry that points at this server."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    # --- answering -----------------------------------------------------------------------

    def answer(self, packet: bytes) -> bytes | None:
        """The reply to one query packet, or None to stay silent."""
        try:
            request = DNSRecord.parse(packet)
        except Exception:  # noqa: BLE001 - garbage in: no answer, like a real server
            return None
        q = request.q
        name = _key(str(q.qname))
        with self._lock:
            self.queries.append(Query(time.monotonic(), name, QTYPE.get(q.qtype, str(q.qtype))))
            entry = self._records.get(name)
        mode = self.mode
        if mode == "drop":
            return None
        reply = request.reply()  # aa=1, ra=1, same id and question
        if mode == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
        elif entry is None:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            addresses, ttl = entry
            for a in addresses:
                v6 = ipaddress.ip_address(a).version == 6
                if q.qtype == QTYPE.A and not v6:
                    reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(a), ttl=ttl))
                elif q.qtype == QTYPE.AAAA and v6:
                    reply.add_answer(RR(q.qname, QTYPE.AAAA, rdata=AAAA(a), ttl=ttl))
        return reply.pack()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        """Bind a free UDP port (and the same TCP port) on ``host`` and serve in a thread."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(20):  # the UDP port the kernel picks may be taken for TCP: try again
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            self._udp, self._tcp, self.port = udp, tcp, port
            break
        else:
            raise RuntimeError("no free port for the test DNS server")
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="test-dns")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and close the sockets (the port is then simply closed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()
        self._udp = self._tcp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._udp, selectors.EVENT_READ, "udp")
            sel.register(self._tcp, selectors.EVENT_READ, "tcp")
            while not self._stop.is_set():
                for key, _ in sel.select(TICK):
                    if key.data == "udp":
                        packet, peer = self._udp.recvfrom(4096)
                        out = self.answer(packet)
                        if out is not None:
                            self._udp.sendto(out, peer)
                    else:
                        self._serve_tcp()

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        conn, _ = self._tcp.accept()
        with conn:
            conn.settimeout(1.0)
            try:
                size = struct.unpack("!H", _read(conn, 2))[0]
                out = self.answer(_read(conn, size))
                if out is not None:
                    conn.sendall(struct.pack("!H", len(out)) + out)
            except (OSError, struct.error):
                pass


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return data


def _key(name: str) -> str:
    return name.lower().rstrip(".")
