"""Fuzzing the client side: hypothesis throws generated requests at ``balancer run``, and the
same inputs straight at the sans-IO HTTP/1 layer (``http1.RequestParser``), cut into reads.

Inputs: valid requests built from parts (methods, targets, versions, headers, framings), the
same mutated at the byte level (inserted, deleted, duplicated and replaced bytes, CRLF turned to
LF, cut short), raw random bytes, and smuggling-shaped framing (Content-Length and
Transfer-Encoding variants, duplicated, obfuscated, with a request hidden in the body), sent one
to three at a time on one connection, which the client then half-closes.

For every input: what comes back is a sequence of complete, well-formed HTTP responses (or
nothing) followed by the proxy closing; no 5xx except 501 and 505 (what HTTP prescribes for an
unknown method or coding, and for a version); and the backends never answer a request that no
client received an answer to (a desync: a request smuggled past the proxy). After the run the
proxy still serves a normal request and its log holds no traceback and no error.

The CI runs ``FUZZ_EXAMPLES`` (300) examples; ``BALANCER_FUZZ_EXAMPLES`` asks for more (the
reliability script does); the number that ran is recorded (tests/support/hardening.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from httptools import HttpParserError, HttpResponseParser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.http1 import Reject, RequestHead, RequestParser
from balancer.proxy import ProxySettings
from tests.support.hardening import FUZZ_ENV, record
from tests.support.net import free_port, run_app
from tests.support.proc import READY, BalancerProcess, pool_config, write_config

FUZZ_EXAMPLES = 300
EXAMPLES = int(os.environ.get(FUZZ_ENV) or FUZZ_EXAMPLES)
#: Statuses of the 5xx class that malformed input may get: 501 (method or transfer coding not
#: implemented) and 505 (HTTP version not supported).
ALLOWED_5XX = {501, 505}


# --------------------------------------------------------------------------- the stand


class Backends:
    """Two aiohttp backends in a thread of their own; ``answered`` counts the requests they
    read whole and answered (the other side of the desync check)."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.answered = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def _app(self, name: str) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            self.answered += 1
            return web.Response(body=b"%s %d" % (name.encode(), len(body)),
                                headers={"X-Backend": name})

        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with run_app(self._app("fa")) as a, run_app(self._app("fb")) as b:
            self.ports = [a, b]
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> Backends:
        self._thread.start()
        assert self._ready.wait(15), "backends did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


class Stand:
    def __init__(self, proc: BalancerProcess, port: int, backends: Backends) -> None:
        self.proc = proc
        self.port = port
        self.backends = backends
        self.answered_seen = 0  # backend answers that reached a client
        self.examples = 0
        self.statuses: Counter[str] = Counter()


@pytest.fixture(scope="module")
def stand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stand]:
    folder: Path = tmp_path_factory.mktemp("fuzz")
    with Backends() as backends:
        port = free_port()
        config = write_config(folder / "fuzz.yaml", {
            "listen": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{free_port()}",
            "client": {"header_timeout": "2s", "body_timeout": "2s", "keepalive_timeout": "2s",
                       "max_body_size": "64KiB", "max_header_size": "8KiB",
                       "max_url_size": "4KiB", "max_headers": 50},
            "pools": {"web": pool_config(backends.ports, retries=0)}})
        with BalancerProcess(config) as proc:
            deadline = time.monotonic() + 15
            while not any(READY.search(line) for line in proc.lines_since(0)):
                assert proc.returncode is None, proc.log
                assert time.monotonic() < deadline, proc.log
                time.sleep(0.05)
            yield Stand(proc, port, backends)


# --------------------------------------------------------------------------- inputs

METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"BREW",
           b"get", b"CONNECT", b"G\x00T", b""]
TARGETS = [b"/", b"/a/b?c=d&e", b"*", b"http://h.test/x", b"http://u@h/", b"/%00%zz",
           b"//double", b"/a#frag", b"/\xff", b"/" + b"x" * 5000, b"", b"no-slash"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9",
            b"HTTP/1", b"http/1.1", b""]
FRAMING = [b"Content-Length: 5", b"Content-Length: 0", b"Content-Length: -1",
           b"Content-Length: 5, 5", b"Content-Length:  5 ", b"Content-Length: 0x5",
           b"Content-Length: +5", b"Content-Length: 99999999999999999999999",
           b"Content-Length: 18446744073709551615", b"Content-Length: 70000",
           b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked ",
           b"Transfer-Encoding: xchunked", b"Transfer-Encoding: chunked, identity",
           b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding:\tchunked",
           b"Transfer-Encoding: \x0bchunked", b"Transfer-encoding: CHUNKED",
           b"Transfer_Encoding: chunked", b"Transfer-Encoding : chunked",
           b" Transfer-Encoding: chunked", b"Content_Length: 5", b"Transfer-Encoding: ",
           b"Expect: 100-continue", b"Connection: close", b"Connection: keep-alive, Upgrade",
           b"Upgrade: websocket", b"Upgrade: h2c", b"Connection: Content-Length"]
