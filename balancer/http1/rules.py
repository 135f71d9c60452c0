"""HTTP/1.1 rules as data and functions: header tables, what a request head must be, the
refusals (``Reject``) and our own short answers. Pure: no I/O, no parser state."""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Protocol

from httptools import (
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserInvalidURLError,
    HttpParserUpgrade,
)

__all__ = ["ANSWER_FRAMING", "CHUNK_OVERHEAD", "CHUNKED", "LENGTH", "NO_BODY", "O_CHUNK",
           "O_NONE", "O_RAW", "ResponseHead", "UNTIL_CLOSE", "HeaderKinds", "Limits",
           "MAX_LENGTH", "NO_REQUEST",
           "PLAIN_CONNECTION", "PROTECTED", "REQUEST_HEADERS", "RESPONSE_HEADERS", "Reject",
           "RequestHead", "check_head", "check_target", "connection_tokens", "drop_named",
           "error_response", "host_of", "refusal", "status_line", "transfer_coding",
           "valid_host", "whole_lines"]

CHUNK_OVERHEAD = 64
#: The largest Content-Length we forward: beyond, an int64 parser would wrap.
MAX_LENGTH = 2**63 - 1
#: Request-line bytes not counted by the header budget (method, spaces, version, CRLF).
LINE_SLACK = 64
TOO_MUCH_FRAMING = "chunk extensions or trailer fields too long"


class Reject(Exception):
    """A request we refuse to forward: answered with ``status`` and closed.

    ``late``: a request parsed whole in the same read, the one refused (else the one being
    read); ``bug``: not the client's fault but ours, to be logged (the answer is a 500)."""

    def __init__(self, status: int, detail: str, late: RequestHead | None = None,
                 bug: BaseException | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.late = late
        self.bug = bug


# --- header tables -------------------------------------------------------------------------


class HeaderKinds(dict):  # type: ignore[type-arg]
    """Header name, as spelled on the wire → what to do with it (0: pass it on).

    Looked up by the exact bytes received, so the common spellings cost one dict lookup and no
    ``lower()``; a new spelling is classified case-insensitively once and remembered.
    """

    def __init__(self, table: dict[bytes, int]) -> None:
        super().__init__()
        self.table = table

    def __missing__(self, name: bytes) -> int:
        kind = self.table.get(name.lower(), 0)
        if len(self) < 4096:  # a bound against peers inventing spellings
            self[name] = kind
        return kind


# Request headers handled rather than copied as they are (0: copied). Hop-by-hop ones are
# dropped (RFC 9110 §7.6.1); X-Forwarded-*, X-Request-ID and Via are set by us.
H_PASS, H_DROP, H_HOST, H_CONNECTION, H_TE, H_UPGRADE, H_XFF, H_RID, H_EXPECT, H_LENGTH = range(10)
_HOP_BY_HOP = (b"keep-alive", b"proxy-connection", b"te", b"trailer", b"proxy-authorization",
               b"proxy-authenticate")
_HANDLED = {
    **dict.fromkeys(_HOP_BY_HOP, H_DROP),
    b"host": H_HOST, b"connection": H_CONNECTION, b"transfer-encoding": H_TE,
    b"upgrade": H_UPGRADE, b"x-forwarded-for": H_XFF, b"x-forwarded-proto": H_DROP,
    b"x-forwarded-host": H_DROP, b"x-request-id": H_RID, b"expect": H_EXPECT,
    b"content-length": H_LENGTH,
}
# ...and their spellings with "_" for "-" are dropped: CGI-style backends (WSGI, PHP) read
# ``Transfer_Encoding`` or ``X_Forwarded_For`` as the real header (nginx drops them too).
REQUEST_HEADERS = HeaderKinds({
    **_HANDLED, **{name.replace(b"-", b"_"): H_DROP for name in _HANDLED if b"-" in name}})

# Response headers that never go to the client as received: hop-by-hop ones, the framing we
# redo ourselves, and the request id we set.
R_PASS, R_DROP, R_CONNECTION, R_LENGTH, R_CODING = range(5)
RESPONSE_HEADERS = HeaderKinds({
    **dict.fromkeys(_HOP_BY_HOP, R_DROP), b"upgrade": R_DROP, b"x-request-id": R_DROP,
    b"connection": R_CONNECTION, b"transfer-encoding": R_CODING, b"content-length": R_LENGTH,
})

#: Connection header values that name no other header (the common ones, as spelled).
PLAIN_CONNECTION = frozenset((b"keep-alive", b"Keep-Alive", b"close", b"Close"))
#: Never dropped because a Connection header names them: they frame the request.
PROTECTED = frozenset((b"content-length", b"host", b"upgrade"))


def connection_tokens(value: bytes, named: list[bytes] | None) -> list[bytes] | None:
    """Add the header names a Connection header lists (beyond close/keep-alive) to ``named``."""
    for token in value.lower().split(b","):
        token = token.strip()
        if token and token != b"close" and token != b"keep-alive":
            if named is None:
                named = []
            named.append(token)
    return named


def whole_lines(parts: list[bytes]) -> list[bytes]:
    """Header lines kept as parts (name, ": ", value, CRLF: joined once, with the head)
    or whole, as whole lines, each with its CRLF."""
    return [line + b"\r\n" for line in b"".join(parts).split(b"\r\n")[:-1]]


def drop_named(lines: list[bytes], named: list[bytes]) -> list[bytes]:
    """``lines`` without the headers a Connection header named (hop-by-hop too), except those
    that frame the message (``PROTECTED``)."""
    drop = set(named) - PROTECTED
    return [line for line in lines if line.partition(b":")[0].lower() not in drop]


# --- validation rules ----------------------------------------------------------------------

_METHOD_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ ")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+").fullmatch
#: uri-host [ ":" port ] (RFC 9110 §7.2, RFC 3986 §3.2.2): reg-name, IPv4 or an IP literal.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?").fullmatch
#: Host values already found valid → the host they name: a dict lookup instead of the regex
#: for the hosts a proxy sees again and again (bounded: clients may invent hosts).
_HOSTS: dict[bytes, bytes] = {}


