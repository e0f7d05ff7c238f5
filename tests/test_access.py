"""Access (interface.md section 9): tokens limited to targets, for which anything out of
scope reads as if it did not exist; and a Prometheus that wants credentials (headers, a
bearer token file re-read when it changes, basic auth with the password from the
environment, a private CA), none of which ever reaches a log line or an API answer.
Prometheus runs for real, with its own --web.config.file."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from aiohttp import web

from canary import config as config_mod
from canary.api.app import build_app
from canary.api.auth import Role, Token
from canary.clock import RealClock
from canary.demo.procs import Prometheus, free_port, serve_app, wait_http
from canary.engine.controller import Controller
from canary.errors import MetricsError, ValidationFailed
from canary.gates.kinds import ThresholdGate
from canary.gates.prometheus import BasicAuthDoc, PrometheusDoc, PrometheusSource, measure
from canary.model import Reading, Verdict
from canary.routers.nginx import NginxRouter
from canary.store.sqlite import SqliteStore
from canary.targets import NginxTarget
from tests.helpers import TOKENS, Api, SetSource, eventually, simple_policy, tokens

SHOP_TOKEN = "tok-shop-pipeline"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---- scoped tokens ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_teams(tmp_path: Path) -> AsyncIterator[Api]:
    """A controller with targets `web` and `shop-a`, the usual unscoped tokens, and a
    pipeline token limited to `shop-*`."""
    pol = simple_policy(hold=3600)
    targets = {name: NginxTarget(name=name, file=tmp_path / f"{name}.conf", upstream=name,
                                 stable=("127.0.0.1:9001",), canary=("127.0.0.1:9002",),
                                 test=("true",), reload=("true",), policy=pol.name,
                                 vars={"service": name}, stable_version="v1")
               for name in ("web", "shop-a")}
    store = SqliteStore(str(tmp_path / "state.db"))
    ctl = Controller(store=store, policies={pol.name: pol}, targets=targets,
                     routers={n: NginxRouter(t) for n, t in targets.items()},
                     source=SetSource(0.0), clock=RealClock(), retry_max=1.0)
    shop = Token("shop-pipeline", sha(SHOP_TOKEN), Role.PIPELINE, targets=("shop-*",))
    runner = web.AppRunner(build_app(ctl, (*tokens(), shop)), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as s:
            yield Api(f"http://127.0.0.1:{port}", s)
    finally:
        await runner.cleanup()
        await store.close()


async def test_a_token_scoped_to_shop_cannot_see_or_abort_webs_rollout(tmp_path):
    async with two_teams(tmp_path) as api:
        web_id = (await api.start(canary_version="v2", target="web"))["id"]
        await api.until(web_id, lambda r: r["applied_weight"] == 10)
        unknown = "20260101-000000-abcdef"

        status, body = await api.call("POST", f"/api/v1/rollouts/{web_id}/abort",
                                      {"reason": "not mine"}, token=SHOP_TOKEN)
        _, not_there = await api.call("POST", f"/api/v1/rollouts/{unknown}/abort",
                                      {"reason": "not mine"}, token=SHOP_TOKEN)
        assert status == 404
        assert body == {"error": not_there["error"].replace(unknown, web_id)}, \
            "out of scope answers exactly as an unknown id"
        status, body = await api.call("GET", f"/api/v1/rollouts/{web_id}", token=SHOP_TOKEN)
        _, not_there = await api.call("GET", f"/api/v1/rollouts/{unknown}", token=SHOP_TOKEN)
        assert status == 404 and body == {"error": not_there["error"].replace(unknown, web_id)}

        r = await api.rollout(web_id)
        assert (r["state"], r["weight"]) == ("progressing", 10), "web's rollout goes on"

        for path in ("/api/v1/rollouts", "/api/v1/rollouts?target=web"):
            status, listed = await api.call("GET", path, token=SHOP_TOKEN)
            assert status == 200 and listed["rollouts"] == []
        _, targets = await api.call("GET", "/api/v1/targets", token=SHOP_TOKEN)
        assert [t["name"] for t in targets["targets"]] == ["shop-a"]

        status, shop = await api.call("POST", "/api/v1/rollouts",
                                      {"target": "shop-a", "canary_version": "v2"},
                                      token=SHOP_TOKEN)
        assert status == 201, shop
        status, aborted = await api.call("POST", f"/api/v1/rollouts/{shop['id']}/abort",
                                         {"reason": "bad build"}, token=SHOP_TOKEN)
        assert status == 200, aborted
        await api.until(shop["id"], lambda r: r["state"] == "rolled_back")
        _, listed = await api.call("GET", "/api/v1/rollouts", token=SHOP_TOKEN)
        assert [r["id"] for r in listed["rollouts"]] == [shop["id"]]

        _, listed = await api.call("GET", "/api/v1/rollouts", role="viewer")
        assert {r["id"] for r in listed["rollouts"]} == {web_id, shop["id"]}, \
            "an unscoped token sees both"
        _, targets = await api.call("GET", "/api/v1/targets", role="viewer")
        assert [t["name"] for t in targets["targets"]] == ["shop-a", "web"]


async def test_starting_on_a_target_out_of_scope_reads_like_an_unknown_target(tmp_path):
    async with two_teams(tmp_path) as api:
        status, body = await api.call("POST", "/api/v1/rollouts",
                                      {"target": "web", "canary_version": "v2"}, token=SHOP_TOKEN)
        _, not_there = await api.call("POST", "/api/v1/rollouts",
                                      {"target": "nope", "canary_version": "v2"},
                                      token=SHOP_TOKEN)
        assert status == 404
        assert body == {"error": not_there["error"].replace("'nope'", "'web'")}
        assert body["error"].endswith("configured: shop-a"), "the list names only its scope"
        _, listed = await api.call("GET", "/api/v1/rollouts", role="viewer")
        assert listed["rollouts"] == [], "nothing was started"


def write_config(tmp_path: Path, *, prometheus: str = "", auth: str = "") -> Path:
    (tmp_path / "policies").mkdir(exist_ok=True)
    auth = auth or f"""
