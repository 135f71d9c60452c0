"""``balancer demo``: three demo backends behind the real proxy, nothing else to install or run.

The backends (``demo_backends.py``) and the App share one event loop in one process. The
config is ``demo.yaml`` shipped in the package, with the ports filled in, written to a temp
file so that the App loads it through the same loader and guard as ``balancer run`` (and so a
curious user can edit it and send SIGHUP to watch the guard judge the change).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import uvloop
import yaml

from balancer.config import Address, ConfigError
from balancer.demo_backends import DemoBackend, start_backends, stop_backends
from balancer.logs import setup_logging

#: The pool in demo.yaml whose backends the demo starts.
DEMO_POOL = "demo"


def demo_config(backends: list[DemoBackend], port: int, admin_port: int) -> dict[str, Any]:
    """demo.yaml as data, with listen, admin and each backend's url filled in."""
    data = yaml.safe_load(resources.files("balancer").joinpath("demo.yaml").read_text("utf-8"))
    data["listen"] = f"127.0.0.1:{port}"
    data["admin"] = f"127.0.0.1:{admin_port}"
    urls = {b.name: b.url for b in backends}
    for entry in data["pools"][DEMO_POOL]["backends"]:
        entry["url"] = urls[entry["name"]]
    return data


def demo_backend_names() -> list[str]:
    data = yaml.safe_load(resources.files("balancer").joinpath("demo.yaml").read_text("utf-8"))
    return [entry["name"] for entry in data["pools"][DEMO_POOL]["backends"]]


def banner(proxy: Address, admin: Address | None, backends: list[DemoBackend],
           config_path: str) -> str:
    """What to try, with the real URLs."""
    url = f"http://{proxy}"
    width = max(len(b.name) for b in backends)
    lines = [(f"balancer demo: {len(backends)} backends behind the proxy "
              f"(pool {DEMO_POOL!r}, round robin)")]
    lines += [f"  {b.name:<{width}}  {b.url}" for b in backends]
    lines += ["", f"Proxy: {url}/"]
    if admin is not None:
        lines += [f"Dashboard: http://{admin}/", f"Metrics: http://{admin}/metrics"]
    lines += [
        f"Config: {config_path}",
        (f"  (edit it, then `kill -HUP {os.getpid()}`: the guard checks every reload and"
         " refuses one that concentrates traffic;"),
        ("   one it accepts that then concentrates live traffic, such as a consistent_hash"
         " key clients never send, is rolled back within guard.probation, 30 s: send it"
         " 100 requests)"),
        "",
        "Try:",
        f"  curl {url}/                                 # each call: the next backend",
        f"  for i in 1 2 3 4 5 6; do curl -s {url}/ | grep '\"backend\"'; done",
        f"  curl -H 'X-Request-ID: hello' {url}/hi      # your request id reaches the backend",
        f"  curl -N {url}/stream                        # a line every 100 ms, streamed",
        f"  curl '{url}/slow?ms=2000'                   # a slow request",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def _admin_address(app: Any) -> Address | None:
    """The admin server's bound address, once the App runs one."""
    for service in getattr(app, "services", ()):
        address = getattr(service, "address", None)
        if isinstance(address, Address):
            return address
    return None


async def run_demo(port: int, admin_port: int) -> int:
    """Start the backends and the proxy, print the banner, serve until SIGTERM/SIGINT."""
    from balancer.app import App, StartError

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    temp_dirs: list[str] = []

    def on_stop(sig: int) -> None:
        if stop.is_set():  # a second Ctrl-C: do not wait for the drain (as `balancer run`)
            print("balancer demo: stopped without waiting for in-flight requests",
                  file=sys.stderr, flush=True)
            for d in temp_dirs:
                shutil.rmtree(d, ignore_errors=True)
            os._exit(128 + sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    app: App | None = None
    backends = await start_backends(demo_backend_names())
    try:
        with tempfile.TemporaryDirectory(prefix="balancer-demo-") as tmp:
            temp_dirs.append(tmp)
            path = str(Path(tmp) / "demo.yaml")
            Path(path).write_text(yaml.safe_dump(demo_config(backends, port, admin_port),
                                                 sort_keys=False))
            try:
                app = await asyncio.to_thread(App, path)
            except ConfigError as exc:  # demo.yaml itself is broken: a bug, say where
                for problem in exc.problems:
                    print(f"balancer demo: {problem}", file=sys.stderr)
                return 1
            try:
                await app.checker.warm()  # as `balancer run`: before it serves
                await app.start()
            except StartError as exc:
                print(f"balancer demo: {exc} (--port 0 and --admin-port 0 pick free ports)",
                      file=sys.stderr)
                return 1
            reloads: set[asyncio.Task[Any]] = set()

            def on_sighup() -> None:
                assert app is not None
                task = loop.create_task(app.reload())
                reloads.add(task)
                task.add_done_callback(reloads.discard)

            loop.add_signal_handler(signal.SIGHUP, on_sighup)
            print(banner(app.address, _admin_address(app), backends, path), flush=True)
            await stop.wait()
            print("balancer demo: stopping", flush=True)
            await app.drain()
    finally:
        await stop_backends(backends)
    return 0


def main_demo(port: int, admin_port: int) -> int:
    """``balancer demo``: 0 after Ctrl-C or SIGTERM, 1 when a port is taken."""
    for name, value in (("--port", port), ("--admin-port", admin_port)):
        if not 0 <= value <= 65535:
            print(f"balancer demo: {name} must be 0..65535, got {value}", file=sys.stderr)
            return 2
    setup_logging()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(run_demo(port, admin_port))
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed
        return 0