OTHER = [b"Host: h", b"Host: h", b"Host: a b", b"Host: h:80", b"Host: [::1]:8", b"Host:",
         b"X-Forwarded-For: 1.2.3.4", b"X-Request-ID: abc", b"Proxy-Authorization: x",
         b"X-Obs: a\r\n fold", b"X-Nul: a\x00", b"X-High: \xe9", b"Cookie: a=b",
         b"X-Long: " + b"v" * 9000, b"TE: trailers", b"Trailer: X-T"]
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
BODIES = [b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b"5;ext=1\r\nhello\r\n0\r\n\r\n",
          b"3\r\nhello\r\n0\r\n\r\n", b"5\nhello\n0\n\n", b"ffffffffffffffffff\r\n",
          b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", b"0\r\n\r\n" + SMUGGLED, b"hello" + SMUGGLED,
          b"x" * 70000]

header_names = st.from_regex(rb"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}\Z")
header_values = st.one_of(st.from_regex(rb"\A[ -~]{0,24}\Z"), st.binary(max_size=16))


@st.composite
def built(draw: st.DrawFn) -> bytes:
    """A request made of parts, valid or not."""
    line = b" ".join([draw(st.sampled_from(METHODS)), draw(st.sampled_from(TARGETS)),
                      draw(st.sampled_from(VERSIONS))])
    fields = draw(st.lists(st.one_of(
        st.sampled_from(FRAMING), st.sampled_from(OTHER),
        st.tuples(header_names, header_values).map(lambda kv: kv[0] + b": " + kv[1])),
        max_size=6))
    if draw(st.booleans()):
        fields.insert(0, b"Host: h")
    body = draw(st.one_of(st.sampled_from(BODIES), st.binary(max_size=64)))
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body


