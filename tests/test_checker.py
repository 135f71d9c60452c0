"""A reload's check runs in a child process (balancer/checker.py), and answers as the check does.

The serving process sends the path and gets back the checked config with its tables; what the
check refuses is refused with the same lines as ``check_file`` (and ``balancer check``) says.
A plug-in next to the config loads in both processes. A check that kills the child refuses the
reload and leaves the proxy serving; the next reload starts a new child. The child ends with a
drain, exits when idle (reaped: no zombie) unless ``balancer run`` started it before serving
(``warm``: it stays), and dies with its parent.
"""

from __future__ import annotations

import asyncio
import operator
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from balancer.app import App
from balancer.config import ConfigError
from balancer.loading import check_file
from tests.support.net import free_port
from tests.support.proc import RunningBalancer, write_config


def config(weights: list[int], strategy: str = "round_robin", **pool: Any) -> dict[str, Any]:
    return {"listen": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{free_port()}",
            "access_log": False, "guard": {"probation": 0},
            "pools": {"web": {"strategy": strategy, **pool, "backends": [
                {"url": f"http://127.0.0.1:{9000 + i}", "name": f"b{i}", "weight": w}
                for i, w in enumerate(weights)]}}}


def problems_of(path: Path) -> list[str]:
    """What the check in this process says of ``path``."""
    with pytest.raises(ConfigError) as caught:
        check_file(str(path))
    return caught.value.problems


def plugin(where: Path, module: str, cls: str, *body: str, imports: str = "") -> None:
    """A round robin plug-in ``module:cls`` next to the config, with ``body`` lines."""
    lines = [imports, "from balancer.strategies.round_robin import RoundRobin", "", "",
             f"class {cls}(RoundRobin):", *(f"    {line}" for line in body or ["pass"])]
    (where / f"{module}.py").write_text("\n".join(lines) + "\n", encoding="utf-8")


def child_pid(app: App) -> int:
    proc = app.checker._proc
    assert proc is not None and proc.returncode is None
    return proc.pid


async def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":  # exited, not yet reaped by its parent
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.fixture
async def app(tmp_path: Path) -> Any:
    path = write_config(tmp_path / "c.yaml", config([1, 1, 1]))
    app = App(str(path))
    yield app
    await app.checker.close()


async def test_refusals_through_the_check_process_say_what_the_check_says(
        app: App, tmp_path: Path) -> None:
    path = Path(app.config_path)
    bad = {
        "concentrated": config([9, 1]),
        "invalid": {**config([1, 1]), "client": {"header_timeout": "soon"}},
    }
    for name, data in bad.items():
        write_config(path, data)
        expected = problems_of(path)
        result = await app.reload()
        assert not result.applied, name
        assert result.problems == expected, name
    path.write_text("pools: [unclosed\n", encoding="utf-8")
    expected = problems_of(path)
    result = await app.reload()
    assert not result.applied and result.problems == expected
    path.unlink()
    result = await app.reload()
    assert not result.applied and result.problems == problems_of(path)
    assert "cannot read" in result.problems[0]
    # One child answered them all, and the config that runs is still the first.
    assert [b.weight for b in app.pools["web"].backends] == [1, 1, 1]
    pid = child_pid(app)
    write_config(path, config([1, 2, 1]))
    result = await app.reload()
    assert result.applied, result.problems
    assert [b.weight for b in app.pools["web"].backends] == [1, 2, 1]
    assert child_pid(app) == pid


async def test_a_plugin_next_to_the_config_loads_in_both_processes(
        app: App, tmp_path: Path) -> None:
    # A module this process has never imported, in a directory not on its sys.path.
    plugin(tmp_path, "fresh_plugin", "Fresh", "name = 'fresh'")
    write_config(Path(app.config_path), config([1, 1, 1], strategy="fresh_plugin:Fresh"))
    result = await app.reload()
    assert result.applied, result.problems
    assert type(app.pools["web"].strategy).__name__ == "Fresh"


