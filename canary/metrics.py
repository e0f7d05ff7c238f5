"""The controller's own metrics, in its own registry (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from canary.model import Rollout


class Metrics:
    def __init__(self) -> None:
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
        if r.state.final:
            for g in (self.weight, self.applied, self.stage):
                try:
                    g.remove(*labels)
                except KeyError:
                    pass
            for gate in r.gates:
                try:
                    self.gate_value.remove(r.target, r.id, gate.name)
                except KeyError:
                    pass
            return
        self.weight.labels(*labels).set(r.weight)
        if r.applied_weight is not None:
            self.applied.labels(*labels).set(r.applied_weight)
        self.stage.labels(*labels).set(r.stage)
        for gate in r.gates:
            if gate.value is not None:
                self.gate_value.labels(r.target, r.id, gate.name).set(gate.value)
