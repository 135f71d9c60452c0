"""The operator docs, exercised, so they cannot rot (docs/configuration.md, docs/runbook.md).

- Every key the config package accepts (the ``_*_KEYS`` sets of balancer/config/parse.py and
  pools.py, read programmatically, so a key added later without a row fails here) has a row in
  its section of configuration.md, and every default written there as a single ``code`` value
  is what the loader really uses.
- Every ```yaml block of both docs parses; a full config (one with ``pools``) goes through
  ``balancer check`` and is accepted, or refused / warned about with the line its ``# refused:``
  or ``# warning:`` comment quotes; a fragment of keys is loaded inside a minimal config.
- The runbook's first ```sh block defines the variables the others use; every other ```sh block
  runs for real (bash -e -o pipefail) against a real ``balancer run`` subprocess in the state of
  a 503 page (live concentration, backends down, a pool in panic, a pool at its connection
  limit) with real aiohttp backends on free loopback ports, must exit 0, and its output must
  match the ```text block that follows it (``...`` matches anything).
- The runbook's table of 503 answers is what the proxy really answers, and every metric name
  the docs mention is in a real ``/metrics`` scrape.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from balancer import guard
from balancer.config import ConfigError
from balancer.config import parse as config_parse
from balancer.config import pools as config_pools
from balancer.loading import parse_config
from balancer.strategies import STRATEGIES, resolve_strategy
from tests.support.net import free_port, name_app, run_app
from tests.support.proc import WAIT, BalancerProcess, run_cli, write_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION = ROOT / "docs" / "configuration.md"
RUNBOOK = ROOT / "docs" / "runbook.md"
DOCS = (CONFIGURATION, RUNBOOK)
ALERTS = ROOT / "config" / "alerts.yml"

# --------------------------------------------------------------------------- reading markdown


@dataclass(frozen=True)
class Block:
    """A fenced code block: its info string, text, first line number, and the ```text block
    right after it (its example output), if any."""

    lang: str
    text: str
    line: int
    output: str | None = None

    def where(self, doc: Path) -> str:
        return f"{doc.name}:{self.line}"


def code_blocks(doc: Path) -> list[Block]:
    """Every fenced block of ``doc``, in order, each ```sh paired with the ```text after it."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    raw: list[tuple[str, str, int, int]] = []  # lang, text, first line, last line
    i = 0
    while i < len(lines):
        m = re.match(r"\s*```(\S*)\s*$", lines[i])
        if m is None:
            i += 1
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        start, i = i, i + 1
        body = []
        while i < len(lines) and not re.match(r"\s*```\s*$", lines[i]):
            line = lines[i]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            i += 1
        raw.append((m.group(1), "\n".join(body) + "\n", start + 1, i + 1))
        i += 1
    out = []
    for k, (lang, text, first, last) in enumerate(raw):
        output = None
        if lang == "sh" and k + 1 < len(raw) and raw[k + 1][0] == "text":
            between = lines[last:raw[k + 1][2] - 1]
            if all(not line.strip() for line in between):
                output = raw[k + 1][1]
        out.append(Block(lang, text, first, output))
    return out


