"""``balancer check --replay``: a config judged on traffic a real ``balancer run`` recorded.

Fast parts first (the log reader, the replay core and its verdict on hand-written logs, the
``access_log`` keys), then end to end: three real aiohttp backends behind a real
``balancer run`` (round robin, recording ``header:X-User``), real client traffic from one
address to one domain, mostly on ``/``; the issue's traps replayed on its log must exit 1,
naming the backend, and configs that spread must exit 0.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from balancer import accesslog
from balancer.config import ConfigError
from balancer.loading import parse_config
from balancer.replay import run
from balancer.replaylog import LogReader
from tests.support.net import name_app, run_app
from tests.support.proc import BalancerProcess, run_cli, write_config

DOMAIN = "shop.example.com"
SECRET = "replay-test-digest-key"
USERS = 120  # distinct X-User values the clients send
REQUESTS = 240  # 200 of them on "/"


# --------------------------------------------------------------------------- fast parts


def _config(strategy: Any = "round_robin", n: int = 3, **top: Any) -> Any:
    backends = [{"name": f"web{i}", "url": f"http://10.0.0.{i}:8000"} for i in range(1, n + 1)]
    return parse_config({"pools": {"web": {"backends": backends, "strategy": strategy}},
                         **top})


def _json_line(i: int, **fields: Any) -> str:
    record = {"time": f"2026-12-04T10:00:{i // 100:02d}.{i % 100 * 10:03d}Z",
              "request_id": f"r{i}", "client": "203.0.113.7", "method": "GET",
              "host": DOMAIN, "path": f"/item/{i}", "pool": "web", "backend": "web1",
              "status": 200, "upstream_time": 0.004, "total_time": 0.005, "bytes": 10}
    return json.dumps({**record, **fields})


def _replay(tmp_path: Path, lines: list[str], new: Any, old: Any = None,
            host: str | None = None) -> tuple[int, str, str]:
    log = tmp_path / "access.log"
    log.write_text("\n".join(lines) + "\n")
    out, err = io.StringIO(), io.StringIO()
    code = run(new, [str(log)], host=host, old=old, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_reader_takes_json_and_combined_lines_and_counts_the_rest(tmp_path: Path) -> None:
    log = tmp_path / "mixed.log"
    log.write_text("\n".join([
        "2026-12-04 10:00:00.000 INFO balancer.app: balancer 1.0 listening on 127.0.0.1:8080",
        _json_line(1, keys={"header:x-user": "00ff", "cookie:sid": None}),
        '{"not": "an access record"}',
        '198.51.100.4 - - [04/Dec/2026:10:00:01 +0000] "GET /a?b=1 HTTP/1.1" 200 12 "-" "curl"',
        '198.51.100.4 - - [04/Dec/2026:10:00:01 +0000] "-" 400 0 "-" "-"',
    ]) + "\n")
    reader = LogReader()
    got = list(reader.read(str(log)))
    assert (reader.json, reader.combined, reader.skipped) == (1, 1, 3)
    assert got[0].host == DOMAIN and got[0].keys == {"header:x-user": "00ff", "cookie:sid": None}
    assert got[0].hold == 0.005 and got[0].latency == 0.004
    assert got[1].client == "198.51.100.4" and got[1].path == "/a?b=1" and got[1].host is None
    assert got[1].when == got[0].when - 0.01 + 1  # 10:00:01 exactly vs 10:00:00.010
    assert reader.labels == {"header:x-user", "cookie:sid"}


def test_a_hash_key_the_log_never_recorded_concentrates(tmp_path: Path) -> None:
    lines = [_json_line(i) for i in range(300)]
    new = _config({"name": "consistent_hash", "key": "header:X-Tenant"})
    code, out, err = _replay(tmp_path, lines, new)
    assert code == 1, out + err
    assert re.search(r"^replay: pool web: backend web\d took 100% of 300 requests "
                     r"\(max_share 50%\)$", err, re.M), err
    assert "only 1 backend (web" in err
    assert "never recorded header:x-tenant" in out
    code, out, err = _replay(tmp_path, lines, _config("least_connections"))
    assert code == 0 and err == "", out + err


def test_recorded_digests_spread_and_allow_concentration_warns(tmp_path: Path) -> None:
    lines = [_json_line(i, keys={"header:x-tenant": f"{i % 90:016x}"}) for i in range(300)]
    new = _config({"name": "consistent_hash", "key": "header:X-Tenant"})
    code, out, err = _replay(tmp_path, lines, new)
    assert code == 0, out + err
    assert "never recorded" not in out
    keyless = [_json_line(i) for i in range(300)]
    allowed = parse_config({"pools": {"web": {
        "backends": ["http://10.0.0.1:1", "http://10.0.0.2:1"], "strategy": "ewma",
        "allow_concentration": "canary"}}})
    code, out, err = _replay(tmp_path, keyless, allowed)
    assert code == 0


def test_nginx_combined_needs_host_to_reach_a_host_route(tmp_path: Path) -> None:
    lines = [f'198.51.100.{i % 3} - - [04/Dec/2026:10:00:{i // 10:02d} +0000] '
             f'"GET /p/{i} HTTP/1.1" 200 5 "-" "ua"' for i in range(300)]
    backends = [f"http://10.0.0.{i}:8000" for i in (1, 2, 3)]
    data = {"pools": {"web": {"backends": backends, "strategy": {
        "name": "consistent_hash", "key": "header:Host"}}},
        "routes": [{"host": DOMAIN, "pool": "web"}]}
    new = parse_config(data)
    code, out, err = _replay(tmp_path, lines, new)
    assert code == 0 and "300 routed nowhere" in out, out + err
    code, out, err = _replay(tmp_path, lines, new, host=DOMAIN.upper() + ":443")
    assert code == 1 and "0 routed nowhere" in out, out + err
    assert re.search(r"backend 10\.0\.0\.\d:8000 took 100% of 300 requests", err), err


def test_against_prints_both_and_judges_the_new_one(tmp_path: Path) -> None:
    lines = [_json_line(i) for i in range(200)]
    old = _config("round_robin")
    new = _config({"name": "consistent_hash", "key": "client_ip"})
    code, out, err = _replay(tmp_path, lines, new, old=old)
    assert code == 1, out + err
    assert "pool web: 200 → 200 requests" in out
    assert re.search(r"web\d +33% \(6\d\) → 100% \(200\)  \*", out), out
    code, out, err = _replay(tmp_path, lines, old, old=new)
    assert code == 0, out + err


def test_unreadable_or_empty_log_is_exit_2(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    missing = str(tmp_path / "missing.log")
    assert run(_config(), [missing], out=out, err=err) == 2
    assert err.getvalue() == f"replay: cannot read {missing}: No such file or directory\n"
    empty = tmp_path / "empty.log"
    empty.write_text("2026-12-04 10:00:00.000 INFO balancer.app: started\n")
    err = io.StringIO()
    assert run(_config(), [str(empty)], out=out, err=err) == 2
    assert err.getvalue().startswith(f"replay: {empty}: no request in it")


def test_access_log_record_entries_are_checked_one_line_each() -> None:
    with pytest.raises(ConfigError) as caught:
        _config(access_log={"record": ["header:X-Tenant", "query:x", "cookie:"],
                            "digest_key": ""})
    assert caught.value.problems == [
        "access_log.digest_key: must be a non-empty string, got ''",
        "access_log.record[1]: must be client_ip, path, header:NAME or cookie:NAME, "
        "got 'query:x'",
        "access_log.record[2]: cookie name must be a non-empty token like session, "
        "got 'cookie:'"]
    hashed = _config({"name": "consistent_hash", "key": "cookie:sid"},
                     access_log={"record": ["header:X-Tenant", "path", "header:Host"]})
    assert hashed.access_log.pools == {"web": ("cookie:sid", "header:x-tenant")}
    assert _config(access_log=False).access_log.pools == {}  # nothing the lines would carry
    assert not _config(access_log={"enabled": False}).access_log
    assert SECRET not in repr(_config(access_log={"digest_key": SECRET}))


# --------------------------------------------------------------------------- end to end


async def _record(tmp: Path) -> tuple[list[int], str]:
    """Real traffic through a real ``balancer run``; (backend ports, its whole stderr)."""
    async with run_app(name_app("a")) as p1, run_app(name_app("b")) as p2, \
            run_app(name_app("c")) as p3:
        ports = [p1, p2, p3]
        data = {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0",
                "access_log": {"record": ["header:X-User"], "digest_key": SECRET},
                "pools": {"web": _backends(ports)}}
        async with BalancerProcess(write_config(tmp / "recorded.yaml", data)) as proc, \
                aiohttp.ClientSession() as session:
            address = await proc.wait_ready()
            for i in range(REQUESTS):
                path = "/" if i % 6 else f"/item/{i}"
                headers = {"Host": DOMAIN, "X-User": f"user-{i % USERS}"}
                async with session.get(f"http://{address}{path}", headers=headers) as resp:
                    assert resp.status == 200
                    await resp.read()
            for _ in range(100):  # lines are written in batches, at most 0.1 s late
                if sum(line.startswith("{") for line in proc.lines_since(0)) >= REQUESTS:
                    break
                await asyncio.sleep(0.05)
            return ports, proc.log


def _backends(ports: list[int], strategy: Any = "round_robin") -> dict[str, Any]:
    return {"strategy": strategy,
            "backends": [{"name": f"web{i}", "url": f"http://127.0.0.1:{p}"}
                         for i, p in enumerate(ports, 1)]}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[int], str]]:
    tmp = tmp_path_factory.mktemp("replay")
    ports, text = asyncio.run(_record(tmp))
    log = tmp / "balancer.log"
    log.write_text(text + "\n")
    yield tmp, ports, text


def _check(recorded: tuple[Path, list[int], str], strategy: Any, *args: str,
           name: str = "new.yaml") -> Any:
    tmp, ports, _ = recorded
    config = write_config(tmp / name, {"pools": {"web": _backends(ports, strategy)}})
    return run_cli("check", "-c", str(config), "--replay", str(tmp / "balancer.log"), *args)


def test_the_log_holds_host_and_digests_never_raw_values(
        recorded: tuple[Path, list[int], str]) -> None:
    _, _, text = recorded
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert len(lines) == REQUESTS
    assert {line["host"] for line in lines} == {DOMAIN}
    assert "user-1" not in text  # no raw value anywhere, in any line
    key = accesslog.digest_key(SECRET)
    for i, line in enumerate(lines):
        assert line["keys"] == {"header:x-user": accesslog.digest(f"user-{i % USERS}", key)}
    assert lines[0]["keys"] == lines[USERS]["keys"] != lines[1]["keys"]  # stable per value


@pytest.mark.parametrize("strategy", [
    {"name": "consistent_hash", "key": "header:X-Tenant"},  # clients never send it
    {"name": "consistent_hash", "key": "header:Host"},  # one domain
    {"name": "consistent_hash", "key": "path"},  # most requests are "/"
], ids=["header-never-sent", "host-one-domain", "path-mostly-root"])
def test_each_trap_of_the_issue_is_caught(recorded: tuple[Path, list[int], str],
                                          strategy: Any) -> None:
    done = _check(recorded, strategy)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "new.yaml: accepted" in done.stdout  # the guard's synthetic traffic spreads
    assert re.search(r"^replay: pool web: backend web\d took (8\d|9\d|100)(\.\d)?% of 240 "
                     r"requests \(max_share 50%\)$", done.stderr, re.M), done.stderr
    if strategy["key"] == "header:X-Tenant":
        assert "never recorded header:x-tenant" in done.stdout


@pytest.mark.parametrize("strategy", [
    "round_robin", {"name": "consistent_hash", "key": "header:X-User"}],
    ids=["round-robin", "recorded-header"])
def test_configs_that_spread_pass(recorded: tuple[Path, list[int], str], strategy: Any) -> None:
    done = _check(recorded, strategy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "new.yaml: replay accepted" in done.stdout
    assert re.search(r"240 requests \(240 balancer JSON, 0 nginx combined\), \d+ other lines "
                     r"skipped, 0 routed nowhere", done.stdout), done.stdout


def test_cli_against_and_an_unreadable_log(recorded: tuple[Path, list[int], str]) -> None:
    tmp, ports, _ = recorded
    old = write_config(tmp / "old.yaml", {"pools": {"web": _backends(ports)}})
    done = _check(recorded, {"name": "consistent_hash"}, "--against", str(old))
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"replayed shares before ({old}) → after" in done.stdout
    assert re.search(r"web\d +33% \(80\) → 100% \(240\)  \*", done.stdout), done.stdout
    missing = tmp / "nope.log"
    done = run_cli("check", "-c", str(old), "--replay", str(missing))
    assert done.returncode == 2
    assert f"replay: cannot read {missing}: No such file or directory" in done.stderr
