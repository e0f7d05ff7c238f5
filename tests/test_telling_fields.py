"""The policy's `webhooks`, `alerts` and `approval_timeout` and the config's
`notifications`: written in YAML, checked with a message naming the field, kept with a
rollout as written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from canary import policy as policy_mod

POLICY = """\
stages:
  - {weight: 50, hold: 1m, approval: true}
  - {weight: 100, hold: 1m}
webhooks:
  - {name: smoke, when: pre-rollout, url: "http://tests.internal/run/{{ service }}", timeout: 5s}
  - {name: tell, when: rollback, url: "http://tests.internal/rolled-back"}
alerts:
  - matchers: {alertname: CanaryHighErrorRate, service: "{{ service }}"}
approval_timeout: 2h
"""


def validate(tmp_path, name: str, text: str) -> list[str]:
    p = tmp_path / name
    p.write_text(text)
    run = subprocess.run([sys.executable, "-m", "canary.cli", "validate", str(p)],
                         capture_output=True, text=True, check=False)
    assert "Traceback" not in run.stderr
    return [line.removeprefix(f"{p}:") for line in run.stdout.splitlines()]


def test_webhooks_alerts_and_approval_timeout_are_read_and_kept_with_the_rollout(tmp_path):
    p = tmp_path / "pol.yaml"
    p.write_text(POLICY)
    pol = policy_mod.load_file(p)
    assert [(h.name, h.when, h.timeout, h.gates) for h in pol.webhooks] == [
        ("smoke", "pre-rollout", 5.0, True), ("tell", "rollback", 10.0, False)]
    assert pol.approval_timeout == 7200.0
    assert pol.template_names() == {"service"}, "hook URLs and matchers use {{ vars }}"
    stored = pol.to_dict()
    assert stored["approval_timeout"] == "2h" and stored["webhooks"][1]["timeout"] == "10s"
    assert policy_mod.from_dict(stored) == pol


@pytest.mark.e2e
@pytest.mark.parametrize("text,expected", [
    (POLICY.replace("when: pre-rollout", "when: later"),
     "5: webhooks[0].when: must be one of pre-rollout, stage, pre-promotion, post-rollout, "
     "rollback"),
    (POLICY.replace('url: "http://tests.internal/run/{{ service }}"', "url: ftp://x"),
     "5: webhooks[0].url: must start with http:// or https://"),
    (POLICY.replace("{{ service }}\"", "{{ service\"", 1),
     "5: webhooks[0].url: malformed template"),
    (POLICY.replace("timeout: 5s", "timeout: 0s"), "5: webhooks[0].timeout: must be longer than 0"),
    (POLICY.replace('{name: tell, when: rollback, url: "http://tests.internal/rolled-back"}',
                    "{name: tell}"),
     "6: webhooks[1].when: required: one of pre-rollout"),  # (and its url)
    (POLICY.replace("matchers: {alertname: CanaryHighErrorRate, service: \"{{ service }}\"}",
                    "matchers: {}"), "8: alerts[0].matchers: must be a non-empty mapping"),
    (POLICY.replace("alertname:", "alert-name:"),
     "8: alerts[0].matchers.alert-name: 'alert-name' is not an Alertmanager label name"),
    (POLICY.replace("name: tell,", "name: smoke,"),
     "6: webhooks[1].name: webhook 'smoke' is also webhooks[0]'s name; give each webhook a "
     "unique name"),
    (POLICY.replace("approval_timeout: 2h", "approval_timeout: soon"),
     "9: approval_timeout: 'soon' is not a duration"),
])
def test_bad_hook_alert_and_deadline_fields_are_named_with_how_to_fix_them(tmp_path, text,
                                                                            expected):
    found = validate(tmp_path, "pol.yaml", text)
    assert found and found[0].startswith(expected), found


CONFIG = """\
auth: {tokens: [{name: a, sha256: "%s", role: viewer}]}
policies: pol.yaml
targets:
  web: {router: nginx, file: up.conf, upstream: web, stable: ["127.0.0.1:1"],
        canary: ["127.0.0.1:2"], vars: {service: web}}
notifications:
  - {name: chat, url: "https://chat.example/hooks/T0/B0", format: slack,
     events: [rolled_back, paused, approval]}
  - {name: ops, url: "http://ops.internal/canary", secret_env: CANARY_TEST_SECRET}
