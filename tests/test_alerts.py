"""Alertmanager rolls a release back: POST /api/v1/alerts with its webhook payload
(version 4). Firing alerts whose labels match an active rollout's policy `alerts` roll it
back; resolved or unmatched alerts change nothing."""

from __future__ import annotations

import io
import json

import pytest

from canary.policy import AlertRule
from tests.helpers import controller, simple_policy

RULE = AlertRule(matchers={"alertname": "CanaryHighErrorRate", "service": "{{ service }}"})


def payload(*alerts: dict, status: str = "firing") -> dict:
    return {"version": "4", "status": status, "receiver": "canary", "groupKey": "{}:{}",
            "truncatedAlerts": 0, "groupLabels": {}, "commonLabels": {},
            "commonAnnotations": {}, "externalURL": "http://am", "alerts": list(alerts)}


def alert(status: str = "firing", **labels: str) -> dict:
    return {"status": status, "labels": {"alertname": "CanaryHighErrorRate", **labels},
            "annotations": {"summary": "5xx rate of web\nabove 5%\u202e"},
            "startsAt": "2026-11-25T08:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prom/graph", "fingerprint": "abc"}


async def test_firing_alert_matching_the_policy_rolls_the_rollout_back_naming_it(tmp_path):
    async with controller(tmp_path, policies=[simple_policy(hold=3600, alerts=(RULE,))]) \
            as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        await api.until(r["id"], lambda x: x["applied_weight"] == 10)
        status, data = await api.call("POST", "/api/v1/alerts",
                                      payload(alert(service="web", severity="page")),
                                      role="pipeline")
        assert status == 200 and data == {"rolled_back": [r["id"]]}
        done = await api.until(r["id"], lambda x: x["state"] == "rolled_back")
        assert done["reason"].endswith(
            "alert CanaryHighErrorRate firing: 5xx rate of web above 5%"), "one plain line"
        assert any(e["type"] == "abort" and e["actor"] == "pipeline-token"
                   for e in done["events"])


@pytest.mark.parametrize("body", [
    payload(alert("resolved", service="web"), status="resolved"),
    payload(alert(service="api")),                              # another service
    payload({**alert(service="web"), "labels": {"service": "web"}}),  # no alertname
    payload(),
])
async def test_resolved_or_unmatched_alerts_change_nothing(tmp_path, body):
    async with controller(tmp_path, policies=[simple_policy(hold=3600, alerts=(RULE,))]) \
            as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        await api.until(r["id"], lambda x: x["applied_weight"] == 10)
        status, data = await api.call("POST", "/api/v1/alerts", body, role="pipeline")
        assert status == 200 and data == {"rolled_back": []}
        after = await api.rollout(r["id"])
        assert after["state"] == "progressing" and after["weight"] == 10


async def test_a_policy_without_alerts_is_not_rolled_back_by_any_alert(tmp_path):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        status, data = await api.call("POST", "/api/v1/alerts", payload(alert(service="web")),
                                      role="pipeline")
        assert status == 200 and data == {"rolled_back": []}
        assert (await api.rollout(r["id"]))["state"] == "progressing"


@pytest.mark.parametrize("body,field,says", [
    ({"alerts": []}, "version", 'required: "4"'),
    ({"version": "3", "alerts": []}, "version", "'4'"),
    ({"version": "4"}, "alerts", "required: a list of alerts"),
    ({"version": "4", "alerts": [{"labels": {}}]}, "alerts.0.status",
     "required: firing or resolved"),
    ({"version": "4", "alerts": [{"status": "firing"}]}, "alerts.0.labels",
     "required: a JSON object"),
    ({"version": "4", "alerts": [{"status": "firing", "labels": {"a": 1}}]}, "alerts.0.labels.a",
     "must be a string"),
    ({"version": "4", "alerts": "x"}, "alerts", "must be a list"),
    ({"version": "4", "alerts": [], "truncatedAlerts": 1.5}, "truncatedAlerts",
     "must be a whole number"),
])
async def test_bad_alert_bodies_are_refused_naming_the_field(tmp_path, body, field, says):
    """...and saying what the field is: a missing list or object was 'required, a
    non-empty string'."""
    async with controller(tmp_path, policies=[simple_policy(hold=3600, alerts=(RULE,))]) \
            as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        status, data = await api.call("POST", "/api/v1/alerts", body, role="pipeline")
        assert status == 400, data
        assert data["error"].startswith(field + ":"), data
        assert says in data["error"].split(";")[0], data
        assert (await api.rollout(r["id"]))["state"] == "progressing"


@pytest.mark.parametrize("body,says", [
    ({"version": "4", "alerts": [{"status": "firing", "labels": {"a": "x" * 4001}}]},
     "alerts.0.labels.a: at most 4000 characters"),
    ({"version": "4", "alerts": [{"status": "firing", "labels": {"k" * 1025: "x"}}]},
     "at most 1024 characters"),
    ({"version": "4", "alerts": [{"status": "firing",
                                  "labels": {str(i): "x" for i in range(1001)}}]},
     "alerts.0.labels: at most 1000 entries"),
    ({"version": "4", "alerts": [{"status": "firing", "labels": {}}] * 10_001},
     "alerts: at most 10000 entries"),
])
def test_an_alert_body_over_a_limit_is_refused_with_that_limit(body, says):
    # a label value may be 4,000 characters and a name 1,024: the answer gave 1,000 for
    # both, and pydantic's own words for too many labels or alerts
    from canary.api.bodies import AlertmanagerWebhook, parse
    from canary.errors import InvalidInput

    with pytest.raises(InvalidInput) as e:
        parse(AlertmanagerWebhook, body)
    assert says in str(e.value) and "should" not in str(e.value), str(e.value)[-200:]


