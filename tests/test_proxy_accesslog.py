"""The access log's pieces: the line, the cheap record, and the batching handler."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os

from balancer import accesslog
from balancer.accesslog import AccessLogHandler, AccessRecord


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def record(i: int) -> AccessRecord:
    return AccessRecord(f'{{"n":{i}}}', 1.0)


def test_record_formats_like_a_normal_one() -> None:
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(process)d %(message)s")
    line = formatter.format(AccessRecord('{"a":1}', 1_700_000_000.25))
    assert line.endswith(f' INFO balancer.access {os.getpid()} {{"a":1}}')
    assert ",250 " in line  # msecs


def test_line_is_json_with_every_field(caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level("INFO", logger="balancer.access")
    accesslog.write(b"rid-1", "10.0.0.9", b"POST", b'/a "b"\\\xe9', "web", 'b"1', 502, None,
                    0.25, 17)
    (rec,) = [r for r in caplog.records if r.name == "balancer.access"]
    data = json.loads(rec.getMessage())
    assert data == {"time": data["time"], "request_id": "rid-1", "client": "10.0.0.9",
                    "method": "POST", "host": None, "path": '/a "b"\\\xe9', "pool": "web",
                    "backend": 'b"1',
                    "status": 502, "upstream_time": None, "total_time": 0.25, "bytes": 17}
    assert data["time"].endswith("Z") and "T" in data["time"]


async def test_handler_batches_lines_until_its_delay() -> None:
    stream = CountingStream()
    handler = AccessLogHandler(stream, max_delay=0.05)
    for i in range(10):
        handler.handle(record(i))
    assert stream.writes == 0
    await asyncio.sleep(0.15)
    assert stream.writes == 1
    assert [json.loads(line)["n"] for line in stream.getvalue().splitlines()] == list(range(10))


async def test_handler_writes_a_full_batch_at_once_and_the_rest_at_close() -> None:
    stream = CountingStream()
    handler = AccessLogHandler(stream, max_lines=4, max_delay=10)
    for i in range(10):
        handler.handle(record(i))
    assert stream.writes == 2  # two batches of four
    handler.close()
    assert stream.writes == 3
    assert len(stream.getvalue().splitlines()) == 10


def test_handler_outside_an_event_loop_writes_at_once() -> None:
    stream = CountingStream()
    handler = AccessLogHandler(stream)
    handler.handle(record(1))
    assert stream.getvalue() == '{"n":1}\n'