def valid_host(value: bytes) -> bool:
    """``uri-host[:port]`` (the emptiness of the host itself is checked by ``host_of``)."""
    return value in _HOSTS or _HOST(value) is not None


def host_of(raw: bytes) -> bytes:
    """The host a valid Host value names, lower-cased and without its port. Refused when
    not ``uri-host[:port]`` or when the host is empty (RFC 9110 §4.2.1: an http URI with an
    empty host is invalid)."""
    known = _HOSTS.get(raw)
    if known is not None:
        return known
    if not _HOST(raw):
        raise Reject(400, "invalid Host header")
    host = raw.lower()
    if 0x3A in host:  # ":" (an int: ``bytes in bytes`` costs more, for nothing)
        if host[:1] == b"[":
            end = host.find(b"]")
            host = host[:end + 1] if end >= 0 else host
        else:
            host = host.partition(b":")[0]
    if not host:
        raise Reject(400, "empty Host")
    if len(_HOSTS) < 4096:
        _HOSTS[raw] = host
    return host


def transfer_coding(te: bytes) -> Reject:
    """The refusal of a Transfer-Encoding other than exactly ``chunked``.

    Trailing whitespace is an obfuscation probe (``chunked ``): 400. Chunked missing as the
    last coding, or applied twice, leaves the body's end unknowable: 400 (RFC 9112 §6.3). A
    well-formed list ending in chunked with other codings before it is 501: we implement only
    chunked (RFC 9112 §6.1).
    """
    if te[-1:] in (b" ", b"\t") or te[:1] in (b" ", b"\t"):
        return Reject(400, "Transfer-Encoding value with surrounding whitespace")
    codings = [c.strip(b" \t").lower() for c in te.split(b",")]
    if not all(_TOKEN(c.partition(b";")[0].rstrip(b" \t")) for c in codings):
        return Reject(400, "malformed Transfer-Encoding")
    if codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
        return Reject(400, "Transfer-Encoding must end in chunked, once")
    return Reject(501, "only the chunked transfer-coding is implemented")