async def test_alerts_need_a_pipeline_token(tmp_path):
    async with controller(tmp_path, policies=[simple_policy(hold=3600, alerts=(RULE,))]) \
            as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        for role, code in ((None, 401), ("viewer", 403)):
            status, _ = await api.call("POST", "/api/v1/alerts", payload(alert(service="web")),
                                       role=role)
            assert status == code
        assert (await api.rollout(r["id"]))["state"] == "progressing"


# ---- end to end: Prometheus's alert rule, through a real Alertmanager, rolls back -----------

ALERT_RULE = """\
groups:
  - name: canary
    interval: 1s
    rules:
      - alert: CanaryHighErrorRate
        expr: |
          sum by (service, version) (rate(http_requests_total{code=~"5.."}[5s]))
          /
          sum by (service, version) (rate(http_requests_total[5s])) > 0.2
        for: 0s
        labels: {severity: page}
        annotations:
          summary: "5xx rate of {{ $labels.service }} {{ $labels.version }} is {{ $value }}"
"""


def alertmanager_config(api: str, token: str) -> str:
    return f"""\
route:
  receiver: canary
  group_by: [alertname, service]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: canary
    webhook_configs:
      - url: {api}/api/v1/alerts
        send_resolved: true
        http_config:
          authorization: {{type: Bearer, credentials: {token}}}
"""


@pytest.mark.e2e
async def test_a_real_alertmanager_alert_rolls_a_faulty_canary_back(tmp_path):
    from canary.demo.playground import Playground, fast_policy
    from canary.demo.procs import Alertmanager, free_port
    from tests.e2e import running, traffic_settles_at

    pg = Playground(tmp_path / "pg")
    pg.tokens.update({"viewer": "tok-viewer", "pipeline": "tok-pipeline",
                      "oncall": "tok-oncall"})
    am = Alertmanager(tmp_path / "am", free_port(),
                      alertmanager_config(pg.api, pg.tokens["pipeline"]))
    pg.prometheus.rules = ALERT_RULE
    pg.prometheus.alertmanagers = [am.port]
    # gates that never judge a breach: only the alert can roll this rollout back
    policy = {**fast_policy("fast", holds=("10m",) * 4, progress_deadline="30m",
                            max_error=1.0, max_latency=10.0),
              "alerts": [{"matchers": {"alertname": "CanaryHighErrorRate",
                                       "service": "{{ service }}",
                                       "version": "{{ canary_version }}"}}]}
    try:
        am.start()
        await am.ready()
        await pg.start()
        async with running(pg, [policy]) as (api, _load):
            rid = (await api.start(canary_version="v2", stable_version="v1"))["id"]
            await api.until(rid, lambda r: r["applied_weight"] == 5)
            pg.canary.error_rate = 1.0
            r = await api.until(rid, lambda r: r["state"] == "rolled_back", deadline=60,
                                what="rolled back by the alert")
            assert "alert CanaryHighErrorRate firing" in r["reason"]
            assert "5xx rate of web v2" in r["reason"]
            assert any(e["type"] == "abort" and e["actor"] == "pipeline-token"
                       for e in r["events"])
            assert all(g["status"] != "fail" for g in r["gates"]), "the gates did not do it"
            assert await traffic_settles_at(pg, 0, tolerance=0.0) == 0.0
    finally:
        am.stop()
        await pg.stop()


def _sized_alert(i: int) -> dict:
    """An alert as Alertmanager sends one: its generatorURL carries the rule's expression."""
    a = alert(service=f"svc-{i}", version="v2", severity="page", pod=f"svc-{i}-7d9f8-x{i}")
    a["generatorURL"] = "http://prometheus:9090/graph?g0.expr=" + "sum%28rate%28" * 30
    return a


async def test_an_alertmanager_message_of_hundreds_of_alerts_is_read_not_refused(tmp_path):
    """Alertmanager groups alerts into one message; a group of a few hundred (some 150 KiB)
    refused with 413 would never be sent again (Alertmanager retries only 5xx), and the
    matching alert would never roll back. Up to 1 MiB is read; other bodies keep 64 KiB."""
    async with controller(tmp_path, policies=[simple_policy(hold=3600, alerts=(RULE,))]) \
            as (api, _ctl, _t):
        r = await api.start(canary_version="v2")
        big = payload(*[_sized_alert(i) for i in range(300)], alert(service="web"))
        raw = json.dumps(big).encode()
        assert 128 * 1024 < len(raw) < 1024 * 1024
        status, data = await api.call("POST", "/api/v1/alerts", raw=raw, role="pipeline")
        assert status == 200 and data == {"rolled_back": [r["id"]]}, data
        await api.until(r["id"], lambda x: x["state"] == "rolled_back")
        too_big = json.dumps(payload(*[_sized_alert(i) for i in range(3000)])).encode()
        status, data = await api.call("POST", "/api/v1/alerts", raw=io.BytesIO(too_big),
                                      role="pipeline")
        assert status == 413 and "1048576" in data["error"], data
        status, data = await api.call("POST", "/api/v1/rollouts", raw=raw, role="pipeline")
        assert status == 413 and "65536" in data["error"], data

        async def chunks():  # no Content-Length: the limit holds as the body arrives
            for _ in range(4):
                yield raw[:40_000]
        status, data = await api.call("POST", "/api/v1/rollouts", raw=chunks(),
                                      role="pipeline")
        assert status == 413 and "65536" in data["error"], data
