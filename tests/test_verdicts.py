"""Better verdicts: the sequential error gate and the comparison gate, as pure functions
on counts the test makes, and through the state machine."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary.engine import decide
from canary.gates import sequential
from canary.gates.evaluate import judge_compare
from canary.gates.kinds import CompareGate, ErrorsGate
from canary.model import Phase, Reading, Readings, Verdict
from canary.policy import NoData, Policy, parse
from canary.stages import Stage

GATE = sequential.ErrorGate(tolerance=1.0, alpha=0.01)


def run(p_stable: float, p_canary: float, *, rps: float, weights: list[int], seconds: int = 15,
        intervals: int = 80, seed: int = 0, gate: sequential.ErrorGate = GATE,
        own_noise: float = 0.0, shared_noise: float = 0.0, canary_noise: float = 0.0,
        before_full: bool = False) -> tuple[str, int]:
    """Feed `intervals` scrapes of cumulative counters; return the last verdict and when
    the gate fired (-1 if never). own_noise: each version's error rate is multiplied by
    its own gamma shock of that variance every scrape (per-version overdispersion);
    canary_noise: the canary's alone (one canary pod, many stable ones)."""
    rng = random.Random(seed)

    def shock(var: float = own_noise) -> float:
        return rng.gammavariate(1 / var, var) if var else 1.0

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
        both = shock(shared_noise)
        q_c, q_s = p_canary * shock() * both * shock(canary_noise), p_stable * shock() * both
        counts["canary_errors"] += sum(1 for _ in range(n_c) if rng.random() < q_c)
        counts["stable_errors"] += sum(1 for _ in range(n_s) if rng.random() < q_s)
        out = sequential.update(gate, state, dict(counts), before_full=before_full)
        state, verdict = out.state, out.verdict
        if verdict == "fail":
            return verdict, i
    return verdict, -1


@pytest.mark.e2e
def test_healthy_canaries_are_rarely_rolled_back_whatever_the_split():
    fired = sum(run(0.01, 0.01, rps=20, weights=[5, 25, 50, 100], seed=s)[1] >= 0
                for s in range(150))
    assert fired <= 3, f"{fired} of 150 healthy runs rolled back (alpha 0.01)"


def test_a_five_fold_regression_is_caught_within_a_few_intervals():
    # 13-14 intervals at 20 requests/s (the bets allowing for wandering and shared bursts
    # together are linear in the canary's share of each interval's errors: they cannot
    # compound within an interval as a likelihood ratio does - 9-12 before)
    for seed in range(5):
        verdict, at = run(0.01, 0.05, rps=20, weights=[25], seed=seed)
        assert verdict == "fail" and 0 <= at <= 16, (seed, at)


def test_a_failure_that_starts_late_is_still_caught():
    # after 90 healthy minutes a 5x failure is caught in 28-36 intervals (seeds 3-8), not
    # the 13-14 of an early one: the change point's prior weight 1/(nu (nu + 1)) costs
    # log(nu^2) more evidence, and the linear bets earn at most ~0.7 a 15 s interval here
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
            assert bad and i - 360 <= 40, i
            return
    pytest.fail("the late failure was never caught")


@pytest.mark.e2e
def test_per_version_overdispersion_does_not_roll_back_healthy_canaries():
    # each version's error rate wanders on its own (+-55% per scrape) at 200 rps: the
    # binomial split alone would call that a difference; the spread stable shows tempers it
    fired = sum(run(0.005, 0.005, rps=200, weights=[5, 25, 50], intervals=60, seed=s,
                    own_noise=0.3)[1] >= 0 for s in range(100))
    assert fired <= 2, f"{fired} of 100 healthy, overdispersed runs rolled back"


@pytest.mark.e2e
def test_bursts_both_versions_share_do_not_roll_back_healthy_canaries():
    # a shared shock cancels out of the canary's share; the spread it puts into stable's
    # rate may slow the test down, never make it fire
    fired = sum(run(0.005, 0.005, rps=200, weights=[5, 25, 50], intervals=60, seed=s,
                    shared_noise=1.0)[1] >= 0 for s in range(100))
    assert fired <= 2, f"{fired} of 100 healthy runs with shared bursts rolled back"


@pytest.mark.e2e
def test_a_canary_that_wanders_more_than_stable_is_judged_by_its_own_spread():
    # one canary pod whose error rate swings +-100% from scrape to scrape, beside a
    # steady stable: on average no worse, so not to be rolled back. Judged by stable's
    # spread alone, 11 of these 100 runs were; with the canary's own, 3 (its first
    # intervals, before it has shown its spread - docs/verdicts.md)
    fired = sum(run(0.005, 0.005, rps=200, weights=[25, 50], intervals=60, seed=s,
                    canary_noise=1.0)[1] >= 0 for s in range(100))
    assert fired <= 5, f"{fired} of 100 healthy runs with a wandering canary rolled back"
    # ...while a canary failing 5x as often, wandering as much, is still caught
    for seed in range(3):
        verdict, at = run(0.005, 0.025, rps=200, weights=[25, 50], intervals=60, seed=seed,
                          canary_noise=1.0)
        assert verdict == "fail" and 0 <= at <= 30, (seed, at)


def test_overdispersion_still_lets_a_real_regression_through():
    for seed in range(3):
        verdict, at = run(0.005, 0.025, rps=200, weights=[25], intervals=60, seed=seed,
                          own_noise=0.3)
        assert verdict == "fail" and 0 <= at <= 20, (seed, at)


