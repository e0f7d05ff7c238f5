"""Writing policies and configs: `canary validate` and `canary plan` as an SRE uses them."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from canary import fields, policy
from canary.cli import main, validate_files

ROOT = Path(__file__).resolve().parent.parent
GOOD = """\
name: p
interval: 10s
stages:
  - weight: 10
    hold: 1m
  - weight: 100
    hold: 1m
gates:
  - name: errors
    query: sum(rate(x{service="{{ service }}"}[1m]))
    max: 0.01
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def problems(tmp_path: Path, text: str) -> list[str]:
    return [str(p) for p in validate_files([write(tmp_path, "pol.yaml", text)])]


def test_shipped_example_policies_and_config_are_valid(capsys):
    files = [str(p) for p in sorted((ROOT / "policies").glob("*.yaml"))]
    assert len(files) >= 3
    assert main(["validate", *files, str(ROOT / "docs" / "canary.example.yaml")]) == 0
    assert "valid" in capsys.readouterr().out


@pytest.mark.parametrize("text,expected", [
    (GOOD.replace("weight: 100", "weight: 5"),
     ["pol.yaml:6: stages[1].weight: 5 is not above the previous stage's 10",
      "pol.yaml:6: stages[1].weight: the last stage must have weight 100"]),
    (GOOD.replace("weight: 100", "weight: 90"),
     ["pol.yaml:6: stages[1].weight: the last stage must have weight 100"]),
    (GOOD.replace("hold: 1m\n  - weight: 100", "hold: 1 minute\n  - weight: 100"),
     ["pol.yaml:5: stages[0].hold: '1 minute' is not a duration"]),
    (GOOD.replace("interval: 10s", "interval: 10s\nintervall: 5s"),
     ["pol.yaml:3: intervall: unknown field"]),
    (GOOD.replace("    max: 0.01\n", ""), ["pol.yaml:9: gates[0]: a gate needs min or max"]),
    (GOOD.replace("max: 0.01", "max: lots"), ["pol.yaml:11: gates[0].max: must be a number"]),
    (GOOD.replace("{{ service }}", "{{ service"), ["pol.yaml:10: gates[0].query: malformed template"]),
    (GOOD + "no_data: maybe\n", ["pol.yaml:12: no_data: must be one of hold, fail, pass"]),
    (GOOD + "failure_limit: 0\n", ["pol.yaml:12: failure_limit: must be a whole number"]),
    (GOOD + "progress_deadline: 1m\n", ["pol.yaml:12: progress_deadline: 1m is not longer"]),
    # a stage gate whose name is not text, beside policy-wide gates: a message, not a traceback
    (GOOD.replace("    hold: 1m\n  - weight: 100", "    hold: 1m\n    gates: [{name: [x], max: 1}]\n"
                  "  - weight: 100"), ["pol.yaml:6: stages[0].gates[0].name: must be text of 1 to 100 "
                                          "characters",
                                          "pol.yaml:6: stages[0].gates[0].query: required"]),
    ("stages: [\n", ["pol.yaml:2: (file): malformed YAML"]),
    ("base: &b {weight: 5}\nstages: [*b]\n", ["pol.yaml:1: (file): malformed YAML: anchors and aliases"]),
    # YAML 1.1 would read 1:30 as 90 (base 60): helm and editors read text, so does canary
    (GOOD.replace("weight: 10\n", "weight: 1:30\n"), ["pol.yaml:4: stages[0].weight: must be"]),
    (GOOD.replace("hold: 1m", "hold: 1:30", 1), ["pol.yaml:5: stages[0].hold: '1:30' is not a "
                                                 "duration"]),
    # an escaped lone surrogate is no character: it used to pass, then fail at the stage
    # when the router wrote it out
    ("stages:\n  - match: {headers: {x-id: \"\\ud800\"}}\n    hold: 1m\n"
     "  - weight: 100\n    hold: 1m\n",
     ["pol.yaml:2: (file): malformed YAML: a lone UTF-16 surrogate"]),
    # an alias of a plain value, or of a key, is refused like one of a mapping
    ("interval: &x 30s\nstages: [{weight: 100, hold: *x}]\n",
     ["pol.yaml:1: (file): malformed YAML: anchors and aliases"]),
    ("&k hold: 1m\nstages: [{weight: 100, *k : 1m}]\n",
     ["pol.yaml:1: (file): malformed YAML: anchors and aliases"]),
])
def test_each_problem_is_reported_as_file_line_field_message(tmp_path, text, expected):
    found = problems(tmp_path, text)
    assert len(found) == len(expected), found
    for want, got in zip(expected, found, strict=True):
        assert got.startswith(str(tmp_path) + "/" + want) or got.startswith(want), (want, got)


