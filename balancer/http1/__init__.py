"""HTTP/1.1 as data: what a client may send, how heads are classified, our own answers. No I/O.

In the spirit of h11: bytes go in (``RequestParser.feed``), records and decisions come out
(``RequestHead``, then body bytes, to a ``RequestSink``), and a request we will not
forward comes out as a refusal, ``Reject(status, detail)``. Sockets, timers and backends belong
to the modules above (``proxy``, ``exchange``, ``upstream``), which only move bytes between
their transports and this layer; so every rule here is tested without a socket.

What a client may send (each refusal is our own short answer, then the connection closes):
llhttp (strict mode, as httptools builds it) refuses bad request lines, header names and
control bytes in values, obs-fold, bare CR/LF, ``Content-Length`` with ``Transfer-Encoding``,
duplicate or malformed lengths and bad chunk framing; it is lenient where we are not, so we add:

- ``Transfer-Encoding``: only exactly ``chunked`` (any case) is framed; trailing whitespace is
  refused as an obfuscation (400), chunked not last or twice is 400 (RFC 9112 §6.3), another
  coding before a final chunked is 501, and any Transfer-Encoding in HTTP/1.0 is 400 (§6.1);
- ``Content-Length`` above 2**63-1 (llhttp takes up to 2**64-1: an int64 backend would wrap)
  is 400, and the length is re-written in canonical digits;
- ``Host`` (and an absolute-form authority) must be ``uri-host[:port]`` with a non-empty host
  (RFC 9110 §4.2.1, RFC 9112 §3.2: 400); a target with a ``#fragment`` is 400 (backends
  disagree about what it means);
- ``Upgrade`` in an HTTP/1.0 request is ignored and dropped (RFC 9110 §7.8);
- chunk extensions and trailer fields: llhttp skips extensions of any length and httptools
  buffers a trailer field whole, so framing bytes beyond ``CHUNK_OVERHEAD`` per chunk plus
  ``max_header_size`` are refused (400), also within the read where the head ends; trailers
  count against ``max_header_size`` (431).

Header values may carry obs-text (bytes 0x80-0xFF; RFC 9110 §5.5 allows them) and are passed on
as they are. Bodies are always re-framed by the proxy from the parser's events (chunks
re-chunked, lengths canonical), so what a backend receives parses one way only.
"""

from balancer.http1.request import BodySink, RequestParser, RequestSink, SettingsSource
from balancer.http1.rules import (
    ANSWER_FRAMING,
    CHUNK_OVERHEAD,
    CHUNKED,
    LENGTH,
    MAX_LENGTH,
    NO_BODY,
    NO_REQUEST,
    O_CHUNK,
    O_NONE,
    O_RAW,
    PLAIN_CONNECTION,
    PROTECTED,
    R_CODING,
    R_CONNECTION,
    R_LENGTH,
    REQUEST_HEADERS,
    RESPONSE_HEADERS,
    UNTIL_CLOSE,
    HeaderKinds,
    Limits,
    Reject,
    RequestHead,
    ResponseHead,
    connection_tokens,
    drop_named,
    error_response,
    host_of,
    refusal,
    status_line,
    transfer_coding,
    valid_host,
    whole_lines,
)

__all__ = ["ANSWER_FRAMING", "BodySink", "CHUNK_OVERHEAD", "CHUNKED", "LENGTH", "NO_BODY",
           "O_CHUNK", "O_NONE", "O_RAW", "UNTIL_CLOSE", "HeaderKinds", "Limits", "MAX_LENGTH",
           "NO_REQUEST",
           "PLAIN_CONNECTION", "PROTECTED", "R_CODING", "R_CONNECTION", "R_LENGTH",
           "REQUEST_HEADERS", "RESPONSE_HEADERS", "Reject", "RequestHead", "RequestParser",
           "ResponseHead",
           "RequestSink", "SettingsSource", "connection_tokens", "drop_named", "error_response",
           "whole_lines",
           "host_of", "refusal", "status_line", "transfer_coding", "valid_host"]