def sections(doc: Path) -> list[tuple[str, str]]:
    """(heading, the text under it up to the next heading of any level), every heading."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    heads, fenced = [], False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6}\s", line):  # not a comment in a code block
            heads.append(i)
    heads.append(len(lines))
    return [(lines[i].lstrip("#").strip(), "\n".join(lines[i + 1:end]))
            for i, end in itertools.pairwise(heads)]


def section(doc: Path, heading: str) -> str:
    """The text under the first heading that contains ``heading``."""
    for title, body in sections(doc):
        if heading in title:
            return body
    raise AssertionError(f"{doc.name} has no heading containing {heading!r}")


def table_rows(body: str) -> list[dict[str, str]]:
    """Rows of the markdown tables in ``body``, as {lower-cased column title: cell text}."""
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    for line in body.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if header is None:
            header = [c.lower() for c in cells]
        elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
            rows.append(dict(zip(header, cells)))
    return rows


def single_code(cell: str) -> str | None:
    """The value of a cell that is exactly one ``code`` span, else None."""
    m = re.fullmatch(r"`([^`]+)`", cell.strip())
    return m.group(1) if m else None


# --------------------------------------------------------------------------- (1) every key


@dataclass(frozen=True)
class KeySection:
    """Where a key set is documented, and how to load one of its keys in a minimal config."""

    heading: str
    embed: Callable[[str, Any], dict[str, Any]] | None = None
    read: Callable[[Any], Any] | None = None


def _backends() -> list[dict[str, Any]]:
    return [{"url": "http://10.0.0.1:8000"}, {"url": "http://10.0.0.2:8000"}]


def _pool(**extra: Any) -> dict[str, Any]:
    return {"pools": {"web": {"backends": _backends(), **extra}}}


def _backend_entry(key: str, value: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"url": "http://10.0.0.3:8000", key: value}
    if key == "resolve_interval":  # only valid with discovery
        entry.update(url="http://app.internal:8000", discovery="dns")
    return {"pools": {"web": {"backends": [*_backends(), entry]}}}


#: Each key set of config.py → its section in configuration.md. A set added later without an
#: entry here is looked for under a heading holding its stem in code (``_TLS_KEYS`` → `tls`).
KEY_SECTIONS: dict[str, KeySection] = {
    "_TOP_KEYS": KeySection("Top level", lambda k, v: {**_pool(), k: v}, lambda c: c),
    "_GUARD_KEYS": KeySection("`guard`", lambda k, v: {**_pool(), "guard": {k: v}},
                              lambda c: c.guard),
    "_POOL_KEYS": KeySection("`pools`", lambda k, v: _pool(**{k: v}),
                             lambda c: c.pools["web"]),
    "_BACKEND_KEYS": KeySection("`backends`", _backend_entry,
                                lambda c: c.pools["web"].backends[-1]),
    "_HEALTH_KEYS": KeySection("`health_check`", lambda k, v: _pool(health_check={k: v}),
                               lambda c: c.pools["web"].health_check),
    "_OUTLIER_KEYS": KeySection("`outlier_detection`",
                                lambda k, v: _pool(outlier_detection={k: v}),
                                lambda c: c.pools["web"].outlier_detection),
    "_TIMEOUT_KEYS": KeySection("`timeouts`", lambda k, v: _pool(timeouts={k: v}),
                                lambda c: c.pools["web"].timeouts),
    "_ROUTE_KEYS": KeySection("`routes`", lambda k, v: {**_pool(), "routes": [
        {"pool": "web", k: v}]}, lambda c: c.routes[0]),
}

#: What a key's row may say instead of a value when its default is "not set".
UNSET = {"none", "unlimited", "off", "any host"}


def key_sets() -> dict[str, set[str] | frozenset[str]]:
    """Every ``_*_KEYS`` set of balancer/config/: the keys the loader accepts."""
    found = {name: value for module in (config_parse, config_pools)
             for name, value in vars(module).items()
             if re.fullmatch(r"_[A-Z][A-Z_]*_KEYS", name) and isinstance(value, (set, frozenset))}
    assert "_TOP_KEYS" in found and "_POOL_KEYS" in found, sorted(found)
    return found


def where_documented(set_name: str) -> KeySection:
    known = KEY_SECTIONS.get(set_name)
    if known is not None:
        return known
    return KeySection(f"`{set_name.strip('_').removesuffix('_KEYS').lower()}`")


def documented_rows(set_name: str) -> dict[str, dict[str, str]]:
    """The rows of ``set_name``'s section, by the key in their first cell."""
    body = section(CONFIGURATION, where_documented(set_name).heading)
    rows = {}
    for row in table_rows(body):
        key = single_code(next(iter(row.values()), ""))
        if key is not None:
            rows[key] = row
    return rows


def test_every_key_the_loader_accepts_has_a_row_in_its_section() -> None:
    missing = []
    for set_name, keys in sorted(key_sets().items()):
        heading = where_documented(set_name).heading
        try:
            rows = documented_rows(set_name)
        except AssertionError:
            missing.append(f"{set_name}: no section headed {heading!r} for keys {sorted(keys)}")
            continue
        missing += [f"{set_name}: `{k}` has no row under {heading!r}"
                    for k in sorted(keys) if k not in rows]
    assert not missing, "configuration.md does not document:\n" + "\n".join(missing)


def test_every_documented_key_exists() -> None:
    """The other way round: a row for a key the loader would refuse as unknown is a lie."""
    for set_name, keys in key_sets().items():
        extra = set(documented_rows(set_name)) - set(keys)
        assert not extra, f"configuration.md documents {sorted(extra)} under " \
                          f"{where_documented(set_name).heading!r}, which config.py does not accept"


