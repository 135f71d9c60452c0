"""The client-side hardening suite, for the tests and for ``scripts/reliability.py``.

- ``ParsingBackend``: a loopback backend that parses what the proxy forwards with llhttp (a sane
  backend), records each request as it understood it, and answers ``200 ok``. Tests read its
  ``requests`` to show that what was forwarded parses one way only.
- ``record(family, case, **observed)``: the tests note each case they tried and what happened,
  as a JSON line in the file named by ``$BALANCER_HARDENING_REPORT`` (nothing when unset).
- ``run_input_suite()``: runs the client-side test files (bad input, smuggling, limits, slow
  clients, TLS, doors, fuzzing) in a pytest subprocess and returns, per family, how many cases
  ran, how many gave the expected outcome, the statuses seen, and pytest's own totals. This is
  what ``scripts/reliability.py`` calls for those families of docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from httptools import HttpParserError, HttpRequestParser

ROOT = Path(__file__).resolve().parents[2]
#: The test files of the client-side families, in the order they are reported.
FILES = ("tests/test_bad_input.py", "tests/test_client_limits.py", "tests/test_tls.py",
         "tests/test_fuzz.py")
REPORT_ENV = "BALANCER_HARDENING_REPORT"
#: Set to run more hypothesis examples than the CI's bounded run (read by test_fuzz.py).
FUZZ_ENV = "BALANCER_FUZZ_EXAMPLES"


# --------------------------------------------------------------------------- recording


def record(family: str, case: str, **observed: Any) -> None:
    """Append one case's outcome to ``$BALANCER_HARDENING_REPORT`` (no-op when unset).

    ``observed`` should hold ``ok`` (the outcome was the one wanted) and what was seen
    (``status``, ``expected``...); values must be JSON-serialisable.
    """
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    line = json.dumps({"family": family, "case": case, **observed}, default=str)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


# --------------------------------------------------------------------------- a sane backend


@dataclass
class Parsed:
    """One request as the backend's parser understood it."""

    method: bytes = b""
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _Conn(asyncio.Protocol):
    def __init__(self, backend: ParsingBackend) -> None:
        self.backend = backend
        self.parser = HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.current: Parsed | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.backend.connections += 1
        self.backend.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend.open.discard(self)

    def data_received(self, data: bytes) -> None:
        self.backend.raw.append(data)
        try:
            self.parser.feed_data(data)
        except HttpParserError as exc:
            self.backend.errors.append(f"{type(exc).__name__}: {exc}")
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
            self.transport.close()

    def on_message_begin(self) -> None:
        self.current = Parsed()
        self.body = []
        self.backend.requests.append(self.current)

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.method = self.parser.get_method()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.current is not None and self.transport is not None
        self.current.body = b"".join(self.body)
        self.current.complete = True
        if not self.backend.silent:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


class ParsingBackend:
    """A loopback server that parses requests with llhttp, notes them, and answers 200.

    ``silent``: read and note requests but never answer (a backend that stalls).
    """

    def __init__(self, silent: bool = False) -> None:
        self.requests: list[Parsed] = []
        self.errors: list[str] = []
        self.raw: list[bytes] = []
        self.connections = 0
        self.open: set[_Conn] = set()
        self.silent = silent
        self.port = 0
        self.server: asyncio.AbstractServer | None = None

    def clear(self) -> None:
        self.requests.clear()
        self.errors.clear()
        self.raw.clear()

    @property
    def wire(self) -> bytes:
        return b"".join(self.raw)


@asynccontextmanager
async def parsing_backend(silent: bool = False) -> AsyncIterator[ParsingBackend]:
    backend = ParsingBackend(silent)
    loop = asyncio.get_running_loop()
    backend.server = await loop.create_server(lambda: _Conn(backend), "127.0.0.1", 0)
    backend.port = backend.server.sockets[0].getsockname()[1]
    try:
        yield backend
    finally:
        backend.server.close()
        for conn in list(backend.open):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- the suite


def run_input_suite(fuzz_examples: int | None = None, timeout: float = 1800.0,
                    files: tuple[str, ...] = FILES) -> dict[str, Any]:
    """Run the client-side hardening tests; their totals and outcomes per family.

    ``fuzz_examples``: hypothesis examples for the fuzzer (default: the CI's bounded run).
    Returns ``{"command", "duration_s", "tests": {passed, failed, errors, skipped},
    "failures": [test ids], "families": {family: {"cases", "ok", "statuses", "examples"?}}}``;
    a case counts as ok when its outcome was the one wanted (``ok`` in its record).
    """
    with tempfile.TemporaryDirectory(prefix="hardening-") as tmp:
        records_path = Path(tmp) / "records.jsonl"
        junit = Path(tmp) / "junit.xml"
        env = dict(os.environ, **{REPORT_ENV: str(records_path)})
        if fuzz_examples is not None:
            env[FUZZ_ENV] = str(fuzz_examples)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", *files]
        started = time.monotonic()
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        duration = time.monotonic() - started
        records = ([json.loads(line) for line in records_path.read_text().splitlines()]
                   if records_path.exists() else [])
        tests, failures = _junit(junit)
    return {
        "command": "python -m pytest " + " ".join(files)
                   + (f"  ({FUZZ_ENV}={fuzz_examples})" if fuzz_examples else ""),
        "returncode": proc.returncode,
        "duration_s": round(duration, 1),
        "tests": tests,
        "failures": failures,
        "families": summarise(records),
        "output_tail": proc.stdout[-2000:] if proc.returncode else "",
    }


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Records → per family: cases, ok, statuses seen (and fuzz examples, when recorded)."""
    families: dict[str, dict[str, Any]] = {}
    for rec in records:
        fam = families.setdefault(rec["family"], {"cases": 0, "ok": 0, "statuses": Counter()})
        if "examples" in rec:  # one record for a whole hypothesis run
            fam["cases"] += rec["examples"]
            fam["ok"] += rec["examples"] if rec.get("ok") else 0
            fam["statuses"].update(rec.get("statuses", {}))
            fam["examples"] = fam.get("examples", 0) + rec["examples"]
            continue
        fam["cases"] += 1
        fam["ok"] += 1 if rec.get("ok") else 0
        status = rec.get("status")
        fam["statuses"][str(status if status is not None else "closed")] += 1
    for fam in families.values():
        fam["statuses"] = dict(sorted(fam["statuses"].items()))
    return families


def _junit(path: Path) -> tuple[dict[str, int], list[str]]:
    if not path.exists():
        return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}, []
    root = ET.parse(path).getroot()
    counts = Counter(passed=0, failed=0, errors=0, skipped=0)
    failures = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failures.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failures.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return dict(counts), failures


if __name__ == "__main__":  # python -m tests.support.hardening [FUZZ_EXAMPLES]
    result = run_input_suite(int(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(json.dumps(result, indent=2))