auth:
  tokens:
    - {{name: oncall, sha256: "{sha('x')}", role: oncall}}
"""
    path = tmp_path / "canary.yaml"
    path.write_text(f"""state: sqlite:state.db
{prometheus}
policies: policies/
{auth}
targets:
  web:
    router: nginx
    file: web.conf
    upstream: web
    stable: ["127.0.0.1:9001"]
    canary: ["127.0.0.1:9002"]
""")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ValidationFailed) as e:
        config_mod.load_file(path)
    return [str(p) for p in e.value.problems]


def test_token_scopes_come_from_the_config_and_the_tokens_file(tmp_path):
    (tmp_path / "tokens.yaml").write_text(
        f'tokens:\n  - {{name: shop-oncall, sha256: "{sha("b")}", role: oncall, '
        f'targets: [shop, "shop-[ab]*"]}}\n')
    cfg = config_mod.load_file(write_config(tmp_path, auth=f"""
auth:
  tokens_file: tokens.yaml
  tokens:
    - {{name: shop-pipeline, sha256: "{sha('a')}", role: pipeline, targets: ["shop-*"]}}
    - {{name: everyone, sha256: "{sha('c')}", role: viewer}}
"""))
    scoped = {t.name: t for t in cfg.tokens}
    assert scoped["shop-pipeline"].targets == ("shop-*",)
    assert scoped["shop-oncall"].targets == ("shop", "shop-[ab]*")
    assert scoped["everyone"].targets is None
    assert scoped["shop-oncall"].may_see("shop-b2") and not scoped["shop-oncall"].may_see("shop-c")
    assert not scoped["shop-pipeline"].may_see("shop") and scoped["everyone"].may_see("web")


def test_bad_token_scopes_are_refused_with_file_and_line(tmp_path):
    path = write_config(tmp_path, auth=f"""
