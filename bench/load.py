"""Load benchmark (guarantee 7): one controller holding many concurrent rollouts against
a fast router double and a Prometheus HTTP double, while the API serves a steady stream
of reads and overrides. Prints evaluation lateness, missed intervals, and abort latency
(request sent -> router carries weight 0) as percentiles.

    .venv/bin/python -m bench.load --rollouts 200 --interval 10 --duration 60

With `--flood IN_FLIGHT`, a read-flood phase follows on the same rollouts: another
process sends `--flood-requests` list and get requests (first pages, later pages,
filtered, single rollouts), IN_FLIGHT at a time, each sent once and none waiting out a
503 (dashboards, scripts and impatient viewers all at once), while an abort is sent every
`--flood-abort-every` seconds until the flood is over. Evaluation lateness, missed
intervals and abort latency are printed for the quiet phase and the flood, side by side,
with their ratios (flood / quiet).

    .venv/bin/python -m bench.load --rollouts 100 --interval 1 --duration 10 --aborts 10 \
        --flood 500 --flood-requests 3000

With `--watchers N`, a watch phase follows the quiet one (before any flood): another
process holds N Server-Sent-Event streams (`GET /api/v1/rollouts/{id}/watch`) open over
the rollouts, round robin, for `--duration` seconds, while `--aborts` aborts are spread
over it as in the quiet phase. Lateness, missed intervals and abort latency are printed
for both phases side by side, with the events the watchers received.

    .venv/bin/python -m bench.load --rollouts 200 --interval 1 --duration 20 --aborts 10 \
        --watchers 500

With `--stop-after-flood`, instead: `canary serve` as a process, its state file holding
200 finished rollouts of 1,000 events each, gets `--flood-requests` reads, `--flood` in
flight, from clients that give up after 5 ms to 2 s, and is sent SIGTERM as soon as
they are done; printed: how long it took to exit, and its resident memory before the
flood, after it and at its peak.

    .venv/bin/python -m bench.load --stop-after-flood --flood 500 --flood-requests 3000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from canary.api.app import ApiServer, bind, build_app
from canary.clock import RealClock
from canary.demo.procs import free_port
from canary.engine.controller import Controller
from canary.gates.kinds import ThresholdGate
from canary.gates.prometheus import CoalescingSource, PrometheusSource
from canary.policy import NoData, Policy
from canary.stages import Stage
from canary.store.sqlite import SqliteStore
from canary.targets import NginxTarget
from tests.doubles import PrometheusDouble
from tests.helpers import TOKENS, tokens


class MemoryRouter:
    """A router that applies at once and remembers when each weight came into force."""

    def __init__(self) -> None:
        self.weight: int | None = 0
        self.changes: list[tuple[float, int]] = []
        self.zeroed = asyncio.Event()

    async def get_weight(self) -> int | None:
        return self.weight

    async def check(self) -> None:
        return None

    async def decision(self) -> str | None:
        return None

    async def get_shape(self) -> str | None:
        return None

    async def check_shapes(self, shapes: Any) -> None:
        return None

    async def set_weight(self, weight: int, *, decision: str | None = None,
                         shape: str | None = None) -> None:
        await asyncio.sleep(0.001)
        self.weight = weight
        self.changes.append((time.monotonic(), weight))
        if weight == 0 and len(self.changes) > 1:
            self.zeroed.set()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Lateness:
    """Stands in for the controller's evaluation-delay histogram: forwards each
    observation and keeps it with its time, for exact percentiles per phase."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seen: list[tuple[float, float]] = []

    def observe(self, value: float) -> None:
        self.seen.append((time.monotonic(), value))
        self.inner.observe(value)

    def planned_between(self, start: float, end: float) -> list[float]:
        """Lateness of the evaluations that were due in [start, end), however late they
        started (a flood must not hide the evaluations it pushed past its own end)."""
        return [v for at, v in self.seen if start <= at - v < end]


