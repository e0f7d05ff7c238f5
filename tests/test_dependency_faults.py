"""Guarantees 2 and 3: when Prometheus or nginx fail, a rollout never advances on missing
evidence, says why in the API and the logs, retries with backoff, and recovers by itself;
a rollback that cannot be applied is retried and never reported done early."""

from __future__ import annotations

import logging
import shutil

import pytest

from canary.gates.prometheus import PrometheusSource
from canary.routers.nginx import parse_weight
from tests.doubles import PrometheusDouble
from tests.helpers import controller, eventually, simple_policy

# each test waits through real stage holds and fault windows
pytestmark = pytest.mark.e2e


def gate_logs(caplog, rid: str, words: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "rollout", None) == rid
            and words in r.getMessage()]


async def error_verdicts(api) -> float:
    _, text = await api.call("GET", "/metrics", role=None)
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("canary_gate_verdicts_total{") and 'verdict="error"' in line)


async def evaluations(api, n: int) -> None:
    start = await error_verdicts(api)

    async def more() -> bool:
        return await error_verdicts(api) >= start + n
    await eventually(more, what=f"{n} more evaluations")


async def run_prometheus_fault(tmp_path, caplog, break_it, fix_it, words: str):
    prom = PrometheusDouble(0.0)
    await prom.start()
    try:
        source = PrometheusSource(prom.url, timeout=0.3)
        pol = simple_policy(hold=0.3, interval=0.2)
        async with controller(tmp_path, policies=[pol], source=source) as (api, _c, target):
            rid = (await api.start(canary_version="v2"))["id"]
            await api.until(rid, lambda r: r["applied_weight"] == 10)
            await break_it(prom)
            r = await api.until(rid, lambda r: r["gates"][0]["status"] == "error")
            stage = r["stage"]
            assert words in r["gates"][0]["detail"]
            await evaluations(api, 6)
            r = await api.rollout(rid)
            assert (r["state"], r["stage"]) == ("progressing", stage), "no advance without evidence"
            assert parse_weight(target, target.file.read_text()) == r["weight"]
            assert gate_logs(caplog, rid, "gate errors: error"), "the reason is in the logs"
            await fix_it(prom)
            await api.until(rid, lambda r: r["state"] == "succeeded")
    finally:
        await prom.stop()


async def test_prometheus_down_holds_and_recovers_by_itself(tmp_path, caplog):
    async def down(p: PrometheusDouble) -> None:
        await p.stop()

    async def up(p: PrometheusDouble) -> None:
        await p.start()

    await run_prometheus_fault(tmp_path, caplog, down, up, "ConnectionError")


async def test_prometheus_slower_than_the_timeout_holds_and_recovers(tmp_path, caplog):
    async def slow(p: PrometheusDouble) -> None:
        p.delay = 1.0

    async def fast(p: PrometheusDouble) -> None:
        p.delay = 0.0

    await run_prometheus_fault(tmp_path, caplog, slow, fast, "Timeout")


async def test_prometheus_errors_hold_and_recover(tmp_path, caplog):
    async def failing(p: PrometheusDouble) -> None:
        p.status = 503

    async def healthy(p: PrometheusDouble) -> None:
        p.status = 200

    await run_prometheus_fault(tmp_path, caplog, failing, healthy, "503")


async def test_query_errors_are_retried_with_backoff_within_an_evaluation(tmp_path):
    prom = PrometheusDouble(0.0, status=500)
    await prom.start()
    try:
        source = PrometheusSource(prom.url, timeout=0.3)
        from canary.gates.prometheus import measure

        readings = await measure(source, simple_policy().gates, {"service": "web"}, attempts=3,
                                 budget=5)
        assert readings[0].verdict.value == "error" and prom.queries == 3
    finally:
        await prom.stop()


async def test_evidence_missing_past_the_progress_deadline_rolls_back(tmp_path):
    prom = PrometheusDouble(None)  # Prometheus answers, but with no sample
    await prom.start()
    try:
        pol = simple_policy(hold=0.3, interval=0.2, progress_deadline=1.5)
        source = PrometheusSource(prom.url, timeout=0.3)
        async with controller(tmp_path, policies=[pol], source=source) as (api, _c, target):
            rid = (await api.start(canary_version="v2"))["id"]
            r = await api.until(rid, lambda r: r["state"] == "rolled_back")
            assert r["stage"] == 0 and "no progress for 1500ms" in r["reason"]
            assert "gate errors: no_data" in r["reason"]
            assert parse_weight(target, target.file.read_text()) == 0
    finally:
        await prom.stop()