auth:
  tokens:
    - {{name: a, sha256: "{sha('a')}", role: pipeline, targets: "shop-*"}}
    - {{name: b, sha256: "{sha('b')}", role: pipeline, targets: []}}
    - {{name: c, sha256: "{sha('c')}", role: pipeline, targets: ["shop/*", 3, "[x"]}}
""")
    found = problems(path)
    f = str(path)
    assert any(p.startswith(f"{f}:7: auth.tokens[0].targets: must be a non-empty list")
               for p in found), found
    assert any(p.startswith(f"{f}:8: auth.tokens[1].targets: must be a non-empty list")
               for p in found), found
    for j, glob in enumerate(("'shop/*'", "3", "'[x'")):
        assert any(p.startswith(f"{f}:9: auth.tokens[2].targets[{j}]: {glob} is not a target")
                   for p in found), found


# ---- Prometheus credentials -------------------------------------------------------------


GATE = ThresholdGate("error-rate", "vector(0.01)", max=0.05)


async def read_gate(source: PrometheusSource) -> Reading:
    (reading,) = await measure(source, [GATE], {}, attempts=1, budget=5)
    return reading


async def until_answering(source: PrometheusSource) -> None:
    async def answers() -> bool:
        return (await read_gate(source)).verdict is Verdict.PASS
    await eventually(answers, deadline=60, what="Prometheus answering")


@contextlib.asynccontextmanager
async def real_prometheus(tmp_path: Path, *, web_config: str | None = None,
                          scheme: str = "http") -> AsyncIterator[Prometheus]:
    port = free_port()
    prom = Prometheus(tmp_path / "prometheus", port, targets=[port], web_config=web_config,
                      scheme=scheme)
    prom.start()
    try:
        yield prom
    finally:
        prom.stop()


@contextlib.contextmanager
def closing(*sources: PrometheusSource) -> Any:
    try:
        yield
    finally:
        for s in sources:
            s.close()


def bcrypt_users(**users: str) -> str:
    lines = [f'  {u}: "{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}"'
             for u, p in users.items()]
    return "basic_auth_users:\n" + "\n".join(lines) + "\n"


def log_text(caplog) -> str:
    return "\n".join(r.getMessage() + json.dumps(r.__dict__, default=str) for r in caplog.records)


async def test_basic_auth_with_the_password_from_the_environment(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    password, wrong = "pw-" + secrets.token_hex(8), "pw-" + secrets.token_hex(8)
    monkeypatch.setenv("PROM_PASSWORD", password)
    monkeypatch.setenv("PROM_WRONG_PASSWORD", wrong)
    async with real_prometheus(tmp_path, web_config=bcrypt_users(canary=password)) as prom:
        right = PrometheusSource(prom.url, timeout=2, access=PrometheusDoc(
            basic_auth=BasicAuthDoc(username="canary", password_env="PROM_PASSWORD")))
        bad = PrometheusSource(prom.url, timeout=2, access=PrometheusDoc(
            basic_auth=BasicAuthDoc(username="canary", password_env="PROM_WRONG_PASSWORD")))
        anonymous = PrometheusSource(prom.url, timeout=2)
        with closing(right, bad, anonymous):
            await until_answering(right)
            ok = await read_gate(right)
            assert (ok.verdict, ok.value) == (Verdict.PASS, 0.01)
            refused = [await read_gate(bad), await read_gate(anonymous)]
    for r in refused:
        assert r.verdict is Verdict.ERROR and "401" in (r.detail or ""), r
        assert password not in (r.detail or "") and wrong not in (r.detail or "")
    text = log_text(caplog)
    assert password not in text and wrong not in text


def make_ca_and_server_cert(d: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate it signed for 127.0.0.1: (ca, cert, key)."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=30)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=canary test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "ext.cnf")
    return d / "ca.pem", d / "server.pem", d / "server.key"


@pytest.mark.e2e
async def test_a_prometheus_with_a_private_ca_is_trusted_with_ca_file_and_only_then(tmp_path):
    ca, cert, key = make_ca_and_server_cert(tmp_path / "pki")
    web_config = f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
    async with real_prometheus(tmp_path, web_config=web_config, scheme="https") as prom:
        trusted = PrometheusSource(prom.url, timeout=2, access=PrometheusDoc(ca_file=str(ca)))
        default = PrometheusSource(prom.url, timeout=2)
        with closing(trusted, default):
            await until_answering(trusted)
            ok = await read_gate(trusted)
            refused = await read_gate(default)
    assert (ok.verdict, ok.value) == (Verdict.PASS, 0.01)
    assert refused.verdict is Verdict.ERROR
    assert "CERTIFICATE_VERIFY_FAILED" in (refused.detail or ""), refused


class TenantGateway:
    """In front of a real Prometheus, as a multi-tenant gateway (Mimir, Cortex, Thanos)
    would be: it answers only requests for tenant team-a with the current bearer token."""

    def __init__(self, upstream: str, token: str) -> None:
        self.upstream, self.token = upstream, token
        self.seen: list[str] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        self.seen.append(auth)
        if request.headers.get("X-Scope-OrgID") != "team-a":
            return web.Response(status=401, text="no tenant\n")
        if auth != f"Bearer {self.token}":
            return web.Response(status=401, text="bad token\n")
        async with aiohttp.ClientSession() as s, \
                s.get(self.upstream + "/api/v1/query", params=request.query) as r:
            return web.Response(body=await r.read(), status=r.status,
                                content_type="application/json")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        app = web.Application()
        app.router.add_get("/api/v1/query", self.handle)
        runner = await serve_app(app, self.port)
        try:
            yield
        finally:
            await runner.cleanup()


async def test_tenant_header_and_a_bearer_token_file_reread_when_rotated(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    first, second, third = (f"tok-{secrets.token_hex(n)}" for n in (8, 8, 12))
    token_file = tmp_path / "prometheus-token"
    token_file.write_text(first + "\n")
    async with real_prometheus(tmp_path) as prom:
        gateway = TenantGateway(prom.url, first)
        access = PrometheusDoc(headers={"X-Scope-OrgID": "team-a"},
                               bearer_token_file=str(token_file))
        source = PrometheusSource(gateway.url, timeout=2, access=access)
        no_tenant = PrometheusSource(gateway.url, timeout=2,
                                     access=PrometheusDoc(bearer_token_file=str(token_file)))
        details: list[str] = []
        async with gateway.running():
            with closing(source, no_tenant):
                await until_answering(source)
                assert (await read_gate(source)).value == 0.01
                r = await read_gate(no_tenant)
                assert r.verdict is Verdict.ERROR and "no tenant" in (r.detail or "")

                gateway.token = second  # the gateway rotates; canary still has the old one
                r = await read_gate(source)
                assert r.verdict is Verdict.ERROR and "bad token" in (r.detail or "")
                details.append(r.detail or "")
                # the new token lands as a mounted Secret's does: a new file renamed over
                (tmp_path / "new-token").write_text(second)
                os.replace(tmp_path / "new-token", token_file)
                r = await read_gate(source)
                assert (r.verdict, r.value) == (Verdict.PASS, 0.01), "no restart needed"
                assert gateway.seen[-1] == f"Bearer {second}"

                gateway.token = third  # rewritten in place
                token_file.write_text(third)
                assert (await read_gate(source)).verdict is Verdict.PASS

                token_file.unlink()
                r = await read_gate(source)
                assert r.verdict is Verdict.ERROR, "a missing token file is a gate error"
                assert "cannot read bearer_token_file" in (r.detail or "")
                details.append(r.detail or "")
                token_file.write_text(third)
                assert (await read_gate(source)).verdict is Verdict.PASS
    text = log_text(caplog) + "\n".join(details)
    assert not any(t in text for t in (first, second, third)), "a token reached a log or reason"


def test_a_token_file_is_read_again_every_5s_even_when_it_looks_unchanged(tmp_path):
    """README: the token file is re-read when it changes "and every 5 s". A same-size
    rewrite in place within one tick of the file system's clock keeps its inode, size and
    mtime, so only the 5 s re-read picks it up (on a clock the test drives)."""
    from canary.gates.prometheus import TokenFile

    now = [1000.0]
    path = tmp_path / "token"
    path.write_text("tok-aaaa")
    token_file = TokenFile(path, clock=lambda: now[0])
    assert token_file.token() == "tok-aaaa"
    before = os.stat(path)
    with open(path, "r+") as f:  # in place: the same inode and size
        f.write("tok-bbbb")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the same mtime
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
        (before.st_ino, before.st_size, before.st_mtime_ns)
    now[0] += 4.9
    assert token_file.token() == "tok-aaaa", "nothing tells it the file changed yet"
    now[0] += 0.1
    assert token_file.token() == "tok-bbbb", "read again 5 s after the last read"


def serve_config(run: Path, prometheus_url: str, port: int, tenant: str) -> Path:
    (run / "policy.yaml").write_text(
        "name: p\ninterval: 1s\nfailure_limit: 2\nno_data: hold\nprogress_deadline: 1h\n"
        "stages: [{weight: 10, hold: 10m}, {weight: 100, hold: 10m}]\n"
        'gates: [{name: error-rate, query: "vector(0.01)", max: 0.05}]\n')
    tokens_yaml = "".join(f'    - {{name: {role}, sha256: "{sha(tok)}", role: {role}}}\n'
                          for role, tok in TOKENS.items())
    (run / "canary.yaml").write_text(f"""
