"""The controller's own metrics, in its own registry (served at /metrics).

A finished rollout's series are kept `RETAIN` seconds after it ends (its last gate
values, and `canary_rollout_finished_timestamp_seconds` with the outcome), so a scrape
every 15-30 s sees the reading that breached, and a dashboard can show it afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from canary.model import Phase, Rollout, Verdict

RETAIN = 900.0  # seconds a finished rollout's series stay exported


class Metrics:
    def __init__(self, *, retain: float = RETAIN,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.retain, self._clock = retain, clock
        self._ended: dict[tuple[str, str], tuple[float, tuple[str, ...], str]] = {}
        self._lock = threading.Lock()  # (observed on the control loop, scraped on the API's)
        self.registry = CollectorRegistry()
        self.weight = Gauge("canary_rollout_weight_percent",
                            "Canary weight canary wants in force, per active rollout",
                            ["target", "rollout"], registry=self.registry)
        self.applied = Gauge("canary_rollout_applied_weight_percent",
                             "Canary weight the router is known to carry",
                             ["target", "rollout"], registry=self.registry)
        self.stage = Gauge("canary_rollout_stage", "Current stage index",
                           ["target", "rollout"], registry=self.registry)
        self.gate_value = Gauge("canary_gate_value", "Latest value of a gate's query",
                                ["target", "rollout", "gate"], registry=self.registry)
        self.verdicts = Counter("canary_gate_verdicts", "Gate evaluations by verdict",
                                ["target", "gate", "verdict"], registry=self.registry)
        self.outcomes = Counter("canary_rollouts_finished", "Rollouts ended, by outcome",
                                ["target", "outcome"], registry=self.registry)
        self.started = Counter("canary_rollouts_started", "Rollouts started",
                               ["target"], registry=self.registry)
        self.active = Gauge("canary_rollouts_active", "Rollouts not yet final",
                            registry=self.registry)
        self.eval_delay = Histogram(
            "canary_evaluation_delay_seconds",
            "How late a gate evaluation started against its planned time",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.missed = Counter("canary_missed_intervals",
                              "Evaluations that started more than one interval late",
                              registry=self.registry)
        self.store_failures = Counter(
            "canary_store_failures", "State store operations that failed (full, read-only, "
            "corrupt, deleted or unreachable store)", registry=self.registry)
        self.store_writable = Gauge("canary_store_writable",
                                    "1 while the state store accepts writes, else 0",
                                    registry=self.registry)
        self.store_writable.set(1)
        self.router_errors = Counter("canary_router_errors", "Failed router operations",
                                     ["target"], registry=self.registry)
        self.finished_at = Gauge(
            "canary_rollout_finished_timestamp_seconds",
            "When a rollout ended (Unix time), by outcome; kept for a while after it ends, "
            "beside its last canary_gate_value", ["target", "rollout", "outcome"],
            registry=self.registry)
        self.gate_failing = Gauge(
            "canary_gate_failing",
            "1 while a gate's latest verdict is fail, else 0; kept for a while after the "
            "rollout ends, so the breaching gate can be shown afterwards",
            ["target", "rollout", "gate"], registry=self.registry)
        self.paused_since = Gauge(
            "canary_rollout_paused_since_timestamp_seconds",
            "When a paused rollout was paused (Unix time); absent while it is not paused",
            ["target", "rollout"], registry=self.registry)
        self.api_refused = Counter("canary_api_refused",
                                   "API requests answered 503 because too many of their "
                                   "kind (read, write) were in flight", ["kind"],
                                   registry=self.registry)

        self.notify_sent = Counter("canary_notifications_sent",
                                   "Messages a notification receiver accepted (2xx)",
                                   ["receiver"], registry=self.registry)
        self.notify_failures = Counter("canary_notification_failures",
                                       "Delivery attempts that failed (an error status, no "
                                       "answer in time, no connection)", ["receiver"],
                                       registry=self.registry)
        self.notify_backlog = Gauge("canary_notification_backlog_rollouts",
                                    "Rollouts with messages not yet delivered to a receiver",
                                    ["receiver"], registry=self.registry)
        self.notify_dropped = Counter("canary_notifications_dropped",
                                      "Messages never delivered: the outbox bound was reached "
                                      "(the receiver was down too long)", ["receiver"],
                                      registry=self.registry)

    def observe(self, r: Rollout) -> None:
        labels = (r.target, r.id)
        self.expire()
        if r.paused_at is not None and r.state is Phase.PAUSED:
            self.paused_since.labels(*labels).set(r.paused_at)
        else:
            _remove(self.paused_since, *labels)
        for gate in r.gates:
            if gate.value is not None:
                self.gate_value.labels(r.target, r.id, gate.name).set(gate.value)
            if gate.status is not Verdict.PENDING:
                self.gate_failing.labels(r.target, r.id, gate.name).set(
                    1 if gate.status is Verdict.FAIL else 0)
        if r.state.final:
            for g in (self.weight, self.applied, self.stage):
                _remove(g, *labels)
            # the last gate values stay RETAIN seconds: a scrape must not miss the breach
            self.finished_at.labels(r.target, r.id, r.state.value).set(r.updated_at)
            with self._lock:
                self._ended[labels] = (self._clock() + self.retain,
                                       tuple(g.name for g in r.gates), r.state.value)
            return
        self.weight.labels(*labels).set(r.weight)
        if r.applied_weight is not None:
            self.applied.labels(*labels).set(r.applied_weight)
        self.stage.labels(*labels).set(r.stage)

    def expire(self) -> None:
        """Drop finished rollouts' series kept longer than RETAIN (at each save and each
        scrape)."""
        now = self._clock()
        with self._lock:
            gone = [(k, v) for k, v in self._ended.items() if v[0] <= now]
            for k, _ in gone:
                del self._ended[k]
        for (target, rid), (_, gates, outcome) in gone:
            _remove(self.finished_at, target, rid, outcome)
            for name in gates:
                _remove(self.gate_value, target, rid, name)
                _remove(self.gate_failing, target, rid, name)


def _remove(gauge: Gauge, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass
