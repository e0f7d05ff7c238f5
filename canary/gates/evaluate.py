"""Numbers -> verdicts. Pure: the source measures, this judges."""

from __future__ import annotations

import math

from canary.model import Reading, Verdict
from canary.policy import Gate


def judge(gate: Gate, value: float | None, *, error: str | None = None) -> Reading:
    if error is not None:
        return Reading(gate=gate.name, verdict=Verdict.ERROR, detail=error)
    if value is None:
        return Reading(gate=gate.name, verdict=Verdict.NO_DATA, detail="query returned no sample")
    if math.isnan(value):
        return Reading(gate=gate.name, verdict=Verdict.NO_DATA,
                       detail="query returned NaN (no traffic in the window?)")
    too_high = gate.max is not None and value > gate.max
    too_low = gate.min is not None and value < gate.min
    return Reading(gate=gate.name, verdict=Verdict.FAIL if too_high or too_low else Verdict.PASS,
                   value=value)
