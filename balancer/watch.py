"""Config file watching: reload when the file's content changes, exactly as SIGHUP does.

For a Kubernetes ConfigMap mounted as a volume: the kubelet updates it by writing a new
directory and swapping a symlink (``..data``), so the file's path never changes but what it
leads to does. Once a second the watcher reads the file through its symlinks and hashes the
content; when the hash differs from the last one it saw, it calls ``App.reload()``, where the
guard decides: a refused config leaves the old one serving, and the same content is not tried
again until it changes once more. Content, not mtime or inode, is the signal: a swap that
writes identical bytes, or a ``touch``, reloads nothing, while any real edit is seen however
the file was replaced. Hashing a config file once a second costs microseconds.

Turned on by ``balancer run --watch`` rather than a config key: how the file reaches the
process (a ConfigMap mount, a hand-edited file on a VM) is a property of the deployment, set
next to the mount in the manifest, not of the routing config; and a flag cannot be switched
off by the very file it watches.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

from balancer.appview import AppView

log = logging.getLogger("balancer.watch")

#: Seconds between looks at the file.
INTERVAL = 1.0


def digest(path: str | Path) -> str | None:
    """SHA-256 of the file's content (symlinks followed), or None when it cannot be read."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


class ConfigWatcher:
    """A Service that reloads the App when its config file's content changes."""

    def __init__(self, path: str | Path, interval: float = INTERVAL) -> None:
        self.path = Path(path)
        self.interval = interval
        self.reloads = 0  # reloads this watcher asked for (applied or refused)
        self._app: AppView | None = None
        self._seen: str | None = None
        self._unreadable = False
        self._task: asyncio.Task[None] | None = None

    # --- Service interface (app.py) ------------------------------------------------------

    async def start(self, app: AppView) -> None:
        self._app = app
        self._seen = await asyncio.to_thread(digest, self.path)
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name="balancer-config-watch")
        log.info("watching %s for changes (every %gs)", self.path, self.interval)

    def on_reload(self, app: AppView) -> None:
        self._app = app

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # --- watching ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except Exception:  # a bug here must not stop the watching for good
                log.exception("watching %s failed", self.path)

    async def poll(self) -> bool:
        """Look at the file once; reload if its content changed. True when it reloaded."""
        # Off the loop: a config on a network volume may be slow to read.
        now = await asyncio.to_thread(digest, self.path)
        if now is None:
            if not self._unreadable:
                self._unreadable = True
                log.warning("config file %s cannot be read; still serving the loaded config",
                            self.path)
            return False
        self._unreadable = False
        if now == self._seen:
            return False
        self._seen = now
        self.reloads += 1
        log.info("config file %s changed: reloading", self.path)
        if self._app is not None:
            await self._app.reload()
        return True

    def __repr__(self) -> str:
        return f"<ConfigWatcher {self.path} reloads={self.reloads}>"