def refusal(exc: HttpParserError, data: bytes) -> Reject:
    """What to answer a request llhttp (or one of our rules, raised in a callback) refused."""
    cause = exc.__context__
    if isinstance(cause, Reject):
        return cause
    # (HttpParserUpgrade is no HttpParserError: it is the context when the bytes after an
    # upgrade we do not proxy fail to parse, which is the client's error, not a bug.)
    if cause is not None and not isinstance(cause, (HttpParserError, HttpParserUpgrade)):
        return Reject(500, "internal error", bug=cause)
    if isinstance(exc, HttpParserInvalidMethodError):
        # A well-formed method we do not know is "not implemented"; garbage is a bad request.
        known = _METHOD_TOKEN.match(data.lstrip(b"\r\n")[:64]) is not None
        return Reject(501, "unknown method") if known else Reject(400, "invalid request line")
    if isinstance(exc, HttpParserInvalidURLError):
        return Reject(400, "invalid request target")
    if data.lstrip(b"\r\n").startswith(b"PRI * HTTP/2.0"):
        return Reject(505, "HTTP/2 is not supported here: speak HTTP/1.1")
    return Reject(400, f"invalid request: {exc}")


class Limits(Protocol):
    """The request limits a parser applies (``proxy.ProxySettings`` has them)."""

    @property
    def max_body_size(self) -> int | None: ...
    @property
    def max_url_size(self) -> int: ...
    @property
    def max_header_size(self) -> int: ...
    @property
    def max_headers(self) -> int: ...


class RequestHead:
    """One request head as parsed and checked: what routing and forwarding read."""

    __slots__ = ("method", "url", "target", "path", "headers", "lines", "host", "host_raw",
                 "xff", "rid_in", "te", "upgrade", "named", "expect", "http10", "keep_alive",
                 "content_length", "chunked", "expect_continue", "websocket", "switch",
                 "body_size")

    def __init__(self) -> None:
        self.method = self.url = b""
        self.target = self.path = b"/"
        self.headers: list[tuple[bytes, bytes]] = []
        self.lines: list[bytes] = []  # header lines passed on, or their parts: joined whole
        self.host = b""
        self.host_raw: bytes | None = None
        self.xff: bytes | None = None
        self.rid_in: bytes | None = None
        self.te: bytes | None = None
        self.upgrade: bytes | None = None
        self.named: list[bytes] | None = None  # header names listed in Connection
        self.expect: bytes | None = None
        self.http10 = self.keep_alive = self.chunked = False
        self.expect_continue = self.websocket = False
        self.switch = False  # the parser stops after this head (an upgrade was asked)
        self.content_length = self.body_size = 0

    def __repr__(self) -> str:
        return f"<RequestHead {self.method.decode('latin-1')} {self.url.decode('latin-1')}>"


#: The request of an answer given before any request was read (max_clients, a bad head).
NO_REQUEST = RequestHead()


def check_head(head: RequestHead, version: str, limits: Limits) -> None:
    """The rules a complete head must pass (raises ``Reject``); sets its framing, target and
    what it asks for (100-continue, a WebSocket)."""
    if version != "1.1":
        if version != "1.0":
            raise Reject(505, f"HTTP/{version} is not supported")
        head.http10 = True
    method = head.method
    if method == b"CONNECT":
        raise Reject(405, "CONNECT is not supported by this proxy")
    if head.te is not None:
        if head.http10:  # RFC 9112 §6.1: faulty framing, whatever else it says
            raise Reject(400, "Transfer-Encoding in an HTTP/1.0 request")
        if head.te.lower() != b"chunked":
            raise transfer_coding(head.te)
        head.chunked = True
    elif head.content_length:
        limit = limits.max_body_size
        if limit is not None and head.content_length > limit:
            raise Reject(413, f"request body larger than {limit} bytes")
    url = head.url
    if url[:1] == b"/" and 0x23 not in url:  # origin form, the usual one ("#": check_target)
        head.target = head.path = url
        if head.host_raw is None and not head.http10:
            raise Reject(400, "HTTP/1.1 requests need a Host header")
    else:
        check_target(head)
    if head.expect is not None:
        if head.expect.strip().lower() != b"100-continue":
            raise Reject(417, "only the 100-continue expectation is supported")
        head.expect_continue = not head.http10 and (head.chunked or bool(head.content_length))
    # RFC 9110 §7.8: an Upgrade in an HTTP/1.0 request is ignored (and dropped).
    if head.upgrade is not None and method == b"GET" and not head.http10 \
            and head.named is not None and b"upgrade" in head.named \
            and b"websocket" in head.upgrade.lower():
        head.websocket = True