listen: 127.0.0.1:{port}
state: sqlite:state.db
prometheus:
  url: {prometheus_url}
  timeout: 2s
  headers: {{X-Scope-OrgID: {tenant}}}
  basic_auth: {{username: canary, password_env: PROM_PASSWORD}}
policies: [policy.yaml]
auth:
  tokens:
{tokens_yaml}
targets:
  web:
    router: nginx
    file: upstream.conf
    upstream: web
    stable: ["127.0.0.1:9001"]
    canary: ["127.0.0.1:9002"]
    test: ["true"]
    reload: ["true"]
    policy: p
    stable_version: v1
""")
    return run / "canary.yaml"


@pytest.mark.e2e
@pytest.mark.parametrize("password_is", ["right", "wrong"])
async def test_canary_serve_never_logs_or_returns_prometheus_credentials(tmp_path, password_is):
    """The whole controller as a process, with basic auth and a tenant header: neither the
    password nor the header value reach its log (at DEBUG) or any answer of its API."""
    password, wrong = "pw-" + secrets.token_hex(8), "pw-" + secrets.token_hex(8)
    tenant = "tenant-" + secrets.token_hex(8)
    given = password if password_is == "right" else wrong
    async with real_prometheus(tmp_path, web_config=bcrypt_users(canary=password)) as prom:
        port = free_port()
        config = serve_config(tmp_path, prom.url, port, tenant)
        log = tmp_path / "controller.log"
        with open(log, "wb") as logf:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "canary.cli", "serve", "--config", str(config),
                stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                env={**os.environ, "PROM_PASSWORD": given, "CANARY_LOG_LEVEL": "DEBUG"})
        answers: list[str] = []
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_http(base + "/healthz")
            async with aiohttp.ClientSession() as s:
                api = Api(base, s)
                rid = (await api.start(canary_version="v2"))["id"]

                def judged(r: dict[str, Any]) -> bool:
                    gate = r["gates"][0]
                    if password_is == "right":
                        return bool(gate["status"] == "pass")
                    # a 401, not the 503 of a Prometheus still starting
                    return gate["status"] == "error" and "401" in gate.get("detail", "")
                r = await api.until(rid, judged, deadline=60)
                if password_is == "right":
                    assert r["gates"][0]["value"] == 0.01
                for path in ("/api/v1/targets", "/api/v1/rollouts", f"/api/v1/rollouts/{rid}",
                             "/api/v1/policies", "/api/v1/openapi.json", "/metrics", "/readyz",
                             "/healthz"):
                    status, body = await api.call("GET", path, role="viewer")
                    assert status == 200, (path, body)
                    answers.append(body if isinstance(body, str) else json.dumps(body))
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    logged = log.read_text()
    assert "canary serving" in logged
    if password_is == "wrong":
        assert "401" in logged, "the gate's error and its reason were logged"
    text = logged + "\n".join(answers)
    for secret in (password, wrong, tenant):
        assert secret not in text, "a secret reached a log line or an answer"


def test_secrets_written_in_the_config_are_refused_with_a_way_out(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_PROMETHEUS_PASSWORD", raising=False)
    (tmp_path / "not-a-ca.pem").write_text("hello\n")
    path = write_config(tmp_path, prometheus="""
