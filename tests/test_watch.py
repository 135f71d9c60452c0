"""The config file watcher: a ConfigMap-style symlink swap reaches the running proxy.

The config directory is laid out as the kubelet lays out a mounted ConfigMap (the file a
symlink into ``..data``, itself a symlink to a versioned directory, swapped atomically on
update). Backends are real aiohttp servers on loopback; the proxy is the real App in-process
(to read its counters) or ``balancer run --watch`` as a subprocess.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancer.app import App
from balancer.watch import ConfigWatcher
from tests.support.net import free_port, name_app, run_app
from tests.support.proc import BalancerProcess, pool_config
from tests.support.traffic import Traffic, until

#: Poll interval for the in-process watcher (the CLI's is the default, 1 s).
FAST = 0.1


class ConfigMapDir:
    """A directory updated the way the kubelet updates a mounted ConfigMap."""

    def __init__(self, root: Path, filename: str = "balancer.yaml") -> None:
        self.root = root
        self.filename = filename
        self.version = 0

    @property
    def path(self) -> Path:
        """The path the balancer is given: ``<root>/balancer.yaml`` → ``..data/balancer.yaml``."""
        return self.root / self.filename

    def publish(self, data: dict[str, Any]) -> None:
        """Write a new version directory, then swap ``..data`` to it in one rename."""
        self.version += 1
        old = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        version = self.root / f"..v{self.version}"
        version.mkdir()
        (version / self.filename).write_text(yaml.safe_dump(data, sort_keys=False))
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to(f"..data/{self.filename}")
        if old is not None:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


class Site:
    """Three loopback backends, a proxy port, and the ConfigMap directory of its config."""

    def __init__(self, tmp_path: Path) -> None:
        self.listen = free_port()
        self.admin = free_port()
        self.cm = ConfigMapDir(tmp_path)
        self.ports: list[int] = []

    async def start(self, stack: AsyncExitStack) -> list[int]:
        """Serve the backends and publish the first config (the first two of them)."""
        self.ports = [free_port() for _ in range(3)]
        for p in self.ports:
            await stack.enter_async_context(run_app(name_app(f"b{p}"), port=p))
        self.publish(self.ports[:2])
        return self.ports

    def publish(self, ports: list[int], weights: dict[int, int] | None = None) -> None:
        """Pool ``web`` over ``ports``: the same arguments publish the same bytes."""
        pool = pool_config(ports)
        for b, port in zip(pool["backends"], ports):
            if weights and port in weights:
                b["weight"] = weights[port]
        self.cm.publish({"listen": f"127.0.0.1:{self.listen}",
                         "admin": f"127.0.0.1:{self.admin}", "pools": {"web": pool}})

    async def app(self, stack: AsyncExitStack, watch: bool = True) -> tuple[App, ConfigWatcher]:
        """The App in-process, with a fast watcher unless ``watch`` is False; drained at exit."""
        app = App(str(self.cm.path))
        watcher = ConfigWatcher(self.cm.path, interval=FAST)
        if watch:
            app.services.append(watcher)
        await app.start()
        stack.push_async_callback(app.drain, 2.0)
        return app, watcher


# --------------------------------------------------------------------------- in-process


async def test_configmap_swap_applies_a_good_file_and_refuses_a_concentrated_one(
        tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        site = Site(tmp_path)
        a, b, c = await site.start(stack)
        app, watcher = await site.app(stack)
        traffic = await stack.enter_async_context(Traffic(site.listen))
        assert set(await traffic.sample(20)) == {f"b{a}", f"b{b}"}

        # A good edit: applied, and the new backend takes traffic.
        site.publish([a, b, c])
        await until(lambda: app.reloads["applied"] == 1, "applied reload")
        assert set(await traffic.sample(30)) == {f"b{a}", f"b{b}", f"b{c}"}

        # A concentrated edit (one backend at 80%): refused, the even config keeps serving.
        good = app.config
        site.publish([a, b, c], weights={a: 8})
        await until(lambda: app.reloads["refused"] == 1, "refused reload")
        assert app.config is good
        spread = await traffic.sample(60)
        assert set(spread) == {f"b{a}", f"b{b}", f"b{c}"}  # about a third each; 80% if applied
        assert spread[f"b{a}"] <= 0.5 * sum(spread.values()), spread
        # The refused content is not tried again at every poll.
        await asyncio.sleep(5 * FAST)
        assert app.reloads == {"applied": 1, "refused": 1} and watcher.reloads == 2

        # Rolling the ConfigMap back is a change too: applied.
        site.publish([a, b, c])
        await until(lambda: app.reloads["applied"] == 2, "the rollback applied")
        # Republishing identical bytes (a new directory, a new inode) reloads nothing.
        site.publish([a, b, c])
        os.utime(site.cm.path)
        await asyncio.sleep(5 * FAST)
        assert app.reloads == {"applied": 2, "refused": 1} and watcher.reloads == 3
        assert traffic.failures == [], traffic.failures[:5]


async def test_an_unreadable_file_keeps_serving_and_is_said_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with AsyncExitStack() as stack:
        site = Site(tmp_path)
        a, b, _ = await site.start(stack)
        app, _ = await site.app(stack)

        (tmp_path / "..data").unlink()  # the symlink now leads nowhere
        await asyncio.sleep(5 * FAST)
        said = [r for r in caplog.records if r.levelno == logging.WARNING
                and "cannot be read" in r.getMessage()]
        assert len(said) == 1 and app.reloads == {"applied": 0, "refused": 0}
        # It comes back changed: reloaded.
        site.publish([b, a])
        await until(lambda: app.reloads["applied"] == 1, "the reload after the file came back")


async def test_without_a_watcher_edits_wait_for_sighup(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        site = Site(tmp_path)
        a, b, c = await site.start(stack)
        app, _ = await site.app(stack, watch=False)
        site.publish([a, b, c])
        await asyncio.sleep(10 * FAST)
        assert app.reloads["applied"] == 0 and len(app.pools["web"].backends) == 2


# --------------------------------------------------------------------------- the CLI flag


async def test_run_watch_reloads_a_swapped_configmap(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        site = Site(tmp_path)
        a, b, c = await site.start(stack)
        proc = await stack.enter_async_context(BalancerProcess(site.cm.path, "--watch"))
        await proc.wait_for(r"watching .*balancer\.yaml for changes")
        traffic = await stack.enter_async_context(Traffic(site.listen))
        assert set(await traffic.sample(20)) == {f"b{a}", f"b{b}"}

        mark = proc.mark()
        site.publish([a, b, c], weights={c: 8})
        await proc.wait_for("reload refused", since=mark)
        assert any("config file" in line and "changed: reloading" in line
                   for line in proc.lines_since(mark))

        mark = proc.mark()
        site.publish([a, b, c])
        await proc.wait_for("reload applied", since=mark)
        assert set(await traffic.sample(30)) == {f"b{a}", f"b{b}", f"b{c}"}
        assert traffic.failures == [], traffic.failures[:5]