def test_the_tabulated_split_bounds_are_the_computed_ones():
    # the bound on a healthy canary's mean split (and on a canary at the margin's) that the
    # gate bets against is tabulated; recomputed here (a coarser grid) at a few splits, the
    # table is at least as cautious, and it is what wandering needs: with it zeroed,
    # per-version wandering and shared bursts together fire in 16.7% of 60 long runs at a
    # 5% share (docs/verdicts.md, `longrun --bare`)
    from bench.verdicts.split_bound import offsets

    for logit in (-6.0, -2.95, -1.1, 0.0, 1.6):
        pi_0 = 1 / (1 + np.exp(-logit))
        up, down = offsets(logit, n=300)
        hi, lo = sequential.split_bounds(float(pi_0))
        assert np.log(hi / (1 - hi)) - logit >= up - 0.002, (logit, up)
        assert np.log(lo / (1 - lo)) - logit <= down + 0.002, (logit, down)
        assert hi >= pi_0 >= lo
    # ...and so is each other `wander`'s table (variance: wander squared), the default's
    # the widest
    for wander in sequential.WANDERS:
        for logit in (-6.0, -2.95, -1.1, 0.0, 1.6):
            pi_0 = 1 / (1 + np.exp(-logit))
            up, down = offsets(logit, wander ** 2, n=300)
            hi, lo = sequential.split_bounds(float(pi_0), wander)
            assert np.log(hi / (1 - hi)) - logit >= up - 0.002, (wander, logit, up)
            assert np.log(lo / (1 - lo)) - logit <= down + 0.002, (wander, logit, down)
            assert sequential.split_bounds(float(pi_0))[0] >= hi >= pi_0 >= lo


def test_the_step_to_full_traffic_waits_for_evidence_the_canary_is_not_worse():
    # healthy up to 2x stable; before 100% it must be shown below 2 x 1.5 = 3x
    gate = sequential.ErrorGate(tolerance=2.0, alpha=0.01, final_gross=1.5)
    verdict, _ = run(0.01, 0.01, rps=40, weights=[50], intervals=60, gate=gate,
                     before_full=True)
    assert verdict == "pass"
    # a canary right at that margin is never waved through, however long it is watched
    # (the regression test, judging against 2x, may or may not catch it)
    held = [run(0.01, 0.03, rps=40, weights=[50], intervals=60, gate=gate, seed=s,
                before_full=True)[0] for s in range(10)]
    assert "pass" not in held, held


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
    # evidence stored by an older canary (no spread, no non-inferiority) still loads
    old = {k: v for k, v in state.to_json().items() if k not in ("ni", "disp")}
    assert sequential.State.from_json(old).s == state.s


def test_absolute_evidence_stored_before_the_change_point_mixture_loads_at_half_weight():
    # an older canary kept the absolute test as one product from the first interval; the
    # mixture weighs that start 1/2, so a stored product loads as its log less log 2
    old = {"t": 7, "ab": [3.0, 2.0, 1.0], "s": [0.0] * len(sequential.GRID)}
    state = sequential.State.from_json(old)
    assert state.ab == pytest.approx([3.0 - np.log(2), 2.0 - np.log(2), 1.0 - np.log(2)])
    assert state.ab_t == 7
    again = sequential.State.from_json(json.loads(json.dumps(state.to_json())))
    assert again == state


def test_absolute_evidence_stored_before_any_interval_loads_without_extra_mass():
    # an older canary stored its state after the first reading, before any interval: the
    # product from the first interval was 1 (logs 0) at t 0; loaded as the start at the
    # first interval (weight 1/2), the pending mass must be that of the starts after it,
    # or the statistic starts above 1 and is no e-process
    old = {"t": 0, "ab": [0.0] * len(sequential.AB_GRID), "ni": [0.0] * len(sequential.NI_GRID),
           "s": [0.0] * len(sequential.GRID)}
    state = sequential.State.from_json(old)
    assert sequential.ni_evidence(state) <= 1.0 + 1e-12
    for t in range(0, 50):
        state = sequential.State.from_json({**old, "t": t})
        mass = 0.5 + 1 / (state.ab_t + 1)  # the loaded start, and those not yet reached
        assert mass <= 1.0 + 1e-12, (t, state.ab_t)


def _absolute(gate, counts):
    """The absolute test's evidence (canary below detect_rate) after each (n_c, e_c)."""
    state, out = sequential.State(), []
    for n_c, e_c in counts:
        state = sequential.step_absolute(gate, state, e_c, n_c)
        out.append(sequential.absolute_evidence(state))
    return out


def test_a_shared_outage_sets_back_only_the_absolute_tests_that_began_before_it():
    # docs/verdicts.md, "When it cannot decide": a healthy canary at 0.5% (detect_rate 1%)
    # through a 2-minute outage at 10x: the tests begun before it lose, the ones begun
    # after it build evidence as if it had not happened, so the step to 100% waits
    # minutes, not the rest of the rollout
    gate = sequential.ErrorGate(detect_rate=0.01)
    rng = np.random.default_rng(1)
    before = [(300, int(rng.binomial(300, 0.005))) for _ in range(8)]
    outage = [(300, int(rng.binomial(300, 0.05))) for _ in range(8)]
    after = [(300, int(rng.binomial(300, 0.005))) for _ in range(120)]
    ev = _absolute(gate, before + outage + after)
    assert ev[15] < 1                        # the outage took what the start had built
    reached = next(i for i, e in enumerate(ev) if i > 15 and e >= 1 / gate.alpha)
    quiet = _absolute(gate, after)           # the same counts with no outage before them
    first = next(i for i, e in enumerate(quiet) if e >= 1 / gate.alpha)
    # (a start after the outage weighs 1/(t (t + 1)): it pays that, and no more)
    assert reached - 16 <= 2 * first + 15, (reached, first)
    # one product from the first interval, as before: after the outage's ~120 errors
    # (24 expected at detect_rate) it is still below 1/alpha 120 intervals later
    logs = [sum(e * np.log(r) + (n - e) * np.log((1 - r * 0.01) / 0.99)
                for n, e in before + outage + after) for r in sequential.AB_GRID]
    assert max(logs) < np.log(1 / gate.alpha)


def test_a_canary_failing_at_detect_rate_is_rarely_shown_below_it_however_long_watched():
    # the absolute test's guarantee with its change points: a canary failing at exactly
    # detect_rate, each interval's rate x a shock both versions share (an outage now and
    # then), watched for 1,000 intervals: shown below detect_rate in at most alpha of runs
    gate = sequential.ErrorGate(detect_rate=0.01, alpha=0.01)
    shown = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        state = sequential.State()
        for _ in range(1000):
            p = 0.01 * (10.0 if rng.random() < 0.02 else 1.0)  # 2% of intervals: an outage
            n = int(rng.poisson(300))
            state = sequential.step_absolute(gate, state, int(rng.binomial(n, p)), n)
            if sequential.absolute_evidence(state) >= 1 / gate.alpha:
                shown += 1
                break
    assert shown <= 3, shown


