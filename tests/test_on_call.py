"""The on-call view's API (interface.md section 8): a rollout's reading history, kept
across restarts and bounded; Server-Sent Events that follow a rollout to its end; and
who a token is, so the status page shows only the buttons it may use."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import socket
from typing import Any

import aiohttp
import pytest

from canary import history
from canary.gates.kinds import CompareGate, ErrorsGate, ThresholdGate
from canary.policy import NoData, Policy
from canary.stages import Stage
from canary.store.sqlite import SqliteStore
from tests.helpers import TOKENS, Api, controller, eventually, simple_policy


class Counters:
    """Request and error counters of both versions that grow at each query, and a
    latency per version: enough for every gate kind."""

    def __init__(self, canary_error_share: float = 0.001) -> None:
        self.n = 0.0
        self.share = canary_error_share

    async def query(self, promql: str) -> float | None:
        if promql.startswith("latency"):
            return 0.2 if "v1" in promql else 0.21
        return (await self.query_series(promql))[""]

    async def query_series(self, promql: str) -> dict[str, float]:
        self.n += 100.0
        if promql.startswith("req"):
            return {"": self.n * (1 if "v1" in promql else 0.5)}
        rate = 0.001 if "v1" in promql else self.share
        return {"": self.n * rate * (1 if "v1" in promql else 0.5)}


def every_kind(*, hold: float = 0.6) -> Policy:
    return Policy(name="kinds", interval=0.1, failure_limit=2, no_data=NoData.HOLD,
                  progress_deadline=120.0,
                  # Counters gives the canary a third of the requests at every weight:
                  # within half to twice the weight at 25% and 50% (at 10% the errors gate
                  # would hold: far more traffic than its weight)
                  stages=(Stage(25, hold), Stage(50, hold), Stage(100, hold)),
                  gates=(ThresholdGate("latency-max", "latency{{ canary_version }}", max=0.5),
                         CompareGate(name="latency-vs-stable", query="latency{{ version }}",
                                     max_ratio=1.5),
                         ErrorsGate(name="errors", requests="req{{ version }}",
                                    errors="err{{ version }}", gross=1000)))


async def readings(api: Api, rid: str, role: str = "viewer") -> dict[str, Any]:
    status, data = await api.call("GET", f"/api/v1/rollouts/{rid}/readings", role=role)
    assert status == 200, data
    return data  # type: ignore[no-any-return]


@pytest.mark.e2e
async def test_a_rollouts_readings_show_its_weight_and_every_gate_over_time_after_a_restart(
        tmp_path):
    async with controller(tmp_path, policies=[every_kind()], source=Counters()) as (api, _c, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["state"] in ("succeeded", "rolled_back"), deadline=60)
        before = await readings(api, rid)
        assert (await api.rollout(rid))["state"] == "succeeded", before
    # weight over time: each stage's weight, as the router carried it, in order
    assert [(w["stage"], w["weight"]) for w in before["weights"]] == [(0, 25), (1, 50), (2, 100)]
    gates = {g["name"]: g for g in before["gates"]}
    assert {n: g["kind"] for n, g in gates.items()} == {
        "latency-max": "threshold", "latency-vs-stable": "compare", "errors": "errors"}
    for g in gates.values():
        assert len(g["readings"]) >= 3 and {x["stage"] for x in g["readings"]} == {0, 1, 2}
        assert [x["at"] for x in g["readings"]] == sorted(x["at"] for x in g["readings"])
    last = gates["latency-max"]["readings"][-1]
    assert (last["value"], last["max"], last["verdict"]) == (0.21, 0.5, "pass")
    compare = [x for x in gates["latency-vs-stable"]["readings"] if x["stable"] is not None]
    assert compare and all(x["stable"] == 0.2 and math.isclose(x["bound"], 0.3) for x in compare)
    judged = [x for x in gates["errors"]["readings"] if x["canary_requests"]]
    assert judged, gates["errors"]
    assert all(x["stable_requests"] > x["canary_requests"] > 0 and x["max"] == 2.0
               for x in judged), "each side's counts and the evidence's threshold (log10 100)"

    # a restart (a new controller on the same state file) loses none of it
    async with controller(tmp_path, policies=[every_kind()], source=Counters()) as (api, _c, _t):
        assert await readings(api, rid) == before
        status, body = await api.call("GET", "/api/v1/rollouts/nope/readings", role="viewer")
        assert status == 404 and "nope" in body["error"]
        status, _ = await api.call("GET", f"/api/v1/rollouts/{rid}/readings", role=None)
        assert status == 401


@pytest.mark.e2e
async def test_a_rolled_back_rollouts_readings_show_the_breach(tmp_path):
    pol = simple_policy(hold=3600, interval=0.1)
    from tests.helpers import SetSource

    source = SetSource(0.01)
    async with controller(tmp_path, policies=[pol], source=source) as (api, _c, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        await eventually(lambda: _count(api, rid, 3), what="three readings")
        source.value = 0.5
        await api.until(rid, lambda r: r["state"] == "rolled_back")
        data = await readings(api, rid)
    (gate,) = data["gates"]
    verdicts = [x["verdict"] for x in gate["readings"]]
    assert verdicts[-2:] == ["fail", "fail"] and "pass" in verdicts
    assert gate["readings"][-1]["value"] == 0.5 and gate["readings"][-1]["max"] == 0.05
    assert data["weights"][-1]["weight"] == 0 and data["state"] == "rolled_back"


async def _count(api: Api, rid: str, n: int) -> bool:
    data = await readings(api, rid)
    return bool(data["gates"]) and len(data["gates"][0]["readings"]) >= n


def test_a_long_rollouts_history_is_bounded_keeps_recent_readings_and_every_verdict_change():
    stored: list[dict[str, Any]] = []
    flips = set()
    for i in range(5000):
        verdict = "fail" if i % 700 == 350 else "pass"
        if verdict == "fail":
            flips.update({i, i + 1})
        stored.append({"series": "g", "at": float(i), "verdict": verdict, "i": i})
        drop = set(history.thin(stored))
        stored = [p for k, p in enumerate(stored) if k not in drop]
        assert len(stored) <= history.MAX_POINTS
    kept = [p["i"] for p in stored]
    assert kept[0] == 0 and kept[-history.RECENT:] == list(range(5000 - history.RECENT, 5000))
    assert flips <= set(kept), "a breach and the reading after it are never thinned away"
    gaps = [b - a for a, b in itertools.pairwise(kept)]
    slices = (history.MAX_POINTS - history.RECENT) // 2
    assert max(gaps) <= 3 * 5000 / slices, "old history is evenly spaced, not cut in stretches"


@pytest.mark.e2e
async def test_the_sqlite_store_keeps_a_long_rollouts_history_bounded(tmp_path):
    from tests.helpers import seed

    store = SqliteStore(str(tmp_path / "state.db"))
    try:
        (r,) = await seed(store, 1)
        for i in range(1500):
            r = await store.save(rollout=r, expected_version=r.version, readings=[
                {"series": "g", "at": float(i), "verdict": "pass", "value": float(i)},
                *([{"series": "", "at": float(i), "weight": 10, "stage": 0}] if i == 0 else [])])
        got = await store.readings(r.id)
        assert len([p for p in got if p["series"] == "g"]) <= history.MAX_POINTS
        assert [p["weight"] for p in got if p["series"] == ""] == [10]
        assert got[-1]["value"] == 1499.0
    finally:
        await store.close()


# ---- watch --------------------------------------------------------------------------------


async def events(api: Api, rid: str, *, until: int = 1000, token: str = TOKENS["viewer"],
                 raw: list[str] | None = None) -> list[dict[str, Any]]:
    """The `rollout` events of the watch stream, to its end (or `until` of them)."""
    out: list[dict[str, Any]] = []
    async with api.s.get(f"{api.base}/api/v1/rollouts/{rid}/watch",
                         headers={"Authorization": f"Bearer {token}"},
                         timeout=aiohttp.ClientTimeout(total=60)) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        kind = None
        async for line in resp.content:
            text = line.decode().rstrip("\n")
            if raw is not None:
                raw.append(text)
            if text.startswith("event: "):
                kind = text[7:]
            elif text.startswith("data: ") and kind == "rollout":
                out.append(json.loads(text[6:]))
                if len(out) >= until:
                    break
    return out


@pytest.mark.e2e
async def test_watch_streams_the_rollout_on_each_change_until_it_is_final(tmp_path):
    pol = simple_policy(hold=0.5, interval=0.1)
    async with controller(tmp_path, policies=[pol], heartbeat=0.2) as (api, _c, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        raw: list[str] = []
        seen = await events(api, rid, raw=raw)  # returns when the server ends the stream
        assert seen[-1]["state"] == "succeeded"
        assert [r["state"] for r in seen[:-1]] and all(r["state"] == "progressing"
                                                       for r in seen[:-1])
        weights = [r["applied_weight"] for r in seen]
        assert {10, 50, 100} <= set(weights) and weights == sorted(weights, key=lambda w: w or 0)
        updated = [r["updated_at"] for r in seen]
        assert updated == sorted(updated) and len(set(updated)) == len(updated), "each change once"
        # a finished rollout: its JSON once, then the end
        assert [r["state"] for r in await events(api, rid)] == ["succeeded"]


@pytest.mark.e2e
async def test_a_quiet_watch_gets_heartbeats_and_sees_an_override(tmp_path):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)],
                          heartbeat=0.1) as (api, _c, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        raw: list[str] = []
        watching = asyncio.ensure_future(events(api, rid, raw=raw))
        await eventually(lambda: _ready(raw.count(": heartbeat") >= 2), what="heartbeats")
        status, _ = await api.call("POST", f"/api/v1/rollouts/{rid}/pause",
                                   {"reason": "looking at it"})
        assert status == 200
        await eventually(lambda: _ready(any('"paused"' in x for x in raw)), what="paused")
        await api.call("POST", f"/api/v1/rollouts/{rid}/abort", {"reason": "bad"})
        seen = await asyncio.wait_for(watching, 30)
    assert [r["state"] for r in seen][-1] == "rolled_back"
    assert any(r["state"] == "paused" and "looking at it" in r["reason"] for r in seen)


async def _ready(value: bool) -> bool:
    return value


async def test_watch_refuses_unknown_ids_and_missing_tokens(tmp_path):
    async with controller(tmp_path) as (api, _c, _t):
        status, body = await api.call("GET", "/api/v1/rollouts/nope/watch", role="viewer")
        assert status == 404 and "nope" in body["error"]
        status, _ = await api.call("GET", "/api/v1/rollouts/nope/watch", role=None)
        assert status == 401


async def test_whoami_names_the_tokens_role_and_what_it_may_do(tmp_path):
    async with controller(tmp_path) as (api, _c, _t):
        got = {}
        for role in ("viewer", "pipeline", "oncall"):
            status, body = await api.call("GET", "/api/v1/whoami", role=role)
            assert status == 200
            got[role] = body
    assert got["viewer"] == {"name": "viewer-token", "role": "viewer", "targets": None,
                             "may": []}
    assert got["pipeline"]["may"] == ["start", "abort", "handover"]
    assert set(got["oncall"]["may"]) == {"start", "pause", "resume", "promote", "abort",
                                         "handover"}


# ---- the controller's own metrics ---------------------------------------------------------


@pytest.mark.e2e
async def test_a_rolled_back_rollouts_breaching_reading_stays_on_metrics_to_be_scraped(tmp_path):
    from tests.helpers import SetSource

    source = SetSource(0.01)
    async with controller(tmp_path, policies=[simple_policy(hold=3600, interval=0.1)],
                          source=source) as (api, _c, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["gates"][0]["status"] == "pass")
        source.value = 0.5
        await api.until(rid, lambda r: r["state"] == "rolled_back")
        async with api.s.get(f"{api.base}/metrics") as resp:
            text = await resp.text()
    labels = f'gate="errors",rollout="{rid}",target="web"'
    assert f"canary_gate_value{{{labels}}} 0.5" in text
    assert f"canary_gate_failing{{{labels}}} 1.0" in text
    assert f'canary_rollout_finished_timestamp_seconds{{outcome="rolled_back",rollout="{rid}"' \
        in text
    assert f'canary_rollout_weight_percent{{rollout="{rid}"' not in text  # (no longer live)


def test_a_finished_rollouts_series_go_after_the_retention():
    from dataclasses import replace

    from prometheus_client import generate_latest

    from canary.engine import decide
    from canary.metrics import Metrics
    from canary.model import GateStatus, Phase, Verdict

    now = [0.0]
    m = Metrics(retain=900, clock=lambda: now[0])
    r = decide.start(rollout_id="r1", target="web", policy=simple_policy(), canary_version="v2",
                     stable_version="v1", now=1.0, actor="t")
    gate = GateStatus("errors", None, 0.05, Verdict.FAIL, 0.5, 2, at=2.0)
    m.observe(replace(r, gates=(gate,)))
    m.observe(replace(r, gates=(gate,), state=Phase.ROLLED_BACK, weight=0))
    now[0] = 899.0
    m.expire()
    assert b'canary_gate_value{gate="errors",rollout="r1",target="web"} 0.5' in \
        generate_latest(m.registry)
    now[0] = 900.0
    m.expire()
    text = generate_latest(m.registry)
    assert b'rollout="r1"' not in text


async def test_a_watcher_that_hangs_up_is_forgotten_quietly(tmp_path, caplog):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)],
                          heartbeat=0.05) as (api, ctl, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        hub = ctl.listeners[0].__self__
        for _ in range(3):
            seen = await events(api, rid, until=1)  # reads one event, then hangs up
            assert seen[0]["id"] == rid
        await eventually(lambda: _ready(hub.count() == 0), what="every watcher forgotten")
        await api.call("POST", f"/api/v1/rollouts/{rid}/pause", {"reason": "after"})
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_a_scoped_token_sees_no_readings_or_watch_of_a_rollout_out_of_its_scope(tmp_path):
    from tests.test_access import SHOP_TOKEN, two_teams

    async with two_teams(tmp_path) as api:
        web_id = (await api.start(canary_version="v2", target="web"))["id"]
        unknown = "20260101-000000-abcdef"
        for what in ("readings", "watch"):
            status, body = await api.call("GET", f"/api/v1/rollouts/{web_id}/{what}",
                                          token=SHOP_TOKEN)
            _, not_there = await api.call("GET", f"/api/v1/rollouts/{unknown}/{what}",
                                          token=SHOP_TOKEN)
            assert status == 404, (what, body)
            assert body == {"error": not_there["error"].replace(unknown, web_id)}, \
                "out of scope answers exactly as an unknown id"
        status, me = await api.call("GET", "/api/v1/whoami", token=SHOP_TOKEN)
        assert status == 200 and me["targets"] == ["shop-*"] and me["may"] == ["start", "abort",
                                                                             "handover"]


@pytest.mark.e2e
async def test_a_watcher_that_stops_reading_does_not_hold_its_stream_forever(tmp_path,
                                                                            monkeypatch, caplog):
    """A client that opens a watch and never reads (its socket buffers full) used to hold
    the handler in a write forever, past the rollout's end: 2,000 of them would take
    every stream for good. A write that cannot go out within WRITE_TIMEOUT ends the
    stream, and the place is free for a watcher that reads."""
    from canary.api import watch

    monkeypatch.setattr(watch, "WRITE_TIMEOUT", 0.5)
    async with controller(tmp_path, policies=[simple_policy(hold=3600)],
                          heartbeat=0.05) as (api, ctl, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        hub = ctl.listeners[0].__self__
        host, port = api.base.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(f"GET /api/v1/rollouts/{rid}/watch HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {TOKENS['viewer']}\r\n\r\n".encode())
        try:
            await eventually(lambda: _ready(hub.count() == 1), what="the stream open")
            for i in range(120):  # changes, each sending the whole (growing) rollout
                kind = "pause" if i % 2 == 0 else "resume"
                status, _ = await api.call("POST", f"/api/v1/rollouts/{rid}/{kind}",
                                           {"reason": f"{kind} {i} " + "x" * 900})
                assert status == 200
            await api.call("POST", f"/api/v1/rollouts/{rid}/abort", {"reason": "done"})
            await eventually(lambda: _ready(hub.count() == 0),
                             what="the stream of the client that never reads ended")
            monkeypatch.setattr(watch, "MAX_WATCHERS", 1)
            seen = await events(api, rid)
            assert seen[-1]["state"] == "rolled_back", "a reading watcher gets the place"
        finally:
            sock.close()
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_one_token_cannot_take_every_watch_place_from_the_others(tmp_path, monkeypatch):
    """A runaway dashboard or a leaked viewer token holds at most MAX_PER_TOKEN streams:
    its next one is a 429 naming the token, while the on-call's own token still watches;
    a stream it closes gives it the place back."""
    from canary.api import watch

    monkeypatch.setattr(watch, "MAX_PER_TOKEN", 1)
    async with controller(tmp_path, policies=[simple_policy(hold=3600)],
                          heartbeat=0.05) as (api, ctl, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        hub = ctl.listeners[0].__self__
        url = f"{api.base}/api/v1/rollouts/{rid}/watch"
        viewer = {"Authorization": f"Bearer {TOKENS['viewer']}"}
        first = await api.s.get(url, headers=viewer)
        try:
            assert first.status == 200
            await eventually(lambda: _ready(hub.count() == 1), what="the first stream open")
            async with api.s.get(url, headers=viewer) as second:
                assert second.status == 429, await second.text()
                body = await second.json()
                assert "'viewer-token'" in body["error"] and "poll GET" in body["error"], body
                assert second.headers["Retry-After"] == "5"
            oncall = asyncio.create_task(events(api, rid, until=1, token=TOKENS["oncall"]))
            [seen] = await oncall
            assert seen["state"] == "progressing", "another token still watches"
        finally:
            first.close()
        await eventually(lambda: _ready(hub.count() == 0), what="the first stream closed")
        [seen] = await events(api, rid, until=1)
        assert seen["state"] == "progressing", "the place is the viewer's again"
