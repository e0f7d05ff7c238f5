"""A policy's webhooks, against real HTTP receivers on loopback: pre-rollout, stage and
pre-promotion hooks gate (2xx goes on; anything else or no answer within the timeout holds
and counts as a failing evaluation), post-rollout and rollback hooks are told, and none of
it stands between on-call and an abort."""

from __future__ import annotations

from dataclasses import replace

import pytest

from canary.demo.procs import Blackhole
from canary.engine import decide
from canary.hooks import Webhook
from canary.model import CommandKind, Phase, Reading, Readings, Verdict
from canary.routers.nginx import parse_weight
from tests.helpers import controller, eventually, simple_policy
from tests.receivers import Receiver


def hook(when: str, url: str, *, name: str = "smoke", timeout: float = 2.0) -> Webhook:
    return Webhook(name=name, when=when, url=url + "/run/{{ service }}", timeout=timeout)  # type: ignore[arg-type]


# ---- the state machine, on a driven clock -------------------------------------------------


def started(pol):
    r = decide.start(rollout_id="r1", target="web", policy=pol, canary_version="v2",
                     stable_version="v1", now=0.0, actor="pipeline")
    return decide.applied(r, r.weight, 1.0)


def answer(r, pol, verdict, at):
    rd = Readings(at, r.stage, (Reading("hook:smoke", verdict, detail="x"),))
    return decide.tick(decide.readings(r, pol, rd, at), pol, at)


def test_pre_rollout_holds_weight_0_until_the_hook_passes_and_rolls_back_at_the_limit():
    pol = simple_policy(hold=60, webhooks=(hook("pre-rollout", "http://h"),))
    r = started(pol)
    assert (r.weight, r.applied_weight, r.pre_rollout) == (0, 0, True)
    r = answer(r, pol, Verdict.FAIL, 2.0)
    assert r.state is Phase.PROGRESSING and r.weight == 0, "one refusal holds"
    ok = answer(r, pol, Verdict.PASS, 3.0)
    assert (ok.weight, ok.stage, ok.pre_rollout) == (10, 0, False)
    assert [g.name for g in ok.gates] == ["errors"], "the stage's own gates from here on"
    r = answer(r, pol, Verdict.FAIL, 3.0)
    assert r.state is Phase.ROLLED_BACK and r.applied_weight == 0


def test_on_call_can_promote_past_or_resume_during_the_pre_rollout_hooks():
    pol = simple_policy(hold=60, webhooks=(hook("pre-rollout", "http://h"),))
    from canary.model import Command
    r = decide.command(started(pol), pol, Command(CommandKind.PAUSE, "bob", "wait"), 2.0)
    r = decide.command(r, pol, Command(CommandKind.RESUME, "bob", "go"), 3.0)
    assert r.weight == 0 and r.pre_rollout, "a resume moves no traffic"
    r = decide.command(r, pol, Command(CommandKind.PROMOTE, "bob", "skip"), 4.0)
    assert (r.weight, r.stage, r.pre_rollout) == (10, 0, False)


def test_stage_hooks_are_gates_of_every_stage_and_pre_promotion_of_the_last_but_one():
    pol = simple_policy(webhooks=(hook("stage", "http://h", name="s"),
                                  hook("pre-promotion", "http://h", name="p")))
    assert [[g.name for g in decide.fresh_gates(pol, i)] for i in range(3)] == [
        ["hook:s", "errors"], ["hook:s", "hook:p", "errors"], ["hook:s", "errors"]]


# ---- against real receivers -------------------------------------------------------------


async def test_a_pre_rollout_hook_that_answers_2xx_lets_traffic_move(tmp_path):
    async with Receiver() as rx, controller(tmp_path, policies=[simple_policy(
            hold=3600, webhooks=(hook("pre-rollout", rx.url),))]) as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        assert r["weight"] == 0, "no traffic before the pre-rollout hook said yes"
        r = await api.until(r["id"], lambda x: x["applied_weight"] == 10)
        sent = rx.got[0]
        assert sent.path == "/run/web", "the URL's {{ vars }} are filled"
        assert sent.json["hook"] == "smoke" and sent.json["when"] == "pre-rollout"
        assert sent.json["id"] == r["id"] and sent.json["canary_version"] == "v2"
        assert any(e["type"] == "stage" and "pre-rollout hooks answered 2xx" in e["message"]
                   for e in r["events"])