async def test_nginx_reload_failing_pauses_then_recovers_by_itself(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    flag = tmp_path / "reload-broken"
    async with controller(tmp_path, policies=[simple_policy(hold=0.5)],
                          reload_cmd=("test", "!", "-e", str(flag))) as (api, _c, target):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        flag.write_text("")
        r = await api.until(rid, lambda r: r["state"] == "paused")
        assert r["paused_for"] == "router" and "nginx reload failed" in r["reason"]
        assert r["weight"] == 10 and parse_weight(target, target.file.read_text()) == 10
        assert gate_logs(caplog, rid, "nginx reload failed")
        await eventually(lambda: _errors(api, 3), what="retries")
        flag.unlink()
        await api.until(rid, lambda r: r["state"] == "succeeded")


async def test_unwritable_upstream_directory_pauses_then_recovers(tmp_path):
    d = tmp_path / "nginx"
    d.mkdir()
    async with controller(tmp_path, policies=[simple_policy(hold=0.5)],
                          file=d / "up.conf") as (api, _c, _target):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        shutil.rmtree(d)
        d.write_text("")  # a file where the directory was: unwritable, even for root
        r = await api.until(rid, lambda r: r["state"] == "paused")
        assert r["paused_for"] == "router" and "cannot" in r["reason"]
        d.unlink()
        d.mkdir()
        await api.until(rid, lambda r: r["state"] == "succeeded")


async def test_rollback_always_wins_and_is_never_reported_before_it_is_in_force(tmp_path):
    flag = tmp_path / "reload-broken"
    async with controller(tmp_path, policies=[simple_policy(hold=3600)],
                          reload_cmd=("test", "!", "-e", str(flag))) as (api, _c, target):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        flag.write_text("")
        status, r = await api.call("POST", f"/api/v1/rollouts/{rid}/abort", {"reason": "bad"},
                                   role="pipeline")
        assert status == 200 and r["state"] == "rolling_back"
        await eventually(lambda: _errors(api, 3), what="rollback retries")
        r = await api.rollout(rid)
        assert r["state"] == "rolling_back" and "not yet taken weight 0" in r["reason"]
        assert parse_weight(target, target.file.read_text()) == 10
        flag.unlink()
        r = await api.until(rid, lambda r: r["state"] == "rolled_back")
        assert parse_weight(target, target.file.read_text()) == 0


async def _errors(api, n: int) -> bool:
    _, text = await api.call("GET", "/metrics", role=None)
    for line in text.splitlines():
        if line.startswith("canary_router_errors_total{"):
            return float(line.rsplit(" ", 1)[1]) >= n
    return False


async def test_abort_lands_while_prometheus_accepts_and_never_answers(tmp_path):
    """A hung Prometheus costs only its own gates: the abort does not wait for the
    rollout's evaluation in flight (30 s query timeout; the abort lands within 10 s,
    in milliseconds in bench/controller.py's prometheus_hung rows)."""
    from canary.demo.procs import Blackhole

    hole = Blackhole()
    async with hole as url:
        source = PrometheusSource(url, timeout=30.0)
        pol = simple_policy(hold=60.0, interval=0.2)
        async with controller(tmp_path, policies=[pol], source=source) as (api, _c, target):
            rid = (await api.start(canary_version="v2"))["id"]
            await api.until(rid, lambda r: r["applied_weight"] == 10)
            await eventually(lambda: _true(hole.accepted > 0), what="a query in flight")
            status, _ = await api.call("POST", f"/api/v1/rollouts/{rid}/abort",
                                       {"reason": "bad"}, role="pipeline")
            assert status == 200
            await api.until(rid, lambda r: r["state"] == "rolled_back", deadline=10)
            assert parse_weight(target, target.file.read_text()) == 0
            status, _ = await api.call("GET", "/api/v1/rollouts", role="viewer")
            assert status == 200


async def _true(value: bool) -> bool:
    return value