async def run(n: int, interval: float, duration: float, aborts: int, hold: float,
              reads_per_s: float, shared_queries: bool = False, wait_stage: int = 0,
              wait_limit: float = 120.0, flood: int = 0, flood_requests: int = 3000,
              flood_abort_every: float = 0.1,
              flood_timeout: float | None = None, watchers: int = 0) -> dict[str, Any]:
    """Run for `duration`, then (if `flood`) a read flood of `flood_requests` with `flood`
    in flight, then (if `wait_stage`) keep going until every rollout has finished or
    reached that stage, for at most `wait_limit` more seconds: a test asserts on what
    happened, not on how fast a busy machine got there."""
    prom = PrometheusDouble(0.001)
    # per-target queries (the usual case), or one service-wide query every rollout shares
    svc = "shared" if shared_queries else "{{ target }}"
    await prom.start()
    tmp = Path(tempfile.mkdtemp(prefix="canary-bench-"))
    pol = Policy(name="bench", interval=interval, failure_limit=2, no_data=NoData.HOLD,
                 progress_deadline=hold * 10 + interval * 10,
                 stages=(Stage(5, hold), Stage(25, hold), Stage(50, hold), Stage(100, hold)),
                 gates=(ThresholdGate("errors", "sum(rate(errors{svc=\"" + svc + "\"}[1m]))", max=0.01),
                        ThresholdGate("latency", "p99{svc=\"" + svc + "\"}", max=0.5)))
    targets = {f"t{i}": NginxTarget(name=f"t{i}", file=tmp / f"t{i}.conf", upstream=f"t{i}",
                                    stable=("127.0.0.1:1",), canary=("127.0.0.1:2",),
                                    policy="bench") for i in range(n)}
    routers = {name: MemoryRouter() for name in targets}
    store = SqliteStore(str(tmp / "state.db"))
    ctl = Controller(store=store, policies={"bench": pol}, targets=targets, routers=routers,
                     source=CoalescingSource(PrometheusSource(prom.url, timeout=5)),
                     clock=RealClock())
    lateness = Lateness(ctl.metrics.eval_delay)
    ctl.metrics.eval_delay = lateness  # type: ignore[assignment]
    port = free_port()
    # as `canary serve` runs it
    api = ApiServer(build_app(ctl, tokens()), bind("127.0.0.1", port))
    await api.start()
    base = f"http://127.0.0.1:{port}"
    cpu0 = time.process_time()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    phases: dict[str, dict[str, Any]] = {}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as s:
            pipe = {"Authorization": f"Bearer {TOKENS['pipeline']}"}
            view = {"Authorization": f"Bearer {TOKENS['viewer']}"}
            # started 20 at a time, as pipelines do: one by one, the first rollouts could
            # finish before the last one started, and no abort would meet them in flight
            gate = asyncio.Semaphore(20)

            async def create(name: str) -> tuple[str, str]:
                async with gate, s.post(f"{base}/api/v1/rollouts", headers=pipe,
                                        json={"target": name, "canary_version": "v2",
                                              "stable_version": "v1"}) as r:
                    return name, (await r.json())["id"]
            ids = list(await asyncio.gather(*(create(name) for name in targets)))
            start = time.monotonic()
            queries0 = prom.queries  # (the creation burst's evaluations are not a tick's)
            cpu0 = time.process_time()  # from here: the steady state, not the creation burst
            victims = random.Random(2).sample(ids, len(ids))
            quiet_victims, victims = victims[:aborts], victims[aborts:]
            phases["quiet"] = await phase(s, base, ids, quiet_victims, routers, reads_per_s,
                                          lateness, interval, duration=duration)
            if watchers:
                watch_victims, victims = victims[:aborts], victims[aborts:]
                client = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.load", "--watch-client", base,
                    "--watchers", str(watchers), "--duration", str(duration),
                    *[x for _, rid in ids for x in ("--id", rid)],
                    stdout=asyncio.subprocess.PIPE, stdin=subprocess.DEVNULL)
                assert client.stdout is not None
                await client.stdout.readline()  # "ready": every stream is open
                phases["watch"] = await phase(s, base, ids, watch_victims, routers, reads_per_s,
                                              lateness, interval, flood=client,
                                              abort_every=duration / (aborts + 1))
            if flood:
                flooder = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.load", "--flood-client", base,
                    "--flood", str(flood), "--flood-requests", str(flood_requests),
                    *(["--flood-timeout", str(flood_timeout)] if flood_timeout else []),
                    *[x for _, rid in ids[:50] for x in ("--id", rid)],
                    stdout=asyncio.subprocess.PIPE, stdin=subprocess.DEVNULL)
                assert flooder.stdout is not None
                await flooder.stdout.readline()  # "ready": it starts now
                phases["flood"] = await phase(s, base, ids, victims, routers, reads_per_s,
                                              lateness, interval, flood=flooder,
                                              abort_every=flood_abort_every)
            settle = time.monotonic() + 10 + (wait_limit if wait_stage else 0)
            while True:  # the last abort's confirmation may still be on its way to the store
                final = await every_rollout(s, base, view)
                if time.monotonic() > settle or all(_settled(x, wait_stage) for x in final):
                    break
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - start
            async with s.get(f"{base}/metrics") as r:
                metrics = await r.text()
    finally:
        await api.stop()
        await store.close()
        await prom.stop()
    cpu = time.process_time() - cpu0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    delays = _histogram(metrics, "canary_evaluation_delay_seconds")
    missed = _value(metrics, "canary_missed_intervals_total")
    states: dict[str, int] = {}
    stages: dict[int, int] = {}
    for x in final:
        states[x["state"]] = states.get(x["state"], 0) + 1
        stages[x["stage"]] = stages.get(x["stage"], 0) + 1
    evals = prom.queries / max(1, len(pol.gates))
    out = {
        "rollouts": n, "interval_s": interval, "duration_s": round(elapsed, 1),
        "evaluations": int(evals),
        "evaluation_delay_s": delays,
        "missed_intervals": missed,
        "aborts_accepted": sum(p["aborts_accepted"] for p in phases.values()),
        "aborts_refused": [st for p in phases.values() for st in p["aborts_refused"]],
        "abort_to_weight0_ms": _ms([x for p in phases.values() for x in p["abort_latency"]]),
        "reads_failed": sum(p["reads_failed"] for p in phases.values()),
        "read_latency_ms": _ms([x for p in phases.values() for x in p["read_latency"]],
                               with_max=False),
        "prometheus_queries_per_tick": round((prom.queries - queries0)
                                             / max(1, elapsed / interval), 1),
        "cpu_s_per_rollout_per_min": round(cpu / n / (elapsed / 60), 4),
        "cpu_share_of_one_core": round(cpu / elapsed, 3),
        "max_rss_mb_growth_per_rollout": round((rss - rss0) / 1024 / n, 3),
        "states": states,
        "stages": dict(sorted(stages.items())),
    }
    if flood:
        out["read_flood"] = compare(phases["quiet"], phases["flood"], flood)
    if watchers:
        w = compare(phases["quiet"], phases["watch"], 0, other="watch")
        w.pop("reads_in_flight")
        w["watchers"] = w.pop("flood_requests")
        out["watchers"] = w
    return out


