"""What the kernel says about a process tree and the CPUs: CPU ticks, peak and current RSS.

Read straight from ``/proc`` so the figures are the same for every proxy compared, whatever its
language: CPU time is ``utime + stime`` of every process in the tree (nginx's master and worker,
balancer's one process), memory is ``VmHWM`` / ``VmRSS`` from ``/proc/PID/status``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_split(pid: int) -> tuple[int, int]:
    """(user, system) CPU ticks used so far by ``pid``'s whole tree."""
    user = system = 0
    for p in tree(pid):
        fields = _stat_fields(p)
        if fields:
            # utime and stime are fields 14 and 15 of the full line; 12 and 13 here.
            user += int(fields[11])
            system += int(fields[12])
    return user, system


def cpu_ticks(pid: int) -> int:
    """User + system CPU ticks used so far by ``pid``'s whole tree."""
    return sum(cpu_split(pid))


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_kib(pid: int) -> int:
    """The largest ``VmHWM`` in the tree: the busiest process's peak (nginx's worker)."""
    return max((_status_kib(p, "VmHWM") for p in tree(pid)), default=0)


def rss_kib(pid: int) -> int:
    """Resident memory of the whole tree now (``VmRSS`` summed)."""
    return sum(_status_kib(p, "VmRSS") for p in tree(pid))


@dataclass(frozen=True)
class CpuSample:
    """Busy ticks per CPU id (user + nice + system + steal), for watching foreign load."""

    busy: dict[int, int]

    @classmethod
    def take(cls) -> CpuSample:
        busy: dict[int, int] = {}
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, *vals = line.split()
                if name.startswith("cpu") and name[3:].isdigit():
                    user, nice, system = int(vals[0]), int(vals[1]), int(vals[2])
                    steal = int(vals[7]) if len(vals) > 7 else 0
                    busy[int(name[3:])] = user + nice + system + steal
        return cls(busy)

    def since(self, earlier: CpuSample) -> dict[int, int]:
        return {cpu: n - earlier.busy.get(cpu, 0) for cpu, n in self.busy.items()}