def test_every_strategy_and_its_options_are_documented() -> None:
    body = section(CONFIGURATION, "`strategy`")
    listed = {single_code(next(iter(r.values()))) for r in table_rows(body)}
    assert set(STRATEGIES) <= listed, f"strategies without a row: {set(STRATEGIES) - listed}"
    for name in STRATEGIES:
        options = resolve_strategy(name).options_allowed
        if not options:
            continue
        rows = {single_code(next(iter(r.values()))) for r in table_rows(
            section(CONFIGURATION, f"`{name}` options"))}
        assert set(options) <= rows, f"{name} options without a row: {set(options) - rows}"


def test_documented_defaults_are_what_the_loader_uses() -> None:
    """A default written as one ``code`` value, set explicitly, loads the same config as the key
    left out; a default written as "none" / "unlimited" / "off" loads as not set."""
    checked = 0
    for set_name in key_sets():
        where = where_documented(set_name)
        if where.embed is None or where.read is None:
            continue
        for key, row in documented_rows(set_name).items():
            cell = row.get("default", "")
            value = single_code(cell)
            if value is not None:
                literal = yaml.safe_load(value)
                with_key = parse_config(where.embed(key, literal))
                without = parse_config(where.embed(key, None))
                assert with_key == without, (
                    f"{set_name} `{key}`: the documented default {value!r} loads as "
                    f"{getattr(where.read(with_key), key)!r}, the real default is "
                    f"{getattr(where.read(without), key)!r}")
                checked += 1
            elif cell.lower() in UNSET:
                loaded = where.read(parse_config(where.embed(key, None)))
                assert not getattr(loaded, key), (
                    f"{set_name} `{key}`: documented as {cell!r}, but it loads as "
                    f"{getattr(loaded, key)!r} when left out")
                checked += 1
    assert checked >= 25, f"only {checked} defaults checked: did the tables' columns change?"


def test_the_guard_is_described_with_its_real_numbers() -> None:
    text = " ".join(section(CONFIGURATION, "`guard`").split())
    assert f"{guard.REQUESTS:,} varied" in text
    assert f"{guard.CONCURRENCY} in flight" in text
    assert f"{guard.TOLERANCE * 100:g} points of tolerance" in text


# --------------------------------------------------------------------------- (2) yaml blocks


def yaml_blocks() -> list[tuple[Path, Block]]:
    return [(doc, b) for doc in DOCS for b in code_blocks(doc) if b.lang == "yaml"]


def _is_full(data: Any) -> bool:
    return isinstance(data, dict) and "pools" in data


def embed_fragment(data: Any) -> dict[str, Any] | None:
    """A minimal config holding ``data``, a fragment of top-level, pool or health-check keys, or
    a list of backends; every pool its routes name exists. None when it fits none of these."""
    sets = key_sets()
    if isinstance(data, list) and all(isinstance(x, str) or "url" in x for x in data):
        return {"pools": {"web": {"backends": data}}}
    if not isinstance(data, dict):
        return None
    keys = set(data)
    if keys <= sets["_TOP_KEYS"]:
        named = {r.get("pool") for r in data.get("routes") or [] if isinstance(r, dict)}
        return {"pools": {str(name): {"backends": _backends()} for name in named | {"web"}},
                **data}
    if keys <= sets["_POOL_KEYS"]:
        return {"pools": {"web": {"backends": _backends(), **data}}}
    if keys <= sets["_HEALTH_KEYS"]:
        return _pool(health_check=data)
    return None


def test_every_yaml_block_parses_and_every_fragment_loads() -> None:
    fragments = 0
    for doc, block in yaml_blocks():
        try:
            data = yaml.safe_load(block.text)
        except yaml.YAMLError as exc:
            pytest.fail(f"{block.where(doc)}: not YAML: {exc}")
        if _is_full(data):
            continue
        config = embed_fragment(data)
        assert config is not None, f"{block.where(doc)}: a fragment of no known section:\n" \
                                   f"{block.text}"
        try:
            parse_config(config, block.where(doc))
        except ConfigError as exc:
            pytest.fail(f"{block.where(doc)}: the fragment does not load:\n{exc}")
        fragments += 1
    assert fragments >= 8, f"only {fragments} fragments found"