def test_the_absolute_bench_runs_the_gates_own_test_and_drift_breaks_its_bound_either_way():
    # docs/verdicts.md, promise 2: bench/verdicts/absolute.py replicates step_absolute
    # exactly; a canary at detect_rate on average whose rate drifts below it for long
    # stretches (persisting shocks, outside the guarantee) is shown below it far more
    # often than alpha, by the mixture over starts and by one product alike
    from bench.verdicts import absolute

    assert absolute.check() < 1e-9
    rng = np.random.default_rng(3)
    n = rng.poisson(150, (300, 120)).astype(float)
    e = rng.binomial(n.astype(int), absolute.rates("drifting", rng, 300, 120)).astype(float)
    mixture = np.mean(absolute.peaks(n, e, mixture=True) >= 100)
    product = np.mean(absolute.peaks(n, e, mixture=False) >= 100)
    assert product > 0.05 and mixture >= product


def test_compare_gate_judges_canary_against_stable():
    g = CompareGate(name="lat", query="q{{ version }}", max_increase=0.05,
             max_ratio=1.5)
    assert judge_compare(g, 0.30, 0.28).verdict is Verdict.PASS
    assert judge_compare(g, 0.40, 0.28).verdict is Verdict.FAIL
    assert judge_compare(g, 0.02, 0.0).verdict is Verdict.PASS  # within max_increase
    assert judge_compare(g, None, 0.3).verdict is Verdict.NO_DATA
    only_ratio = CompareGate(name="e", query="q{{ version }}", max_ratio=2)
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
    (POLICY.replace("    alpha: 0.01\n", "    final_gross: 0\n"),
     "final_gross: must be above 1 and at most 1000"),
    (POLICY.replace("    alpha: 0.01\n", "    gross: 1\n"), "gross: must be above 1"),
    (POLICY.replace("    alpha: 0.01\n", "    detect_rate: 5\n"),
     "detect_rate: must be between 0 and 1"),
])
def test_bad_sequential_and_compare_gates_are_reported(text, words):
    from canary.errors import ValidationFailed

    with pytest.raises(ValidationFailed) as e:
        parse(text, file="seq.yaml", default_name="seq")
    assert words in str(e.value)


