#!/usr/bin/env python3
"""The demo stack's topology as local processes, for machines without Docker.

It starts what docker-compose.yml starts, from the same files, with only the addresses rewritten
to loopback: the web service's replicas (its own command, one process each, on 127.0.0.2,
127.0.0.3, ... and one shared free port, as compose gives each container its own address),
balancer (``balancer run`` on deploy/compose/balancer.yaml) and Prometheus (Debian's
``prometheus``) on deploy/prometheus/prometheus.yml with config/alerts.yml loaded. Docker's
embedded DNS is played by the loopback DNS server of the discovery tests (tests/support/dns.py;
it and the live-traffic client come from tests/support rather than as copies, since this script
runs from a checkout with the test extras, as the tests do): it answers ``web`` with every
running replica's address and each container name with its own, and the config's
``discovery: dns`` entry asks it through a ``resolver:`` line.

Then it drives traffic that touches every counter (steady requests, the web service scaled from
3 to 4 replicas and back under load, a backend killed and restarted, an overload burst, an
applied and a refused reload via deploy/demo-break.sh) and checks the wiring for real:

- DNS discovery follows the scaling with no failed request;
- Prometheus scrapes balancer;
- every rule of config/alerts.yml is loaded and evaluates without error;
- every query of the Grafana dashboards returns data, and names only metrics balancer exports;
- the concentrated config of ``make demo-break`` is refused while traffic keeps flowing;

and tears everything down: balancer must drain and exit 0 on SIGTERM, every process is gone
and the temporary directory removed. Every wait is bounded; the whole run by ``--timeout``.

    python deploy/local-stack.py          check, tear down; exit 0 when every check passed
    python deploy/local-stack.py --hold   check, then keep running until Ctrl-C (make stack)

The last line is ``STACK {json}``: pids, temporary directory and failed checks, for the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
try:
    from tests.support.dns import DNSServer
    from tests.support.traffic import Traffic
except ImportError as exc:  # dnslib is a test extra
    sys.exit(f"local-stack: {exc}: run it from a checkout after pip install -e '.[test]'")

COMPOSE = ROOT / "docker-compose.yml"
STACK_CONFIG = ROOT / "deploy" / "compose" / "balancer.yaml"
BROKEN_CONFIG = ROOT / "deploy" / "concentrated.yaml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "config" / "alerts.yml"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
DEMO_BREAK = ROOT / "deploy" / "demo-break.sh"

#: What Grafana substitutes for the dashboards' variables, with every pool selected.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$pool": ".*"}
SCRAPE_INTERVAL = "1s"
#: The TTL Docker's embedded DNS gives its answers; discovery re-resolves sooner anyway
#: (resolve_interval), as it would in compose.
DOCKER_DNS_TTL = 600
_METRIC = re.compile(r"\bbalancer_[a-z_]+")


class StackError(Exception):
    """A step of the stack that did not happen in time or went wrong; one line, says which."""


@dataclass
class Stack:
    """The running processes and where they listen."""

    tmp: Path
    dns: DNSServer
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: compose container name (balancer-demo-web-1, ...) → its loopback address, for every
    #: replica that runs and is in DNS.
    replicas: dict[str, str] = field(default_factory=dict)
    web_port: int = 0
    proxy_port: int = 0
    admin_port: int = 0
    prometheus_port: int = 0
    admin_token: str | None = None
    failed: list[str] = field(default_factory=list)
    passed: int = 0

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def prometheus(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def backend(self, container: str) -> str:
        """The name balancer gives a replica it discovered: ``web@<address>:<port>``."""
        return f"web@{self.replicas[container]}:{self.web_port}"

    def publish(self) -> None:
        """Tell DNS what Docker's DNS would: ``web`` is every replica, each container itself."""
        for container, address in self.replicas.items():
            self.dns.set(container, [address], ttl=DOCKER_DNS_TTL)
        self.dns.set("web", list(self.replicas.values()), ttl=DOCKER_DNS_TTL)

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed.append(what)
        return ok


# --------------------------------------------------------------------------- small helpers


def free_port(*also: str) -> int:
    """A port free on 127.0.0.1 and on every address in ``also``."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            for host in also:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port


async def until(what: str, probe: Callable[[], Awaitable[Any]], timeout: float,
                every: float = 0.2) -> Any:
    """Poll ``probe`` until it returns something truthy; StackError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = await probe()
            if result:
                return result
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            last = exc
        await asyncio.sleep(every)
    detail = f" (last error: {last})" if last else ""
    raise StackError(f"{what}: not within {timeout:.0f}s{detail}")