def _expectation(text: str) -> tuple[int, list[tuple[str, str]]]:
    """From a block's comments: the exit code ``check`` should give, and the lines its stderr
    must contain (``# refused: LINE`` → 1; ``# warning: LINE`` → 0; neither → 0, and silent).
    ``...`` in a LINE matches anything (simulated shares vary with the backends' addresses)."""
    comment = re.compile(r"^#\s*(refused|warning):\s*(.+)$", re.MULTILINE | re.IGNORECASE)
    wanted = [(m.group(1).lower(), m.group(2).strip()) for m in comment.finditer(text)]
    return (1 if any(kind == "refused" for kind, _ in wanted) else 0), wanted


def test_every_full_config_in_the_docs_gets_the_documented_verdict(tmp_path: Path) -> None:
    blocks = [(doc, b) for doc, b in yaml_blocks() if _is_full(yaml.safe_load(b.text))]
    assert len(blocks) >= 4, "the docs lost their complete examples"
    files = [tmp_path / f"{doc.stem}-{block.line}.yaml" for doc, block in blocks]
    for path, (_, block) in zip(files, blocks):
        path.write_text(block.text, encoding="utf-8")
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda p: run_cli("check", "-c", str(p)), files))
    for (doc, block), result in zip(blocks, results):
        code, wanted = _expectation(block.text)
        assert result.returncode == code, (
            f"{block.where(doc)}: balancer check exited {result.returncode}, the docs say "
            f"{code}:\n{result.stdout}{result.stderr}")
        assert "Traceback" not in result.stderr
        for kind, line in wanted:
            rx = re.compile(".*".join(re.escape(part) for part in line.split("...")))
            hits = [s for s in result.stderr.splitlines() if rx.search(s)]
            assert hits, f"{block.where(doc)}: check never said {line!r}:\n{result.stderr}"
            if kind == "warning":
                assert all(" warning: " in s or s.startswith("warning: ") for s in hits)
        if code == 0 and not wanted:
            assert not result.stderr.strip(), f"{block.where(doc)}: warnings:\n{result.stderr}"


# --------------------------------------------------------------------------- the 503 page, live