async def test_a_plugin_that_raises_refuses_the_reload_with_its_error(
        app: App, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plugin(tmp_path, "broken_plugin", "Broken", "@classmethod",
           "def validate_options(cls, options):", "    raise RuntimeError('boom')")
    write_config(Path(app.config_path), config([1, 1, 1], strategy="broken_plugin:Broken"))
    result = await app.reload()
    assert not result.applied
    assert any("RuntimeError: boom" in p for p in result.problems), result.problems
    assert "broken_plugin.py" in caplog.text  # the child's trace, in this process's log


async def test_a_check_that_kills_the_child_is_refused_and_the_next_reload_works(
        app: App, tmp_path: Path) -> None:
    plugin(tmp_path, "slow_plugin", "Slow", "@classmethod",
           "def validate_options(cls, options):", "    time.sleep(60)", "    return []",
           imports="import time")
    write_config(Path(app.config_path), config([1, 1, 1], strategy="slow_plugin:Slow"))
    reload = asyncio.get_running_loop().create_task(app.reload())
    deadline = time.monotonic() + 15
    while app.checker._proc is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    pid = child_pid(app)
    await asyncio.sleep(1.0)  # in the plug-in's sleep by now
    os.kill(pid, signal.SIGKILL)
    result = await asyncio.wait_for(reload, 15)
    assert not result.applied
    assert result.problems == [f"{app.config_path}: the check process died while checking "
                               "(killed by signal 9)"]
    assert [b.weight for b in app.pools["web"].backends] == [1, 1, 1]
    write_config(Path(app.config_path), config([2, 1, 1]))
    result = await app.reload()
    assert result.applied, result.problems
    assert child_pid(app) != pid


async def test_the_child_ends_with_a_drain(app: App) -> None:
    write_config(Path(app.config_path), config([1, 1, 2]))
    assert (await app.reload()).applied
    pid = child_pid(app)
    await app.start()
    await app.drain(1.0)
    assert await gone(pid)


async def test_an_idle_child_exits_and_is_reaped(app: App,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import balancer.checker

    monkeypatch.setattr(balancer.checker, "IDLE", 0.2)
    write_config(Path(app.config_path), config([1, 2, 1]))
    assert (await app.reload()).applied
    pid = child_pid(app)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), "the idle check process is left a zombie"
    write_config(Path(app.config_path), config([2, 1, 1]))
    assert (await app.reload()).applied  # the next reload starts another
    assert child_pid(app) != pid


async def test_a_warm_child_answers_at_once_and_stays(app: App,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import balancer.checker

    monkeypatch.setattr(balancer.checker, "IDLE", 0.2)
    await app.checker.warm()  # what `balancer run` does before it serves
    pid = child_pid(app)
    await asyncio.sleep(0.6)  # past IDLE: a warm child does not exit
    assert child_pid(app) == pid
    write_config(Path(app.config_path), config([1, 2, 1]))
    assert (await app.reload()).applied
    await asyncio.sleep(0.6)
    assert child_pid(app) == pid


async def test_the_child_dies_with_balancer_run(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    pools = {"web": {"backends": [{"url": f"http://127.0.0.1:{p}", "name": f"b{p}"}
                                  for p in ports]}}
    async with RunningBalancer(tmp_path, pools) as lb:
        # Started before it serves (Checker.warm), not at the first reload.
        children = Path(f"/proc/{lb.proc.pid}/task/{lb.proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        pid = int(children[0])
        mark = lb.proc.mark()
        lb.proc.send(signal.SIGHUP)
        await lb.proc.wait_for("reload applied", since=mark)
        assert Path(f"/proc/{lb.proc.pid}/task/{lb.proc.pid}/children").read_text().split() \
            == children  # the same one checked the reload
        assert "balancer.checker" in Path(f"/proc/{pid}/cmdline").read_text()
        lb.proc.proc.kill()  # type: ignore[union-attr]
        assert await gone(pid)


async def test_tables_that_cannot_be_sent_are_built_here(app: App, tmp_path: Path) -> None:
    plugin(tmp_path, "local_plugin", "Local", "@classmethod",
           "def precompute(cls, members, options):",
           "    class Cycle(list):  # a class pickle cannot name: the table cannot be sent",
           "        pass",
           "    table = super().precompute(members, options)",
           "    return None if table is None else Cycle(table)")
    write_config(Path(app.config_path), config([1, 2, 1], strategy="local_plugin:Local"))
    result = await app.reload()
    assert result.applied, result.problems
    assert type(app.pools["web"].strategy).__name__ == "Local"
    assert [b.weight for b in app.pools["web"].backends] == [1, 2, 1]


async def test_the_guards_other_work_runs_there_and_answers_as_here(app: App) -> None:
    from balancer.loading import top_share

    pool = app.config.pools["web"]
    assert await app.compute(top_share, app.config, pool) == top_share(app.config, pool)
    pid = child_pid(app)
    with pytest.raises(KeyError):  # what the function raises is raised here, as itself
        await app.compute(operator.getitem, {}, "missing")
    assert await app.compute(lambda: os.getpid()) == os.getpid()  # pickle cannot send it
    assert child_pid(app) == pid


async def test_a_plugins_own_objects_travel_and_its_simulation_runs_there(
        app: App, tmp_path: Path) -> None:
    # Tables of a class the plug-in defines: unpickled here, where the module sits next to
    # the config, not on sys.path; probation's simulation of it runs in the child.
    plugin(tmp_path, "table_plugin", "Tabled", "@classmethod",
           "def precompute(cls, members, options):",
           "    table = super().precompute(members, options)",
           "    return None if table is None else Table(table)",
           imports="class Table(list):\n    pass\n\n")
    write_config(Path(app.config_path), config([1, 2, 1], strategy="table_plugin:Tabled"))
    result = await app.reload()
    assert result.applied, result.problems
    assert type(app.pools["web"].strategy).__name__ == "Tabled"
    from balancer.loading import top_share

    pool = app.config.pools["web"]
    assert await app.compute(top_share, app.config, pool) == pytest.approx(0.5, abs=0.05)


def test_the_check_process_steps_aside_in_its_main_thread() -> None:
    """``gil.courteous`` (what the child calls first): in the main thread ``give_way`` then
    pauses after each ``SLICE`` of work, where by default it never does there."""
    import subprocess
    import sys

    code = ("import time\n"
            "from balancer import gil\n"
            "pauses = []\n"
            "gil.time.sleep = pauses.append  # count the steps aside instead of taking them\n"
            "def busy():\n"
            "    pauses.clear()\n"
            "    start = time.perf_counter()\n"
            "    while time.perf_counter() - start < 0.05:\n"
            "        gil.give_way()\n"
            "    return len(pauses)\n"
            "alone = busy()\n"
            "gil.courteous()\n"
            "print(alone, busy())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True).stdout.split()
    alone, courteous = map(int, out)
    assert alone == 0  # the main thread of any other process never steps aside
    assert courteous >= 20  # 50 ms of work: a step aside after each 0.5 ms slice
