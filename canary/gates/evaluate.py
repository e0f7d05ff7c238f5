"""Numbers -> verdicts. Pure: the source measures, this judges."""

from __future__ import annotations

import math

from canary.gates.kinds import CompareGate, ThresholdGate
from canary.model import Reading, Verdict


def judge(gate: ThresholdGate, value: float | None, *, error: str | None = None) -> Reading:
    if error is not None:
        return Reading(gate=gate.name, verdict=Verdict.ERROR, detail=error)
    if value is None:
        return Reading(gate=gate.name, verdict=Verdict.NO_DATA, detail="query returned no sample")
    if math.isnan(value):
        return Reading(gate=gate.name, verdict=Verdict.NO_DATA,
                       detail="query returned NaN (no traffic in the window?)")
    if math.isinf(value):
        # never judged against a bound: +Inf would pass any `min`, -Inf any `max`
        return Reading(gate=gate.name, verdict=Verdict.NO_DATA, detail=_infinite(value))
    too_high = gate.max is not None and value > gate.max
    too_low = gate.min is not None and value < gate.min
    return Reading(gate=gate.name, verdict=Verdict.FAIL if too_high or too_low else Verdict.PASS,
                   value=value)


def _infinite(value: float) -> str:
    return (f"the query returned {'+' if value > 0 else '-'}Inf (a division by zero?); "
            "read as no data, so the policy's no_data decides")


def judge_compare(gate: CompareGate, canary: float | None, stable: float | None, *,
                  error: str | None = None) -> Reading:
    """Canary against stable: fails when canary - stable > max_increase, or canary /
    stable > max_ratio (with stable at 0, any canary value above 0 breaks a ratio)."""
    if error is not None:
        return Reading(gate=gate.name, verdict=Verdict.ERROR, detail=error)
    if canary is None or stable is None or math.isnan(canary) or math.isnan(stable):
        side = "canary" if canary is None or math.isnan(canary) else "stable"
        return Reading(gate=gate.name, verdict=Verdict.NO_DATA,
                       detail=f"no sample for {side}")
    if math.isinf(canary) or math.isinf(stable):
        side, value = ("canary", canary) if math.isinf(canary) else ("stable", stable)
        return Reading(gate=gate.name, verdict=Verdict.NO_DATA,
                       detail=f"{side}: {_infinite(value)}")
    bad = []
    if gate.max_increase is not None and canary - stable > gate.max_increase:
        bad.append(f"{canary - stable:.4g} above stable, more than {gate.max_increase:g}")
    if gate.max_ratio is not None:
        if stable > 0 and canary / stable > gate.max_ratio:
            bad.append(f"{canary / stable:.3g}x stable, more than {gate.max_ratio:g}x")
        elif stable <= 0 < canary and gate.max_increase is None:
            bad.append("above 0 while stable is 0")
    detail = f"stable {stable:.6g}" + (f"; {'; '.join(bad)}" if bad else "")
    # (raw: both sides, for the reading history's plot of canary against stable)
    return Reading(gate=gate.name, verdict=Verdict.FAIL if bad else Verdict.PASS, value=canary,
                   detail=detail, raw={"canary": canary, "stable": stable})
