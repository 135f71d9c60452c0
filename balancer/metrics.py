"""Prometheus metrics, read from the live objects at scrape time.

Nothing here runs on the request path: the pool and the backends keep plain integer counters
(``requests_by_class``, ``errors``, ``latency_counts``, ``rejected``…) and this collector turns
them into metric families only when ``/metrics`` is scraped. The collector lives in its own
``CollectorRegistry`` (no process-global state, so tests and several apps in one process do not
collide).

The names below are a contract: dashboards and ``config/alerts.yml`` use them. Everything is a
plain counter or gauge labelled by ``pool`` and ``backend`` (the backend's configured name), so
the series of several worker processes can be summed; the one exception,
``balancer_backend_traffic_share``, is a ratio that a multi-process setup recomputes from
``balancer_requests_total``. Counters belong to the Backend object, which the app keeps across
reloads for a server that stays, so they never restart on a reload.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from balancer.appview import AppView, ClientSideView
from balancer.backend import LATENCY_BUCKETS
from balancer.monitor import Monitor
from balancer.pool import Pool

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Status classes as ``requests_by_class`` indexes them (index 0: no valid status).
CODE_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")

#: Error kinds always exported (at 0 until they happen), so that rate() works from the start.
ERROR_KINDS = {"connect": 0, "timeout": 0, "reset": 0, "protocol": 0}

_BUCKET_BOUNDS = [repr(float(b)) for b in LATENCY_BUCKETS] + ["+Inf"]


class BalancerCollector(Collector):
    """Reads ``app.pools``, ``app.reloads`` and the monitor's window whenever it is collected.

    ``app`` is read afresh on every scrape (balancer/appview.py), so a reload that swaps
    ``app.pools`` is seen at once. A scrape reads only: it changes no pool's state.
    """

    def __init__(self, app: AppView, monitor: Monitor | None = None) -> None:
        self.app = app
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        pools: Mapping[str, Pool] = self.app.pools
        yield from self._backend_metrics(pools.values())
        yield from self._pool_metrics(pools.values())
        reloads = CounterMetricFamily("balancer_config_reloads",
                                      "Config reloads, by result (applied or refused).",
                                      labels=["result"])
        counts = self.app.reloads
        for result in ("applied", "refused"):
            reloads.add_metric([result], counts.get(result, 0))
        yield reloads
        yield CounterMetricFamily(
            "balancer_config_rollbacks",
            "Applied reloads undone automatically during their probation because a changed "
            "pool became concentrated (the log line 'reload rolled back' says why).",
            value=self.app.rollbacks)
        probation = self.app.probation
        yield GaugeMetricFamily("balancer_config_probation",
                                "1 while the last applied reload is on probation.",
                                value=1 if probation else 0)
        yield GaugeMetricFamily("balancer_start_time_seconds",
                                "When this balancer process started (unix time).",
                                value=self.app.started_at)
        state = self.app.state  # the client side (balancer/proxy.py)
        if state is not None:
            yield from _client_metrics(state)
        # balancer run --workers N (balancer/supervisor.py); one process is worker 0, up.
        yield from _worker_metrics(self.app.workers or ({"worker": 0, "up": 1, "restarts": 0},))

    # --- per backend ---------------------------------------------------------------------

    def _backend_metrics(self, pools: Iterable[Pool]) -> Iterator[Metric]:
        lb = ["pool", "backend"]
        requests = CounterMetricFamily(
            "balancer_requests", "Requests answered by each backend, by status class.",
            labels=lb + ["code"])
        duration = HistogramMetricFamily(
            "balancer_request_duration_seconds",
            "Upstream time of each answered request: from sending it to the response head.",
            labels=lb)
        in_flight = GaugeMetricFamily("balancer_backend_in_flight",
                                      "Requests in flight to each backend now.", labels=lb)
        up = GaugeMetricFamily("balancer_backend_up",
                               "1 while the backend is in rotation, 0 while it is out "
                               "(failed health checks, ejected or draining).", labels=lb)
        share = GaugeMetricFamily(
            "balancer_backend_traffic_share",
            "Share of its pool's requests the backend took over the live window "
            "(guard.live_window, default 60s).", labels=lb)
        errors = CounterMetricFamily("balancer_upstream_errors",
                                     "Failed upstream attempts, by kind (connect, timeout, "
                                     "reset, ...).", labels=lb + ["kind"])
        retries = CounterMetricFamily("balancer_upstream_retries",
                                      "Requests that failed on the backend before any byte of "
                                      "the answer reached the client, and were sent to another "
                                      "backend.", labels=lb)
        weight = GaugeMetricFamily("balancer_backend_weight", "Configured weight.", labels=lb)
        limit = GaugeMetricFamily("balancer_backend_max_connections",
                                  "Configured in-flight limit (absent when unlimited).",
                                  labels=lb)
        ejections = CounterMetricFamily("balancer_backend_ejections",
                                        "Times passive health ejected the backend.", labels=lb)
        state = GaugeMetricFamily("balancer_backend_state",
                                  "1 for the backend's current state (up, down, ejected, backup).",
                                  labels=lb + ["state"])
        for pool in pools:
            now = pool.clock()
            shares = self.monitor.shares(pool.name) if self.monitor is not None else {}
            for b in pool.backends:
                lv = [pool.name, b.name]
                for i, n in enumerate(b.requests_by_class):
                    if i or n:  # "other" only when it happened
                        requests.add_metric(lv + [CODE_CLASSES[i]], n)
                cumulative, buckets = 0, []
                for bound, n in zip(_BUCKET_BOUNDS, b.latency_counts):
                    cumulative += n
                    buckets.append((bound, cumulative))
                duration.add_metric(lv, buckets, b.latency_sum)
                in_flight.add_metric(lv, b.in_flight)
                up.add_metric(lv, 1 if b.available(now) else 0)
                share.add_metric(lv, shares.get(b.key, 0.0))
                for kind, n in sorted({**ERROR_KINDS, **b.errors}.items()):
                    errors.add_metric(lv + [kind], n)
                retries.add_metric(lv, b.retries)
                weight.add_metric(lv, b.weight)
                if b.max_connections is not None:
                    limit.add_metric(lv, b.max_connections)
                ejections.add_metric(lv, b.ejections)
                state.add_metric(lv + [b.state(now)], 1)
        yield from (requests, duration, in_flight, up, share, errors, retries, weight, limit,
                    ejections, state)

    # --- per pool ------------------------------------------------------------------------

    def _pool_metrics(self, pools: Iterable[Pool]) -> Iterator[Metric]:
        rejected = CounterMetricFamily(
            "balancer_rejected_requests",
            "Requests the balancer answered itself because no backend could take them, by "
            "reason (no_backend, overload).", labels=["pool", "reason"])
        concentrated = GaugeMetricFamily(
            "balancer_pool_concentrated",
            "1 while one backend takes more than max_share + live_margin of the pool's live "
            "traffic, while fewer than guard.min_backends backends are in rotation (health "
            "checks, ejection), or while DNS discovery keeps the pool's last good set because "
            "the guard refused the new one.", labels=["pool"])
        too_few = GaugeMetricFamily(
            "balancer_pool_too_few_in_rotation",
            "1 while a pool configured with at least guard.min_backends distinct active "
            "backends has fewer than that in rotation (down, ejected or draining).",
            labels=["pool"])
        panic = GaugeMetricFamily(
            "balancer_pool_panic",
            "1 while too few backends are healthy (panic_threshold) and traffic is spread over "
            "all of them.", labels=["pool"])
        waiting = GaugeMetricFamily("balancer_pool_queue_waiting",
                                    "Requests waiting for a backend below max_connections.",
                                    labels=["pool"])
        window = GaugeMetricFamily("balancer_pool_window_requests",
                                   "Requests of the pool in the live traffic-share window.",
                                   labels=["pool"])
        for pool in pools:
            _, _, in_panic = pool.judge(pool.clock())  # judged now, not recorded
            for reason, n in sorted(pool.rejected.items()):
                rejected.add_metric([pool.name, reason], n)
            conc = self.monitor.concentration(pool.name) if self.monitor is not None else None
            refused = pool.discovery_refused
            concentrated.add_metric([pool.name], 1 if conc is not None or refused else 0)
            too_few.add_metric([pool.name],
                               1 if conc is not None and conc.cause == "rotation" else 0)
            panic.add_metric([pool.name], 1 if in_panic else 0)
            waiting.add_metric([pool.name], pool.waiting)
            if self.monitor is not None:
                window.add_metric([pool.name], self.monitor.window_requests(pool.name))
        yield from (rejected, concentrated, too_few, panic, waiting, window)


def _client_metrics(state: ClientSideView) -> Iterator[Metric]:
    """Client connections: open, cut off by a timeout (slowclients.py), turned away."""
    yield GaugeMetricFamily("balancer_client_connections", "Open client connections.",
                            value=len(state.connections))
    timeouts = CounterMetricFamily(
        "balancer_client_timeouts", "Client connections cut off, by the timeout that fired "
        "(header, body, keepalive, send).", labels=["timeout"])
    for kind, n in state.timers.fired.items():
        timeouts.add_metric([kind], n)
    yield timeouts
    yield CounterMetricFamily("balancer_client_connections_refused",
                              "Client connections answered 503 because max_clients was reached.",
                              value=state.turned_away)


def _worker_metrics(workers: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
    """One series per worker process: up or not, and how often it was started again."""
    up = GaugeMetricFamily("balancer_worker_up", "1 while the worker process serves.",
                           labels=["worker"])
    restarts = CounterMetricFamily("balancer_worker_restarts",
                                   "Times the worker process exited and was started again.",
                                   labels=["worker"])
    for w in workers:
        up.add_metric([str(w["worker"])], 1 if w["up"] else 0)
        restarts.add_metric([str(w["worker"])], w["restarts"])
    yield from (up, restarts)


def build_registry(app: AppView, monitor: Monitor | None = None) -> CollectorRegistry:
    """A fresh registry holding only the balancer's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BalancerCollector(app, monitor))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format."""
    return generate_latest(registry)