async def phase(s: aiohttp.ClientSession, base: str, ids: list[tuple[str, str]],
                victims: list[tuple[str, str]], routers: dict[str, MemoryRouter],
                reads_per_s: float, lateness: Lateness, interval: float, *,
                duration: float = 0.0, flood: asyncio.subprocess.Process | None = None,
                abort_every: float = 0.1) -> dict[str, Any]:
    """Steady reads and aborts of `victims`: for `duration` with the aborts evenly spread,
    or while `flood` runs with one abort every `abort_every` seconds."""
    pipe = {"Authorization": f"Bearer {TOKENS['pipeline']}"}
    view = {"Authorization": f"Bearer {TOKENS['viewer']}"}
    start = time.monotonic()
    done = asyncio.Event()
    read_latency: list[float] = []
    abort_latency: list[float] = []
    abort_status: list[int] = []
    read_status: list[int] = []
    flood_out: dict[str, Any] = {}

    async def clock() -> None:
        if flood is None:
            await asyncio.sleep(duration)
        else:
            out, _ = await flood.communicate()
            flood_out.update(json.loads(out))
        done.set()

    async def reader() -> None:
        rng = random.Random(1)
        while not done.is_set():
            rid = rng.choice(ids)[1]
            t0 = time.monotonic()
            path = f"/api/v1/rollouts/{rid}" if rng.random() < 0.9 else "/api/v1/rollouts"
            async with s.get(base + path, headers=view) as r:
                await r.read()
                read_status.append(r.status)
            read_latency.append(time.monotonic() - t0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1 / reads_per_s)

    async def abort(name: str, rid: str) -> None:
        t0 = time.monotonic()
        async with s.post(f"{base}/api/v1/rollouts/{rid}/abort", headers=pipe,
                          json={"reason": "bench"}) as r:
            abort_status.append(r.status)
            if r.status != 200:
                return  # 409: it had already finished
        await routers[name].zeroed.wait()
        abort_latency.append(time.monotonic() - t0)

    async def aborter() -> None:
        gap = abort_every if flood is not None else duration / (len(victims) + 1)
        sent = []
        for name, rid in victims:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), gap)
            if done.is_set():
                break
            sent.append(asyncio.create_task(abort(name, rid)))
        await asyncio.gather(*sent)

    await asyncio.gather(clock(), reader(), aborter())
    end = time.monotonic()
    await asyncio.sleep(interval + 1)  # every evaluation due in the phase has started
    late = lateness.planned_between(start, end)
    return {"seconds": round(end - start, 1), "evaluations": len(late),
            "lateness": late, "missed_intervals": sum(1 for x in late if x > interval),
            "abort_latency": abort_latency, "aborts_accepted": abort_status.count(200),
            "aborts_refused": [st for st in abort_status if st != 200],
            "read_latency": read_latency, "flood_client": flood_out,
            "reads_failed": sum(1 for st in read_status if st != 200)}