prometheus:
  url: http://canary:hunter2@127.0.0.1:9090
  headers: {X-Scope-OrgID: team-a, Authorization: "Bearer hunter2", Cookie: "s=hunter2"}
  basic_auth: {username: canary, password: hunter2}
  bearer_token_file: missing-token
  ca_file: not-a-ca.pem
  concurrency: 0
""")
    found = "\n".join(problems(path))
    f = str(path)
    assert f"{f}:4: prometheus.url: carries credentials" in found
    assert f"{f}:5: prometheus.headers.Authorization: carries a credential" in found
    assert "prometheus.bearer_token_file" in found.split("headers.Authorization", 1)[1]
    assert f"{f}:5: prometheus.headers.Cookie: carries a credential" in found
    assert f"{f}:6: prometheus.basic_auth.password: a secret is never written in the config: " \
           "put the password in an environment variable and name it in " \
           "basic_auth.password_env" in found
    assert f"{f}:7: prometheus.bearer_token_file: cannot read" in found
    assert f"{f}:8: prometheus.ca_file: " in found and "is not a PEM CA certificate" in found
    assert f"{f}:9: prometheus.concurrency: must be a whole number" in found
    assert "not both" in found
    assert "hunter2" not in found.replace(f, ""), "problems never echo the secret"

    path = write_config(tmp_path, prometheus="""
