"""From measurements to the tables: medians over rounds, ratios to nginx in the same round.

Pure functions over plain records, so the arithmetic is tested without running anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median
from typing import Any

from bench.load import LoadResult

#: (name, path, connections): the loads every proxy gets, in this order, every round.
SCENARIOS: tuple[tuple[str, str, int], ...] = (
    ("small c64", "/", 64),
    ("small c8", "/", 8),
    ("64KiB c64", "/64k", 64),
)

#: A measurement with more than this fraction of a core used by foreign processes is re-run.
FOREIGN_LIMIT = 0.10


@dataclass
class Measurement:
    proxy: str
    scenario: str
    round: int
    load: LoadResult
    cpu_us_per_request: float
    foreign: dict[str, float]  # "proxy cpu" / "load cpu" → fraction of that core used by others
    attempts: int = 1
    #: Fraction of a core used by the proxy, and by the backend + load generator: a proxy
    #: well below 100% while the other side is at 100% was not the bottleneck.
    proxy_busy: float = 0.0
    load_busy: float = 0.0
    #: The part of the proxy's CPU time spent in the kernel (syscalls, TCP on loopback).
    system_share: float = 0.0
    #: Worker processes / threads of the proxy (run.py --workers); 1: one core.
    workers: int = 1

    @property
    def disturbed(self) -> bool:
        return max(self.foreign.values(), default=0.0) > FOREIGN_LIMIT


@dataclass
class Summary:
    proxy: str
    scenario: str
    rps: float
    ratio: float | None
    #: nginx's CPU per request ÷ this proxy's, same round: the share of nginx's capacity this
    #: proxy reaches on one saturated core (steadier than requests/s on a shared machine).
    cpu_ratio: float | None
    p50_ms: float
    p99_ms: float
    cpu_us: float
    errors: int
    foreign_max: float
    disturbed_rounds: int
    proxy_busy: float = 0.0
    load_busy: float = 0.0
    system_share: float = 0.0


@dataclass
class Results:
    measurements: list[Measurement] = field(default_factory=list)
    peak_rss_kib: dict[str, int] = field(default_factory=dict)
    idle_bytes: dict[str, float] = field(default_factory=dict)


def summarise(ms: list[Measurement], reference: str = "nginx") -> list[Summary]:
    """One line per (scenario, proxy): medians over rounds; ratio = median of same-round ratios."""
    by_key: dict[tuple[str, str], list[Measurement]] = {}
    for m in ms:
        by_key.setdefault((m.scenario, m.proxy), []).append(m)
    ref = {(m.scenario, m.round): m.load.rps for m in ms if m.proxy == reference}
    ref_cpu = {(m.scenario, m.round): m.cpu_us_per_request for m in ms if m.proxy == reference}
    out: list[Summary] = []
    for (scenario, proxy), group in by_key.items():
        ratios = [m.load.rps / ref[(scenario, m.round)] for m in group
                  if ref.get((scenario, m.round))]
        cpu_ratios = [ref_cpu[(scenario, m.round)] / m.cpu_us_per_request for m in group
                      if ref_cpu.get((scenario, m.round)) and m.cpu_us_per_request]
        out.append(Summary(
            proxy=proxy, scenario=scenario,
            rps=median(m.load.rps for m in group),
            ratio=median(ratios) if ratios else None,
            cpu_ratio=median(cpu_ratios) if cpu_ratios else None,
            p50_ms=median(m.load.p50_ms for m in group),
            p99_ms=median(m.load.p99_ms for m in group),
            cpu_us=median(m.cpu_us_per_request for m in group),
            errors=sum(m.load.errors + m.load.non2xx for m in group),
            foreign_max=max(max(m.foreign.values(), default=0.0) for m in group),
            disturbed_rounds=sum(m.disturbed for m in group),
            proxy_busy=median(m.proxy_busy for m in group),
            load_busy=median(m.load_busy for m in group),
            system_share=median(m.system_share for m in group),
        ))
    order = {name: i for i, (name, _, _) in enumerate(SCENARIOS)}
    run_order = {proxy: i for i, proxy in enumerate(dict.fromkeys(m.proxy for m in ms))}
    out.sort(key=lambda s: (order.get(s.scenario, 99), s.proxy != reference, run_order[s.proxy]))
    return out


def scaling_table(ms: list[Measurement]) -> str:
    """Per proxy and load: requests/s with N workers ÷ with one, median of same-round ratios."""
    base = {(m.proxy, m.scenario, m.round): m.load.rps for m in ms if m.workers == 1}
    ratios: dict[tuple[str, str, int], list[float]] = {}
    for m in ms:
        if m.workers > 1:
            one = base.get((m.proxy.rsplit("×", 1)[0], m.scenario, m.round))
            if one:
                key = (m.proxy.rsplit("×", 1)[0], m.scenario, m.workers)
                ratios.setdefault(key, []).append(m.load.rps / one)
    rows = [[proxy, scenario, f"1 → {n}", f"{median(r):.2f}", str(len(r))]
            for (proxy, scenario, n), r in ratios.items()]
    return _table(["proxy", "load", "workers", "requests/s ratio", "rounds"], rows)


def load_results(raw: dict[str, Any]) -> Results:
    """Results back from the JSON run.py writes (``--report FILE`` re-prints its tables)."""
    ms = []
    for m in raw["measurements"]:
        fields = dict(m)
        fields["load"] = LoadResult(**fields["load"])
        ms.append(Measurement(**fields))
    return Results(ms, dict(raw.get("peak_rss_kib", {})), dict(raw.get("idle_bytes", {})))


def _table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _ratio(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "—"


def detail_table(summaries: list[Summary]) -> str:
    rows = [[s.scenario, s.proxy, f"{s.rps:,.0f}", _ratio(s.ratio), _ratio(s.cpu_ratio),
             f"{s.p50_ms:.2f}", f"{s.p99_ms:.2f}",
             f"{s.cpu_us:.1f} ({s.system_share:.0%} kernel)",
             f"{s.proxy_busy:.0%} / {s.load_busy:.0%}", str(s.errors),
             f"{s.foreign_max:.0%}" + (f" ({s.disturbed_rounds} disturbed)"
                                       if s.disturbed_rounds else "")]
            for s in summaries]
    return _table(["load", "proxy", "requests/s", "ratio to nginx", "CPU ratio", "p50 ms",
                   "p99 ms",
                   "CPU µs/request", "core busy: proxy / backend+load", "errors",
                   "foreign CPU (max)"], rows)


def headline_table(summaries: list[Summary], results: Results) -> str:
    """The shape of BENCHMARKING.md's reference table: ratios per load, CPU, memory."""
    proxies = list(dict.fromkeys(s.proxy for s in summaries))
    cell = {(s.proxy, s.scenario): s for s in summaries}
    rows = []
    for proxy in proxies:
        row = [proxy]
        for name, _, _ in SCENARIOS:
            s = cell.get((proxy, name))
            if s is None:
                row.append("—")
            elif s.ratio is None:
                row.append(f"{s.rps:,.0f} rps")
            else:
                row.append(f"{s.ratio:.2f} / {_ratio(s.cpu_ratio)} ({s.rps:,.0f} rps)")
        first = cell.get((proxy, SCENARIOS[0][0]))
        row.append(f"{first.cpu_us:.1f}" if first else "—")
        row.append(f"{first.p99_ms:.2f}" if first else "—")
        rss = results.peak_rss_kib.get(proxy)
        row.append(f"{rss / 1024:.1f}" if rss else "—")
        idle = results.idle_bytes.get(proxy)
        row.append(f"{idle:,.0f}" if idle is not None else "—")
        rows.append(row)
    return _table(["proxy", *(f"{name}: rps ratio / CPU ratio" for name, _, _ in SCENARIOS),
                   f"CPU µs/req ({SCENARIOS[0][0]})", f"p99 ms ({SCENARIOS[0][0]})",
                   "peak RSS MiB", "bytes / idle conn"], rows)