""" % ("0" * 64)


def test_notifications_are_read_from_the_config(tmp_path, monkeypatch):
    from canary import config as config_mod
    from canary import notify
    monkeypatch.setenv("CANARY_TEST_SECRET", "s3cret")
    monkeypatch.setenv("CANARY_TEST_CHAT_URL", "https://chat.example/T0/secret-path")
    (tmp_path / "pol.yaml").write_text(POLICY)
    (tmp_path / "canary.yaml").write_text(CONFIG + "  - {name: chat2, url_env: CANARY_TEST_CHAT_URL}\n")
    cfg = config_mod.load_file(tmp_path / "canary.yaml")
    chat, ops, chat2 = cfg.notifications
    assert chat2.send_url() == "https://chat.example/T0/secret-path" and chat2.url is None
    assert (chat.format, chat.events) == ("slack", ("rolled_back", "paused", "approval"))
    assert ops.format == "webhook" and ops.events == notify.NOTIFY_EVENTS
    assert ops.secret_env == "CANARY_TEST_SECRET" and "s3cret" not in repr(cfg)


@pytest.mark.e2e
@pytest.mark.parametrize("change,expected", [
    (("format: slack", "format: irc"), "7: notifications[0].format: must be one of slack, teams, "
                                       "webhook"),
    (("events: [rolled_back, paused, approval]", "events: [rolled_back, everything]"),
     "8: notifications[0].events[1]: 'everything' is not an event type"),
    (("url: \"https://chat.example/hooks/T0/B0\"", "url: chat"),
     "7: notifications[0].url: must start with http:// or https://"),
    (("url: \"https://chat.example/hooks/T0/B0\"", "url: \"https://chat.example:99999/T0/B0\""),
     "7: notifications[0].url: is not a URL canary can send to (the port must be a "
     "number from 1 to 65535)"),
    (("url: \"https://chat.example/hooks/T0/B0\"", "url: \"https://[::1/hooks/T0/B0\""),
     "7: notifications[0].url: is not a URL canary can send to (an IPv6 address "
     "without its closing ])"),
    (("url: \"https://chat.example/hooks/T0/B0\"", "url: \"https:///hooks/T0/B0\""),
     "7: notifications[0].url: is not a URL canary can send to (no host)"),
    (("name: ops", "name: chat"), "9: notifications[1].name: receiver name 'chat' is used twice"),
    (("url: \"https://chat.example/hooks/T0/B0\"", "url_env: CANARY_TEST_UNSET_URL"),
     "7: notifications[0].url_env: environment variable CANARY_TEST_UNSET_URL (the URL) is not "
     "set; export it"),
    (("url: \"https://chat.example/hooks/T0/B0\"", "url_env: CANARY_TEST_BAD_URL"),
     "7: notifications[0].url_env: environment variable CANARY_TEST_BAD_URL: the URL is not a "
     "URL canary can send to (the port must be a number from 1 to 65535)"),
    (("url: \"https://chat.example/hooks/T0/B0\"",
      "url: \"https://chat.example/a\", url_env: CANARY_TEST_CHAT_URL"),
     "7: notifications[0]: give url, or url_env"),
    (("url: \"https://chat.example/hooks/T0/B0\", ", ""), "7: notifications[0]: give url, or url_env"),
    (("CANARY_TEST_SECRET", "CANARY_TEST_UNSET_SECRET"),
     "9: notifications[1].secret_env: environment variable CANARY_TEST_UNSET_SECRET is not set"),
])
def test_bad_notification_fields_are_named_with_how_to_fix_them(tmp_path, monkeypatch, change,
                                                                  expected):
    monkeypatch.setenv("CANARY_TEST_SECRET", "s3cret")
    monkeypatch.delenv("CANARY_TEST_UNSET_SECRET", raising=False)
    monkeypatch.delenv("CANARY_TEST_UNSET_URL", raising=False)
    monkeypatch.setenv("CANARY_TEST_BAD_URL", "https://chat.example:99999/T0/secret-path")
    monkeypatch.setenv("CANARY_TEST_CHAT_URL", "https://chat.example/T0/secret-path")
    (tmp_path / "pol.yaml").write_text(POLICY)
    found = validate(tmp_path, "canary.yaml", CONFIG.replace(*change))
    assert found and found[0].startswith(expected), found
    assert "secret-path" not in "\n".join(found), "the URL is a secret: never repeated"
