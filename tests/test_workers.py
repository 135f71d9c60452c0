"""``balancer run --workers 2`` for real: every worker serves, one set of numbers, one verdict,
faults (a worker SIGKILLed, the supervisor SIGKILLed, SIGTERM); and the pieces under it (the
split of ``max_connections``, the mirror's sums, the wire) with real Pool and Backend objects.

The proxy runs as a real subprocess tree (supervisor and workers) in front of real aiohttp
backends on loopback; the clients open a new connection per request, so that the kernel's
SO_REUSEPORT spreads them over the workers.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from balancer.backend import Backend
from balancer.config import parse_config
from balancer.fleet import Fleet
from balancer.mirror import (
    Mirror,
    Reporter,
    apply_health,
    health_state,
    share,
    slots,
    split_limits,
)
from balancer.wire import frame
from tests.support.net import name_app, run_app
from tests.support.proc import BalancerProcess, RunningBalancer, pool_config, run_cli, write_config

WAIT = 15.0


# --------------------------------------------------------------------------- helpers


async def _backends(stack: AsyncExitStack, n: int) -> list[int]:
    return [await stack.enter_async_context(run_app(name_app(f"b{i}"))) for i in range(n)]


def _running(tmp_path: Path, ports: list[int], **top: Any) -> RunningBalancer:
    rb = RunningBalancer(tmp_path, {"web": pool_config(ports)}, **top)
    rb.proc = BalancerProcess(rb.path, "--workers", "2")
    return rb


async def _get(admin: str, path: str) -> tuple[dict[str, Any], dict[str, str]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as s, \
            s.get(admin + path) as r:
        body = await r.json() if path == "/status" else {"text": await r.text()}
        return body, dict(r.headers)


async def _status(rb: RunningBalancer) -> dict[str, Any]:
    return (await _get(rb.admin, "/status"))[0]


async def _send(url: str, n: int, clients: int = 4) -> list[str]:
    """``n`` GETs, each on a new connection; the bodies (backend names) or "error: ..."."""
    out: list[str] = []
    queue = list(range(n))

    async def client() -> None:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=WAIT)) as s:
            while queue:
                queue.pop()
                try:
                    async with s.get(url + "/") as r:
                        out.append(await r.text() if r.status == 200 else f"error: {r.status}")
                except aiohttp.ClientError as exc:
                    out.append(f"error: {exc!r}")

    await asyncio.gather(*(client() for _ in range(clients)))
    return out


def _cpu(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie (a zombie has closed its sockets)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def _until(check: Any, what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _requests_total(rb: RunningBalancer) -> float:
    return await rb.counter("balancer_requests_total")


# --------------------------------------------------------------------------- for real


async def test_both_workers_serve_and_metrics_sum_to_the_requests_sent(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        ports = await _backends(stack, 2)
        rb = await stack.enter_async_context(_running(tmp_path, ports))
        workers = (await _status(rb))["workers"]
        pids = [w["pid"] for w in workers]
        assert len(set(pids)) == 2 and all(w["up"] for w in workers), workers
        assert rb.pid not in pids
        cpu_before = {pid: _cpu(pid) for pid in pids}

        n = 600
        answers = await _send(rb.url, n)
        assert [a for a in answers if a.startswith("error")] == []

        async def counted() -> bool:
            return await _requests_total(rb) == n
        await _until(counted, f"balancer_requests_total == {n}")
        await asyncio.sleep(0.6)  # two more reports: nothing is counted twice
        assert await _requests_total(rb) == n
        workers = (await _status(rb))["workers"]
        # Every worker served a part, and the parts add up to what was sent.
        assert all(w["requests"] > 0 for w in workers), workers
        assert sum(w["requests"] for w in workers) == n
        grown = {pid: _cpu(pid) - cpu_before[pid] for pid in pids}
        assert all(t > 0 for t in grown.values()), grown
        assert await rb.counter("balancer_worker_up") == 2


async def test_a_reload_is_one_verdict_for_every_worker(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        ports = await _backends(stack, 3)
        rb = await stack.enter_async_context(_running(tmp_path, ports[:2]))
        before = await _status(rb)
        sha = before["config_sha256"]
        assert [w["config_sha256"] for w in before["workers"]] == [sha, sha]

        # Refused (a pool of one backend: all traffic on one server): nobody moves.
        data = {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0",
                "pools": {"web": pool_config(ports[:1])}}
        write_config(rb.path, data)
        mark = rb.proc.mark()
        rb.proc.send(signal.SIGHUP)
        await rb.proc.wait_for("reload refused", since=mark)
        await asyncio.sleep(0.3)
        after = await _status(rb)
        assert after["config_sha256"] == sha
        assert [w["config_sha256"] for w in after["workers"]] == [sha, sha]
        assert set(await _send(rb.url, 20)) <= {"b0", "b1"}

        # Accepted (a third backend): every worker applies it and acknowledges its sha256.
        data["pools"] = {"web": pool_config(ports)}
        write_config(rb.path, data)
        mark = rb.proc.mark()
        rb.proc.send(signal.SIGHUP)
        await rb.proc.wait_for("reload applied", since=mark)
        _, headers = await _get(rb.admin, "/config")
        new = headers["X-Config-SHA256"]
        assert new != sha

        async def moved() -> bool:
            doc = await _status(rb)
            return doc["config_sha256"] == new and all(
                w["config_sha256"] == new for w in doc["workers"])
        await _until(moved, "every worker on the new config")
        assert set(await _send(rb.url, 60)) == {"b0", "b1", "b2"}


async def test_a_killed_worker_is_replaced_and_new_connections_never_fail(
        tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        ports = await _backends(stack, 2)
        rb = await stack.enter_async_context(_running(tmp_path, ports))
        victim = (await _status(rb))["workers"][0]
        answers = await _send(rb.url, 50)
        mark = rb.proc.mark()
        os.kill(victim["pid"], signal.SIGKILL)
        while _alive(victim["pid"]):  # its listening socket is closed once it is a zombie
            await asyncio.sleep(0.005)
        # A load loop on new connections while the worker is replaced.
        loop_answers: list[str] = []

        async def replaced() -> bool:
            loop_answers.extend(await _send(rb.url, 8))
            w = (await _status(rb))["workers"][0]
            return w["up"] and w["pid"] != victim["pid"]
        await _until(replaced, "a new worker 0")
        loop_answers.extend(await _send(rb.url, 50))
        assert [a for a in answers + loop_answers if a.startswith("error")] == []
        assert "worker 0 (pid %d) exited (killed by SIGKILL); starting a new one" % (
            victim["pid"]) in "\n".join(rb.proc.lines_since(mark))
        assert await rb.counter("balancer_worker_restarts_total", worker="0") == 1
        assert await rb.counter("balancer_worker_up") == 2


async def test_sigterm_drains_every_worker_and_exits_0(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        ports = await _backends(stack, 2)
        rb = await stack.enter_async_context(_running(tmp_path, ports))
        pids = [w["pid"] for w in (await _status(rb))["workers"]]
        assert await _send(rb.url, 20)
        rb.proc.send(signal.SIGTERM)
        assert await rb.proc.wait_exit() == 0
        assert [pid for pid in pids if _alive(pid)] == []


async def test_workers_die_with_the_supervisor(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        ports = await _backends(stack, 2)
        rb = await stack.enter_async_context(_running(tmp_path, ports))
        pids = [w["pid"] for w in (await _status(rb))["workers"]]
        rb.proc.kill()  # SIGKILL: no drain, no goodbye

        async def gone() -> bool:
            return not any(_alive(pid) for pid in pids)
        await _until(gone, "the workers to exit")


def test_workers_key_and_flag_refuse_bad_values(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", {"pools": {"web": pool_config([1, 2])},
                                              "workers": 0})
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1
    assert f"{path}: workers: must be a whole number >= 1 or auto, got 0" in result.stderr
    result = run_cli("run", "-c", str(path), "--workers", "many")
    assert result.returncode == 2
    assert "--workers: must be a whole number >= 1 or auto, got 'many'" in result.stderr


# --------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("limit,workers", [(10, 2), (11, 2), (7, 3), (1, 2), (2, 4), (64, 16)])
def test_a_limit_is_split_so_the_machine_holds_it(limit: int, workers: int) -> None:
    parts = [share(limit, workers, i) for i in range(workers)]
    assert all(p >= 1 for p in parts)
    assert max(parts) - min(parts) <= 1
    # Exactly the limit when there is at least one per worker; else one each.
    assert sum(parts) == (limit if limit >= workers else workers)


def _config(**pool: Any) -> Any:
    return parse_config({"pools": {"web": {**pool_config([8001, 8002, 8003]), **pool}}})


def test_split_limits_sets_each_workers_share_of_pool_and_backend_limits() -> None:
    data = pool_config([8001, 8002])
    data["backends"][0]["max_connections"] = 5
    config = parse_config({"pools": {"web": {**data, "max_connections": 9}}})
    mine = [split_limits(config, 2, i).pools["web"] for i in range(2)]
    assert [p.max_connections for p in mine] == [5, 4]
    assert [p.backends[0].max_connections for p in mine] == [3, 2]
    assert [p.backends[1].max_connections for p in mine] == [None, None]
    assert split_limits(config, 1, 0) is config


def test_the_config_travels_whole() -> None:
    config = _config(strategy={"name": "consistent_hash", "key": "header:X-User"})
    import pickle

    body = frame({"config": config})[4:]
    assert pickle.loads(body)["config"] == config


def _fleet(config: Any) -> Fleet:
    fleet = Fleet()
    fleet.apply(config)
    return fleet


def test_the_mirror_is_the_sum_of_the_workers() -> None:
    config = _config()
    supervisor, workers = _fleet(config), [_fleet(config), _fleet(config)]
    mirror, reporters = Mirror(), [Reporter(), Reporter()]
    sent = 0
    for rounds in range(3):
        for i, fleet in enumerate(workers):
            pool = fleet.pools["web"]
            for k, b in enumerate(pool.backends):
                for _ in range(k + i + rounds):
                    pool.begin(b)
                    pool.finish(b, 200 if k else 503, 0.004)
                    sent += 1
            pool.begin(pool.backends[0])  # one left in flight
            pool.backends[1].record_error("connect")
            report = reporters[i].report(fleet.pools, {"connections": 1, "in_flight": 1,
                                                       "turned_away": 0, "fired": {}})
            mirror.fold(i, report, supervisor.pools)
    mine: list[Backend] = list(supervisor.pools["web"].backends)
    assert sum(b.requests_total for b in mine) == sent
    for k, b in enumerate(mine):
        theirs = [w.pools["web"].backends[k] for w in workers]
        assert b.requests_by_class == [sum(x) for x in zip(*(t.requests_by_class
                                                              for t in theirs))]
        assert b.latency_counts == [sum(x) for x in zip(*(t.latency_counts for t in theirs))]
        assert b.errors == {"connect": 6} if k == 1 else not b.errors
        assert b.in_flight == sum(t.in_flight for t in theirs)
    # An idle report adds nothing; a dead worker's in-flight requests are gone.
    mirror.fold(0, reporters[0].report(workers[0].pools, {}), supervisor.pools)
    assert sum(b.requests_total for b in mine) == sent
    mirror.forget(0, supervisor.pools)
    assert mine[0].in_flight == 3  # worker 1's


def test_an_ejection_reaches_every_worker_and_a_push_never_shortens_one() -> None:
    config = _config()
    supervisor, a, b = _fleet(config), _fleet(config), _fleet(config)
    mirror = Mirror()
    victim = a.pools["web"].backends[2]
    victim.ejected_until, victim.ejections = time.monotonic() + 30, 1  # worker a ejected it
    mirror.fold(0, Reporter().report(a.pools, {}), supervisor.pools)
    pushed = health_state(supervisor.pools)
    apply_health(b.pools, pushed)
    assert not b.pools["web"].backends[2].available(time.monotonic())
    assert b.pools["web"].backends[2].ejections == 1
    # A later push from before another ejection in b does not undo b's own.
    other = b.pools["web"].backends[0]
    other.ejected_until = time.monotonic() + 30
    apply_health(b.pools, pushed)
    assert not other.available(time.monotonic())
    assert set(slots(b.pools)) == set(pushed)


async def test_an_ejection_by_one_worker_holds_in_every_worker(tmp_path: Path) -> None:
    from aiohttp import web

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, text="bad")

    bad = web.Application()
    bad.router.add_get("/{tail:.*}", fail)
    async with AsyncExitStack() as stack:
        ports = await _backends(stack, 2)
        bad_port = await stack.enter_async_context(run_app(bad))
        pool = pool_config([*ports, bad_port])
        pool["outlier_detection"] = {"consecutive_failures": 1, "base_ejection": "60s"}
        bad_name = pool["backends"][2]["name"]
        rb = RunningBalancer(tmp_path, {"web": pool})
        rb.proc = BalancerProcess(rb.path, "--workers", "2")
        await stack.enter_async_context(rb)

        async def ejected() -> list[bool]:
            return [f"web/{bad_name}" in w["ejected"] for w in (await _status(rb))["workers"]]

        answers: list[str] = []

        async def somewhere() -> bool:
            # One request at a time, and the reports in before the next: the first answer from
            # the bad backend ejects it in the worker that sent it there, before any other
            # worker has sent it a request.
            answers.extend(await _send(rb.url, 1, clients=1))
            await asyncio.sleep(0.4)
            return any(await ejected())
        await _until(somewhere, "the bad backend ejected by a worker")

        async def everywhere() -> bool:
            return all(await ejected())
        await _until(everywhere, "the bad backend ejected in both workers")
        answers.extend(await _send(rb.url, 60))
        # One 500 in all: the other worker never sent the bad backend a request of its own
        # (without the push it would have, and ejected it only then).
        assert [a for a in answers if a.startswith("error")] == ["error: 500"]
        status = await _status(rb)
        assert status["pools"]["web"]["backends"][2]["state"] == "ejected"


async def test_max_connections_hold_for_the_machine_not_per_worker(tmp_path: Path) -> None:
    """A limit of 2 per backend over two workers is 1 each: however the kernel spreads eight
    concurrent clients, no backend ever has more than 2 requests at once (without the split, a
    worker given 4 of them would send 2 to each backend, the other worker more)."""
    from aiohttp import web

    now = {"b0": 0, "b1": 0}
    peak = {"b0": 0, "b1": 0}

    def slow(name: str) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            now[name] += 1
            peak[name] = max(peak[name], now[name])
            try:
                await asyncio.sleep(0.3)
            finally:
                now[name] -= 1
            return web.Response(text=name)
        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        return app

    async with AsyncExitStack() as stack:
        ports = [await stack.enter_async_context(run_app(slow(n))) for n in ("b0", "b1")]
        pool = pool_config(ports, max_connections=2, queue_timeout="5s")
        rb = RunningBalancer(tmp_path, {"web": pool})
        rb.proc = BalancerProcess(rb.path, "--workers", "2")
        await stack.enter_async_context(rb)
        answers = await _send(rb.url, 24, clients=8)
        assert set(answers) == {"b0", "b1"}, answers  # queued for a slot, none turned away
        assert max(peak.values()) <= 2, peak


async def test_tls_on_listen_is_served_by_every_worker(tmp_path: Path) -> None:
    import ssl

    from tests.support.certs import issue, make_ca

    ca = make_ca(tmp_path)
    server = issue(tmp_path, ca)
    async with AsyncExitStack() as stack:
        ports = await _backends(stack, 2)
        rb = RunningBalancer(tmp_path, {"web": pool_config(ports)},
                             tls={"cert": str(server.cert), "key": str(server.key)})
        rb.proc = BalancerProcess(rb.path, "--workers", "2")
        await stack.enter_async_context(rb)
        ctx = ssl.create_default_context(cafile=str(ca.cert))
        url = rb.url.replace("http://", "https://")
        connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as s:
            for _ in range(40):
                async with s.get(url + "/") as r:
                    assert r.status == 200
        async def counted() -> bool:
            return await _requests_total(rb) == 40
        await _until(counted, "40 requests counted")
        assert all(w["requests"] > 0 for w in (await _status(rb))["workers"])


async def test_probation_judges_the_traffic_of_every_worker_and_only_since_the_change(
        tmp_path: Path) -> None:
    """The hash-key trap under two workers, with load on both before and after the reload:
    rolled back, and the share it names is of the new config's traffic alone (a worker
    reports what it counted before it applies a config; counting starts once all have)."""
    async with AsyncExitStack() as stack:
        ports = await _backends(stack, 3)
        rb = await stack.enter_async_context(_running(
            tmp_path, ports, guard={"probation": "10s", "live_min_requests": 50}))
        load = asyncio.ensure_future(_send(rb.url, 4000, clients=4))
        await asyncio.sleep(0.5)  # both workers serving round robin
        data = yaml.safe_load(rb.path.read_text())
        data["pools"]["web"]["strategy"] = {"name": "consistent_hash", "key": "header:X-Tenant"}
        write_config(rb.path, data)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as s, \
                s.post(rb.admin + "/reload?wait=1") as r:
            status, doc = r.status, await r.json()
        answers = await load
        assert status == 409 and doc["result"] == "rolled_back", doc
        assert re.search(r"pool web: b\d+ took 100% of \d+ requests", doc["reason"]), doc
        assert not [a for a in answers if a.startswith("error")]
        workers = (await _status(rb))["workers"]
        assert all(w["requests"] > 0 for w in workers), workers