@st.composite
def valid(draw: st.DrawFn) -> bytes:
    """A request any HTTP/1.1 server should accept."""
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS"]))
    body = draw(st.binary(max_size=64)) if method in (b"POST", b"PUT") else b""
    framing = draw(st.sampled_from(["length", "chunked"])) if body else "none"
    head = [method + b" /v?q=" + draw(st.from_regex(rb"\A[a-z0-9]{0,8}\Z")) + b" HTTP/1.1",
            b"Host: h"]
    if framing == "length":
        head.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        head.append(b"Transfer-Encoding: chunked")
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@st.composite
def smuggling(draw: st.DrawFn) -> bytes:
    """A sound request line and Host, then one to three framing headers and a body that may
    hide another request."""
    method = draw(st.sampled_from([b"POST", b"GET", b"PUT"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    fields = draw(st.lists(st.sampled_from(FRAMING), min_size=1, max_size=3))
    body = draw(st.sampled_from(BODIES))
    return (method + b" /s " + version + b"\r\nHost: h\r\n" + b"".join(f + b"\r\n" for f in fields)
            + b"\r\n" + body)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A request (valid or built) with a few byte-level mutations."""
    data = bytearray(draw(st.one_of(valid(), built(), smuggling())))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "duplicate", "lf",
                                     "truncate"]))
        if kind == "insert":
            data[at:at] = draw(st.sampled_from([b"\r\n", b"\n", b"\r", b" ", b"\t", b"\x00",
                                                b":", b",", b";", b"\xff", b"0"]))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "duplicate":
            piece = data[at:at + draw(st.integers(1, 40))]
            data[at:at] = piece
        elif kind == "lf":
            data = bytearray(bytes(data).replace(b"\r\n", b"\n", 1))
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


inputs = st.lists(st.one_of(valid(), built(), smuggling(), mutated(),
                            st.binary(min_size=1, max_size=256)),
                  min_size=1, max_size=3).map(b"".join)


# --------------------------------------------------------------------------- one exchange


class Responses:
    """Parses what came back: complete responses only, or it says what is wrong."""

    def __init__(self) -> None:
        self.parser = HttpResponseParser(self)
        self.statuses: list[int] = []
        self.backends = 0
        self.in_message = False
        self._backend = False

    def on_message_begin(self) -> None:
        self.in_message = True
        self._backend = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-backend":
            self._backend = True

    def on_message_complete(self) -> None:
        self.in_message = False
        status = self.parser.get_status_code()
        if status >= 200:
            self.statuses.append(status)
            self.backends += self._backend


def exchange(port: int, data: bytes) -> tuple[bytes, float]:
    """Send ``data``, half-close, read until the proxy closes: (what came back, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # refused before we were done sending: fine, read the answer
            pass
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - started


def check_answer(stand: Stand, data: bytes) -> None:
    got, took = exchange(stand.port, data)
    assert took < 9, f"the proxy took {took:.1f}s to answer and close"
    answers = Responses()
    try:
        answers.parser.feed_data(got)
    except HttpParserError as exc:
        raise AssertionError(f"not a well-formed response ({exc}): {got[:300]!r}") from None
    assert not answers.in_message, f"a response cut short: {got[-300:]!r}"
    for status in answers.statuses:
        stand.statuses[str(status)] += 1
        assert status < 500 or status in ALLOWED_5XX, f"{status} for {data[:300]!r}:\n{got!r}"
    if not answers.statuses:
        stand.statuses["closed"] += 1
    # Every request a backend answered, a client got the answer of: no desync.
    stand.answered_seen += answers.backends
    deadline = time.monotonic() + 2
    while stand.backends.answered != stand.answered_seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stand.backends.answered == stand.answered_seen, (
        f"backends answered {stand.backends.answered} requests, clients got "
        f"{stand.answered_seen} of those answers, after {data[:300]!r}")


# --------------------------------------------------------------------------- the run


def test_fuzzed_requests_get_well_formed_answers_and_the_proxy_stays_up(stand: Stand) -> None:
    started = time.monotonic()
    failed = True
    try:
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])
        @given(data=inputs)
        def run(data: bytes) -> None:
            stand.examples += 1
            check_answer(stand, data)

        run()
        failed = False
    finally:
        record("fuzz", "hypothesis: generated requests", examples=stand.examples,
               ok=not failed, statuses=dict(stand.statuses),
               seconds=round(time.monotonic() - started, 1))
    # Still up, still serving, and nothing went wrong inside.
    got, _ = exchange(stand.port, b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]
    assert stand.proc.returncode is None
    bad = [line for line in stand.proc.lines_since(0)
           if "Traceback" in line or re.search(r"\b(ERROR|CRITICAL)\b", line)]
    assert bad == [], "\n".join(bad[:20])
    assert stand.examples >= min(EXAMPLES, 100)


# --------------------------------------------------------------------------- the sans-IO layer


class Recorder:
    """An ``http1.RequestSink`` (and BodySink) that writes down what comes out: a head as
    (method, target, Host), then its body bytes, then "end"."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.last: RequestHead | None = None

    def request_head(self, head: RequestHead) -> Recorder:
        self.last = head
        self.events.append((head.method, head.target, head.host_raw, head.chunked))
        return self

    def request_body(self, data: bytes) -> None:
        if self.events and isinstance(self.events[-1], bytes):
            self.events[-1] += data
        else:
            self.events.append(data)

    def request_end(self) -> None:
        self.events.append("end")


class Place:
    settings = ProxySettings()


def sans_io(reads: list[bytes]) -> tuple[list[object], int | None]:
    """Feed ``reads`` as ClientConnection does (after an upgrade: a WebSocket keeps the rest,
    another upgrade goes on in HTTP/1.1): what came out, and the refusal's status if any."""
    sink = Recorder()
    parser = RequestParser(sink, Place())
    try:
        for data in reads:
            while data:
                at = parser.feed(data)
                if at < 0:
                    break
                if sink.last is not None and sink.last.websocket:
                    return sink.events, None
                data = data[at:]
    except Reject as refused:
        assert refused.bug is None, f"a bug, not a refusal: {refused.bug!r}"
        return sink.events, refused.status
    return sink.events, None


@settings(max_examples=EXAMPLES * 3, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(data=inputs, cuts=st.lists(st.integers(0, 1000), max_size=4))
def test_the_sans_io_layer_refuses_cleanly_and_reads_the_same_however_the_bytes_are_cut(
        data: bytes, cuts: list[int]) -> None:
    """Every input is heads, bodies and ends in order, or a refusal with a 4xx (501 or 505),
    never a bug or another exception; an input read whole reads the same cut anywhere."""
    events, status = sans_io([data])
    assert status is None or 400 <= status < 500 or status in ALLOWED_5XX, (status, data)
    ends = [i for i, e in enumerate(events) if e == "end"]
    heads = [i for i, e in enumerate(events) if isinstance(e, tuple)]
    assert len(ends) <= len(heads) <= len(ends) + 1 and all(h < e for h, e in zip(heads, ends))
    if status is None:
        points = sorted({c for c in cuts if 0 < c < len(data)})
        reads = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
        assert sans_io(reads) == (events, None), (reads, events)
