"""The CLI on-call uses at 3 a.m. (interface.md section 8): follow a rollout someone else
started (`status ID --watch`, exits as `start --wait`), a table of rollouts with relative
times whose reasons can never drive the terminal, `version`, and shell completion."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from canary.cli import ago, table
from canary.store.sqlite import SqliteStore
from tests.helpers import SetSource, controller, eventually, seed, simple_policy
from tests.test_restart_and_cli import cli


@pytest.mark.e2e
async def test_status_watch_follows_a_rollout_to_success_and_exits_0(tmp_path):
    async with controller(tmp_path, policies=[simple_policy(hold=3600)]) as (api, ctl, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        watching = asyncio.ensure_future(cli("status", rid, "--watch", server=api.base,
                                             token="tok-viewer"))
        hub = ctl.listeners[0].__self__  # (the API's watchers)
        await eventually(lambda: _true(hub.count() == 1), what="the CLI watching")
        await api.call("POST", f"/api/v1/rollouts/{rid}/promote", {"reason": "ship", "full": True})
        code, out, err = await watching
    assert code == 0, err
    lines = out.splitlines()
    assert "weight 10%" in lines[0] and "succeeded" in lines[-1] and "weight 100%" in lines[-1]


async def _true(value: bool) -> bool:
    return value


@pytest.mark.e2e
async def test_status_watch_exits_1_on_rollback_with_the_reason(tmp_path):
    source = SetSource(0.01)
    async with controller(tmp_path, policies=[simple_policy(hold=3600)],
                          source=source) as (api, _c, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        watching = asyncio.ensure_future(cli("status", rid, "--watch", server=api.base,
                                             token="tok-viewer"))
        await api.until(rid, lambda r: r["gates"][0]["status"] == "pass")
        source.value = 0.3
        code, out, _err = await watching
    assert code == 1
    assert "rolled_back" in out and "gate errors: value 0.3 above max 0.05" in out


@pytest.mark.e2e
async def test_status_watch_of_an_unknown_rollout_exits_2(tmp_path):
    async with controller(tmp_path) as (api, _c, _t):
        code, _out, err = await cli("status", "nope", "--watch", server=api.base,
                                    token="tok-viewer")
    assert code == 2 and "404" in err and "nope" in err


@pytest.mark.e2e
async def test_status_lists_a_table_with_relative_times_filters_and_a_limit(tmp_path):
    store = SqliteStore(str(tmp_path / "state.db"))
    await seed(store, 6, targets=("web", "api"))
    async with controller(tmp_path, store=store,
                          policies=[simple_policy(hold=3600)]) as (api, _c, _t):
        live = await api.start(canary_version="v9")
        code, out, err = await cli("status", "--limit", "3", server=api.base, token="tok-viewer")
        assert code == 0, err
        head, *rows = out.splitlines()
        assert head.split() == ["ID", "TARGET", "VERSION", "STATE", "STAGE", "WEIGHT",
                                "STARTED", "UPDATED", "REASON"]
        assert len(rows) == 3 and rows[0].startswith(live["id"]) and "s ago" in rows[0]
        assert "d ago" in rows[1], "seeded rollouts started in 2023"
        assert "--before" in err, "says how to see older ones"
        code, out, _ = await cli("status", "--target", "api", "--state", "succeeded",
                                 server=api.base, token="tok-viewer")
        rows = out.splitlines()[1:]
        assert rows and all(" api " in r and "succeeded" in r for r in rows)


def test_a_reason_with_control_characters_is_shown_escaped_in_the_table():
    r = {"id": "r1", "target": "web", "canary_version": "v2", "state": "rolled_back",
         "stage": 0, "weight": 0, "started_at": "2026-11-22T08:00:00Z",
         "updated_at": "2026-11-22T08:00:30Z",
         "reason": "gate x: \x1b[2J\x1b]0;owned\x07 bad\r\nline \u202etxt"}
    text = table([r], now=1_795_500_000.0)
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    assert "\\x1b[2J" in text and "\\u202e" in text
    assert ago("2026-11-22T08:00:00Z", now=1_795_334_400.0 + 90) == "1m ago"


@pytest.mark.e2e
def test_version_and_completion_scripts(tmp_path):
    run = [sys.executable, "-m", "canary.cli"]
    out = subprocess.run([*run, "version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("canary ") and out.split()[1][0].isdigit()
    script = subprocess.run([*run, "completion", "bash"], capture_output=True, text=True,
                            check=True).stdout
    (tmp_path / "c.bash").write_text(script)
    probe = ('source c.bash; COMP_WORDS=(canary st); COMP_CWORD=1; _canary; echo "${COMPREPLY[@]}";'
             'COMP_WORDS=(canary status --wa); COMP_CWORD=2; _canary; echo "${COMPREPLY[@]}";'
             'COMP_WORDS=(canary completion ""); COMP_CWORD=2; _canary; echo "${COMPREPLY[@]}"')
    got = subprocess.run(["bash", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert got[0].split() == ["start", "status"]
    assert got[1] == "--watch"
    assert {"bash", "zsh", "fish"} <= set(got[2].split())
    for shell in ("zsh", "fish"):
        text = subprocess.run([*run, "completion", shell], capture_output=True, text=True,
                              check=True).stdout
        assert "status" in text and "watch" in text and "version" in text
    bad = subprocess.run([*run, "completion", "tcsh"], capture_output=True, text=True)
    assert bad.returncode == 2 and "tcsh" in bad.stderr




@pytest.mark.e2e
def test_relative_times_are_right_in_a_timezone_on_summer_time():
    """API times are UTC: a rollout updated 5 minutes ago reads "5m ago" wherever the
    terminal is, also in a timezone on daylight saving time (Sydney in November, New
    York in July), where reading the time as local and correcting by the standard offset
    was an hour off."""
    probe = ("from canary.cli import ago; "
             "print(ago('2026-11-25T08:40:00.000Z', now=1795596000.0 + 300), "
             "ago('2026-07-01T12:00:00.000Z', now=1782907200.0 + 300))")
    for tz in ("UTC", "Australia/Sydney", "America/New_York", "Europe/Berlin"):
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             check=True, env={"TZ": tz, "PATH": "/usr/bin:/bin"}).stdout
        assert out.split() == ["5m", "ago", "5m", "ago"], (tz, out)
