"""Telling people, against real HTTP receivers on loopback: every event a person cares
about reaches chat (slack, teams) and webhook receivers, in order, each with its
idempotency key, signed when asked; a receiver that fails or hangs is retried and never
slows a rollout."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from canary.demo.procs import Blackhole
from canary.notify import Notification, Notifier
from tests.helpers import controller, eventually, simple_policy
from tests.receivers import Received, Receiver


@asynccontextmanager
async def telling(tmp_path, receivers: list[Notification], *, reminder: float = 1800.0,
                  **policy: Any) -> AsyncIterator[Any]:
    async with controller(tmp_path, policies=[simple_policy(**policy)]) as (api, ctl, t):
        if ctl.notifier is not None:
            await ctl.notifier.stop()  # (the one every controller has: no receivers)
        ctl.notifier = Notifier(receivers, ctl.store, clock=ctl.clock, metrics=ctl.metrics,
                                reminder=reminder, link="https://canary.example")
        await ctl.notifier.start()
        yield api, ctl, t


def keys(rx: Receiver) -> list[str]:
    return [x.headers["Idempotency-Key"] for x in rx.got]


def metric(text: str, name: str, receiver: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'receiver="{receiver}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.e2e
async def test_every_event_reaches_a_webhook_receiver_in_order_with_its_key(tmp_path):
    async with Receiver() as rx, telling(tmp_path, [Notification(name="ops", url=rx.url)],
                                         hold=0.3) as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        r = await api.until(r["id"], lambda x: x["state"] == "succeeded")

        async def all_in():
            return [x.json for x in rx.got] if len(rx.got) >= 4 else None
        sent = await eventually(all_in, what="four messages")
        assert [m["event"]["category"] for m in sent] == ["started", "stage", "stage",
                                                          "succeeded"]
        assert keys(rx) == [m["idempotency_key"] for m in sent]
        assert keys(rx) == sorted(set(keys(rx)), key=keys(rx).index), "none twice"
        assert all(k.startswith(r["id"] + "-") for k in keys(rx))
        assert [m["event"]["seq"] for m in sent] == sorted(m["event"]["seq"] for m in sent)
        assert sent[-1]["rollout"]["id"] == r["id"] and sent[0]["rollout"]["target"] == "web"
        assert sent[0]["link"] == f"https://canary.example/api/v1/rollouts/{r['id']}"


async def test_slack_and_teams_get_readable_text_with_target_versions_stage_reason_and_link(
        tmp_path):
    async with Receiver() as slack, Receiver() as teams, telling(tmp_path, [
            Notification(name="chat", url=slack.url, format="slack",
                         events=("rolled_back", "paused")),
            Notification(name="teams", url=teams.url, format="teams", events=("rolled_back",)),
    ], hold=3600) as (api, _ctl, _t):
        r = await api.start(canary_version="v2", stable_version="v1")
        await api.until(r["id"], lambda x: x["applied_weight"] == 10)
        await api.call("POST", f"/api/v1/rollouts/{r['id']}/pause", {"reason": "checking logs"})
        await api.call("POST", f"/api/v1/rollouts/{r['id']}/abort", {"reason": "bad build"},
                       role="pipeline")
        await eventually(lambda: _count(slack, 3), what="slack messages")
        texts = [x.json["text"] for x in slack.got]
        assert texts[0].startswith("canary: web v1 → v2: paused by oncall-token: checking logs")
        assert "stage 0, weight 10%" in texts[0]
        assert any("rolling back: aborted by pipeline-token: bad build" in t for t in texts)
        assert all(f"<https://canary.example/api/v1/rollouts/{r['id']}|rollout" in t
                   for t in texts)
        await eventually(lambda: _count(teams, 2), what="teams messages")
        card = teams.got[0].json
        assert card["@type"] == "MessageCard" and "bad build" in card["text"]
        assert card["potentialAction"][0]["targets"][0]["uri"].endswith(r["id"])


@pytest.mark.e2e
async def test_a_receiver_answering_500_gets_every_message_once_it_recovers(tmp_path):
    rx = Receiver(status=500, text="down for maintenance")
    async with rx, telling(tmp_path, [Notification(name="ops", url=rx.url)],
                           hold=0.3) as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        await api.until(r["id"], lambda x: x["state"] == "succeeded")
        await eventually(lambda: _count(rx, 3), what="retries")
        _, text = await api.call("GET", "/metrics", role=None)
        assert metric(text, "canary_notification_failures_total", "ops") >= 3
        assert metric(text, "canary_notification_backlog_rollouts", "ops") == 1
        rx.status = 200
        failed = len(rx.got)

        async def delivered():
            ok = keys(rx)[failed:]
            return ok if len(ok) >= 4 else None
        ok = await eventually(delivered, deadline=60, what="delivered after recovery")
        assert len(ok) == len(set(ok)) == 4, "each message once after it was accepted"
        assert ok == sorted(ok, key=lambda k: int(k.rsplit("-", 1)[1]))


async def test_messages_are_signed_with_hmac_sha256_and_the_secret_is_never_logged(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CANARY_TEST_NOTIFY_SECRET", "s3cret-value")
    caplog.set_level(logging.DEBUG)
    async with Receiver() as rx, telling(tmp_path, [
            Notification(name="ops", url=rx.url, secret_env="CANARY_TEST_NOTIFY_SECRET",
                         events=("started",))]) as (api, _ctl, _t):
        await api.start(canary_version="v2")
        await eventually(lambda: _count(rx, 1), what="a signed message")
        got = rx.got[0]
        want = hmac.new(b"s3cret-value", got.body, hashlib.sha256).hexdigest()
        assert got.headers["X-Canary-Signature"] == f"sha256={want}"
    assert "s3cret-value" not in caplog.text


@pytest.mark.e2e
async def test_waiting_for_approval_is_announced_and_reminded_until_promoted(tmp_path):
    async with Receiver() as rx, telling(tmp_path, [
            Notification(name="ops", url=rx.url, events=("approval",))],
            reminder=0.5, hold=0.3, approval=True) as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        await eventually(lambda: _count(rx, 3), what="approval and two reminders")
        first, *reminders = [x.json["event"] for x in rx.got]
        assert first["reminder"] is None and "waiting for approval at stage 1" in first["text"]
        assert [e["reminder"] for e in reminders[:2]] == [1, 2]
        assert "still waiting for approval at weight 50%" in reminders[0]["text"]
        await api.call("POST", f"/api/v1/rollouts/{r['id']}/promote", {"reason": "ok"})
        await api.until(r["id"], lambda x: x["state"] == "succeeded")
        n = len(rx.got)
        assert len(set(keys(rx))) == n, "each reminder once"


@pytest.mark.e2e
async def test_a_receiver_that_hangs_does_not_slow_the_rollout_and_is_bounded(tmp_path):
    async with Blackhole() as url, telling(tmp_path, [
            Notification(name="hung", url=url, timeout=30.0)], hold=0.3) as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        await api.until(r["id"], lambda x: x["state"] == "succeeded")
        r2 = await api.start(canary_version="v3")
        await api.call("POST", f"/api/v1/rollouts/{r2['id']}/abort", {"reason": "x"},
                       role="pipeline")
        await api.until(r2["id"], lambda x: x["state"] == "rolled_back")
        _, text = await api.call("GET", "/metrics", role=None)
        assert metric(text, "canary_notification_backlog_rollouts", "hung") == 2
        assert metric(text, "canary_notifications_sent_total", "hung") == 0


async def _count(rx: Receiver, n: int) -> bool:
    return len(rx.got) >= n


@pytest.mark.e2e
async def test_a_signed_receiver_whose_secret_is_unset_gets_nothing_unsigned(tmp_path,
                                                                             monkeypatch):
    monkeypatch.delenv("CANARY_TEST_LATE_SECRET", raising=False)
    async with Receiver() as rx, telling(tmp_path, [
            Notification(name="ops", url=rx.url, secret_env="CANARY_TEST_LATE_SECRET",
                         events=("started",))]) as (api, _ctl, _t):
        await api.start(canary_version="v2")

        async def failed():
            _, text = await api.call("GET", "/metrics", role=None)
            return metric(text, "canary_notification_failures_total", "ops") >= 1
        await eventually(failed, what="a refused send")
        assert rx.got == []
        monkeypatch.setenv("CANARY_TEST_LATE_SECRET", "late")
        await eventually(lambda: _count(rx, 1), deadline=60, what="sent once the secret is set")
        assert rx.got[0].headers["X-Canary-Signature"].startswith("sha256=")


def test_each_event_a_person_cares_about_has_a_name_receivers_pick_from():
    from canary.notify import NOTIFY_EVENTS, category
    assert {t: category(t) for t in (
        "start", "stage", "pause", "approval", "drift", "router_error", "router_recovered",
        "rollback", "rolled_back", "succeeded", "handover", "hook", "resume", "trimmed")} == {
        "start": "started", "stage": "stage", "pause": "paused", "approval": "approval",
        "drift": "drift", "router_error": "router", "router_recovered": "router",
        "rollback": "rolled_back", "rolled_back": "rolled_back", "succeeded": "succeeded",
        "handover": "handover", "hook": None, "resume": None, "trimmed": None}
    assert set(NOTIFY_EVENTS) == {c for c in (category(t) for t in (
        "start", "stage", "pause", "approval", "drift", "router_error", "rollback",
        "succeeded", "handover")) if c}


@pytest.mark.e2e
async def test_a_receiver_whose_url_is_a_secret_reads_it_from_the_environment(
        tmp_path, monkeypatch, caplog):
    """A chat's incoming-webhook URL is itself a secret: `url_env` keeps it out of the
    config. Messages reach it; the URL is never logged; while the variable is unset the
    messages wait (retried) and arrive once it is set."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("CANARY_TEST_CHAT_URL", raising=False)
    async with Receiver() as rx, telling(tmp_path, [
            Notification(name="chat", url_env="CANARY_TEST_CHAT_URL", format="slack",
                         events=("started",))]) as (api, _ctl, _t):
        await api.start(canary_version="v2")
        async def failed() -> bool:
            _, text = await api.call("GET", "/metrics", role=None)
            return metric(text, "canary_notification_failures_total", "chat") >= 1
        await eventually(failed, what="a failed try while the variable is unset")
        assert not rx.got
        monkeypatch.setenv("CANARY_TEST_CHAT_URL", rx.url + "/services/T0/B0/chat-secret-path")
        await eventually(lambda: _count(rx, 1), what="the message once the URL is set")
        assert rx.got[0].path == "/services/T0/B0/chat-secret-path"
    assert "chat-secret-path" not in caplog.text
    assert "CANARY_TEST_CHAT_URL (the URL) is not set" in caplog.text