def test_an_unknown_field_is_told_only_the_fields_a_file_may_write(tmp_path):
    found = problems(tmp_path, GOOD.replace("interval:", "intervall:"))
    assert len(found) == 1 and "expected one of" in found[0], found
    offered = found[0].split("expected one of ")[1].split(", ")
    assert "interval" in offered and "stages" in offered
    assert "source" not in offered, "source is refused in a file: it must not be suggested"


def test_a_source_written_in_a_file_is_one_unknown_field_among_the_others(tmp_path):
    # (it used to stop the whole check at "source: unknown field", hiding the rest)
    found = problems(tmp_path, GOOD.replace("interval:", "source: here\nintervall:"))
    assert [p.split(": ")[1] for p in found] == ["source", "intervall"], found
    assert all("unknown field; expected one of" in p for p in found), found


def test_all_problems_of_a_file_are_reported_at_once(tmp_path):
    text = GOOD.replace("interval: 10s", "interval: fast").replace("weight: 100", "weight: 7")
    assert len(problems(tmp_path, text)) == 3


@pytest.mark.e2e
def test_validate_exits_1_with_one_line_per_problem_and_no_traceback(tmp_path):
    bad = write(tmp_path, "bad.yaml", GOOD.replace("hold: 1m", "hold: soon", 1))
    run = subprocess.run([sys.executable, "-m", "canary.cli", "validate", bad],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 1
    assert run.stdout.strip() == f"{bad}:5: stages[0].hold: 'soon' is not a duration; write it like " \
                                 "500ms, 30s, 2m, 1h or 1m30s"
    assert "Traceback" not in run.stderr


def test_hostile_files_get_a_clear_error(tmp_path):
    bomb = "a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nstages: [*c]\n"
    assert "aliases" in problems(tmp_path, bomb)[0]
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in str(validate_files([str(p)])[0])
    p.write_bytes(b"a: " + b"x" * (2 << 20))
    assert "limit" in str(validate_files([str(p)])[0])


@pytest.mark.parametrize("deadline,refused", [
    ("2m", True),        # shorter than the second stage's hold alone
    ("5m10s", True),     # equal to its hold plus one interval: not longer
    ("5m10s1ms", False),
])
def test_validate_refuses_a_progress_deadline_not_longer_than_every_hold_plus_an_interval(
        tmp_path, deadline, refused):
    """The first stage holds 1m, the second 5m, the interval is 10s: only a deadline
    longer than 5m10s lets a healthy rollout through every stage."""
    text = GOOD.replace("hold: 1m", "hold: 5m").replace("hold: 5m", "hold: 1m", 1)
    found = problems(tmp_path, text + f"progress_deadline: {deadline}\n")
    if refused:
        assert len(found) == 1 and (f"pol.yaml:12: progress_deadline: {deadline} is not longer "
                                    "than stage 1's hold plus one interval (5m10s)") in found[0], found
    else:
        assert found == []


def test_durations():
    assert fields.parse_duration("1m30s") == 90
    assert fields.parse_duration("500ms") == 0.5
    assert fields.parse_duration("1h") == 3600
    for bad in ("", "10", "m", "1d", "1m 30s", 5):
        with pytest.raises(ValueError):
            fields.parse_duration(bad)
    assert fields.format_duration(90) == "1m30s"


def test_stage_gates_add_and_override_policy_wide_gates(tmp_path):
    pol = policy.load_file(ROOT / "policies" / "standard.yaml")
    at_50 = {g.name: g for g in pol.gates_for(2)}
    assert at_50["p99-latency"].max == 0.3
    assert at_50["p99-latency"].query == {g.name: g for g in pol.gates}["p99-latency"].query
    assert {g.name: g for g in pol.gates_for(1)}["p99-latency"].max == 0.5


WIDE_ERRORS_GATE = """\
name: w
stages:
  - weight: 10
    hold: 1m
    gates:
      - name: lat
        {change}
  - weight: 100
    hold: 1m
gates:
  - name: lat
    query: up
    max: 1
  - name: errors
    kind: errors
    requests: r{{version="{{{{ version }}}}"}}
    errors: e{{version="{{{{ version }}}}"}}
    alpha: {alpha}
"""


@pytest.mark.parametrize("name,field", [
    ("x" * 101, "gates[0].name"), ("[a, b]", "gates[0].name"), ('""', "gates[0].name"),
])
def test_a_gate_name_refused_is_told_the_gate_names_rule(tmp_path, name, field):
    """A gate's name is any text of 1-100 characters; it was told the policy name's rule
    ('1-63 letters, digits, ...'), which a valid gate name like `p99 latency` breaks."""
    text = WIDE_ERRORS_GATE.format(change="max: 2", alpha="0.01").replace(
        "  - name: lat\n    query", f"  - name: {name}\n    query")
    found = problems(tmp_path, text)
    assert any(f": {field}: must be text of 1 to 100 characters" in p for p in found), found
    assert not any("letters, digits" in p for p in found), found
    assert problems(tmp_path, text.replace(f"name: {name}\n", "name: p99 latency (ms)\n")
                    .replace("name: lat\n        max", "name: p99 latency (ms)\n        max")) == []


@pytest.mark.parametrize("change,alpha,expected", [
    # a bad policy-wide field is named once, where it is written, not again at the stage
    # that changes another field of that gate
    ("max: 2\n      - {name: errors, tolerance: 2}", "0.7",
     ["19: gates[1].alpha: must be between 0 and 0.5"]),
    # a stage cannot turn a policy-wide gate into another kind: it was told of a `max`
    # it never wrote (the threshold gate's, kept), at the entry's first line
    ("kind: compare\n        max_ratio: 2", "0.01",
     ["7: stages[0].gates[0].kind: gate 'lat' is a threshold gate (gates[0]); a stage "
      "changes a policy-wide gate's fields, not its kind: give a compare gate of this stage "
      "only another name"]),
])
def test_a_stage_change_to_a_policy_wide_gate_is_told_of_what_it_wrote(tmp_path, change, alpha,
                                                                      expected):
    found = problems(tmp_path, WIDE_ERRORS_GATE.format(change=change, alpha=alpha))
    assert len(found) == len(expected), found
    for line, want in zip(found, expected, strict=True):
        assert line.split(":", 1)[1].startswith(want), found


def config_text(tmp_path: Path, **over: str) -> str:
    pdir = tmp_path / "policies"
    pdir.mkdir(exist_ok=True)
    (pdir / "p.yaml").write_text(GOOD)
    digest = hashlib.sha256(b"secret").hexdigest()
    base = {
        "tokens": f'    - {{name: ci, sha256: "{digest}", role: pipeline}}',
        "vars": "{service: web}",
        "policy": "p",
        "router": "nginx",
    }
    base.update(over)
    return textwrap.dedent(f"""\
        listen: 127.0.0.1:8080
        state: sqlite:state.db
        prometheus: {{url: http://127.0.0.1:9090}}
        policies: policies/
        auth:
          tokens:
        {base["tokens"]}
        targets:
          web:
            router: {base["router"]}
            file: up.conf
            upstream: web
            stable: ["127.0.0.1:9001"]
            canary: ["127.0.0.1:9002"]
            policy: {base["policy"]}
            vars: {base["vars"]}
        """)


def test_controller_config_is_checked_with_its_policies(tmp_path):
    ok = write(tmp_path, "canary.yaml", config_text(tmp_path))
    assert validate_files([ok]) == []
    cases = {
        "policy": ("nope", "targets.web.policy: no policy named 'nope'"),
        "vars": ("{}", "targets.web.vars: policy 'p' uses service; add them to vars"),
        "router": ("haproxy", "targets.web.router: must be nginx, istio or gateway"),
        "tokens": ('    - {name: ci, sha256: "abc", role: pipeline}',
                   "auth.tokens[0].sha256: must be 64 hex digits"),
    }
    for key, (value, want) in cases.items():
        f = write(tmp_path, f"c-{key}.yaml", config_text(tmp_path, **{key: value}))
        found = [str(p) for p in validate_files([f])]
        assert any(want in line for line in found), (key, found)
        assert all(line.startswith(f + ":") for line in found)


def test_a_query_name_no_target_fills_is_reported_for_each_target(tmp_path):
    """The policy's query uses `{{ service }}`: two targets without it are two problems,
    each on its own target's `vars`; the one that fills it is not named."""
    text = config_text(tmp_path, vars="{}")
    text += textwrap.indent(textwrap.dedent("""\
        api:
          router: nginx
          file: api.conf
          upstream: api
          stable: ["127.0.0.1:9003"]
          canary: ["127.0.0.1:9004"]
          policy: p
          vars: {team: a}
        shop:
          router: nginx
          file: shop.conf
          upstream: shop
          stable: ["127.0.0.1:9005"]
          canary: ["127.0.0.1:9006"]
          policy: p
          vars: {service: shop}
        """), "  ")
    found = [str(p) for p in validate_files([write(tmp_path, "canary.yaml", text)])]
    assert sorted(line.split(": ", 1)[1] for line in found) == [
        "targets.api.vars: policy 'p' uses service; add them to vars",
        "targets.web.vars: policy 'p' uses service; add them to vars"], found


@pytest.mark.parametrize("target,line,field,says", [
    ("web: {router: nginx, file: up.conf, upstream: web, stable: [\"127.0.0.1:1\"],\n"
     "        canary: [\"127.0.0.1:1\"], vars: {service: web}}",
     10, "targets.web.canary", "an address cannot be both stable and canary"),
    ("web:\n    router: nginx\n    file: up.conf\n    upstream: web\n"
     "    stable: [\"127.0.0.1:1\"]\n    canary: [\"127.0.0.1:2\"]\n"
     "    server_file: up.conf\n    vars: {service: web}",
     15, "targets.web.server_file", "must be another file than `file`"),
])
def test_a_rule_between_a_targets_fields_names_the_field_on_its_line(tmp_path, target, line,
                                                                     field, says):
    """It was `targets.web: canary: an address ...` at the target's first line: the field
    is now the one the rule is about, on the line where it is written."""
    text = config_text(tmp_path)
    text = text[:text.index("  web:")] + "  " + target + "\n"
    found = [str(p) for p in validate_files([write(tmp_path, "canary.yaml", text)])]
    assert len(found) == 1 and f":{line}: {field}: {says}" in found[0], found


@pytest.mark.parametrize("policies", ["[]", '""', "[policies/p.yaml, 5]", "{a: b}"])
def test_a_bad_policies_field_is_named_once_in_canarys_words(tmp_path, policies):
    """It read `policies.constrained-str: must be a string` and
    `policies.list[constrained-str]: must not be empty`: pydantic's names for the two
    forms the field may take, which are no field of the file."""
    text = config_text(tmp_path).replace("policies: policies/", f"policies: {policies}")
    found = [str(p) for p in validate_files([write(tmp_path, "canary.yaml", text)])]
    assert len(found) == 1, found
    assert found[0].endswith(":4: policies: must be a directory of policy files, like "
                             "policies/, or a non-empty list of policy files"), found


def test_plan_prints_stages_fastest_time_to_100_and_slowest_rollback(capsys):
    assert main(["plan", str(ROOT / "policies" / "standard.yaml")]) == 0
    out = capsys.readouterr().out
    assert "fastest time to 100%: 12m; to success: 17m" in out
    assert "approval" in out
    assert "slowest time from a breach to rollback: 1m" in out


@pytest.mark.e2e
def test_plan_on_traffic_says_how_long_the_errors_gates_take_and_when_they_cannot_decide(
        capsys):
    seq = str(ROOT / "policies" / "sequential.yaml")
    assert main(["plan", seq, "--rps", "200", "--error-rate", "slow-requests=0.01"]) == 0
    out = capsys.readouterr().out
    assert "errors 0.50%, slow-requests 1.00%" in out
    # at 200 requests/s every stage but the first moves on at its hold; the first waits
    # for the slow-requests gate (2 minutes of warm-up, then a 5% share's evidence)
    assert "stage 1 (25%): from about 4m, moves on after 5m; hold 5m" in out
    assert "succeeded at about 19m" in out
    assert main(["plan", seq, "--rps", "20"]) == 0
    out = capsys.readouterr().out
    assert "stage 0 (5%): from about 0s, moves on after" in out
    assert "(waiting for evidence)" in out and "succeeded at about" in out
    assert main(["plan", seq, "--rps", "2"]) == 0
    out = capsys.readouterr().out
    # on expected counts the first stage waits 20 minutes for a gross regression to be
    # able to show a few errors, and the step to 100% is shown safe only after an hour
    # (on real counts, noise makes most such rollouts inconclusive: docs/verdicts.md)
    assert "stage 0 (5%): from about 0s, moves on after 20m15s (waiting for evidence)" in out
    assert "stage 3 (100%): from about 1h2m45s; succeeded at about 1h7m45s" in out
    # threshold gates are fed too; the one plan cannot know (latency) is named
    assert main(["plan", str(ROOT / "policies" / "standard.yaml"), "--rps", "5"]) == 0
    out = capsys.readouterr().out
    assert "not predicted, read as passing: p99-latency" in out
    assert "error-rate 0.50%" in out and "succeeded at about 17m" in out


def test_plan_on_traffic_shows_a_threshold_gate_that_would_roll_back_on_this_traffic(
        tmp_path, capsys):
    # 1% of 20 requests/s is 0.2 requests/s: a gate asking for 0.5 fails at once
    f = write(tmp_path, "few.yaml", GOOD.replace("weight: 10\n", "weight: 1\n").replace(
        "query: sum(rate(x{service=\"{{ service }}\"}[1m]))",
        "query: sum(rate(http_requests_total{version=\"{{ canary_version }}\"}[2m]))").replace(
        "max: 0.01", "min: 0.5"))
    assert main(["plan", f, "--rps", "20"]) == 0
    out = capsys.readouterr().out
    assert "stage 0 (1%): from about 0s; rolled back at about" in out
    assert "gate errors: value 0.2 below min 0.5" in out


@pytest.mark.parametrize("args,words", [
    (["--rps", "0"], "--rps 0: give requests per second"),
    (["--rps", "10", "--error-rate", "lots"], "give a share like 0.005"),
    (["--rps", "10", "--error-rate", "errors=1.5"], "from 0 to below 1"),
])
def test_plan_on_traffic_refuses_nonsense_with_a_message(capsys, args, words):
    with pytest.raises(SystemExit) as e:
        main(["plan", str(ROOT / "policies" / "sequential.yaml"), *args])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_plan_on_traffic_follows_an_errors_gates_wander(tmp_path, capsys):
    # `wander: 0` (versions whose error rates move only together) bets against the
    # steady split itself, with no allowance for each version wandering on its own:
    # `canary plan --rps` runs the same gate code, so it shows the faster step to 100%
    text = (ROOT / "policies" / "sequential.yaml").read_text()
    at = "    detect_rate: 0.01     # (with"
    assert text.count(at) == 1
    seq0 = write(tmp_path, "seq0.yaml", text.replace(at, "    wander: 0\n" + at))
    assert main(["validate", seq0]) == 0
    assert main(["plan", str(ROOT / "policies" / "sequential.yaml"), "--rps", "2"]) == 0
    assert "succeeded at about 1h7m45s" in capsys.readouterr().out
    assert main(["plan", seq0, "--rps", "2"]) == 0
    out = capsys.readouterr().out
    assert "wander 0)" in out and "succeeded at about 55m15s" in out


def test_plan_says_what_a_wander_between_the_tables_is_read_as(tmp_path, capsys):
    # `wander: 0.3` is rounded up to the 0.5 table: the gate then decides exactly as the
    # default does, so the plan must not read as if 0.3 bought any speed
    text = (ROOT / "policies" / "sequential.yaml").read_text()
    at = "    detect_rate: 0.01     # (with"
    for written, shown in (("0.3", "wander 0.3, read as 0.5)"), ("0.05", "wander 0.05, read as 0.1)"),
                           ("0.1", "wander 0.1)"), ("0", "wander 0)"),
                           ("0.1000000001", "wander 0.1)")):
        f = write(tmp_path, f"w{written}.yaml", text.replace(at, f"    wander: {written}\n" + at))
        assert main(["plan", f]) == 0
        out = capsys.readouterr().out
        assert f"errors (errors <= stable x 1, alpha 0.005, {shown}" in out, (written, out)
    assert main(["plan", str(ROOT / "policies" / "sequential.yaml")]) == 0
    assert "wander" not in capsys.readouterr().out


def test_plan_on_traffic_reads_a_gating_webhook_as_passing_and_names_it(tmp_path, capsys):
    # a stage (or pre-rollout) webhook gates every stage; plan cannot know its answer. It
    # used to leave the hook unanswered, so every such policy "stayed inconclusive at the
    # deadline" on any traffic, with no hook named
    hooks = textwrap.dedent("""\
        webhooks:
          - name: check
            when: stage
            url: http://example.invalid/check
          - name: ready
            when: pre-rollout
            url: http://example.invalid/ready
        """)
    f = write(tmp_path, "hooked.yaml",
              (ROOT / "policies" / "standard.yaml").read_text() + hooks)
    assert main(["validate", f]) == 0
    assert main(["plan", f, "--rps", "20"]) == 0
    out = capsys.readouterr().out
    assert "not predicted, read as passing: hook:check, hook:ready, p99-latency" in out
    # (the pre-rollout hooks answer on the first evaluation: stage 0 begins then)
    assert "stage 0 (5%): from about 30s, moves on after 2m; hold 2m" in out
    assert "still inconclusive" not in out and "succeeded at about 17m30s" in out


def test_plan_on_traffic_feeds_a_mirror_stage_and_names_a_match_stage_it_cannot_predict(
        tmp_path, capsys):
    # match and mirror stages carry weight 0 for users, but the canary serves requests:
    # plan fed it none, so a traffic floor "rolled the rollout back" at the match stage
    # on any traffic, where the controller would see the matched requests
    f = write(tmp_path, "shaped.yaml", textwrap.dedent("""\
        name: shaped
        interval: 30s
        progress_deadline: 30m
        stages:
          - match: {headers: {x-canary: "1"}}
            hold: 2m
          - mirror: 20
            hold: 2m
          - weight: 10
            hold: 2m
          - weight: 100
            hold: 2m
        gates:
          - name: errors
            kind: errors
            requests: http_requests_total{version="{{ version }}"}
            errors: http_requests_total{version="{{ version }}",code=~"5.."} or vector(0)
          - name: traffic
            query: sum(rate(http_requests_total{version="{{ canary_version }}"}[1m]))
            min: 0.05
        """))
    assert main(["validate", f]) == 0
    assert main(["plan", f, "--rps", "200"]) == 0
    out = capsys.readouterr().out
    assert ("not predicted, read as passing: every gate at stage 0 (match header x-canary"
            in out)
    assert "rolled back at about" not in out, out
    assert "stage 0 (match header x-canary" in out and "moves on after 2m; hold 2m" in out
    assert "stage 1 (mirror 20% to the canary): from about 2m, moves on after" in out
    assert "succeeded at about" in out


def test_plan_on_traffic_reads_an_increase_as_a_count_not_a_rate(tmp_path, capsys):
    # `sum(increase(...[5m]))` is a number of requests: plan read it as requests per
    # second (2 at 10% of 20 requests/s), so a floor of 100 requests "rolled back" at 1m
    # where the controller passes it from the second evaluation on; a raw counter was
    # read as an error share
    f = write(tmp_path, "counts.yaml", textwrap.dedent("""\
        name: counts
        interval: 30s
        progress_deadline: 30m
        stages:
          - weight: 10
            hold: 5m
          - weight: 100
            hold: 2m
        gates:
          - name: enough-requests
            query: sum(increase(http_requests_total{version="{{ canary_version }}"}[5m]))
            min: 100
          - name: total
            query: sum(http_requests_total{version="{{ canary_version }}"})
            min: 100
        """))
    assert main(["validate", f]) == 0
    assert main(["plan", f, "--rps", "20"]) == 0
    out = capsys.readouterr().out
    assert "not predicted" not in out and "rolled back at about" not in out, out
    assert "stage 0 (10%): from about 0s, moves on after 5m; hold 5m" in out
    assert "succeeded at about 7m" in out