async def test_a_refused_pre_rollout_hook_rolls_back_before_any_traffic_moves(tmp_path):
    async with Receiver(status=412, text="smoke tests failed: /login 500") as rx, \
            controller(tmp_path, policies=[simple_policy(
                hold=3600, webhooks=(hook("pre-rollout", rx.url),))]) as (api, _ctl, target):
        r = await api.start(canary_version="v2")
        r = await api.until(r["id"], lambda x: x["state"] == "rolled_back")
        assert "hook:smoke" in r["reason"] and "HTTP 412: smoke tests failed: /login 500" \
            in r["reason"] and "failure_limit 2" in r["reason"]
        assert not any(e["type"] == "stage" for e in r["events"])
        assert next(e["message"] for e in r["events"] if e["type"] == "hook").startswith(
            "hook smoke: fail (pre-rollout hook answered HTTP 412")
        assert parse_weight(target, target.file.read_text()) == 0
        assert len(rx.got) == 2, "a refusal (4xx) is not retried: one call per evaluation"


@pytest.mark.e2e
async def test_a_stage_hook_answering_500_holds_the_stage_then_rolls_back(tmp_path):
    rx = Receiver()
    async with rx, controller(tmp_path, policies=[simple_policy(
            hold=0.5, webhooks=(hook("stage", rx.url, timeout=1.0),))]) as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        await api.until(r["id"], lambda x: x["applied_weight"] == 10)
        rx.status, rx.text = 500, "boom"
        r = await api.until(r["id"], lambda x: x["state"] == "rolled_back")
        assert "hook:smoke: fail" in r["reason"] and "HTTP 500: boom" in r["reason"]
        gate = next(g for g in r["gates"] if g["name"] == "hook:smoke")
        assert gate["status"] == "fail" and "HTTP 500: boom" in gate["detail"]


@pytest.mark.e2e
async def test_a_stage_hook_that_fails_holds_the_rollout_where_it_is(tmp_path):
    pol = replace(simple_policy(hold=0.5, webhooks=(hook("stage", "http://127.0.0.1:1"),)),
                  failure_limit=1000)
    async with controller(tmp_path, policies=[pol]) as (api, _ctl, _t):
        r = await api.start(canary_version="v2")

        async def failed_twice():
            x = await api.rollout(r["id"])
            g = next(g for g in x["gates"] if g["name"] == "hook:smoke")
            return x if g["failures"] >= 2 else None
        x = await eventually(failed_twice)
        assert x["state"] == "progressing" and x["stage"] == 0 and x["weight"] == 10
        assert "no answer" in next(g for g in x["gates"] if g["name"] == "hook:smoke")["detail"]


@pytest.mark.e2e
async def test_a_hook_that_never_answers_fails_after_its_timeout(tmp_path):
    async with Blackhole() as url, controller(tmp_path, policies=[simple_policy(
            hold=3600, webhooks=(hook("pre-rollout", url, timeout=0.3),))]) as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        r = await api.until(r["id"], lambda x: x["state"] == "rolled_back")
        assert "no answer within 300ms" in r["reason"]


async def test_an_abort_does_not_wait_for_a_hung_hook(tmp_path):
    async with Blackhole() as url, controller(tmp_path, policies=[simple_policy(
            hold=0.2, webhooks=(hook("stage", url, timeout=600.0),))]) as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        await api.until(r["id"], lambda x: x["applied_weight"] == 10)
        status, _ = await api.call("POST", f"/api/v1/rollouts/{r['id']}/abort",
                                   {"reason": "bad build"}, role="pipeline")
        assert status == 200
        # the hook would hold its call for 10 minutes; the rollback is done long before
        r = await api.until(r["id"], lambda x: x["state"] == "rolled_back", deadline=20)
        assert r["weight"] == 0