def test_a_sequential_failure_rolls_back_at_once_and_inconclusive_holds():
    pol = Policy(name="p", interval=15, failure_limit=3, no_data=NoData.PASS,
                 progress_deadline=3600, stages=(Stage(10, 30), Stage(100, 30)),
                 gates=(ErrorsGate(name="errors", requests="r{{ version }}",
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


def test_a_clock_stepped_back_does_not_put_a_warm_gate_back_into_warm_up():
    # warm-up is over once: a wall clock stepped back (NTP) used to make the gate
    # inconclusive again, with its hard guard off, until the clock caught up
    gate = sequential.ErrorGate(warmup=120)
    state = sequential.State()
    counts = dict.fromkeys(("canary_requests", "canary_errors", "stable_requests",
                            "stable_errors"), 0.0)
    for now in (0.0, 60.0, 135.0, 150.0, 70.0):  # the last reading after a step back
        counts["canary_requests"] += 300
        counts["stable_requests"] += 900
        out = sequential.update(gate, state, dict(counts), now=now)
        state = sequential.State.from_json(json.loads(json.dumps(out.state.to_json())))
        assert ("warming up" in out.detail) == (now == 60.0), (now, out.detail)
    # and the hard guard is on: a canary failing every request is rolled back at once
    counts["canary_requests"] += 300
    counts["canary_errors"] += 300
    counts["stable_requests"] += 900
    out = sequential.update(gate, state, dict(counts), now=80.0)
    assert out.verdict == "fail" and "hard guard" in out.detail, out


@pytest.mark.e2e
@settings(max_examples=1000, deadline=None)
@given(tolerance=st.floats(0.01, 1000), alpha=st.floats(1e-12, 0.49),
       gross=st.floats(1.001, 1000), final_gross=st.floats(1.001, 1000),
       detect_rate=st.floats(1e-9, 0.999),
       wander=st.sampled_from(sequential.WANDERS) | st.floats(0, 0.5),
       steps=st.lists(st.tuples(*[st.floats(0, 1e12) | st.floats() | st.none()] * 4),
                      min_size=1, max_size=12))
def test_any_counters_and_any_valid_gate_give_a_verdict_never_an_exception(
        tolerance, alpha, gross, final_gross, detect_rate, wander, steps):
    gate = sequential.ErrorGate(tolerance=tolerance, alpha=alpha, gross=gross,
                                final_gross=final_gross, detect_rate=detect_rate,
                                wander=wander)
    state = sequential.State()
    for i, (n_c, e_c, n_s, e_s) in enumerate(steps):  # counters may go down: resets
        out = sequential.update(gate, state, {"canary_requests": n_c, "canary_errors": e_c,
                                              "stable_requests": n_s, "stable_errors": e_s},
                                before_full=i % 2 == 1, now=15.0 * i)
        state = sequential.State.from_json(json.loads(json.dumps(out.state.to_json())))
        assert out.verdict in ("fail", "pass", "inconclusive", "no_data")
        json.dumps(out.state.to_json(), allow_nan=False)  # stored and served as JSON


def _scenario(name: str):
    from bench.verdicts.simulate import scenarios

    return next(s for s in scenarios() if s.name == name)


@pytest.mark.e2e
@pytest.mark.parametrize("name,most", [("errors x2", 1), ("errors x2, base 0.4%", 3),
                                       ("errors x3, base 0.2%", 40)])
def test_a_worse_canary_is_not_promoted_where_errors_are_rare(name, most):
    # stable at 0.4% (0.2%): margin x stable's rate is below detect_rate, where the step
    # to 100% used to check only how much traffic the stage saw - 48% (27%) of these
    # canaries were promoted. Now only evidence from the canary's own counts lets it
    # through: below 2x stable's rate, or below detect_rate (1%). A 2x canary at 0.8% is
    # under detect_rate but too close to it to be shown below; a 3x one at 0.6% is
    # outside the promise (docs/verdicts.md: below detect_rate), and shown below 1% in a
    # few runs. Both are below detect_rate, where a canary shown below it may be promoted:
    # with the bets that allow for wandering and shared bursts (slower to roll them back)
    # 1 and 36 of these 100 were (1 and 10 before)
    from bench.verdicts.simulate import simulate

    out = [simulate(_scenario(name), 20, seed, None).outcome for seed in range(100)]
    assert out.count("promoted") <= most, out.count("promoted")


def test_a_service_without_errors_is_promoted_on_the_canary_own_evidence():
    # no errors on either side: no ratio can be shown, but the canary's error-free
    # requests show its rate below detect_rate
    state, counts = sequential.State(), dict(COUNTS)
    for _ in range(60):
        counts["canary_requests"] += 300
        counts["stable_requests"] += 300
        out = sequential.update(GATE, state, dict(counts), before_full=True, weight=50)
        state = out.state
    assert out.verdict == "pass" and "shown no worse" in out.detail


def test_the_step_to_100_percent_waits_while_the_counts_lean_toward_worse(monkeypatch):
    # docs/verdicts.md, "Non-inferiority before 100%": a canary three times as bad as a
    # 0.2% stable is under detect_rate, so the absolute test may show it non-inferior; the
    # step to all traffic also asks that the evidence toward "worse" be below 1, where it
    # started. With the stages' cap of 10 there, 28% of these canaries were promoted at 20
    # requests/s (the benchmark's 100 seeds); a healthy canary is not held by it
    from bench.verdicts.simulate import simulate

    def promoted(name: str) -> int:
        return sum(simulate(_scenario(name), 20, s, None).outcome == "promoted"
                   for s in range(100))

    assert promoted("errors x3, base 0.2%") <= 15
    assert promoted("healthy 0.2%") >= 98
    monkeypatch.setattr(sequential, "FINAL_CAP", 10.0)
    assert promoted("errors x3, base 0.2%") >= 20


@pytest.mark.e2e
def test_no_stage_moves_on_while_the_evidence_against_the_canary_is_high():
    from bench.verdicts.simulate import SCRAPE, Ours

    # a canary three times as bad as stable at 0.2%, at 20 requests/s: it used to reach
    # 50% in 31% of rollouts, some at 10-98x the evidence toward "worse"
    sc = _scenario("errors x3, base 0.2%")
    moved_at: list[float] = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        ours = Ours((_gate(),), sc.holds, sc.deadline, sc.weights)
        counts = dict.fromkeys(("canary_requests", "canary_errors", "stable_requests",
                                "stable_errors"), 0.0)
        t = 0.0
        while t < 3600:
            w = ours.weight / 100
            n = rng.poisson(20 * SCRAPE)
            n_c = rng.binomial(n, w)
            counts["canary_requests"] += n_c
            counts["canary_errors"] += rng.binomial(n_c, sc.canary(t))
            counts["stable_requests"] += n - n_c
            counts["stable_errors"] += rng.binomial(n - n_c, sc.p_stable)
            t += SCRAPE
            stage = ours.r.stage
            if ours.judge(t, [dict(counts)]):
                break
            if ours.r.stage != stage:
                state = sequential.State.from_json(ours.r.gates[0].state)
                moved_at.append(sequential.evidence(state))
    assert moved_at and max(moved_at) < 10, max(moved_at)


def _gate():
    from bench.verdicts.simulate import GATE

    return GATE


COUNTS = {"canary_requests": 0.0, "canary_errors": 0.0, "stable_requests": 0.0,
          "stable_errors": 0.0}


def test_at_100_percent_stable_gone_is_nothing_to_compare_with_not_no_data():
    state = sequential.update(GATE, sequential.State(), dict(COUNTS), weight=50).state
    out = sequential.update(GATE, state, {"canary_requests": 500.0, "canary_errors": 2.0,
                                          "stable_requests": None, "stable_errors": None},
                            weight=100)
    assert out.verdict == "pass" and "nothing to compare with" in out.detail
    # below 100% a missing stable is still no data
    out = sequential.update(GATE, state, {"canary_requests": 500.0, "canary_errors": 2.0,
                                          "stable_requests": None, "stable_errors": None},
                            weight=50)
    assert out.verdict == "no_data"


def _fed(intervals: int, weight: int, each: dict[str, float]) -> list[sequential.Outcome]:
    """GATE's outcomes, interval by interval, for counters growing by `each` at `weight`."""
    state, counts, outs = sequential.State(), dict(COUNTS), []
    for _ in range(intervals):
        for k, v in each.items():
            counts[k] += v
        outs.append(sequential.update(GATE, state, dict(counts), weight=weight))
        state = outs[-1].state
    return outs


def test_a_canary_that_gets_far_less_traffic_than_its_weight_holds_and_says_why():
    # weight 25, but the canary gets 2.5% of the requests
    outs = _fed(20, 25, {"canary_requests": 75, "stable_requests": 2925, "stable_errors": 15})
    out = outs[-1]
    assert "pass" not in [o.verdict for o in outs] and out.verdict == "inconclusive"
    assert "served 2.5% of requests this stage at weight 25%" in out.detail
    # the same counts at the weight they match pass
    out = _fed(40, 25, {"canary_requests": 750, "canary_errors": 4, "stable_requests": 2250,
                        "stable_errors": 11})[-1]
    assert out.verdict == "pass", out.detail


def test_a_compare_gate_is_not_judged_at_full_traffic():
    pol = Policy(name="p", interval=15, failure_limit=1, no_data=NoData.HOLD,
                 progress_deadline=3600, stages=(Stage(100, 30),),
                 gates=(CompareGate(name="lat", query="q{{ version }}", max_ratio=1.5),))
    r = decide.start(rollout_id="r", target="t", policy=pol, canary_version="v2",
                     stable_version="v1", now=0.0, actor="a")
    r = decide.applied(r, 100, 0.0)
    rd = Readings(15.0, 0, (judge_compare(pol.gates[0], 0.3, None),))  # stable's series gone
    r = decide.tick(decide.readings(r, pol, rd, 15.0), pol, 45.0)
    assert r.gates[0].status is Verdict.PASS and "not judged at 100%" in (r.gates[0].detail
                                                                          or "")
    assert r.state is Phase.SUCCEEDED


def _per_pod(canary: dict[str, tuple[float, float]], stable: dict[str, tuple[float, float]]):
    raw: dict[str, float | None] = {}
    for side, pods in (("canary", canary), ("stable", stable)):
        raw[f"{side}_requests"] = sum(r for r, _ in pods.values())
        raw[f"{side}_errors"] = sum(e for _, e in pods.values())
        for pod, (r, e) in pods.items():
            raw[f"{side}_requests|pod={pod}"] = r
            raw[f"{side}_errors|pod={pod}"] = e
    return raw


def test_a_pod_that_restarts_resets_only_its_own_counters():
    # four canary pods with 1000 requests each; c1 restarts and serves 40 (4 failed) since;
    # the others serve 100 more each. The sum fell from 4000 to 3340: read as one reset
    # of the sum, that was 3340 new requests (and c1's failures mixed with the others'
    # whole history); per pod it is 340, with the 4 failures where they happened
    stable = {f"s{i}": (5000.0, 25.0) for i in range(4)}
    before = {f"c{i}": (1000.0, 5.0) for i in range(4)}
    after = {**{f"c{i}": (1100.0, 5.0) for i in range(1, 4)}, "c0": (40.0, 4.0)}
    state = sequential.update(GATE, sequential.State(), _per_pod(before, stable),
                              weight=25).state
    stable2 = {k: (r + 900, e + 4) for k, (r, e) in stable.items()}
    out = sequential.update(GATE, state, _per_pod(after, stable2), weight=25)
    assert out.state.stage["n_c"] == 340 and out.state.stage["e_c"] == 4
    assert out.state.stage["n_s"] == 3600 and out.state.stage["e_s"] == 16


def test_stable_scaled_down_is_not_read_as_its_whole_history_again():
    # an autoscaler removes one of four stable pods: its series vanishes. As one sum that
    # is a drop, a "reset", and the remaining pods' days of history would count as one
    # interval's traffic; per pod, only what they served since the last reading counts,
    # and a pod that comes back is not counted from 0
    canary = {"c0": (100.0, 1.0)}
    stable = {f"s{i}": (1e6, 5000.0) for i in range(4)}
    state = sequential.update(GATE, sequential.State(), _per_pod(canary, stable),
                              weight=5).state
    fewer = {f"s{i}": (1e6 + 300, 5001.0) for i in range(1, 4)}
    out = sequential.update(GATE, state, _per_pod({"c0": (150.0, 1.0)}, fewer), weight=5)
    assert out.state.stage["n_s"] == 900 and out.state.stage["e_s"] == 3
    back = {**fewer, "s0": (1e6 + 100, 5000.0)}
    out = sequential.update(GATE, out.state, _per_pod({"c0": (200.0, 1.0)}, back), weight=5)
    assert out.state.stage["n_s"] == 1000


def test_counter_queries_are_read_per_series():
    from canary.gates.prometheus import parse_series

    result = [{"metric": {"pod": "web-1", "version": "v2"}, "value": [0, "10"]},
              {"metric": {"pod": "web-2", "version": "v2"}, "value": [0, "5"]}]
    assert parse_series(result) == {"pod=web-1,version=v2": 10.0, "pod=web-2,version=v2": 5.0}
    assert parse_series([0, "3"]) == {"": 3.0} and parse_series([]) == {}


async def test_an_errors_gate_reads_every_pod_of_a_counter_query():
    from canary.gates.prometheus import CoalescingSource, measure

    class PerPod:
        async def query(self, promql: str) -> float | None:
            raise AssertionError("an errors gate asks for every series")

        async def query_series(self, promql: str) -> dict[str, float]:
            if "canary" in promql:
                return {"pod=c0": 7.0, "pod=c1": 3.0}
            return {"": 100.0}  # sum(...): one series without labels

    g = ErrorsGate(name="errors", requests="r{{ version }}", errors="e{{ version }}")
    (reading,) = await measure(CoalescingSource(PerPod()), [g],
                               {"canary_version": "canary", "stable_version": "stable"})
    assert reading.raw == {"canary_requests": 10.0, "canary_requests|pod=c0": 7.0,
                           "canary_requests|pod=c1": 3.0, "canary_errors": 10.0,
                           "canary_errors|pod=c0": 7.0, "canary_errors|pod=c1": 3.0,
                           "stable_requests": 100.0, "stable_errors": 100.0}


@pytest.mark.e2e
@pytest.mark.parametrize("shared,own,alone,stable_alone,share", [
    (0.0, 0.0, 0.0, 0.0, 0.05),    # steady (binomial)
    (1.0, 0.0, 0.0, 0.0, 0.05),    # bursts both versions share, variance 1 (+-100%)
    (0.0, 0.25, 0.0, 0.0, 0.05),   # each version wandering on its own, +-50%, at 5%...
    (0.0, 0.25, 0.0, 0.0, 0.25),   # ...and at 25%
    (0.0, 0.0, 0.25, 0.0, 0.05),   # the canary alone wandering +-50%
    (1.0, 0.25, 0.0, 0.0, 0.05),   # each version +-50% AND shared bursts, at 5%...
    (1.0, 0.25, 0.0, 0.0, 0.25),   # ...and at 25%
    (4.0, 0.0, 0.0, 0.25, 0.05),   # stable alone +-50% and shared bursts of variance 4...
    (4.0, 0.0, 0.0, 0.25, 0.25),   # ...(the worst case the bound is sized for)
])
def test_a_healthy_canary_watched_for_thousands_of_intervals_is_rarely_rolled_back(
        shared, own, alone, stable_alone, share):
    # the bound alpha is per rollout however long it is watched, under each wandering
    # model docs/verdicts.md claims: 100 healthy canaries at 200 requests/s, 0.5% errors,
    # 1,000 intervals (4 hours) each. Ville's inequality bounds more than the firing: the
    # evidence reaches 10 in at most 10% of them, which 100 runs can check with some power
    # (an invalid allowance for wandering fired in 10% of such runs at 1/alpha = 100)
    from bench.verdicts.longrun import highest

    top = [highest(shared, own, share=share, rps=200, base=0.005, intervals=1000, seed=s,
                   canary_only=alone, stable_only=stable_alone) for s in range(100)]
    fired, ten = sum(m >= 100 for m in top), sum(m >= 10 for m in top)
    assert fired <= 3, f"{fired} of 100 fired (alpha 0.01)"
    assert ten <= 20, f"{ten} of 100 reached 10 (Ville: at most 10%)"


def _with_restarts_gate(enabled: bool) -> Policy:
    """policies/sequential.yaml as shipped, or with the restarts gate its comment (and
    docs/verdicts.md) shows, uncommented."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "policies" / "sequential.yaml").read_text()
    lines = text.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("#  - name: canary-restarts"))
    block = [ln[1:] for ln in lines[at:at + 3]]
    docs = (root / "docs" / "verdicts.md").read_text()
    # the docs show the same gate, word for word
    assert all(ln.strip() in docs for ln in block), block
    if enabled:
        lines = lines[:at] + block + lines[at + 3:]
        at_gates = next(i for i, ln in enumerate(lines) if ln.startswith("gates:"))
        # (the block sits after the gates' comment lines; YAML reads it as the last gate)
        assert at > at_gates
    return parse("\n".join(lines) + "\n", file="sequential.yaml", default_name="sequential")


@pytest.mark.e2e
@pytest.mark.parametrize("enabled", [True, False])
def test_a_crash_looping_canary_is_rolled_back_by_the_documented_restarts_gate(enabled):
    # 4 canary pods, each restarting every 2 minutes on average; the requests a dying pod
    # drops fail for users (twice stable's errors) but no counter of the pod counts them,
    # so the errors gates see a canary as good as stable. The restarts gate (a threshold
    # on kube-state-metrics' restart counter, answered here as Prometheus'
    # increase(...[5m]) would) rolls it back, naming itself; without it, the crash loop
    # is promoted
    from bench.verdicts.simulate import Pods, scenarios
    from canary.engine.dryrun import DryRun

    policy = _with_restarts_gate(enabled)
    assert ("canary-restarts" in [g.name for g in policy.gates]) is enabled
    sc = next(s for s in scenarios() if s.name.startswith("crash loop, failures lost"))
    outcomes, reasons = [], []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        dry, pods, t = DryRun(policy), Pods(), 0.0
        counts = dict.fromkeys(("canary_requests", "canary_errors", "stable_requests",
                                "stable_errors"), 0.0)
        end = None
        while end is None and t < 3 * 3600:
            n = int(rng.poisson(20 * 15))
            n_c = int(rng.binomial(n, dry.weight / 100))
            e_c = int(rng.binomial(n_c, 0.01))  # what users see: 2x stable's 0.5%...
            seen = int(rng.binomial(e_c, 0.5))  # ...half of it counted by the pods
            counts["stable_requests"] += n - n_c
            counts["stable_errors"] += int(rng.binomial(n - n_c, 0.005))
            t += 15
            raw = pods.scrape(rng, n_c, seen, counts, sc, t)
            slow = {**raw, **{k: 0.0 for k in raw if "errors" in k}}  # nothing slow
            end = dry.step(t, {"errors": raw, "slow-requests": slow},
                           {"canary-restarts": (pods.restarted(t), None)})
        outcomes.append(end)
        reasons.append(dry.r.reason or "")
    if enabled:
        assert outcomes == ["rolled_back"] * 10, outcomes
        assert all("canary-restarts" in r for r in reasons), reasons
    else:
        assert outcomes.count("promoted") >= 5, outcomes


# `wander`: the per-version wandering an errors gate's bound allows for (docs/verdicts.md,
# *Buying the speed back: wander*)

@pytest.mark.e2e
@pytest.mark.parametrize("shared,share", [
    (0.0, 0.05), (0.0, 0.25),    # steady (binomial), at a 5% and a 25% share
    (1.0, 0.05), (1.0, 0.25),    # bursts both versions share, variance 1 (+-100%)
])
def test_wander_0_keeps_the_bound_under_steady_rates_and_shared_bursts(shared, share):
    # with no allowance for per-version wandering the gate bets against the steady split
    # pi_0 itself: still an e-process when the versions' rates move only together, since
    # a shared shock does not move the canary's share of the errors
    from bench.verdicts.longrun import highest

    top = [highest(shared, 0.0, share=share, rps=200, base=0.005, intervals=1000, seed=s,
                   wander=0.0) for s in range(100)]
    fired, ten = sum(m >= 100 for m in top), sum(m >= 10 for m in top)
    assert fired <= 3, f"{fired} of 100 fired (alpha 0.01)"
    assert ten <= 20, f"{ten} of 100 reached 10 (Ville: at most 10%)"


@pytest.mark.e2e
def test_wander_0_rolls_back_healthy_canaries_whose_versions_wander_apart():
    # the price when the assumption is wrong: each version wandering +-50% on its own
    # (variance 0.25), a healthy canary at a 5% share watched for 1,000 intervals at
    # 200 requests/s fires far more often than alpha with `wander: 0` (16 of these 100:
    # `longrun --wander 0`); the default (0.5) holds the bound there (the long-run test
    # above)
    from bench.verdicts.longrun import highest

    top = [highest(0.0, 0.25, share=0.05, rps=200, base=0.005, intervals=1000, seed=s,
                   wander=0.0) for s in range(100)]
    fired = sum(m >= 100 for m in top)
    assert fired >= 10, f"{fired} of 100 fired"


def test_the_default_wander_is_the_gate_as_it_was():
    # no `wander` in a policy is wander 0.5, the tables SPLIT_UP / SPLIT_DOWN and the
    # absolute test's penalty at variance 0.25: the gate of before, number for number
    g = ErrorsGate(name="errors", requests="r{{ version }}", errors="e{{ version }}")
    assert g.wander == 0.5 == sequential.ErrorGate().wander
    assert sequential.SPLIT_TABLES[0.5] == (sequential.SPLIT_UP, sequential.SPLIT_DOWN)
    assert sequential.tabulated_wander(0.5) ** 2 == sequential.WANDER
    for pi_0 in (0.01, 0.05, 0.25, 0.5):
        assert sequential.split_bounds(pi_0) == sequential.split_bounds(pi_0, 0.5)
    # through the state machine: a policy without the field, with `wander: 0.5` and with
    # `wander: 0.3` (rounded up to 0.5) decide the same, state for state
    from bench.verdicts.simulate import SCRAPE
    from canary.engine.dryrun import DryRun

    def states(extra: str) -> list[object]:
        pol = parse(POLICY.replace("    tolerance: 1.2\n", "    tolerance: 1.2\n" + extra),
                    file="seq.yaml", default_name="seq")
        dry, rng, out = DryRun(pol), np.random.default_rng(1), []
        counts = dict.fromkeys(("canary_requests", "canary_errors", "stable_requests",
                                "stable_errors"), 0.0)
        for i in range(60):
            n = int(rng.poisson(20 * SCRAPE))
            n_c = int(rng.binomial(n, dry.weight / 100))
            counts["canary_requests"] += n_c
            counts["canary_errors"] += int(rng.binomial(n_c, 0.01))
            counts["stable_requests"] += n - n_c
            counts["stable_errors"] += int(rng.binomial(n - n_c, 0.005))
            if dry.step(SCRAPE * (i + 1), {"errors": dict(counts)}):  # (p99: passing)
                break
            out.append((dry.r.stage, dry.r.gates[0].state, dry.r.gates[0].value))
        return out

    default = states("")
    assert states("    wander: 0.5\n") == default == states("    wander: 0.3\n")
    assert states("    wander: 0\n") != default
    assert sequential.tabulated_wander(0.2) == 0.25 and sequential.tabulated_wander(0) == 0


@pytest.mark.parametrize("value,words", [
    ("0.7", "wander: must be a number from 0 to 0.5"),
    ("-0.1", "wander: must be a number from 0 to 0.5"),
    ("lots", "wander: must be a number"),
])
def test_a_bad_wander_is_reported_naming_the_field_and_the_allowed_values(
        tmp_path, value, words):
    from canary.cli import validate_files

    path = tmp_path / "seq.yaml"
    path.write_text(POLICY.replace("    tolerance: 1.2\n", f"    tolerance: 1.2\n    wander: {value}\n"))
    found = [str(p) for p in validate_files([str(path)])]
    line = POLICY.splitlines().index("    tolerance: 1.2") + 2
    assert len(found) == 1 and found[0].startswith(f"{path}:{line}: gates[0].{words}"), found
    assert "0, 0.1, 0.25, 0.5" in found[0] or value == "lots", found


def test_the_benchmark_compares_canary_only_with_fixed_rules_as_safe_in_a_shared_outage():
    # docs/verdicts.md, "Against a fixed rule that is as safe": the fixed setting picked on
    # steady traffic alone (30 s, threshold 5 at 200 requests/s) rolls back healthy
    # canaries through a 2-minute outage both versions share; the fairer comparison must
    # pass it over for one that does not
    from bench.verdicts.simulate import _cheapest, peers, scenarios, simulate, summarize

    cases = scenarios()
    group = peers(_scenario("errors x2"), cases)
    assert set(group) == {"healthy 0.5%", "burst on both", "bursty, shared",
                          "bursty, per version", "bursty, canary only",
                          "very bursty, canary only"}
    assert peers(_scenario("errors x5, 1% first stage"), cases) == [
        "healthy, 1% first stage", "burst on both, 1% first stage",
        "bursty, shared, 1% first stage", "bursty, per version, 1% first stage"]
    rules = [(30, 5), (60, 10)]
    fr = {}
    for name in ("healthy 0.5%", "burst on both"):
        sc = _scenario(name)
        fr[name] = {None: 0.0, **{r: summarize([simulate(sc, 200, s, r) for s in range(10)],
                                              sc)["rolled_back"] for r in rules}}
    assert fr["burst on both"][(30, 5)] > 0.5 and fr["burst on both"][(60, 10)] == 0.0
    fixed = {(30, 5): {"excess_mean": 40.0}, (60, 10): {"excess_mean": 150.0}}
    steady = _cheapest(fixed, [fr["healthy 0.5%"]])
    every = _cheapest(fixed, list(fr.values()))
    assert steady == (30, 5) and every == (60, 10)


def test_a_bad_canary_the_fixed_rule_promotes_goes_on_costing_errors_to_the_horizon():
    # docs/verdicts.md, "Counting what a promoted bad canary serves": excess bad requests
    # stop at the end of a rollout that rolled back, but a promoted 2x canary keeps
    # serving all traffic, and the benchmark's second cost counts those errors to the
    # horizon; a rollback's cost is the same either way
    from bench.verdicts.simulate import horizon, simulate

    sc = _scenario("errors x2")
    runs = [simulate(sc, 20, s, (60, 10)) for s in range(12)]
    promoted = [r for r in runs if r.outcome == "promoted"]
    rolled = [r for r in runs if r.outcome == "rolled_back"]
    assert promoted and rolled
    for r in rolled:
        assert r.hour == r.excess
    for r in promoted:
        # all 20 requests/s at twice a 0.5% stable: 0.1 excess errors a second
        expected = 20 * (horizon(sc) - r.time) * (2 * sc.p_stable - sc.p_stable)
        assert r.hour - r.excess == pytest.approx(expected, rel=0.5)


def test_counted_to_the_horizon_canary_costs_less_than_the_fixed_rule_as_safe_at_20_rps():
    # docs/verdicts.md, "Counting what a promoted bad canary serves": at 20 requests/s the
    # fixed setting as safe as canary on every healthy row (60 s, threshold 10) promotes
    # many 2x canaries; counted to the horizon canary's cost is well under it
    from bench.verdicts.simulate import simulate, summarize

    sc = _scenario("errors x2")
    ours = summarize([simulate(sc, 20, s, None) for s in range(30)], sc)
    fixed = summarize([simulate(sc, 20, s, (60, 10)) for s in range(30)], sc)
    assert ours["promoted"] == 0.0 and fixed["promoted"] >= 0.2
    assert ours["hour_mean"] < 0.6 * fixed["hour_mean"]


@pytest.mark.e2e
def test_a_lower_detect_rate_stops_worse_canaries_under_it_but_holds_healthy_ones_at_20_rps():
    # docs/verdicts.md, "What detect_rate buys and costs": at 20 requests/s detect_rate
    # 0.005 promotes none of the 3x canaries beside a 0.2% stable (the default promotes
    # some: 6 of these 40), and more than a third of the healthy canaries at a 0.5% base wait out the
    # deadline (the default: none)
    from dataclasses import replace

    from bench.verdicts import simulate as sim

    def outcomes(name: str, gate) -> list[str]:
        old = sim.GATE
        sim.GATE = gate
        try:
            return [sim.simulate(_scenario(name), 20, s, None).outcome for s in range(40)]
        finally:
            sim.GATE = old

    low = replace(sim.GATE, detect_rate=0.005)
    assert outcomes("errors x3, base 0.2%", sim.GATE).count("promoted") >= 5
    assert outcomes("errors x3, base 0.2%", low).count("promoted") == 0
    assert outcomes("healthy 0.5%", sim.GATE).count("inconclusive") == 0
    assert outcomes("healthy 0.5%", low).count("inconclusive") >= 14


@pytest.mark.parametrize("stable", [None, float("nan")])
def test_no_data_pass_does_not_let_an_errors_gate_that_saw_nothing_move_a_stage_on(stable):
    # promise 3: a stage moves on only once an errors gate has compared the canary with
    # stable. Under `no_data: pass` a gate that never read stable's counters (a wrong
    # label, a NaN) used to count as passing: a canary failing a third of its requests
    # was promoted to 100% in 90 s, "judged by the stages before" that judged nothing
    pol = Policy(name="p", interval=15, failure_limit=3, no_data=NoData.PASS,
                 progress_deadline=600, stages=(Stage(10, 30), Stage(50, 30), Stage(100, 30)),
                 gates=(ErrorsGate(name="errors", requests="r{{ version }}",
                                   errors="e{{ version }}"),))
    r = decide.start(rollout_id="r", target="t", policy=pol, canary_version="v2",
                     stable_version="v1", now=0.0, actor="a")
    r = decide.applied(r, 10, 0.0)
    t = 0.0
    while not r.state.final and t < 1200:
        t += 15
        n = t * 2 / 3
        raw = {"canary_requests": n, "canary_errors": n / 3, "stable_requests": stable,
               "stable_errors": stable}
        r = decide.tick(decide.readings(r, pol, Readings(t, r.stage, (
            Reading("errors", Verdict.PENDING, raw=raw),)), t), pol, t)
        if r.weight != r.applied_weight:
            r = decide.applied(r, r.weight, t)
    assert r.stage == 0 and r.state is Phase.ROLLED_BACK, (r.stage, r.state, r.reason)
    assert "no progress" in (r.reason or "") and "gate errors" in (r.reason or "")


def test_a_canary_that_gets_far_more_traffic_than_its_weight_holds_and_says_why():
    # README: an errors gate "holds while the canary gets far less (or more) traffic than
    # its weight". At weight 5 a canary given 40% of the requests (a route that ignores the
    # weight, sticky sessions) passed: the rule only looked at stable's share
    outs = _fed(40, 5, {"canary_requests": 1200, "canary_errors": 6, "stable_requests": 1800,
                        "stable_errors": 9})
    for out in outs:
        assert out.verdict != "pass", out.detail
    assert out.verdict == "inconclusive"
    assert "served 40.0% of requests this stage at weight 5%" in out.detail


def test_a_canary_starved_of_its_weight_is_rolled_back_at_the_deadline_naming_the_gate():
    # docs/verdicts.md, *Traffic that does not follow the weight*: held with the reason,
    # then `progress_deadline` rolls it back, naming the gate and why it held
    pol = Policy(name="p", interval=15, failure_limit=1, no_data=NoData.HOLD,
                 progress_deadline=600, stages=(Stage(25, 60), Stage(100, 60)),
                 gates=(ErrorsGate(name="errors", requests="r{{ version }}",
                                   errors="e{{ version }}"),))
    r = decide.start(rollout_id="r", target="t", policy=pol, canary_version="v2",
                     stable_version="v1", now=0.0, actor="a")
    r = decide.applied(r, 25, 0.0)
    counts, t = dict(COUNTS), 0.0
    while not r.state.final and t < 1200:
        t += 15
        counts["canary_requests"] += 75      # 2.5% of the requests at weight 25
        counts["stable_requests"] += 2925
        counts["stable_errors"] += 15
        r = decide.tick(decide.readings(r, pol, Readings(t, r.stage, (
            Reading("errors", Verdict.PENDING, raw=dict(counts)),)), t), pol, t)
        if r.weight != r.applied_weight:
            r = decide.applied(r, r.weight, t)
    assert r.state is Phase.ROLLED_BACK and r.stage == 0 and 600 < t <= 630, (r.state, t)
    assert r.reason is not None and r.reason.startswith("no progress for 10m")
    assert "gate errors: inconclusive" in r.reason
    assert "served 2.5% of requests this stage at weight 25%" in r.reason


def _stage_of(gate, rps: float, weight: int, interval: float, intervals: int):
    raw = dict.fromkeys(("canary_requests", "canary_errors", "stable_requests",
                         "stable_errors"), 0.0)
    state, out = sequential.State(), None
    for i in range(intervals):
        n = rps * interval
        raw["canary_requests"] += n * weight / 100
        raw["canary_errors"] += n * weight / 100 * 0.005
        raw["stable_requests"] += n * (1 - weight / 100)
        raw["stable_errors"] += n * (1 - weight / 100) * 0.005
        out = sequential.update(gate, state, dict(raw), new_stage=i == 0, now=i * interval,
                                weight=weight)
        state = out.state
    return out


def test_a_stage_does_not_move_on_where_a_gross_regression_would_show_too_few_errors():
    # cautious.yaml's first stage at 2 requests/s: 1% for 10 minutes is about 12 canary
    # requests, where a 10x canary (5% errors) makes 0.6 errors - no bet can count on
    # catching that, though the replay of its expected counts (fractions of an error
    # every interval) reached 1/alpha; the stage holds and says why
    gate = sequential.ErrorGate(alpha=0.005, gross=10, final_gross=2)
    out = _stage_of(gate, 2, 1, 30.0, 25)
    assert out.verdict == "inconclusive", out
    assert "rule out a 10x regression (it would have shown 0.72 errors so far, fewer " \
           "than 3)" in out.detail, out.detail
    # where it would show a few errors the replay decides as before: 5% of 20
    # requests/s passes its first stage within the benchmark's 2-minute hold
    out = _stage_of(sequential.ErrorGate(alpha=0.01), 20, 5, 15.0, 9)
    assert out.verdict == "pass", out