def check_target(head: RequestHead) -> None:
    """Check the request target; set what routing and forwarding use."""
    url = head.url
    if 0x23 in url:  # "#"
        raise Reject(400, "a request target carries no #fragment")
    if url[:1] == b"/":
        head.target = head.path = url
    elif url == b"*" and head.method == b"OPTIONS":
        head.target, head.path = url, b"/"
    elif url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
        # Absolute form: its authority replaces Host (RFC 9112 §3.2.2).
        rest = url.partition(b"://")[2]
        cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0),
                  default=len(rest))
        authority, tail = rest[:cut], rest[cut:]
        if not authority or not _HOST(authority):
            raise Reject(400, "invalid request target")
        head.host_raw = authority
        head.host = host_of(authority)
        head.target = head.path = tail if tail[:1] == b"/" else b"/" + tail
    else:
        raise Reject(400, "invalid request target")
    if head.host_raw is None and not head.http10:
        raise Reject(400, "HTTP/1.1 requests need a Host header")


# --- relaying an answer ------------------------------------------------------------------

# A response's framing as the backend sent it (upstream.py sets it from the head).
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3
# How the answer's body goes to the client: none, as it is, re-chunked.
O_NONE, O_RAW, O_CHUNK = 0, 1, 2


def _answer_framing(framing: int, http10: bool, close: bool) -> tuple[int, bool, bytes]:
    """How an answer framed ``framing`` by the backend goes to the client: its body's framing,
    whether the connection closes after it, and the header lines that say so."""
    if framing == NO_BODY:
        out = O_NONE
    elif framing == LENGTH:
        out = O_RAW  # Content-Length is passed on, canonical
    elif http10:
        out, close = O_RAW, True  # HTTP/1.0 has no chunks: the body ends with the connection
    else:
        out = O_CHUNK  # chunked or until-close: re-chunked, so the connection can stay
    lines = b"Transfer-Encoding: chunked\r\n" if out == O_CHUNK else b""
    if close:
        lines += b"Connection: close\r\n"
    elif http10:
        lines += b"Connection: keep-alive\r\n"  # an HTTP/1.0 client closes unless told
    return out, close, lines


class ResponseHead:
    """One response head from a backend, as parsed: what the client's answer is built from."""

    __slots__ = ("status", "reason", "lines", "framing", "named")

    def __init__(self) -> None:
        self.status = 0
        self.reason = b""
        self.lines: list[bytes] = []  # header lines passed on, or their parts: joined whole
        self.framing = UNTIL_CLOSE  # as the backend sent it: NO_BODY, LENGTH, CHUNKED...
        self.named: list[bytes] | None = None  # header names listed in Connection

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status} {self.reason.decode('latin-1')}>"


#: ``_answer_framing`` for every case, built once: ``ANSWER_FRAMING[framing][http10][close]``.
ANSWER_FRAMING = [[[_answer_framing(f, h, c) for c in (False, True)] for h in (False, True)]
                  for f in (NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE)]


# --- our own answers -----------------------------------------------------------------------

_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def status_line(status: int, reason: bytes) -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n``, remembered for the pairs seen (bounded)."""
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_STATUS_LINES) < 1024:
            _STATUS_LINES[key] = line
    return line


def error_response(status: int, request_id: bytes, detail: str, close: bool,
                   retry_after: int | None = None) -> bytes:
    """A short JSON answer the proxy gives itself: what went wrong, and the request id."""
    phrase = HTTPStatus(status).phrase
    rid = request_id.decode("latin-1")
    body = (json.dumps({"status": status, "error": phrase, "detail": detail,
                        "request_id": rid}) + "\n").encode()
    head = (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nX-Request-ID: {rid}\r\n")
    if retry_after is not None:
        head += f"Retry-After: {retry_after}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode("latin-1") + b"\r\n" + body
