"""A rollout's reading history: every gate's readings and every weight in force, over the
rollout's life (GET /api/v1/rollouts/{id}/readings), bounded for long rollouts.

Pure: the controller turns each saved change into points (`points`), the stores keep them
beside the rollout (same SQLite transaction; a ConfigMap of their own in Kubernetes) and
thin them with `thin`, and the API shapes them with `view`.

Downsampling rule: each series (one gate, or the weight) keeps at most `MAX_POINTS`
points. When a series grows past it, its newest `RECENT` points stay as they are, and
the older ones are cut to one per equal slice of their time span (half as many slices as
they have room for), keeping also the series' first point and every point whose verdict
differs from the one before it (a breach, a recovery). So old history is evenly spaced,
coarser the longer the rollout, and a verdict change is never thinned away.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from canary.model import Readings, Rollout, iso

MAX_POINTS = 600   # per series (a 30 s interval: 5 hours at full resolution)
RECENT = 200       # the newest points of a series, never thinned
MAX_DETAIL = 300   # characters of a reading's detail kept with it
WEIGHT = ""        # the series name of the weight (a gate's name is never empty)
COUNTS = ("canary_requests", "canary_errors", "stable_requests", "stable_errors")
_STAGE_KEYS = {"n_c": "canary_requests", "e_c": "canary_errors", "n_s": "stable_requests",
               "e_s": "stable_errors"}
RULE = (f"each series (a gate, or the weight) keeps at most {MAX_POINTS} points: past that, "
        f"its newest {RECENT} stay and older ones are cut to one per equal slice of their "
        "time span, keeping its first point and every change of verdict")

Point = dict[str, Any]


def _num(v: Any) -> float | None:
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def points(old: Rollout | None, new: Rollout, *, at: float, kinds: Mapping[str, str],
           bounds: Mapping[str, Mapping[str, float | None]] | None = None,
           rd: Readings | None = None) -> list[Point]:
    """What `new` adds to the history after `old`: a weight point when the weight the
    router carries (or the stage) changed, and a point per gate judged anew. `kinds` names
    each gate's kind; `bounds` a compare gate's max_increase / max_ratio; `rd` the raw
    readings the gates were judged from (a compare gate's stable value)."""
    out: list[Point] = []
    was = (old.applied_weight, old.stage) if old is not None else (None, None)
    # (a stage counts from when its weight is in force, not from when it was decided)
    if new.applied_weight is not None and (new.applied_weight, new.stage) != was and (
            new.applied_weight != was[0] or new.applied_weight == new.weight):
        out.append({"series": WEIGHT, "at": at, "weight": new.applied_weight,
                    "stage": new.stage})
    before = {g.name: g.at for g in old.gates} if old is not None else {}
    raw = {x.gate: x.raw for x in rd.items} if rd is not None else {}
    for g in new.gates:
        if g.at is None or before.get(g.name) == g.at:
            continue
        kind = kinds.get(g.name, "threshold")
        p: Point = {"series": g.name, "at": g.at, "kind": kind, "stage": new.stage,
                    "weight": new.applied_weight, "verdict": g.status.value,
                    "value": _num(g.value), "min": g.min, "max": g.max}
        if g.detail:
            p["detail"] = g.detail[:MAX_DETAIL]
        if kind == "compare":
            stable = _num((raw.get(g.name) or {}).get("stable"))
            p["stable"] = stable
            b = (bounds or {}).get(g.name) or {}
            limits = []
            if stable is not None and b.get("max_increase") is not None:
                limits.append(stable + float(b["max_increase"] or 0))
            if stable is not None and b.get("max_ratio") is not None:
                limits.append(stable * float(b["max_ratio"] or 0))
            p["bound"] = min(limits) if limits else None
        if kind == "errors" and g.state is not None:
            stage = g.state.get("stage") or {}
            for short, name in _STAGE_KEYS.items():
                p[name] = _num(stage.get(short))
        out.append(p)
    return out


def thin(series: Sequence[Point]) -> list[int]:
    """Indices (in `series`, oldest first) that the downsampling rule drops; none while
    the series holds at most MAX_POINTS."""
    if len(series) <= MAX_POINTS:
        return []
    old = len(series) - RECENT
    buckets = (MAX_POINTS - RECENT) // 2
    t0, t1 = float(series[0]["at"]), float(series[old - 1]["at"])
    width = (t1 - t0) / buckets or 1.0
    keep, pinned = {0}, set()
    seen: set[int] = set()
    for i in range(1, old):
        if series[i].get("verdict") != series[i - 1].get("verdict"):
            pinned.add(i)
        b = int((float(series[i]["at"]) - t0) / width)
        if b not in seen:
            seen.add(b)
            keep.add(i)
    if len(keep | pinned) + RECENT <= MAX_POINTS:  # (verdicts flapping: buckets only)
        keep |= pinned
    return [i for i in range(old) if i not in keep]


def view(r: Rollout, stored: Sequence[Point]) -> dict[str, Any]:
    """The API's form (canary.api.bodies.ReadingsView): the weight over time, and each
    gate's readings, oldest first; every time in ISO 8601."""
    weights = []
    gates: dict[str, dict[str, Any]] = {}
    for p in sorted(stored, key=lambda p: p["at"]):
        if p.get("series") == WEIGHT:
            weights.append({"at": iso(p["at"]), "weight": p["weight"], "stage": p["stage"]})
            continue
        name = p["series"]
        g = gates.setdefault(name, {"name": name, "kind": p.get("kind", "threshold"),
                                    "readings": []})
        item = {k: v for k, v in p.items() if k not in ("series", "kind")}
        item["at"] = iso(p["at"])
        g["readings"].append(item)
    return {"id": r.id, "state": r.state.value, "started_at": iso(r.started_at),
            "updated_at": iso(r.updated_at), "weights": weights, "gates": list(gates.values()),
            "downsampling": RULE}