class Refusing(Receiver):
    """Refuses (400, as a chat refuses a payload it cannot take) every message about one
    rollout, and takes the others."""

    refused: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.refused and self.refused.encode() in body:
            return web.Response(status=400, text="invalid_payload")
        self.got.append(Received(request.path, dict(request.headers), body))
        return web.Response(text="ok")


@pytest.mark.e2e
async def test_a_message_the_receiver_refuses_does_not_block_other_rollouts_messages(tmp_path):
    """A receiver refusing one rollout's message (a 4xx that retrying will not change)
    used to be asked that message again and again first: no other rollout's message
    reached it ever again. That rollout's messages wait (in order, still retried); the
    other rollouts' messages go on."""
    rx = Refusing()
    async with rx, telling(tmp_path, [Notification(name="chat", url=rx.url, format="slack",
                                                   events=("started", "rolled_back"))],
                           hold=3600) as (api, _ctl, _t):
        stuck = await api.start(canary_version="v2")
        rx.refused = stuck["id"]

        async def failed() -> bool:
            _, text = await api.call("GET", "/metrics", role=None)
            return metric(text, "canary_notification_failures_total", "chat") >= 1
        await eventually(failed, what="the refused message tried")
        await api.call("POST", f"/api/v1/rollouts/{stuck['id']}/abort", {"reason": "next"},
                       role="pipeline")
        await api.until(stuck["id"], lambda x: x["state"] == "rolled_back")
        other = await api.start(canary_version="v3")

        async def other_told() -> bool:
            return any(other["id"] in x.body.decode() for x in rx.got)
        await eventually(other_told, deadline=20, what="the other rollout's message")
        assert not any(stuck["id"] in x.body.decode() for x in rx.got)
