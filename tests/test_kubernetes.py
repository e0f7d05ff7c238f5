"""canary as a Kubernetes controller: rollouts kept in ConfigMaps, one leader at a time
through a Lease. Controllers run as real processes that reach the API double
(tests/kubeapi.py) through KUBECONFIG, as they would a cluster."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from canary.engine import decide
from canary.errors import Conflict, NotFound, StoreConflict
from canary.kube import api_client
from canary.model import Phase
from canary.store.kubernetes import KubernetesStore
from tests.doubles import PrometheusDouble
from tests.helpers import Api, eventually, simple_policy, tokens
from tests.kubeapi import KubeApiDouble
from tests.test_istio import DR, NS, VS, weights

pytestmark = [pytest.mark.e2e, pytest.mark.serial]


def rollout(rid: str, target: str = "api") -> Any:
    return decide.start(rollout_id=rid, target=target, policy=simple_policy(),
                        canary_version="v2", stable_version="v1", now=time.time(), actor="t")


async def test_the_cluster_store_keeps_one_active_rollout_per_target_and_guards_writes(tmp_path):
    kube = KubeApiDouble()
    await kube.start()
    api = api_client(str(kube.kubeconfig(tmp_path / "kubeconfig")))
    try:
        store = KubernetesStore(NS, api)
        results = await asyncio.gather(*(store.create(rollout=rollout(f"r{i}")) for i in range(6)),
                                       return_exceptions=True)
        won = [r for r in results if not isinstance(r, Exception)]
        assert len(won) == 1 and all(isinstance(r, Conflict) for r in results if r not in won)
        r = await store.load(won[0].id)
        saved = await store.save(rollout=r, expected_version=r.version)
        with pytest.raises(StoreConflict):
            await store.save(rollout=r, expected_version=r.version)  # stale
        assert [x.id for x in await store.list(active_only=True)] == [r.id]
        from dataclasses import replace

        await store.save(rollout=replace(saved, state=Phase.ROLLED_BACK),
                         expected_version=saved.version)
        assert await store.list(active_only=True) == []
        nxt = await store.create(rollout=rollout("next"))  # the target is free again
        assert {x.id for x in await store.list()} == {r.id, nxt.id}
        cm = kube.get("configmaps", NS, f"canary-rollout-{r.id}")
        assert cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "canary"
    finally:
        api.close()
        await kube.stop()


async def test_the_cluster_store_pages_and_filters_like_the_embedded_one(tmp_path):
    from canary.store.sqlite import SqliteStore
    from tests.helpers import seed

    kube = KubeApiDouble()
    await kube.start()
    api = api_client(str(kube.kubeconfig(tmp_path / "kubeconfig")))
    sqlite = SqliteStore(str(tmp_path / "state.db"))
    try:
        cluster = KubernetesStore(NS, api)
        seeded = await seed(sqlite, 9, targets=("web", "api"), events=4)
        for r in seeded:
            await cluster.create(rollout=r)
        live = rollout("live", target="web")
        await sqlite.create(rollout=live)
        await cluster.create(rollout=live)
        ref = seeded[4].id
        for kwargs in ({}, {"limit": 3}, {"before": ref}, {"before": ref, "limit": 2},
                       {"target": "api"}, {"target": "api", "before": ref},
                       {"state": Phase.SUCCEEDED}, {"state": [Phase.PROGRESSING,
                                                               Phase.ROLLED_BACK]},
                       {"active_only": True}, {"target": "web", "events": False}):
            a = await sqlite.list(**kwargs)
            b = await cluster.list(**kwargs)
            assert [r.id for r in a] == [r.id for r in b], kwargs
            assert [len(r.events) for r in a] == [len(r.events) for r in b], kwargs
        assert all(r.events == () for r in await cluster.list(events=False))
        with pytest.raises(NotFound):
            await cluster.list(before="no-such-id")
    finally:
        await sqlite.close()
        api.close()
        await kube.stop()


async def test_the_cluster_store_keeps_a_rollouts_readings_beside_it_bounded(tmp_path):
    from canary import history

    kube = KubeApiDouble()
    await kube.start()
    api = api_client(str(kube.kubeconfig(tmp_path / "kubeconfig")))
    try:
        store = KubernetesStore(NS, api)
        r = await store.create(rollout=rollout("hist"))
        assert await store.readings(r.id) == []
        detail = "canary 3/1000 errors, stable 10/9000 this stage; " * 5
        for i in range(history.MAX_POINTS + 50):
            r = await store.save(rollout=r, expected_version=r.version, readings=[
                {"series": "errors", "at": float(i), "verdict": "pass", "value": 0.1,
                 "detail": detail}, {"series": "p99", "at": float(i), "verdict": "pass"}])
        # a new controller (a new store) reads the same history
        got = await KubernetesStore(NS, api).readings(r.id)
        assert 0 < len([p for p in got if p["series"] == "errors"]) <= history.MAX_POINTS
        assert got[-1]["at"] == float(history.MAX_POINTS + 49)
        cm = kube.get("configmaps", NS, f"canary-readings-{r.id}")
        assert len(cm["data"]["readings.json"]) < 1024 * 1024
        # the rollout's own object stays small, and listings never read the history
        assert "readings" not in kube.get("configmaps", NS, f"canary-rollout-{r.id}")["data"]
        assert [x.id for x in await store.list()] == [r.id]
        with pytest.raises(NotFound):
            await store.readings("no-such-id")
    finally:
        api.close()
        await kube.stop()


class Replica:
    def __init__(self, tmp: Path, name: str, kubeconfig: Path, prom: str) -> None:
        self.name, self.port = name, _free()
        self.dir = tmp / name
        self.dir.mkdir()
        pdir = self.dir / "policies"
        pdir.mkdir()
        (pdir / "p.yaml").write_text(yaml.safe_dump({
            "name": "p", "interval": "1s", "failure_limit": 2, "progress_deadline": "1m",
            "stages": [{"weight": 10, "hold": "1500ms"}, {"weight": 25, "hold": "1500ms"},
                       {"weight": 50, "hold": "1500ms"}, {"weight": 100, "hold": "1s"}],
            "gates": [{"name": "errors", "query": 'errors{svc="{{ service }}"}', "max": 0.1}]}))
        (self.dir / "canary.yaml").write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{self.port}", "state": f"kubernetes:{NS}",
            "prometheus": {"url": prom, "timeout": "1s"}, "policies": str(pdir),
            "leader_election": {"lease_duration": "3s", "renew_deadline": "2s",
                                "retry_period": "300ms"},
            "auth": {"tokens": [{"name": t.name, "sha256": t.sha256, "role": t.role.name.lower()}
                                for t in tokens()]},
            "targets": {"api": {
                "router": "istio", "namespace": NS, "virtual_service": "api", "route": "primary",
                "stable": {"host": "api.prod.svc.cluster.local", "subset": "stable"},
                "canary": {"host": "api.prod.svc.cluster.local", "subset": "canary"},
                "policy": "p", "vars": {"service": "api"}, "stable_version": "v1"}}}))
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "POD_NAME": name}
        self.proc: asyncio.subprocess.Process | None = None
        self.base = f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        with open(self.dir / "log", "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "canary.cli", "serve", "--config",
                str(self.dir / "canary.yaml"), env=self.env, stdout=log, stderr=log,
                stdin=asyncio.subprocess.DEVNULL)

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            await self.proc.wait()

    async def ready(self, s: aiohttp.ClientSession) -> dict[str, Any] | None:
        try:
            async with s.get(self.base + "/readyz") as r:
                return await r.json() if r.status == 200 else None
        except aiohttp.ClientError:
            return None


def _free() -> int:
    from canary.demo.procs import free_port

    return free_port()


async def test_one_leader_acts_and_the_other_takes_over_when_it_is_killed(tmp_path):
    kube = KubeApiDouble()
    await kube.start()
    kube.put("virtualservices", NS, VS)
    kube.put("destinationrules", NS, DR)
    prom = PrometheusDouble(0.0)
    await prom.start()
    kubeconfig = kube.kubeconfig(tmp_path / "kubeconfig")
    a = Replica(tmp_path, "a", kubeconfig, prom.url)
    b = Replica(tmp_path, "b", kubeconfig, prom.url)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            await a.start()
            await eventually(lambda: _leading(a, s), what="a leads")
            await b.start()
            await eventually(lambda: b.ready(s), what="b ready")
            assert (await b.ready(s))["leader"] is False
            api_a, api_b = Api(a.base, s), Api(b.base, s)
            status, data = await api_b.call("POST", "/api/v1/rollouts",
                                            {"target": "api", "canary_version": "v2"},
                                            role="pipeline")
            assert status == 503 and "not the leader" in data["error"] and "(a is)" in data["error"]
            rid = (await api_a.start(target="api", canary_version="v2"))["id"]
            assert (await api_b.rollout(rid))["id"] == rid, "followers serve reads"

            async def at_25() -> bool:
                return weights(kube) == [75, 25]
            await eventually(at_25, what="stage 1 in the VirtualService")
            await a.kill()
            killed = time.monotonic()
            await eventually(lambda: _leading(b, s), deadline=30, what="b takes over")
            r = await api_b.until(rid, lambda r: r["state"] == "succeeded", deadline=60)
        assert weights(kube) == [0, 100]
        stages = [e["message"].split(" (")[0] for e in r["events"] if e["type"] == "stage"]
        assert stages == ["stage 1: weight 25", "stage 2: weight 50", "stage 3: weight 100"]
        acting = [(t, ua) for t, _m, plural, name, ua in kube.writes
                  if plural == "virtualservices" or name.startswith("canary-rollout-")]
        by_a = [t for t, ua in acting if ua.startswith("canary/a")]
        by_b = [t for t, ua in acting if ua.startswith("canary/b")]
        assert by_a and by_b, acting
        assert max(by_a) < killed < min(by_b), "the two replicas never both acted"
    finally:
        await a.kill()
        await b.kill(signal.SIGTERM)
        await prom.stop()
        await kube.stop()


async def _leading(replica: Replica, s: aiohttp.ClientSession) -> bool:
    ready = await replica.ready(s)
    return bool(ready and ready.get("leader"))


class Blackhole:
    """A TCP proxy to the API double that, once switched, keeps every connection open
    and answers nothing (an API server that accepts and never replies), counting the
    requests that reach it."""

    def __init__(self, upstream: int) -> None:
        self.upstream, self.silent, self.unanswered = upstream, False, 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, ask: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if self.silent:
                        self.unanswered += data.count(b" HTTP/1.1\r\n") if ask else 0
                        continue  # swallowed: no request goes on, no answer comes back
                    dst.write(data)
                    await dst.drain()

        task = asyncio.ensure_future(asyncio.gather(pipe(reader, up_w, True),
                                                    pipe(up_r, writer, False)))
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await asyncio.gather(task, return_exceptions=True)
        finally:
            for w in (writer, up_w):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(0)  # each connection's finally closes both its ends
        await self._server.wait_closed()


async def test_a_leader_whose_api_server_stops_answering_steps_down_before_another_takes_over(
        tmp_path):
    """README "Running in a cluster": each Kubernetes call is one attempt bounded at 4 s and
    a renewal not done by renew_deadline is given up, so the leader stops acting before
    the others may take the Lease (lease_duration without a renewal). With the client's
    default retries, one renewal to a silent API server took four attempts, about 16 s,
    and the old leader was still leading 17.5 s in, past the 15 s a follower waits."""
    from canary.leader import LeaderElector

    order: list[str] = []

    def elector(name: str, kubeconfig: Path) -> LeaderElector:
        async def started() -> None:
            order.append(f"{name} leads")

        async def stopped() -> None:
            order.append(f"{name} stops")
        return LeaderElector(api_client(str(kubeconfig)), "canary-system", name,
                             lease_duration=15, renew_deadline=10, retry_period=2,
                             on_start=started, on_stop=stopped)

    async with silenceable_api(tmp_path) as (hole, direct, through):
        a, b = elector("a", through), elector("b", direct)
        tasks = [asyncio.create_task(a.run())]
        try:
            await eventually(_now(lambda: a.leading), what="a leads")
            tasks.append(asyncio.create_task(b.run()))
            await eventually(_now(lambda: b.leader == "a"), what="b sees a leading")
            hole.silent = True
            await eventually(_now(lambda: b.leading), deadline=60, what="b takes over")
            assert order == ["a leads", "a stops", "b leads"], order
            # one attempt per call: the renewal's GET, and no second try of it
            assert 1 <= hole.unanswered <= 3, hole.unanswered
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_one_call_to_an_api_server_that_never_answers_is_one_attempt(tmp_path):
    async with silenceable_api(tmp_path) as (hole, _direct, through):
        hole.silent = True
        store = KubernetesStore("canary-system", api_client(str(through)))
        with pytest.raises(Exception, match="state store"):
            await store.ping()
        assert hole.unanswered == 1, "the client retried inside one call"


@contextlib.asynccontextmanager
async def silenceable_api(tmp_path: Path, kube: KubeApiDouble | None = None,
                          ) -> AsyncIterator[tuple[Blackhole, Path, Path]]:
    """The API double (or `kube`), and two kubeconfigs for it: one direct, one through a
    Blackhole that can be silenced: (the blackhole, direct, through)."""
    kube = kube or KubeApiDouble()
    await kube.start()
    hole = Blackhole(kube.port)
    port = await hole.start()
    direct = kube.kubeconfig(tmp_path / "direct")
    through = tmp_path / "through"
    through.write_text(direct.read_text().replace(f":{kube.port}", f":{port}"))
    try:
        yield hole, direct, through
    finally:
        await hole.stop()
        await kube.stop()


def _now(check: Any) -> Any:
    """`eventually` over a plain condition."""
    async def read() -> Any:
        return check()
    return read


async def test_a_leader_that_cannot_start_steps_down_and_starts_again(tmp_path):
    """Resuming the stored rollouts failed once (a connection reset, now that calls are
    one attempt): the replica used to go on leading, renewing the Lease, with none of
    its rollouts resumed. It steps down, hands the Lease over and starts afresh."""
    from canary.leader import LeaderElector

    calls: list[str] = []

    async def started() -> None:
        calls.append("start")
        if calls.count("start") == 1:
            raise ConnectionResetError("listing the stored rollouts: connection reset")

    async def stopped() -> None:
        calls.append("stop")

    async with silenceable_api(tmp_path) as (_hole, direct, _through):
        a = LeaderElector(api_client(str(direct)), "canary-system", "a", lease_duration=3,
                          renew_deadline=2, retry_period=0.3, on_start=started,
                          on_stop=stopped)
        async with running(a):
            await eventually(_now(lambda: calls == ["start", "stop", "start"] and a.leading),
                             what="started again after stepping down")


@contextlib.asynccontextmanager
async def running(elector: Any) -> AsyncIterator[asyncio.Task[None]]:
    """The elector's loop as a task for the block, cancelled after it."""
    task = asyncio.create_task(elector.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_step_down_is_finished_even_when_the_elector_is_stopped_meanwhile(tmp_path):
    """Another replica holds the Lease now: this one stops its rollouts (on_stop), and a
    shutdown arriving while it does so must not cut that short, or rollouts would go on
    running on a replica that no longer leads."""
    from kubernetes import client

    from canary.leader import LeaderElector

    order: list[str] = []

    async def started() -> None:
        order.append("leads")

    async def stopped() -> None:
        order.append("stopping")
        await asyncio.sleep(0.5)
        order.append("rollouts stopped")

    async with silenceable_api(tmp_path) as (_hole, direct, _through):
        a = LeaderElector(api_client(str(direct)), "canary-system", "a", lease_duration=15,
                          renew_deadline=10, retry_period=0.2, on_start=started,
                          on_stop=stopped)
        async with running(a) as task:
            await eventually(_now(lambda: a.leading), what="a leads")
            coord = client.CoordinationV1Api(api_client(str(direct)))

            def taken_by_b() -> None:
                lease = coord.read_namespaced_lease("canary-leader", "canary-system")
                lease.spec.holder_identity = "b"
                coord.replace_namespaced_lease("canary-leader", "canary-system", lease)
            await asyncio.to_thread(taken_by_b)
            await eventually(_now(lambda: "stopping" in order), what="a steps down")
            task.cancel()  # a shutdown, while on_stop is still at work
            await asyncio.gather(task, return_exceptions=True)
            await eventually(_now(lambda: "rollouts stopped" in order),
                             what="the step-down finished")


class Acting:
    """Electors whose on_start starts an 'acting' task (a rollout) and whose on_stop
    cancels it; every tick of acting is recorded, to show whether two ever acted at once."""

    def __init__(self) -> None:
        self.ticks: list[tuple[str, float]] = []
        self.started: list[str] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def elector(self, name: str, kubeconfig: Path, *, slow_start: float = 0.0,
                **timing: float) -> Any:
        from canary.leader import LeaderElector

        async def act() -> None:
            while True:
                self.ticks.append((name, time.monotonic()))
                await asyncio.sleep(0.02)

        async def start() -> None:
            self._tasks[name] = asyncio.create_task(act())  # the rollouts resume first,
            await asyncio.sleep(slow_start)                 # then the rest of a start
            self.started.append(name)

        async def stop() -> None:
            task = self._tasks.pop(name, None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return LeaderElector(api_client(str(kubeconfig)), "canary-system", name,
                             on_start=start, on_stop=stop, **timing)

    def overlap(self) -> float:
        """How long the two acted at once (0: never)."""
        a = [t for who, t in self.ticks if who == "a"]
        b = [t for who, t in self.ticks if who == "b"]
        return max(0.0, max(a) - min(b)) if a and b else 0.0


async def test_a_slow_start_keeps_renewing_so_no_one_else_takes_over_meanwhile(tmp_path):
    """A start slower than the lease (resuming rollouts, then checking each router on a
    slow API server) used to hold up the renewals: the other replica took the Lease while
    the first one's rollouts still ran (1.8 s of both acting). The start now runs beside
    the renewals."""
    acting = Acting()
    timing = {"lease_duration": 3, "renew_deadline": 2, "retry_period": 0.3}
    async with silenceable_api(tmp_path) as (_hole, direct, _through):
        a = acting.elector("a", direct, slow_start=4, **timing)
        b = acting.elector("b", direct, **timing)
        async with running(a):
            await eventually(_now(lambda: a.leading), what="a leads")
            async with running(b):
                await eventually(_now(lambda: "a" in acting.started), what="a's start ends")
                await eventually(_now(lambda: b.leader == "a"), what="b sees a")
                assert a.leading and not b.leading
    assert acting.overlap() == 0 and not any(who == "b" for who, _ in acting.ticks)


async def test_a_renewal_answered_late_counts_from_when_it_was_sent(tmp_path):
    """The API server commits a renewal at once and answers it 1.6 s later, then falls
    silent for the leader. Counting the renew deadline from the answer let the old leader
    act 0.5 s into the new one's term; counted from when it was sent, it steps down
    first, for every lease the config accepts."""
    acting = Acting()
    timing = {"lease_duration": 3, "renew_deadline": 2, "retry_period": 0.3}

    class LateAnswer(KubeApiDouble):
        delay_next_renewal = False

        async def handle(self, request: Any) -> Any:
            response = await super().handle(request)  # committed here
            if request.method == "PUT" and "leases" in request.path \
                    and self.delay_next_renewal:
                self.delay_next_renewal = False
                await asyncio.sleep(1.6)
                asyncio.get_running_loop().call_later(0.1, setattr, hole, "silent", True)
            return response

    kube = LateAnswer()
    async with silenceable_api(tmp_path, kube) as (hole, direct, through):
        a = acting.elector("a", through, **timing)
        b = acting.elector("b", direct, **timing)
        async with running(a):
            await eventually(_now(lambda: a.leading), what="a leads")
            async with running(b):
                await eventually(_now(lambda: b.leader == "a"), what="b sees a")
                kube.delay_next_renewal = True
                await eventually(_now(lambda: "b" in acting.started), deadline=60,
                                 what="b takes over")
    assert acting.overlap() == 0, f"both acted for {acting.overlap():.2f}s"