def gate_app(name: str, gate: asyncio.Event, arrived: list[str]) -> web.Application:
    """A backend whose answers wait for ``gate`` (except /healthz): requests pile up in flight."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path != "/healthz":
            arrived.append(name)
            await gate.wait()
        return web.Response(text=name, headers={"X-Backend": name})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


class LoggedBalancer(BalancerProcess):
    """A BalancerProcess whose stderr is also appended, line by line, to a real log file."""

    def __init__(self, config: Path, log_file: Path) -> None:
        super().__init__(config)
        self.log_file = log_file

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with self.log_file.open("a", encoding="utf-8") as out:
            for line in self.proc.stderr:
                out.write(line)
                out.flush()
                with self._lock:
                    self.lines.append(line.rstrip("\n"))


def incident_config(web_ports: list[int], slow_ports: list[int], dead: list[int],
                    admin: int, listen: int, web_strategy: Any) -> dict[str, Any]:
    """The config of the page: ``web`` keyed on client_ip (every test client is 127.0.0.1, as
    every user behind one NAT address), ``api`` with its backends down and panic off, ``slow``
    at its connection limit, ``legacy`` with its backends down and in panic."""
    probe = {"path": "/healthz", "interval": "200ms", "timeout": "200ms",
             "unhealthy_threshold": 1, "healthy_threshold": 1}

    def backends(prefix: str, ports: list[int]) -> list[dict[str, Any]]:
        return [{"name": f"{prefix}{i}", "url": f"http://127.0.0.1:{p}"}
                for i, p in enumerate(ports, 1)]

    return {
        "listen": f"127.0.0.1:{listen}",
        "admin": f"127.0.0.1:{admin}",
        "admin_token": "docs-test-token",
        "drain_timeout": "2s",
        "guard": {"max_share": 0.5, "live_window": "5s", "live_min_requests": 20},
        "pools": {
            "web": {"strategy": web_strategy, "backends": backends("web", web_ports),
                    "health_check": probe},
            "api": {"backends": backends("api", dead[:2]), "health_check": probe,
                    "panic_threshold": 0},
            "slow": {"backends": backends("slow", slow_ports), "max_connections": 1,
                     "queue_timeout": "100ms", "timeouts": {"read": "2m"}},
            "legacy": {"backends": backends("legacy", dead[2:]), "health_check": probe},
        },
        "routes": [{"path_prefix": "/api", "pool": "api"},
                   {"path_prefix": "/slow", "pool": "slow"},
                   {"path_prefix": "/legacy", "pool": "legacy"},
                   {"pool": "web"}],
    }


class Incident:
    """A real ``balancer run`` in the state of a 503 page, driven from a background event loop
    (backends, live traffic, held requests), so that tests can run shell commands at it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = tmp / "balancer.yaml"
        self.good = tmp / "good.yaml"
        self.log = tmp / "balancer.log"
        self.proxy_port, self.admin_port = free_port(), free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.stack = AsyncExitStack()
        self.gate = asyncio.Event()
        self.arrived: list[str] = []
        self.proc: LoggedBalancer | None = None
        self._traffic: asyncio.Task[None] | None = None
        self._held: list[asyncio.Task[Any]] = []

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def proxy(self) -> str:
        return f"127.0.0.1:{self.proxy_port}"

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def env(self) -> dict[str, str]:
        """The runbook's variables, for this balancer."""
        assert self.proc is not None
        return {"ADMIN": self.admin, "PROXY": self.proxy, "CONFIG": str(self.config),
                "LOG": str(self.log), "PID": str(self.proc.pid), "TOKEN": "docs-test-token",
                "URL": f"http://{self.proxy}/slow/checkout", "GOOD": str(self.good)}

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()
        try:
            self.call(self._start(), timeout=120)
        except BaseException:
            self.stop()
            raise

    async def _start(self) -> None:
        enter = self.stack.enter_async_context
        web_ports = [await enter(run_app(name_app(f"web{i}"))) for i in (1, 2, 3)]
        slow_ports = [await enter(run_app(gate_app(f"slow{i}", self.gate, self.arrived)))
                      for i in (1, 2)]
        dead = [free_port() for _ in range(4)]  # nothing listens: refused
        args = (web_ports, slow_ports, dead, self.admin_port, self.proxy_port)
        write_config(self.config, incident_config(*args, {"name": "consistent_hash"}))
        write_config(self.good, incident_config(*args, "round_robin"))
        self.proc = LoggedBalancer(self.config, self.log)
        self.stack.callback(self.proc.kill)
        self.proc.start()
        await self.proc.wait_ready(timeout=30)
        session = await enter(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)))
        self._traffic = asyncio.create_task(self._steady_traffic(session))
        # Two requests hold both slots of `slow` (max_connections 1 each).
        self._held = [asyncio.create_task(session.get(f"http://{self.proxy}/slow/report"))
                      for _ in range(2)]
        await self._until(lambda: len(self.arrived) >= 2, "both slow backends busy")
        await self._until(lambda: self.proc is not None and self.proc.log.count(" is DOWN") >= 4,
                          "api and legacy backends DOWN")
        await self.proc.wait_for("pool legacy: panic")
        await self.proc.wait_for("pool web: traffic concentrated", timeout=30)

    async def _steady_traffic(self, session: aiohttp.ClientSession) -> None:
        """Live traffic on `web`, ~20 requests/s, for as long as the incident lasts."""
        while True:
            try:
                async with session.get(f"http://{self.proxy}/") as resp:
                    await resp.read()
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)

    async def _until(self, ready: Callable[[], bool], what: str) -> None:
        for _ in range(int(WAIT / 0.05)):
            if ready():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"not within {WAIT}s: {what}; log:\n"
                             f"{self.proc.log if self.proc else ''}")

    def stop(self) -> None:
        if self.thread.is_alive():
            try:
                self.call(self._stop())
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(WAIT)
        self.loop.close()

    async def _stop(self) -> None:
        self.gate.set()
        if self._traffic is not None:
            self._traffic.cancel()
        for task in (self._traffic, *self._held):
            if task is not None:
                try:
                    resp = await task
                    if resp is not None:
                        resp.release()
                except (asyncio.CancelledError, aiohttp.ClientError):
                    pass
        await self.stack.aclose()

    # --- asking it -----------------------------------------------------------------------

    def get(self, path: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        """GET through the proxy: status, headers, the JSON body (empty when not JSON)."""

        async def get() -> tuple[int, dict[str, str], dict[str, Any]]:
            async with aiohttp.ClientSession() as s, s.get(f"http://{self.proxy}{path}") as r:
                try:
                    body = await r.json(content_type=None)
                except ValueError:
                    body = {}
                return r.status, dict(r.headers), body if isinstance(body, dict) else {}

        return self.call(get())

    def scrape(self) -> str:
        async def scrape() -> str:
            async with aiohttp.ClientSession() as s, s.get(f"http://{self.admin}/metrics") as r:
                assert r.status == 200
                return await r.text()

        return self.call(scrape())


@pytest.fixture(scope="module")
def incident(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Incident]:
    for tool in ("curl", "jq"):
        if shutil.which(tool) is None:
            pytest.skip(f"the runbook's commands need {tool}")
    page = Incident(tmp_path_factory.mktemp("incident"))
    page.start()
    try:
        yield page
    finally:
        page.stop()


def run_block(block: Block, env: dict[str, str],
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``block`` as bash does a pasted script that stops at the first failing command, with
    the runbook's variables and this interpreter's ``balancer`` first on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.text],
                          env={**os.environ, **env, "PATH": path}, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def matches(expected: str, actual: str) -> str | None:
    """None when every non-blank line of ``expected`` (``...`` = anything) matches some line of
    ``actual``; else the first that matches none. Order is not compared: the events of a live
    process (health checks, panic, the monitor) interleave differently from run to run."""
    lines = [line.rstrip("\r").strip() for line in actual.splitlines()]
    for want in (w.strip() for w in expected.splitlines()):
        if not want:
            continue
        rx = re.compile(".*".join(re.escape(part) for part in want.split("...")))
        if not any(rx.fullmatch(line) for line in lines):
            return want
    return None


VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def runbook_blocks() -> tuple[Block, list[Block]]:
    """The runbook's variable block and its other ```sh blocks."""
    blocks = [b for b in code_blocks(RUNBOOK) if b.lang == "sh"]
    assert len(blocks) >= 8, "the runbook lost its commands"
    return blocks[0], blocks[1:]


def test_runbook_variables_are_the_ones_its_commands_use() -> None:
    setup, commands = runbook_blocks()
    assigned = re.findall(r"^export ([A-Z_]+)=", setup.text, re.MULTILINE)
    statements = [line for line in setup.text.splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    assert len(statements) == len(assigned), f"{setup.where(RUNBOOK)}: only `export NAME=` lines"
    assert subprocess.run(["bash", "-n", "-c", setup.text], check=False).returncode == 0
    used = set()
    for block in commands:
        local = set(re.findall(r"^\s*([A-Za-z_]\w*)=", block.text, re.MULTILINE))
        # A jq program's `$pool` is jq's, not the shell's: only unquoted or double-quoted text.
        shell = re.sub(r"'[^']*'", "", block.text)
        used |= set(VARIABLE.findall(shell)) - local
    assert used <= set(assigned), f"not set up in {setup.where(RUNBOOK)}: {used - set(assigned)}"
    unused = set(assigned) - used - set(VARIABLE.findall(setup.text))
    assert not unused, f"set up in {setup.where(RUNBOOK)} but never used: {sorted(unused)}"


def runbook_variables() -> set[str]:
    setup, _ = runbook_blocks()
    return set(re.findall(r"^export ([A-Z_]+)=", setup.text, re.MULTILINE))


def test_every_runbook_command_runs_and_answers_as_documented(incident: Incident) -> None:
    _, commands = runbook_blocks()
    env = incident.env()
    assert set(env) == runbook_variables(), "the test must give every runbook variable a value"
    assert incident.proc is not None
    for block in commands:
        result = run_block(block, env)
        where = block.where(RUNBOOK)
        assert result.returncode == 0, (
            f"{where}: exited {result.returncode}\n$ {block.text}\nstdout:\n{result.stdout}\n"
            f"stderr:\n{result.stderr}")
        if block.output is not None:
            missing = matches(block.output, result.stdout)
            assert missing is None, (f"{where}: no output line like {missing!r}\n$ {block.text}"
                                     f"\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    # The rollback was applied, and the live flag clears once spread traffic fills the window.
    incident.call(incident.proc.wait_for(
        r"pool web: traffic concentration cleared \(top backend now", timeout=30))


def test_the_503_table_is_what_the_proxy_answers(incident: Incident) -> None:
    rows = table_rows(section(RUNBOOK, "3. Whose 503"))
    # Scenario path for each row, by the counter its row names.
    paths = {'reason="overload"': "/slow/checkout", 'reason="no_backend"': "/api/orders",
             "balancer_pool_panic": "/legacy/"}
    checked = 0
    for row in rows:
        path = next((p for marker, p in paths.items() if marker in row["counted in"]), None)
        if path is None:
            continue
        pool = path.split("/")[1]
        detail = single_code(row["`detail`"])
        assert detail is not None, row
        before = _rejected(incident.scrape())
        status, headers, body = incident.get(path)
        assert str(status) == row["answer"], (path, status, body)
        want = re.escape(detail.replace("<pool>", pool)).replace(re.escape("..."), ".*")
        assert re.fullmatch(want, body.get("detail", "")), (row["`detail`"], body)
        retry = row["retry-after"]
        assert headers.get("Retry-After") == (None if retry == "—" else retry), (path, headers)
        reason = re.search(r'reason="(\w+)"', row["counted in"])
        if reason:
            after = _rejected(incident.scrape())
            key = (pool, reason.group(1))
            assert after.get(key, 0) == before.get(key, 0) + 1, (key, before, after)
        checked += 1
    assert checked == 3, f"checked {checked} rows of the 503 table"


def _rejected(scrape: str) -> dict[tuple[str, str], float]:
    return {(s.labels["pool"], s.labels["reason"]): s.value
            for f in text_string_to_metric_families(scrape) for s in f.samples
            if s.name == "balancer_rejected_requests_total"}


def test_every_metric_the_docs_name_is_in_a_real_scrape(incident: Incident) -> None:
    names = set()
    for f in text_string_to_metric_families(incident.scrape()):
        names.add(f.name)
        names.update(s.name for s in f.samples)
    mentioned = {m for doc in DOCS
                 for m in re.findall(r"\bbalancer_[a-z0-9_]*[a-z0-9]", doc.read_text())}
    assert len(mentioned) >= 10, mentioned
    assert not mentioned - names, f"not in /metrics: {sorted(mentioned - names)}"


def test_every_alert_the_runbook_names_exists() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    named = set(re.findall(r"`(Balancer[A-Za-z]+)`", RUNBOOK.read_text()))
    assert named, "the runbook names no alert"
    assert not named - alerts, f"not in config/alerts.yml: {sorted(named - alerts)}"
    assert not alerts - named, f"alerts the runbook does not explain: {sorted(alerts - named)}"


def test_a_refused_reload_leaves_the_running_config_alone(incident: Incident) -> None:
    """The runbook's reload command, with a config that concentrates: 409, nothing changes."""
    _, commands = runbook_blocks()
    post = next(b for b in commands if "/reload" in b.text and "POST" in b.text)
    command = "\n".join(line for line in post.text.splitlines() if "/reload" in line)
    live = incident.config.read_text()
    data = yaml.safe_load(live)
    data["pools"]["web"]["backends"][0]["weight"] = 9
    status_before = incident.call(_status(incident))
    assert incident.proc is not None
    mark = incident.proc.mark()
    write_config(incident.config, data)
    try:
        result = run_block(Block("sh", command + "\n", post.line), incident.env())
        no_token = run_block(Block("sh", command.replace("$TOKEN", "wrong") + "\n", post.line),
                             incident.env())
    finally:
        incident.config.write_text(live, encoding="utf-8")
    assert result.returncode == 0, result.stderr
    assert "applied: false" in result.stdout, result.stdout
    assert "would receive" in result.stdout and "max_share 50%" in result.stdout, result.stdout
    assert "applied: null" in no_token.stdout, no_token.stdout  # 401: {"error": ...}
    incident.call(incident.proc.wait_for("reload refused, still serving the previous config",
                                         since=mark))
    status_after = incident.call(_status(incident))
    assert status_after["reloads"]["refused"] == status_before["reloads"]["refused"] + 1
    for name, pool in status_before["pools"].items():
        assert status_after["pools"][name]["strategy"] == pool["strategy"]
        assert [b["weight"] for b in status_after["pools"][name]["backends"]] == \
               [b["weight"] for b in pool["backends"]]


async def _status(incident: Incident) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://{incident.admin}/status") as r:
        return await r.json()
