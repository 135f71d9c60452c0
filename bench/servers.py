"""Starting, pinning, waiting for and stopping the processes a benchmark run needs.

Every process goes through ``Processes``, which starts it in its own session (so nginx's
workers die with their master) and stops all of them, whatever happened, when the run ends.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
REPO = HERE.parent


class StartError(RuntimeError):
    """A process under test did not come up; the message names it and quotes its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render(template: str, dest: Path, **values: object) -> Path:
    """Fill ``templates/<template>`` with ``$name`` values and write it to ``dest``."""
    text = Template((TEMPLATES / template).read_text()).substitute(values)
    dest.write_text(text)
    return dest


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


class Processes:
    """The processes of one run, pinned to a CPU when the machine has two."""

    def __init__(self, workdir: Path, pin: bool) -> None:
        self.workdir = workdir
        self.pin = pin and shutil.which("taskset") is not None
        self.running: list[Proc] = []

    def start(self, name: str, argv: list[str], cpu: int | None,
              env: dict[str, str] | None = None) -> Proc:
        if self.pin and cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir,
                                     start_new_session=True,
                                     env=None if env is None else {**os.environ, **env})
        proc = Proc(name, popen, log)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``grace`` seconds."""
        if proc in self.running:
            self.running.remove(proc)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.popen.wait(wait)
                # The leader is gone; its group (nginx workers) may linger a moment.
                _wait_group_gone(proc.pid, wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise subprocess.TimeoutExpired(f"process group {pgid}", timeout)


def wait_http(proc: Proc, port: int, path: str = "/", timeout: float = 20.0) -> None:
    """Wait until ``GET path`` on ``port`` answers 200, or fail naming the process."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise StartError(f"{proc.name} exited with status {proc.popen.returncode}:\n"
                             f"{proc.log_tail()}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                return
            last = f"status {resp.status}"
        except OSError as exc:
            last = str(exc)
        finally:
            conn.close()
        time.sleep(0.1)
    raise StartError(f"{proc.name} did not answer GET {path} on port {port} within "
                     f"{timeout:.0f}s ({last}):\n{proc.log_tail()}")


# --------------------------------------------------------------------------- the backends


@dataclass
class Backend:
    kind: str  # "nginx" or "builtin"
    proc: Proc
    ports: tuple[int, int]


def start_backend(procs: Processes, kind: str, cpu: int | None) -> Backend:
    """Two backend ports serving ``/`` (ok) and ``/64k`` from one process (tree)."""
    ports = (free_port(), free_port())
    d = procs.workdir
    if kind == "nginx":
        (d / "www").mkdir()
        (d / "www" / "64k").write_bytes(os.urandom(32768).hex().encode())
        os.chmod(d, 0o755)  # nginx workers run as nobody when started by root
        conf = render("nginx-backend.conf", d / "nginx-backend.conf", dir=d,
                      backend1=ports[0], backend2=ports[1])
        proc = procs.start("backend-nginx", ["nginx", "-p", str(d), "-c", str(conf),
                                             "-e", str(d / "nginx-backend.error.log")], cpu)
    else:
        proc = procs.start("backend-builtin", [sys.executable, str(HERE / "fastbackend.py"),
                                               *map(str, ports)], cpu)
    for port in ports:
        wait_http(proc, port)
        wait_http(proc, port, "/64k")
    return Backend(kind, proc, ports)


# --------------------------------------------------------------------------- the proxies

PROXIES = ("nginx", "haproxy", "balancer")
#: Extra proxies for A/B measurements, named in ``--proxies`` like the others:
#: ``balancer-nolog`` runs without its access log (BALANCER_LOG_LEVEL=WARNING),
#: ``balancer-alt`` runs the checkout given as ``--alt-src`` (a proposed change), and
#: ``floor`` is ``floor.py``, a featureless proxy built from balancer's parts (one process).
VARIANTS = ("balancer-nolog", "balancer-alt", "floor")


def proxy_missing(kind: str, alt_src: Path | None = None) -> str | None:
    """Why a proxy cannot be benchmarked here, or None."""
    if kind in ("nginx", "haproxy") and shutil.which(kind) is None:
        return f"{kind} is not installed"
    if kind == "balancer-alt" and (alt_src is None or not (alt_src / "balancer").is_dir()):
        return "--alt-src must name a checkout with a balancer/ package"
    return None


@dataclass
class Proxy:
    kind: str
    proc: Proc
    port: int
    #: Worker processes (nginx), threads (HAProxy) or worker processes (balancer --workers).
    workers: int = 1

    @property
    def label(self) -> str:
        """How the tables name it: ``nginx``, or ``nginx×2`` with two workers."""
        return self.kind if self.workers == 1 else f"{self.kind}×{self.workers}"


def start_proxy(procs: Processes, kind: str, backend: Backend, cpu: int | None,
                tag: str = "", alt_src: Path | None = None, workers: int = 1) -> Proxy:
    """Start one proxy, with ``workers`` workers or threads, in front of ``backend`` and wait
    until it forwards a request."""
    port = free_port()
    d = procs.workdir
    name = f"{kind}{tag}" + (f"-w{workers}" if workers > 1 else "")
    b1, b2 = backend.ports
    env: dict[str, str] | None = None
    if kind == "nginx":
        conf = render("nginx-proxy.conf", d / f"{name}.conf", dir=d, name=name, port=port,
                      backend1=b1, backend2=b2, workers=workers)
        argv = ["nginx", "-p", str(d), "-c", str(conf), "-e", str(d / f"{name}.error.log")]
    elif kind == "haproxy":
        conf = render("haproxy.cfg", d / f"{name}.cfg", port=port, backend1=b1, backend2=b2,
                      workers=workers)
        argv = ["haproxy", "-db", "-f", str(conf)]
    elif kind.startswith("balancer"):
        conf = render("balancer.yaml", d / f"{name}.yaml", port=port, admin_port=free_port(),
                      backend1=b1, backend2=b2, workers=workers)
        argv = [sys.executable, "-m", "balancer", "run", "-c", str(conf)]
        if kind == "balancer-nolog":
            env = {"BALANCER_LOG_LEVEL": "WARNING"}
        elif kind == "balancer-alt":
            assert alt_src is not None
            env = {"PYTHONPATH": str(alt_src.resolve())}
            if workers == 1:  # one process is the default: trees older than the key refuse it
                conf.write_text("\n".join(line for line in conf.read_text().splitlines()
                                           if not line.startswith("workers:")) + "\n")
        elif kind != "balancer":
            raise ValueError(f"unknown proxy {kind!r}")
    elif kind == "floor":
        argv = [sys.executable, str(HERE / "floor.py"), str(port), str(b1), str(b2)]
    else:
        raise ValueError(f"unknown proxy {kind!r} (known: {', '.join(PROXIES + VARIANTS)})")
    proc = procs.start(name, argv, cpu, env)
    wait_http(proc, port)
    return Proxy(kind, proc, port, workers)
