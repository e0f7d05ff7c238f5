"""Better verdicts: the sequential error gate and the comparison gate, as pure functions
on counts the test makes, and through the state machine."""

from __future__ import annotations

import json
import random

import pytest

from canary.engine import decide
from canary.gates import sequential
from canary.gates.evaluate import judge_compare
from canary.model import Phase, Reading, Readings, Verdict
from canary.policy import Gate, NoData, Policy, Stage, parse

GATE = sequential.ErrorGate(tolerance=1.0, alpha=0.01)


def run(p_stable: float, p_canary: float, *, rps: float, weights: list[int], seconds: int = 15,
        intervals: int = 80, seed: int = 0, gate: sequential.ErrorGate = GATE) -> tuple[str, int]:
    """Feed `intervals` scrapes of cumulative counters; return the last verdict and when
    the gate fired (-1 if never)."""
    rng = random.Random(seed)
    counts = {"canary_requests": 0.0, "canary_errors": 0.0, "stable_requests": 0.0,
              "stable_errors": 0.0}
    state = sequential.State()
    verdict = ""
    for i in range(intervals):
        w = weights[min(i * len(weights) // intervals, len(weights) - 1)] / 100
        n = rps * seconds
        n_c = sum(1 for _ in range(int(n)) if rng.random() < w)
        n_s = int(n) - n_c
        counts["canary_requests"] += n_c
        counts["stable_requests"] += n_s
        counts["canary_errors"] += sum(1 for _ in range(n_c) if rng.random() < p_canary)
        counts["stable_errors"] += sum(1 for _ in range(n_s) if rng.random() < p_stable)
        out = sequential.update(gate, state, dict(counts))
        state, verdict = out.state, out.verdict
        if verdict == "fail":
            return verdict, i
    return verdict, -1


def test_healthy_canaries_are_rarely_rolled_back_whatever_the_split():
    fired = sum(run(0.01, 0.01, rps=20, weights=[5, 25, 50, 100], seed=s)[1] >= 0
                for s in range(150))
    assert fired <= 3, f"{fired} of 150 healthy runs rolled back (alpha 0.01)"


def test_a_five_fold_regression_is_caught_within_a_few_intervals():
    for seed in range(5):
        verdict, at = run(0.01, 0.05, rps=20, weights=[25], seed=seed)
        assert verdict == "fail" and 0 <= at <= 12, (seed, at)


def test_a_failure_that_starts_late_is_caught_as_fast_as_an_early_one():
    rng_counts = {"canary_requests": 0.0, "canary_errors": 0.0, "stable_requests": 0.0,
                  "stable_errors": 0.0}
    state = sequential.State()
    rng = random.Random(3)
    for i in range(400):  # 100 healthy minutes, then the canary breaks
        bad = i >= 400 - 40
        n_c, n_s = 75, 225
        rng_counts["canary_requests"] += n_c
        rng_counts["stable_requests"] += n_s
        rng_counts["canary_errors"] += sum(rng.random() < (0.05 if bad else 0.01)
                                           for _ in range(n_c))
        rng_counts["stable_errors"] += sum(rng.random() < 0.01 for _ in range(n_s))
        out = sequential.update(GATE, state, dict(rng_counts))
        state = out.state
        if out.verdict == "fail":
            assert bad and i - 360 <= 15, i
            return
    pytest.fail("the late failure was never caught")


def test_low_traffic_is_inconclusive_not_a_pass_nor_a_rollback():
    verdict, at = run(0.005, 0.005, rps=0.5, weights=[5], intervals=20)
    assert (verdict, at) == ("inconclusive", -1)


def test_a_crash_is_caught_by_the_hard_guard_on_the_first_interval():
    state = sequential.State()
    out = sequential.update(GATE, state, {"canary_requests": 0, "canary_errors": 0,
                                          "stable_requests": 0, "stable_errors": 0})
    out = sequential.update(GATE, out.state, {"canary_requests": 40, "canary_errors": 35,
                                              "stable_requests": 400, "stable_errors": 2})
    assert out.verdict == "fail" and "hard guard" in out.detail


def test_counter_resets_are_not_mistaken_for_traffic():
    state = sequential.State(last={"canary_requests": 1000, "canary_errors": 10,
                                   "stable_requests": 9000, "stable_errors": 90})
    out = sequential.update(GATE, state, {"canary_requests": 30, "canary_errors": 0,
                                          "stable_requests": 9300, "stable_errors": 93})
    assert out.state.stage["n_c"] == 30 and out.state.stage["e_c"] == 0  # restarted at 0


def test_the_evidence_survives_a_restart():
    _, _ = run(0.01, 0.02, rps=20, weights=[25], intervals=10)
    state = sequential.State(last={"canary_requests": 10, "canary_errors": 0,
                                   "stable_requests": 10, "stable_errors": 0}, t=3,
                             s=[0.5] * len(sequential.GRID), stage={"n_c": 5.0})
    again = sequential.State.from_json(json.loads(json.dumps(state.to_json())))
    assert again == state


def test_compare_gate_judges_canary_against_stable():
    g = Gate(name="lat", kind="compare", query="q{{ version }}", max_increase=0.05,
             max_ratio=1.5)
    assert judge_compare(g, 0.30, 0.28).verdict is Verdict.PASS
    assert judge_compare(g, 0.40, 0.28).verdict is Verdict.FAIL
    assert judge_compare(g, 0.02, 0.0).verdict is Verdict.PASS  # within max_increase
    assert judge_compare(g, None, 0.3).verdict is Verdict.NO_DATA
    only_ratio = Gate(name="e", kind="compare", query="q{{ version }}", max_ratio=2)
    assert judge_compare(only_ratio, 0.01, 0.0).verdict is Verdict.FAIL


POLICY = """\
name: seq
interval: 15s
stages:
  - {weight: 5, hold: 1m}
  - {weight: 100, hold: 1m}
gates:
  - name: errors
    kind: errors
    requests: sum(http_requests_total{version="{{ version }}"})
    errors: sum(http_requests_total{version="{{ version }}",code=~"5.."}) or vector(0)
    alpha: 0.01
    tolerance: 1.2
  - name: p99-vs-stable
    kind: compare
    query: histogram_quantile(0.99, sum by (le) (rate(h_bucket{version="{{ version }}"}[1m])))
    max_ratio: 1.5
"""


def test_sequential_and_compare_gates_in_a_policy(tmp_path):
    pol = parse(POLICY, file="seq.yaml", default_name="seq")
    errors = pol.gates[0]
    assert (errors.kind, errors.tolerance, errors.alpha) == ("errors", 1.2, 0.01)
    assert "stable_version" in pol.template_names()
    from canary.policy import from_dict

    assert from_dict(pol.to_dict()) == pol


@pytest.mark.parametrize("text,words", [
    (POLICY.replace("    alpha: 0.01\n", "    alpha: 0.7\n"), "alpha: must be between 0 and 0.5"),
    (POLICY.replace('requests: sum(http_requests_total{version="{{ version }}"})',
                    "requests: sum(http_requests_total)"), "use {{ version }}"),
    (POLICY.replace("    max_ratio: 1.5\n", ""), "needs max_increase or max_ratio"),
    (POLICY.replace("kind: errors", "kind: magic"), "must be one of threshold, compare, errors"),
])
def test_bad_sequential_and_compare_gates_are_reported(text, words):
    from canary.errors import ValidationFailed

    with pytest.raises(ValidationFailed) as e:
        parse(text, file="seq.yaml", default_name="seq")
    assert words in str(e.value)


def test_a_sequential_failure_rolls_back_at_once_and_inconclusive_holds():
    pol = Policy(name="p", interval=15, failure_limit=3, no_data=NoData.PASS,
                 progress_deadline=3600, stages=(Stage(10, 30), Stage(100, 30)),
                 gates=(Gate(name="errors", kind="errors", requests="r{{ version }}",
                             errors="e{{ version }}"),))
    now = 1000.0
    r = decide.start(rollout_id="r", target="t", policy=pol, canary_version="v2",
                     stable_version="v1", now=now, actor="a")
    r = decide.applied(r, 10, now)

    def feed(r, counts, now):
        rd = Readings(now, r.stage, (Reading("errors", Verdict.PENDING, raw=counts),))
        return decide.tick(decide.readings(r, pol, rd, now), pol, now)

    r = feed(r, {"canary_requests": 0, "canary_errors": 0, "stable_requests": 0,
                 "stable_errors": 0}, now + 15)
    r = feed(r, {"canary_requests": 3, "canary_errors": 0, "stable_requests": 27,
                 "stable_errors": 0}, now + 45)
    assert r.state is Phase.PROGRESSING and r.gates[0].status is Verdict.INCONCLUSIVE
    assert r.stage == 0, "no_data: pass does not make an inconclusive gate pass"
    r = feed(r, {"canary_requests": 60, "canary_errors": 40, "stable_requests": 600,
                 "stable_errors": 1}, now + 60)
    assert r.state is Phase.ROLLING_BACK and r.weight == 0 and "gate errors" in r.reason


def test_warmup_ignores_a_slow_start_but_judges_what_follows():
    gate = sequential.ErrorGate(tolerance=1.2, alpha=0.01, warmup=120)
    state = sequential.State()
    counts = {"canary_requests": 0.0, "canary_errors": 0.0, "stable_requests": 0.0,
              "stable_errors": 0.0}
    verdicts = []
    for i in range(40):
        slow = 0.9 if i < 6 else 0.02  # most canary requests slow while it warms up
        counts["canary_requests"] += 300
        counts["canary_errors"] += 300 * slow
        counts["stable_requests"] += 900
        counts["stable_errors"] += 900 * 0.02
        out = sequential.update(gate, state, dict(counts), now=15.0 * i)
        state = out.state
        verdicts.append(out.verdict)
    assert "fail" not in verdicts and verdicts[-1] == "pass"
    assert verdicts[1] == "inconclusive" and "warming up" in sequential.update(
        gate, sequential.State(last={"canary_requests": 1}, first_at=0.0),
        dict(counts), now=1.0).detail