def compare(quiet: dict[str, Any], flood: dict[str, Any], in_flight: int,
            other: str = "flood") -> dict[str, Any]:
    """The flood (or watch) phase beside the quiet one: percentiles in ms, and the
    ratio other / quiet."""
    def row(key: str) -> dict[str, Any]:
        q, f = _ms(quiet[key]), _ms(flood[key])
        ratio = {p: round(f[p] / q[p], 1) if q[p] else None for p in ("p50", "p99")}
        return {"quiet": q, other: f, f"ratio_{other}_over_quiet": ratio}

    return {"reads_in_flight": in_flight,
            "flood_requests": flood.get("flood_client", {}),
            "evaluation_lateness_ms": row("lateness"),
            "evaluations": {"quiet": quiet["evaluations"], other: flood["evaluations"]},
            "missed_intervals": {"quiet": quiet["missed_intervals"],
                                 other: flood["missed_intervals"]},
            "abort_to_weight0_ms": row("abort_latency"),
            f"aborts_refused_during_{other}": flood["aborts_refused"]}


async def watch_client(base: str, n: int, ids: list[str], seconds: float) -> dict[str, Any]:
    """`n` watch streams over `ids`, round robin, held `seconds` after all are open;
    prints "ready" once they are, returns what they received."""
    view = {"Authorization": f"Bearer {TOKENS['viewer']}"}
    got = {"streams": n, "open": 0, "refused": 0, "rollout_events": 0, "heartbeats": 0,
           "ended_final": 0}
    opened = asyncio.Event()
    stop = asyncio.Event()

    async def one(s: aiohttp.ClientSession, rid: str) -> None:
        try:
            async with s.get(f"{base}/api/v1/rollouts/{rid}/watch", headers=view) as r:
                if r.status != 200:
                    got["refused"] += 1
                    return
                got["open"] += 1
                if got["open"] + got["refused"] == n:
                    opened.set()
                reading = asyncio.ensure_future(_count_events(r, got))
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                for t in (reading, stopping):
                    t.cancel()
        finally:
            if got["open"] + got["refused"] == n:
                opened.set()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as s:
        tasks = [asyncio.create_task(one(s, ids[i % len(ids)])) for i in range(n)]
        await opened.wait()
        print("ready", flush=True)
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return got