@pytest.mark.e2e
async def test_pre_promotion_hook_is_asked_only_before_the_step_to_100(tmp_path):
    async with Receiver() as rx, controller(tmp_path, policies=[simple_policy(
            hold=0.3, webhooks=(hook("pre-promotion", rx.url, name="confirm"),))]) \
            as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        r = await api.until(r["id"], lambda x: x["state"] == "succeeded")
        assert rx.got and {x.json["stage"] for x in rx.got} == {1}
        assert {x.json["weight"] for x in rx.got} == {50}


@pytest.mark.e2e
async def test_post_rollout_and_rollback_hooks_are_told_once_the_rollout_ends(tmp_path):
    async with Receiver() as done, Receiver() as back, controller(tmp_path, policies=[
            simple_policy(hold=0.3, webhooks=(hook("post-rollout", done.url, name="done"),
                                              hook("rollback", back.url, name="back")))]) \
            as (api, _ctl, _t):
        ok = await api.start(canary_version="v2")
        await api.until(ok["id"], lambda x: x["state"] == "succeeded")
        await eventually(lambda: _has(done), what="post-rollout hook told")
        assert done.got[0].json["state"] == "succeeded" and done.got[0].json["when"] \
            == "post-rollout"
        bad = await api.start(canary_version="v3")
        await api.call("POST", f"/api/v1/rollouts/{bad['id']}/abort", {"reason": "no"},
                       role="pipeline")
        await eventually(lambda: _has(back), what="rollback hook told")
        assert back.got[0].json["state"] == "rolled_back" and back.got[0].json["id"] \
            == bad["id"]
        assert len(done.got) == 1


async def _has(rx: Receiver) -> bool:
    return bool(rx.got)


async def test_a_told_hook_that_fails_is_told_again_until_it_answers_2xx(tmp_path):
    back = Receiver(status=503, text="busy")
    async with back, controller(tmp_path, policies=[simple_policy(
            hold=3600, webhooks=(hook("rollback", back.url, name="back", timeout=0.5),))]) \
            as (api, ctl, _t):
        r = await api.start(canary_version="v2")
        await api.call("POST", f"/api/v1/rollouts/{r['id']}/abort", {"reason": "no"},
                       role="pipeline")
        await eventually(lambda: _has(back), what="the first try")
        back.status = 200
        tried = len(back.got)

        async def told():
            return back.got[tried:] if len(back.got) > tried else None
        await eventually(told, deadline=60, what="told once it answers 2xx")
        stored = await ctl.store.load(r["id"])
        assert stored.delivered.get("hook:back") == 1, "recorded: not told again"


@pytest.mark.e2e
async def test_a_failing_told_hook_does_not_hold_back_another_rollouts(tmp_path, monkeypatch):
    """Told hooks of every rollout share one queue: a rollback hook whose endpoint is down
    backs off (here 30 s) for its own rollout only; another rollout's post-rollout hook,
    due meanwhile, is told at once, not after the other's backoff."""
    from canary import notify

    monkeypatch.setattr(notify, "BACKOFF_FIRST", 30.0)
    down = Receiver(status=503, text="down")
    async with down, Receiver() as done, controller(tmp_path, policies=[simple_policy(
            hold=0.3, webhooks=(hook("rollback", down.url, name="back", timeout=0.5),
                                hook("post-rollout", done.url, name="done")))]) \
            as (api, _ctl, _t):
        bad = await api.start(canary_version="v2")
        await api.call("POST", f"/api/v1/rollouts/{bad['id']}/abort", {"reason": "no"},
                       role="pipeline")

        async def backing_off() -> bool:  # (counted as its try fails, before the backoff)
            _, text = await api.call("GET", "/metrics", role=None)
            return 'canary_notification_failures_total{receiver="hook:"} 1.0' in text
        await eventually(backing_off, what="the rollback hook failed, backing off")
        ok = await api.start(canary_version="v3")
        await api.until(ok["id"], lambda x: x["state"] == "succeeded")
        await eventually(lambda: _has(done), deadline=10,
                         what="the other rollout's post-rollout hook told during the backoff")
        assert done.got[0].json["id"] == ok["id"]
