"""The access log's direct path: a line handed straight to the batching handler is written
exactly as the logging machinery would have written it, and anything that would change the
line (a filter, a formatter, another handler, propagation) sends it through logging again."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from balancer import accesslog
from balancer.accesslog import LOGGER, AccessLogHandler
from tests.support.accesslog import batched_access_log


@pytest.fixture
def access() -> Iterator[tuple[AccessLogHandler, io.StringIO]]:
    """The access logger as ``logs.setup_logging`` leaves it, restored afterwards."""
    with batched_access_log() as logged:
        yield logged


def write(n: int) -> None:
    accesslog.write(b"rid-%d" % n, "10.0.0.1", b"GET", b"/x", "web", "a", 200, 0.001, 0.002, n)


def lines(stream: io.StringIO) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_direct_lines_equal_the_logging_path(access) -> None:  # type: ignore[no-untyped-def]
    handler, stream = access
    assert handler.direct
    write(1)
    handler.flush()
    direct = stream.getvalue()
    stream.seek(0)
    stream.truncate()
    handler.addFilter(lambda record: True)  # same output, but through Logger.handle
    assert not handler.direct
    write(1)
    handler.flush()
    slow = stream.getvalue()
    strip = [{**d, "time": None} for d in json.loads("[" + direct.strip() + "]")]
    assert strip == [{**d, "time": None} for d in json.loads("[" + slow.strip() + "]")]
    assert direct.count("\n") == 1


def test_a_logger_filter_is_honoured(access) -> None:  # type: ignore[no-untyped-def]
    handler, stream = access
    LOGGER.addFilter(lambda record: '"bytes":2' not in record.getMessage())
    for n in (1, 2, 3):
        write(n)
    handler.flush()
    assert [d["bytes"] for d in lines(stream)] == [1, 3]


def test_a_formatter_is_honoured(access) -> None:  # type: ignore[no-untyped-def]
    handler, stream = access
    handler.setFormatter(logging.Formatter("ACCESS %(message)s"))
    assert not handler.direct
    write(1)
    handler.flush()
    assert stream.getvalue().startswith('ACCESS {"time":')


def test_a_second_handler_and_propagation_see_every_line(  # type: ignore[no-untyped-def]
        access, caplog) -> None:
    handler, stream = access
    extra = io.StringIO()
    LOGGER.addHandler(logging.StreamHandler(extra))
    write(1)
    handler.flush()
    assert len(lines(stream)) == 1 and len(extra.getvalue().splitlines()) == 1
    LOGGER.handlers[:] = [handler]
    LOGGER.propagate = True
    caplog.set_level(logging.INFO)
    write(2)
    handler.flush()
    assert [r for r in caplog.records if r.name == "balancer.access"]
    assert [d["bytes"] for d in lines(stream)] == [1, 2]


def test_a_handler_level_above_info_drops_the_line(access) -> None:  # type: ignore[no-untyped-def]
    handler, stream = access
    handler.setLevel(logging.WARNING)
    assert not handler.direct
    write(1)
    handler.flush()
    assert stream.getvalue() == ""