async def _count_events(r: aiohttp.ClientResponse, got: dict[str, int]) -> None:
    async for line in r.content:
        if line.startswith(b"event: rollout"):
            got["rollout_events"] += 1
        elif line.startswith(b": heartbeat"):
            got["heartbeats"] += 1
    got["ended_final"] += 1


def _ms(values: list[float], *, with_max: bool = True) -> dict[str, float]:
    out = {"n": len(values), "p50": round(pct(values, 0.5) * 1000, 1),
           "p99": round(pct(values, 0.99) * 1000, 1)}
    if with_max:
        out["max"] = round(max(values, default=float("nan")) * 1000, 1)
    return out


async def every_rollout(s: aiohttp.ClientSession, base: str,
                        headers: dict[str, str]) -> list[dict[str, Any]]:
    """Every rollout, page by page."""
    out: list[dict[str, Any]] = []
    before: str | None = None
    while True:
        query = "?limit=500" + (f"&before={before}" if before else "")
        async with s.get(f"{base}/api/v1/rollouts{query}", headers=headers) as r:
            if r.status == 503:  # (busy: the bound on reads in flight)
                await asyncio.sleep(0.1)
                continue
            page = await r.json()
        out.extend(page["rollouts"])
        before = page["next"]
        if not before:
            return out


async def flood_client(base: str, in_flight: int, total: int, ids: list[str],
                       give_up_after: float | None) -> dict[str, Any]:
    """Send `total` reads, `in_flight` at a time, each once: listings (first pages, later
    pages, filtered) and single rollouts. Runs in its own process, so its own work does
    not weigh on the controller's event loop."""
    statuses: dict[str, int] = {}
    latency: list[float] = []
    view = {"Authorization": f"Bearer {TOKENS['viewer']}"}
    paths = ["/api/v1/rollouts", "/api/v1/rollouts?limit=500", "/api/v1/rollouts?state=active",
             *(f"/api/v1/rollouts/{rid}" for rid in ids[:20]),
             *(f"/api/v1/rollouts?before={rid}" for rid in ids[:5])]
    connector = aiohttp.TCPConnector(limit=in_flight)
    left = total
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(
            total=give_up_after)) as s:
        print("ready", flush=True)
        t0 = time.monotonic()

        async def one(worker: int) -> None:
            nonlocal left
            rng = random.Random(worker)
            while left > 0:
                left -= 1
                t = time.monotonic()
                try:
                    async with s.get(base + rng.choice(paths), headers=view) as r:
                        await r.read()
                        key = str(r.status)
                except (TimeoutError, aiohttp.ClientError) as e:
                    key = type(e).__name__
                statuses[key] = statuses.get(key, 0) + 1
                if key == "200":
                    latency.append(time.monotonic() - t)

        await asyncio.gather(*(one(i) for i in range(in_flight)))
        took = time.monotonic() - t0
    return {"sent": sum(statuses.values()), "seconds": round(took, 2),
            "by_status": dict(sorted(statuses.items())),
            "answered_200_ms": _ms(latency, with_max=False)}