def spawn(stack: Stack, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Start a process in its own session (Ctrl-C reaches this script, which tears down in
    order), its output in a log file under the temporary directory."""
    log = open(stack.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    stack.procs[name] = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=stack.tmp,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
    log.close()


def tail(stack: Stack, name: str, lines: int = 15) -> str:
    path = stack.tmp / f"{name}.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


async def get_text(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as resp:
        resp.raise_for_status()
        return await resp.text()


async def prom_query(stack: Stack, http: aiohttp.ClientSession, query: str) -> list[Any]:
    async with http.get(f"{stack.prometheus}/api/v1/query", params={"query": query}) as resp:
        body = await resp.json()
    if body.get("status") != "success":
        raise StackError(f"Prometheus refused {query!r}: {body.get('error')}")
    return list(body["data"]["result"])


def scrape_value(text: str, metric: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None when absent."""
    for line in text.splitlines():
        if not line.startswith(metric + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


# --------------------------------------------------------------------------- the topology


def web_service() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"]["web"])


def web_command() -> list[str]:
    """The compose web service's entrypoint: the same demo backend, run here."""
    cmd = list(web_service()["entrypoint"])
    if cmd[0] == "python":
        cmd[0] = sys.executable
    return cmd


def container_names(count: int) -> list[str]:
    """What compose names the web service's containers: <project>-web-1, -2, ..."""
    project = yaml.safe_load(COMPOSE.read_text())["name"]
    return [f"{project}-web-{i}" for i in range(1, count + 1)]


def local_config(source: Path, stack: Stack) -> dict[str, Any]:
    """A compose config made local: its own ports, the local DNS as resolver, and every web
    backend on the replicas' port (a name it discovers stays a name, for the local DNS to
    answer; a container named outright becomes its address, as Docker's DNS would make it)."""
    data = yaml.safe_load(source.read_text())
    data["listen"] = f"127.0.0.1:{stack.proxy_port}"
    data["admin"] = f"127.0.0.1:{stack.admin_port}"
    data["resolver"] = [stack.dns.nameserver]
    for pool in data["pools"].values():
        for backend in pool["backends"]:
            host = urlsplit(backend["url"]).hostname
            if backend.get("discovery") == "dns" and host == "web":
                backend["url"] = f"http://web:{stack.web_port}"
            elif host in stack.replicas:
                backend["url"] = f"http://{stack.replicas[host]}:{stack.web_port}"
            else:
                raise StackError(f"{source}: backend {backend['url']} is neither the compose web "
                                 f"service nor one of its containers")
    return data


def prometheus_config(stack: Stack, stack_admin_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the target and the rule file made local."""
    prom = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    prom["global"]["scrape_interval"] = SCRAPE_INTERVAL
    prom["global"]["evaluation_interval"] = SCRAPE_INTERVAL
    prom["rule_files"] = [str(ALERTS)]
    (job,) = prom["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    if target != f"balancer:{stack_admin_port}":
        raise StackError(f"{PROMETHEUS_CONFIG}: scrapes {target}, but balancer's admin address "
                         f"in {STACK_CONFIG.name} is port {stack_admin_port}")
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{stack.admin_port}"]
    return prom


def start_web(stack: Stack, container: str, address: str) -> None:
    """One replica of the web service, answering as its address (as in compose) on it."""
    env = {"NAME": address, "HOST": address, "PORT": str(stack.web_port)}
    spawn(stack, container, web_command(), env)


async def start_replica(stack: Stack, http: aiohttp.ClientSession, container: str,
                        address: str, timeout: float) -> None:
    """Start a replica and wait until it answers; then it is in DNS, as a started container."""
    start_web(stack, container, address)
    await until(f"{container} answering on {address}:{stack.web_port}",
                partial(healthz, http, f"http://{address}:{stack.web_port}/healthz"), timeout)
    stack.replicas[container] = address
    stack.publish()


async def bring_up(stack: Stack, http: aiohttp.ClientSession, timeout: float) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise StackError("prometheus not found: apt-get install prometheus (Debian's package)")
    live = yaml.safe_load(STACK_CONFIG.read_text())
    replicas = int(web_service()["deploy"]["replicas"])
    # One address more than the service starts with: room to scale up by one.
    addresses = [f"127.0.0.{2 + i}" for i in range(replicas + 1)]
    stack.web_port = free_port(*addresses)
    stack.proxy_port, stack.admin_port = free_port(), free_port()
    stack.prometheus_port = free_port()
    stack.admin_token = live.get("admin_token")
    stack.dns.start()

    print(f"starting DNS on {stack.dns.nameserver}, {replicas} demo web replicas, balancer and "
          f"Prometheus in {stack.tmp}")
    for container, address in zip(container_names(replicas), addresses):
        await start_replica(stack, http, container, address, timeout)

    for source, target in ((STACK_CONFIG, "balancer.yaml"), (BROKEN_CONFIG, "concentrated.yaml")):
        (stack.tmp / target).write_text(yaml.safe_dump(local_config(source, stack),
                                                       sort_keys=False))
    spawn(stack, "balancer", [sys.executable, "-m", "balancer", "run", "-c",
                              str(stack.tmp / "balancer.yaml")])
    await until("balancer's admin /healthz", lambda: healthz(http, f"{stack.admin}/healthz"),
                timeout)
    await until("balancer serving", lambda: healthz(http, f"{stack.proxy}/"), timeout)

    admin_port = int(str(live["admin"]).rsplit(":", 1)[1])
    (stack.tmp / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(stack, admin_port)))
    spawn(stack, "prometheus", [
        prometheus, f"--config.file={stack.tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={stack.tmp / 'prometheus-data'}",
        f"--web.listen-address=127.0.0.1:{stack.prometheus_port}", "--log.level=warn"])
    await until("Prometheus ready", lambda: healthz(http, f"{stack.prometheus}/-/ready"), timeout)


async def healthz(http: aiohttp.ClientSession, url: str) -> bool:
    async with http.get(url) as resp:
        return resp.status == 200


# --------------------------------------------------------------------------- traffic


async def requests(http: aiohttp.ClientSession, url: str, n: int,
                   concurrency: int) -> dict[int, int]:
    """``n`` GETs with ``concurrency`` at a time; status → count (0: no answer)."""
    statuses: dict[int, int] = {}
    queue = iter(range(n))

    async def worker() -> None:
        for _ in queue:
            try:
                async with http.get(url) as resp:
                    await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError):
                status = 0
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


async def pool_backends(stack: Stack, http: aiohttp.ClientSession) -> set[str]:
    """The backends of the pool ``web`` as balancer's /status lists them now."""
    async with http.get(f"{stack.admin}/status") as resp:
        doc = await resp.json()
    return {b["name"] for b in doc["pools"]["web"]["backends"]}


async def scale(stack: Stack, http: aiohttp.ClientSession, timeout: float) -> None:
    """`docker compose up --scale web=N+1`, then back to N, under load: the new replica joins
    and takes traffic, the one removed leaves DNS, drains, then stops; no request fails."""
    before = dict(stack.replicas)
    container = container_names(len(before) + 1)[-1]
    address = f"127.0.0.{2 + len(before)}"
    print(f"scale: web {len(before)} -> {len(before) + 1} -> {len(before)} replicas under load "
          f"(DNS discovery)")
    async with Traffic(stack.proxy_port, header="X-Backend") as load:
        await start_replica(stack, http, container, address, timeout)
        name = stack.backend(container)
        await until(f"{name} in the pool and answering",
                    lambda: joined(stack, http, load, name, address), timeout)
        stack.check(True, f"scale up: {name} discovered, in the pool, answering")
        del stack.replicas[container]
        stack.dns.remove(container)
        stack.publish()
        await until(f"{name} out of the pool", lambda: left(stack, http, name), timeout)
        stack.procs[container].send_signal(signal.SIGTERM)  # compose stops it: it has drained
        code = await asyncio.to_thread(stack.procs[container].wait, 20)
        mark = load.total
        await until("more requests after the scale-down", lambda: settled(load, mark), timeout)
    stack.check(not load.failures and stack.replicas == before,
                f"scale down: {name} left the pool; {load.total} requests during the scaling, "
                f"none failed", f"{len(load.failures)} failed: {load.failures[:3]}"
                if load.failures else f"the replica exited {code}")


async def joined(stack: Stack, http: aiohttp.ClientSession, load: Traffic, name: str,
                 address: str) -> bool:
    return name in await pool_backends(stack, http) and load.seen[address] > 0


async def left(stack: Stack, http: aiohttp.ClientSession, name: str) -> bool:
    return name not in await pool_backends(stack, http)


async def settled(load: Traffic, mark: int) -> bool:
    return load.total >= mark + 100


async def drive_traffic(stack: Stack, http: aiohttp.ClientSession, timeout: float) -> None:
    print("traffic: steady requests")
    steady = await requests(http, f"{stack.proxy}/", 300, 8)
    stack.check(steady == {200: 300}, "300 requests through balancer, all 200", str(steady))

    await scale(stack, http, timeout)

    victim = list(stack.replicas)[-1]
    name = stack.backend(victim)
    print(f"traffic: {victim} killed, then restarted (upstream errors, health)")
    stack.procs[victim].kill()
    stack.procs[victim].wait(timeout=10)
    during = await requests(http, f"{stack.proxy}/", 60, 4)
    stack.check(during == {200: 60}, f"60 requests while {victim} is down, all 200 (retried)",
                str(during))
    await until(f"{name} out of rotation", lambda: backend_up(stack, http, name, 0), timeout)
    start_web(stack, victim, stack.replicas[victim])
    await until(f"{name} back in rotation", lambda: backend_up(stack, http, name, 1), timeout)
    stack.check(True, f"{name} left rotation and came back")

    live = yaml.safe_load((stack.tmp / "balancer.yaml").read_text())
    (pool,) = live["pools"].values()
    burst = len(stack.replicas) * int(pool["max_connections"]) + 24
    print(f"traffic: {burst} concurrent slow requests against max_connections "
          f"{pool['max_connections']} per backend (overload)")
    over = await requests(http, f"{stack.proxy}/slow?ms=1500", burst, burst)
    stack.check(over.get(503, 0) > 0 and set(over) <= {200, 503},
                "overload answered 503 by balancer, the rest 200", str(over))

    print("reload: SIGHUP with the same config (applied)")
    stack.procs["balancer"].send_signal(signal.SIGHUP)
    await until("the applied reload counted", lambda: reloads(stack, http, "applied"), timeout)
    stack.check(True, "SIGHUP reload applied")

    print("make demo-break, against this stack")
    env = {**os.environ, "LIVE_CONFIG": str(stack.tmp / "balancer.yaml"),
           "BROKEN_CONFIG": str(stack.tmp / "concentrated.yaml"),
           "PROXY_URL": stack.proxy, "ADMIN_URL": stack.admin,
           "ADMIN_TOKEN": stack.admin_token or ""}
    before = (stack.tmp / "balancer.yaml").read_text()
    result = await asyncio.to_thread(
        subprocess.run, ["bash", str(DEMO_BREAK)], env=env, capture_output=True, text=True,
        timeout=timeout)
    print("\n".join("    " + line for line in (result.stdout + result.stderr).splitlines()))
    stack.check(result.returncode == 0, "demo-break: concentrated config refused (409), "
                "traffic still spread", f"exit {result.returncode}")
    stack.check((stack.tmp / "balancer.yaml").read_text() == before,
                "demo-break put the config file back")
    stack.check(bool(await reloads(stack, http, "refused")), "the refused reload is counted")


async def backend_up(stack: Stack, http: aiohttp.ClientSession, name: str, want: int) -> bool:
    # A few requests keep passive health and the traffic window moving.
    await requests(http, f"{stack.proxy}/", 6, 2)
    text = await get_text(http, f"{stack.admin}/metrics")
    return scrape_value(text, "balancer_backend_up", backend=name) == want


async def reloads(stack: Stack, http: aiohttp.ClientSession, result: str) -> bool:
    text = await get_text(http, f"{stack.admin}/metrics")
    return (scrape_value(text, "balancer_config_reloads_total", result=result) or 0) >= 1


# --------------------------------------------------------------------------- the checks


async def check_scrape(stack: Stack, http: aiohttp.ClientSession, timeout: float) -> None:
    async def scraped_after_the_traffic() -> bool:
        up = await prom_query(stack, http, 'up{job="balancer"} == 1')
        refused = await prom_query(
            stack, http, 'balancer_config_reloads_total{result="refused"} >= 1')
        return bool(up) and bool(refused)

    await until("Prometheus scraping balancer (up == 1, the refused reload seen)",
                scraped_after_the_traffic, timeout)
    stack.check(True, "Prometheus scrapes balancer", f"target 127.0.0.1:{stack.admin_port}")


def alert_rule_names() -> set[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule.get("alert") or rule["record"] for group in groups for rule in group["rules"]}


async def check_rules(stack: Stack, http: aiohttp.ClientSession, timeout: float) -> None:
    expected = alert_rule_names()

    async def evaluated() -> dict[str, Any] | None:
        async with http.get(f"{stack.prometheus}/api/v1/rules") as resp:
            body = await resp.json()
        rules = {r["name"]: r for g in body["data"]["groups"] for r in g["rules"]}
        done = all(not str(r.get("lastEvaluation", "0001")).startswith("0001")
                   for r in rules.values())
        return rules if expected <= set(rules) and done else None

    rules = await until(f"the {len(expected)} rules of {ALERTS.name} loaded and evaluated",
                        evaluated, timeout)
    bad = {name: r.get("lastError") for name, r in rules.items() if r.get("health") != "ok"}
    stack.check(not bad, f"{len(rules)} alert rules loaded from {ALERTS.name}, all healthy",
                str(bad) if bad else ", ".join(sorted(rules)))
    firing = sorted(n for n, r in rules.items() if r.get("state") in ("pending", "firing"))
    if firing:
        print(f"  (pending or firing after the induced faults: {', '.join(firing)})")


async def check_dashboards(stack: Stack, http: aiohttp.ClientSession, folder: Path) -> None:
    exported = set()
    for line in (await get_text(http, f"{stack.admin}/metrics")).splitlines():
        m = _METRIC.match(line)
        if m and not line.startswith("#"):
            exported.add(m.group(0))
    for path in sorted(folder.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                query = expr
                for var, value in GRAFANA_VARIABLES.items():
                    query = query.replace(var, value)
                names = set(_METRIC.findall(query))
                unknown = names - exported
                result = await prom_query(stack, http, query)
                what = f"{path.name}: {panel['title']} [{target['refId']}]"
                if unknown:
                    stack.check(False, what, f"not exported by balancer: {sorted(unknown)}")
                else:
                    stack.check(bool(result), what, f"{len(result)} series" if result
                                else f"no data for {query}")


async def tear_down(stack: Stack) -> None:
    """SIGTERM everything, balancer first (it must drain and exit 0); kill what lingers."""
    first = ("balancer", "prometheus")
    order = [*first, *(n for n in stack.procs if n not in first)]
    codes: dict[str, int | None] = {}
    for name in order:
        proc = stack.procs.get(name)
        if proc is None:
            continue
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            codes[name] = await asyncio.to_thread(proc.wait, 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[name] = await asyncio.to_thread(proc.wait, 10)
            print(f"  {name} ignored SIGTERM for 20s: killed")
    if "balancer" in codes:
        stack.check(codes["balancer"] == 0, "balancer drained and exited 0 on SIGTERM",
                    f"exit {codes['balancer']}")


async def main_async(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="balancer-stack-"))
    stack = Stack(tmp=tmp, dns=DNSServer())
    started = time.monotonic()
    step = min(args.timeout / 4, 30.0)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10),
                                 connector=aiohttp.TCPConnector(limit=0))
    error: str | None = None
    try:
        async with asyncio.timeout(None if args.hold else args.timeout):
            await bring_up(stack, http, step)
            print(f"up: proxy {stack.proxy}  admin {stack.admin}  prometheus {stack.prometheus}")
            await drive_traffic(stack, http, step)
            print("checks: Prometheus, alert rules, dashboard queries")
            await check_scrape(stack, http, step)
            await check_rules(stack, http, step)
            await check_dashboards(stack, http, args.dashboards)
            if args.hold:
                print(f"holding; Ctrl-C tears it down. Try:\n"
                      f"  curl {stack.proxy}/\n"
                      f"  open {stack.admin}/ (live dashboard) and {stack.prometheus}/alerts\n"
                      f"  LIVE_CONFIG={stack.tmp / 'balancer.yaml'} "
                      f"BROKEN_CONFIG={stack.tmp / 'concentrated.yaml'} PROXY_URL={stack.proxy} "
                      f"ADMIN_URL={stack.admin} bash {DEMO_BREAK.relative_to(ROOT)}", flush=True)
                await asyncio.Event().wait()
    except StackError as exc:
        error = str(exc)
    except TimeoutError:
        error = f"the whole run took longer than --timeout {args.timeout:.0f}s"
    except asyncio.CancelledError:
        print("interrupted")
    finally:
        await http.close()
        if error:
            stack.check(False, error)
            for name in stack.procs:
                print(f"  --- {name} log (last lines)\n{tail(stack, name)}")
        print("tearing down")
        await tear_down(stack)
        stack.dns.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"local stack: {stack.passed} passed, {len(stack.failed)} failed "
          f"in {time.monotonic() - started:.0f}s")
    print("STACK " + json.dumps({"pids": [p.pid for p in stack.procs.values()],
                                 "tmp": str(tmp), "failed": stack.failed}))
    return 1 if stack.failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hold", action="store_true",
                        help="after the checks, keep the stack running until Ctrl-C")
    parser.add_argument("--timeout", type=float, default=150.0,
                        help="the whole run's limit in seconds (default 150; not with --hold)")
    parser.add_argument("--dashboards", type=Path, default=DASHBOARDS,
                        help="the folder of Grafana dashboard JSON files whose queries to run "
                             "(default: deploy/grafana/dashboards)")
    args = parser.parse_args()
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