prometheus:
  basic_auth: {username: canary, password_env: NO_SUCH_PROMETHEUS_PASSWORD}
""")
    assert problems(path) == [
        f"{path}:4: prometheus.basic_auth.password_env: environment variable "
        "NO_SUCH_PROMETHEUS_PASSWORD is not set; export it with the Prometheus password before "
        "starting canary"]


def test_a_config_with_prometheus_credentials_loads_and_shows_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("PROM_PASSWORD", "pw-shown-nowhere")
    ca, _cert, _key = make_ca_and_server_cert(tmp_path / "pki")
    path = write_config(tmp_path, prometheus=f"""
prometheus:
  url: https://127.0.0.1:9090
  headers: {{X-Scope-OrgID: tenant-shown-nowhere}}
  basic_auth: {{username: canary, password_env: PROM_PASSWORD}}
  ca_file: {ca}
  concurrency: 4
""")
    cfg = config_mod.load_file(path)
    a = cfg.prometheus
    assert a.basic_auth is not None
    assert (a.basic_auth.username, a.basic_auth.password_env, a.ca_file, a.concurrency) == \
        ("canary", "PROM_PASSWORD", str(ca), 4)
    assert dict(a.headers) == {"X-Scope-OrgID": "tenant-shown-nowhere"}
    for shown in (repr(cfg), str(cfg), cfg.model_dump_json()):
        assert "shown-nowhere" not in shown, "the config's repr and dump carry no secret or " \
                                             "header value"


# ---- Prometheus's own threads -----------------------------------------------------------


async def test_a_prometheus_that_never_answers_holds_only_its_own_threads():
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # accepts, reads, never answers

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    source = PrometheusSource(url, timeout=30, access=PrometheusDoc(concurrency=2))
    try:
        queries = [asyncio.ensure_future(source.query(f"q{i}")) for i in range(12)]

        async def both_threads_stuck() -> bool:
            return len(held) >= 2
        await eventually(both_threads_stuck, what="two queries hanging")
        # more hung queries than the default pool has threads: work for the store and the
        # routers (asyncio.to_thread) still runs at once
        assert await asyncio.to_thread(lambda: "free") == "free"
        assert not any(q.done() for q in queries), "all twelve still wait on Prometheus"
        assert len(held) == 2, "at most `concurrency` queries in flight"
        for q in queries:
            q.cancel()
        await asyncio.gather(*queries, return_exceptions=True)
    finally:
        source.close()
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


@pytest.mark.e2e
async def test_a_query_waits_at_most_a_little_past_the_timeout_queueing_included():
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    source = PrometheusSource(url, timeout=0.5, access=PrometheusDoc(concurrency=1))
    try:
        got = await asyncio.gather(*(source.query(f"q{i}") for i in range(3)),
                                   return_exceptions=True)
        assert all(isinstance(g, MetricsError) for g in got), got
        assert "did not answer within" in str(got[2]), "the queued query is bounded too"
    finally:
        source.close()
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
    with pytest.raises(MetricsError, match="closed"):
        await source.query("after close")


# ---- the prometheus-api-client floor ----------------------------------------------------


FLOOR = (0, 7, 0)  # the first release with `timeout` and without pandas/matplotlib as hard deps


def test_the_installed_prometheus_client_takes_every_argument_canary_passes(tmp_path,
                                                                            monkeypatch):
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"prometheus-api-client>={".".join(map(str, FLOOR))}"' in pyproject
    version = importlib.metadata.version("prometheus-api-client")
    assert tuple(int(x) for x in re.findall(r"\d+", version)[:3]) >= FLOOR, version
    hard = [r for r in importlib.metadata.requires("prometheus-api-client") or []
            if "extra ==" not in r]
    assert not [r for r in hard if re.match(r"(pandas|matplotlib|numpy)\b", r)], hard

    import prometheus_api_client
    from prometheus_api_client import PrometheusConnect as Real

    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    class Recorder:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            calls.append(("__init__", args, kwargs))

        def custom_query(self, *args: Any, **kwargs: Any) -> list[Any]:
            calls.append(("custom_query", args, kwargs))
            return []

    monkeypatch.setattr(prometheus_api_client, "PrometheusConnect", Recorder)
    monkeypatch.setenv("PROM_PASSWORD", "x")
    token = tmp_path / "token"
    token.write_text("t")
    for access in (PrometheusDoc(), PrometheusDoc(
            headers={"X-Scope-OrgID": "a"},
            basic_auth=BasicAuthDoc(username="u", password_env="PROM_PASSWORD")),
            PrometheusDoc(bearer_token_file=str(token), ca_file=str(token))):
        source = PrometheusSource("http://127.0.0.1:1", timeout=1, access=access)
        with closing(source):
            source._query_blocking("up")
    assert len(calls) == 6
    for name, args, kwargs in calls:
        inspect.signature(getattr(Real, name)).bind(None, *args, **kwargs)  # TypeError if not


async def test_a_scoped_token_never_sees_another_targets_rollout_id_while_paging(tmp_path):
    """Pages are filled from the token's own targets, and `next` and `before` never name
    (or confirm) a rollout out of scope."""
    async with two_teams(tmp_path) as api:
        shop = (await api.start(target="shop-a", canary_version="v2"))["id"]
        web = (await api.start(target="web", canary_version="v2"))["id"]  # the newest
        for limit in (1, 2, 50):
            status, listed = await api.call("GET", f"/api/v1/rollouts?limit={limit}",
                                            token=SHOP_TOKEN)
            assert status == 200
            assert [r["id"] for r in listed["rollouts"]] == [shop]
            assert listed["next"] is None, "no further page of this token's own rollouts"
        status, unknown = await api.call("GET", "/api/v1/rollouts?before=no-such-id",
                                         token=SHOP_TOKEN)
        status2, foreign = await api.call("GET", f"/api/v1/rollouts?before={web}",
                                          token=SHOP_TOKEN)
        assert (status, status2) == (400, 400)
        assert foreign["error"] == unknown["error"].replace("no-such-id", web)
