"""``balancer run``: what happens before serving — refusals, bad files, busy ports, the start line.

Each test runs the real command in a subprocess. A config that would concentrate traffic must
never get as far as binding a port, and every failure is a clear line, never a traceback.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from tests.support.net import free_port
from tests.support.proc import BalancerProcess, pool_config, run_cli, write_config


def _listening_socket(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_refused_config_exits_1_before_binding(tmp_path: Path) -> None:
    # The listen port is taken: had `run` bound before judging the config, it would complain
    # about the port. It must complain about the config, with the lines `check` prints.
    port = free_port()
    cfg = write_config(tmp_path / "one.yaml", {
        "listen": f"127.0.0.1:{port}",
        "pools": {"web": pool_config([free_port()])},
    })
    with _listening_socket(port):
        run = run_cli("run", "-c", str(cfg))
    check = run_cli("check", "-c", str(cfg))
    assert run.returncode == 1, run.stderr
    assert check.returncode == 1, check.stderr
    assert "already in use" not in run.stderr
    assert "Traceback" not in run.stderr
    problems = [line for line in run.stderr.splitlines() if line.strip()]
    assert problems and any("web" in line for line in problems), run.stderr
    for line in problems:
        assert line in check.stderr, f"{line!r} is not what check says:\n{check.stderr}"


def test_invalid_config_gets_one_line_per_problem_naming_where(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "bad.yaml", {
        "listn": "127.0.0.1:8080",
        "pools": {"web": {"backends": [
            {"url": "http://127.0.0.1:9001"},
            {"url": "http://127.0.0.1:9002", "weight": -3},
        ]}},
    })
    run = run_cli("run", "-c", str(cfg))
    assert run.returncode == 1
    lines = run.stderr.splitlines()
    assert f"{cfg}: pools.web.backends[1].weight: must be >= 0, got -3" in lines, run.stderr
    assert any(line.startswith(f"{cfg}: listn: unknown key") for line in lines), run.stderr
    assert "Traceback" not in run.stderr


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    run = run_cli("run", "-c", str(missing))
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"{missing}: cannot read: No such file or directory"]


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "ok.yaml", {
        "listen": f"127.0.0.1:{port}",
        "admin": f"127.0.0.1:{free_port()}",
        "pools": {"web": pool_config([free_port(), free_port()])},
    })
    with _listening_socket(port):
        run = run_cli("run", "-c", str(cfg))
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, run.stderr
    assert f"listen 127.0.0.1:{port}: address already in use" in errors[0]
    assert "Traceback" not in run.stderr


def test_admin_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    admin = free_port()
    cfg = write_config(tmp_path / "ok.yaml", {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": f"127.0.0.1:{admin}",
        "pools": {"web": pool_config([free_port(), free_port()])},
    })
    with _listening_socket(admin):
        run = run_cli("run", "-c", str(cfg))
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, run.stderr
    # Named as the listen line is: the key, the address, the reason; no errno, no class name.
    assert errors[0].endswith(f"admin 127.0.0.1:{admin}: address already in use"), run.stderr
    assert "Traceback" not in run.stderr and "Errno" not in run.stderr


def test_address_not_on_this_host_is_a_clear_error(tmp_path: Path) -> None:
    # 192.0.2.1 is TEST-NET-1: no interface here has it, so bind() fails (no packet is sent).
    cfg = write_config(tmp_path / "ok.yaml", {
        "listen": f"192.0.2.1:{free_port()}",
        "admin": f"127.0.0.1:{free_port()}",
        "pools": {"web": pool_config([free_port(), free_port()])},
    })
    run = run_cli("run", "-c", str(cfg))
    assert run.returncode == 1
    assert "listen 192.0.2.1:" in run.stderr and "cannot assign requested address" in run.stderr
    assert "Traceback" not in run.stderr


async def test_start_line_names_pools_backends_and_admin(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    web, api = [free_port(), free_port()], [free_port(), free_port()]
    cfg = write_config(tmp_path / "two.yaml", {
        "listen": f"127.0.0.1:{port}",
        "admin": f"127.0.0.1:{admin}",
        "pools": {"web": pool_config(web), "api": pool_config(api, strategy="least_connections")},
        "routes": [{"path_prefix": "/api", "pool": "api"}, {"pool": "web"}],
    })
    async with BalancerProcess(cfg) as proc:
        line = await proc.wait_for(r"balancer\.app: .* listening on")
        assert f"127.0.0.1:{port}" in line and f"127.0.0.1:{admin}" in line
        assert "pool web (round_robin)" in line and "pool api (least_connections)" in line
        for p in web + api:
            assert f"b{p} http://127.0.0.1:{p}" in line
        proc.send(signal.SIGINT)
        assert await proc.wait_exit() == 0


def test_listen_equal_to_admin_is_refused_by_check_and_run_alike(tmp_path: Path) -> None:
    # It used to pass `check` and fail only at `run`, with a bind error (issue 9).
    port = free_port()
    cfg = write_config(tmp_path / "same.yaml", {
        "listen": f"0.0.0.0:{port}",
        "admin": port,
        "pools": {"web": pool_config([free_port(), free_port()])},
    })
    line = (f"{cfg}: admin: 127.0.0.1:{port} is where listen (0.0.0.0:{port}) accepts clients: "
            "one port cannot serve both; give admin a port of its own")
    for command in ("check", "run"):
        result = run_cli(command, "-c", str(cfg))
        assert result.returncode == 1, result.stderr
        assert result.stderr.splitlines() == [line], result.stderr


def test_run_help_says_how_to_reload_stop_and_set_the_log_level() -> None:
    result = run_cli("run", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for said in ("kill -HUP PID", "POST /reload", "admin address", "--watch", "SIGTERM",
                 "drain_timeout (default 30s)", "BALANCER_LOG_LEVEL", "exit codes:"):
        assert said in text, result.stdout