def _settled(rollout: dict[str, Any], wait_stage: int) -> bool:
    if rollout["state"] == "rolling_back":
        return False
    return rollout["state"] != "progressing" or rollout["stage"] >= wait_stage


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _histogram(text: str, name: str) -> dict[str, float]:
    """Approximate p50/p99 from the histogram's cumulative buckets (upper bounds)."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    total = buckets[-1][1] if buckets else 0.0
    out = {"n": total}
    for q in (0.5, 0.99):
        out[f"p{int(q * 100)}_at_most"] = next((le for le, c in buckets if c >= q * total),
                                               float("nan"))
    out["mean"] = round(_value(text, name + "_sum") / total, 4) if total else float("nan")
    return out


async def stop_after_flood(in_flight: int, requests: int) -> dict[str, Any]:
    """`canary serve` flooded by impatient viewers, then stopped at once."""
    import signal

    from tests.test_floods_and_pipes import flood, rss_mb, serve

    with tempfile.TemporaryDirectory(prefix="canary-bench-") as tmp:
        async with serve(Path(tmp), seeded=200, events=1000) as (proc, api):
            ids = [f"seed-{i:04d}" for i in range(200)]
            before, _ = rss_mb(proc.pid)
            t0 = time.monotonic()
            seen = await flood(api.base, requests=requests, in_flight=in_flight, ids=ids,
                               give_up=(0.005, 2.0))
            flooded = time.monotonic() - t0
            after, peak = rss_mb(proc.pid)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                code: int | str = await asyncio.wait_for(proc.wait(), 120)
            except TimeoutError:
                code = "still running after 120 s"
            took = time.monotonic() - t0
    return {"flood": {"requests": requests, "in_flight": in_flight,
                      "seconds": round(flooded, 2), "answers": dict(sorted(seen.items()))},
            "rss_mb": {"before": round(before), "after": round(after), "peak": round(peak)},
            "exit_code": code, "sigterm_to_exit_s": round(took, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rollouts", type=int, default=200)
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--hold", type=float, default=3600.0, help="stage hold (long: stay busy)")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--aborts", type=int, default=20)
    p.add_argument("--reads-per-s", type=float, default=20.0)
    p.add_argument("--shared-queries", action="store_true",
                   help="every rollout's gates read the same series (shows query coalescing)")
    p.add_argument("--flood", type=int, default=0, metavar="IN_FLIGHT",
                   help="add a read-flood phase: this many reads in flight at once, sent by "
                        "another process")
    p.add_argument("--flood-requests", type=int, default=3000,
                   help="reads the flood sends in all (default 3000)")
    p.add_argument("--flood-abort-every", type=float, default=0.1, metavar="SECONDS",
                   help="during the flood, one abort this often (default 0.1)")
    p.add_argument("--flood-timeout", type=float, help="flood clients give up after this "
                   "many seconds (impatient viewers hanging up)")
    p.add_argument("--stop-after-flood", action="store_true",
                   help="instead: flood a `canary serve` process and stop it right after")
    p.add_argument("--watchers", type=int, default=0, metavar="STREAMS",
                   help="add a watch phase: this many /watch streams open, from another "
                        "process")
    p.add_argument("--watch-client", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--flood-client", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--id", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.flood_client:
        print(json.dumps(asyncio.run(flood_client(args.flood_client, args.flood,
                                                  args.flood_requests, args.id,
                                                  args.flood_timeout))))
        return
    if args.watch_client:
        print(json.dumps(asyncio.run(watch_client(args.watch_client, args.watchers, args.id,
                                                  args.duration))))
        return
    if args.stop_after_flood:
        print(json.dumps(asyncio.run(stop_after_flood(args.flood or 500, args.flood_requests)),
                         indent=2))
        return
    logging.disable(logging.WARNING)  # the rollouts' own story is not the benchmark's output
    result = asyncio.run(run(args.rollouts, args.interval, args.duration, args.aborts, args.hold,
                             args.reads_per_s, args.shared_queries, flood=args.flood,
                             flood_requests=args.flood_requests,
                             flood_abort_every=args.flood_abort_every,
                             flood_timeout=args.flood_timeout, watchers=args.watchers))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
