"""`canary serve` as a process, under faults every host sees: whatever reads its log goes
away, clients hang up in the middle of an answer, hundreds of viewers flood it with reads,
and it is stopped right after. It keeps serving, every abort lands, evaluations go on,
and it stops promptly without ballooning. (How late evaluations and aborts get under a
flood is measured by bench/load.py --flood, not asserted here.)"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from canary.api.app import build_app, make_runner
from canary.clock import RealClock
from canary.demo.procs import free_port, wait_http
from canary.engine.controller import Controller
from canary.routers.nginx import NginxRouter
from canary.store.sqlite import SqliteStore
from canary.targets import NginxTarget
from tests.doubles import PrometheusDouble
from tests.helpers import TOKENS, Api, SetSource, eventually, seed, simple_policy, tokens

pytestmark = [pytest.mark.e2e, pytest.mark.serial]
TARGETS = ("web0", "web1", "web2", "web3")


def write_config(tmp: Path, prom: str, *, hold: str = "1h") -> tuple[Path, int]:
    port = free_port()
    (tmp / "policies").mkdir(exist_ok=True)
    (tmp / "policies" / "p.yaml").write_text(yaml.safe_dump({
        "name": "p", "interval": "1s", "failure_limit": 2, "progress_deadline": "2h",
        "stages": [{"weight": 10, "hold": hold}, {"weight": 100, "hold": "300ms"}],
        "gates": [{"name": "errors", "query": 'errors{svc="{{ target }}"}', "max": 0.5}]}))
    (tmp / "canary.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "state": "sqlite:state.db",
        "prometheus": {"url": prom, "timeout": "1s"}, "policies": "policies",
        "auth": {"tokens": [{"name": f"{r}-token", "sha256": hashlib.sha256(t.encode()).hexdigest(),
                             "role": r} for r, t in TOKENS.items()]},
        "targets": {name: {"router": "nginx", "file": f"{name}.conf", "upstream": name,
                           "stable": ["127.0.0.1:9001"], "canary": ["127.0.0.1:9002"],
                           "test": ["true"], "reload": ["true"], "policy": "p",
                           "stable_version": "v1"} for name in TARGETS}}))
    return tmp / "canary.yaml", port


@contextlib.asynccontextmanager
async def serve(tmp: Path, *, seeded: int = 0, events: int = 0, hold: str = "1h",
                out: int | None = None) -> AsyncIterator[tuple[asyncio.subprocess.Process,
                                                               Api]]:
    """`canary serve` as a process (its stdout and stderr to `out`, else a log file), with
    `seeded` finished rollouts of `events` events each already in its state file."""
    prom = PrometheusDouble(0.0)
    await prom.start()
    cfg, port = write_config(tmp, prom.url, hold=hold)
    if seeded:
        store = SqliteStore(str(tmp / "state.db"))
        await seed(store, seeded, targets=TARGETS, events=events)
        await store.close()
    log = open(tmp / "controller.log", "ab")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "canary.cli", "serve", "--config", str(cfg),
        stdin=asyncio.subprocess.DEVNULL, stdout=log if out is None else out,
        stderr=log if out is None else out, cwd=tmp)
    log.close()
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_http(f"{base}/readyz")
        async with aiohttp.ClientSession() as s:
            yield proc, Api(base, s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await prom.stop()


async def until_answered(api: Api, rid: str, check: Any, *, deadline: float = 60.0,
                         what: str = "state") -> dict[str, Any]:
    """Poll one rollout; a 503 (too many reads in flight) is asked again, as the CLI does."""
    async def probe() -> dict[str, Any] | None:
        status, data = await api.call("GET", f"/api/v1/rollouts/{rid}", role="viewer")
        assert status in (200, 503), data
        return data if status == 200 and check(data) else None
    return await eventually(probe, deadline=deadline, what=what)


async def flood(base: str, *, requests: int, in_flight: int, ids: list[str],
                give_up: tuple[float, float] | None = None,
                until: asyncio.Event | None = None) -> dict[str, int]:
    """`requests` reads (or fewer, if `until` is set first), `in_flight` at a time, each
    sent once and none waiting out a 503: listings of every size and single rollouts.
    With `give_up` (seconds, from-to), each client hangs up after a random time in that
    range, often mid-answer."""
    rng = random.Random(7)
    paths = ["/api/v1/rollouts", "/api/v1/rollouts?limit=500", "/api/v1/rollouts?state=active",
             *(f"/api/v1/rollouts/{rid}" for rid in ids[:30])]
    view = {"Authorization": f"Bearer {TOKENS['viewer']}"}
    seen: dict[str, int] = {}
    left = requests
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as s:
        async def one() -> None:
            nonlocal left
            while left > 0 and not (until and until.is_set()):
                left -= 1
                timeout = aiohttp.ClientTimeout(total=rng.uniform(*give_up) if give_up else 60)
                try:
                    async with s.get(base + rng.choice(paths), headers=view,
                                     timeout=timeout) as r:
                        await r.read()
                        key = str(r.status)
                        if r.status == 503:
                            assert r.headers.get("Retry-After"), "a 503 says when to retry"
                except (TimeoutError, aiohttp.ClientError):
                    key = "gave up"
                seen[key] = seen.get(key, 0) + 1

        await asyncio.gather(*(one() for _ in range(in_flight)))
    return seen


def rss_mb(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def read_line(fd: int) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n")[0]


async def test_serve_keeps_working_after_whatever_reads_its_log_goes_away(tmp_path):
    """`canary serve ... 2>&1 | head -1`: head reads one line and exits."""
    r, w = os.pipe()
    try:
        async with serve(tmp_path, hold="600ms", out=w) as (proc, api):
            os.close(w)
            w = -1
            first = await asyncio.wait_for(asyncio.to_thread(read_line, r), 30)
            assert first.startswith(b"{"), first
            os.close(r)  # the reader is gone: every log line from here meets a closed pipe
            r = -1
            a = await api.start(target="web0", canary_version="v2")
            status, data = await api.call("POST", f"/api/v1/rollouts/{a['id']}/abort",
                                          {"reason": "bad build"}, role="pipeline")
            assert status == 200, data
            await api.until(a["id"], lambda x: x["state"] == "rolled_back")
            b = await api.start(target="web0", canary_version="v3")
            done = await api.until(b["id"], lambda x: x["state"] == "succeeded", deadline=60)
            assert done["weight"] == 100
            status, data = await api.call("POST", "/api/v1/rollouts", {"target": "nope",
                                          "canary_version": "v4"}, role="pipeline")
            assert status == 404  # (a refused write is audited: one more line to drop)
            assert (await api.call("GET", "/healthz", role=None))[0] == 200
            assert proc.returncode is None
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0, "a clean exit, not SIGPIPE"
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


async def test_serve_keeps_working_while_whatever_reads_its_log_stops_reading(tmp_path):
    """A log shipper that hangs with the pipe still open: the pipe's buffer fills and every
    write to it would wait forever. The controller must not wait with it: aborts land,
    reads answer, evaluations go on, and it stops on SIGTERM."""
    r, w = os.pipe()
    try:
        async with serve(tmp_path, hold="1h", out=w) as (proc, api):
            os.close(w)
            w = -1
            # nobody reads `r` from here on; each refused write is one more audited line
            for i in range(600):  # (well past the 64 KiB a pipe holds: ~250 bytes a line)
                status, _ = await api.call("POST", "/api/v1/rollouts", {
                    "target": f"nope-{i}", "canary_version": "v4"}, role="pipeline")
                assert status == 404
            a = await api.start(target="web1", canary_version="v2")
            status, data = await api.call("POST", f"/api/v1/rollouts/{a['id']}/abort",
                                          {"reason": "bad build"}, role="pipeline")
            assert status == 200, data
            await api.until(a["id"], lambda x: x["state"] == "rolled_back", deadline=30)
            assert (await api.call("GET", "/healthz", role=None))[0] == 200
            # the reader comes back: the lines that waited (far fewer than the 10,000 the
            # queue holds before it drops and counts) all arrive, in order
            os.set_blocking(r, False)
            seen = b""

            async def arrived() -> bool:
                nonlocal seen
                with contextlib.suppress(BlockingIOError):
                    while chunk := os.read(r, 1 << 20):
                        seen += chunk
                return seen.count(b"\n") >= 600
            await eventually(arrived, deadline=30, what="the lines that waited")
            assert all(line.startswith(b"{") for line in seen.splitlines())
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


@pytest.mark.parametrize("fault", ["a config it cannot load", "a port already taken"])
async def test_serve_that_must_exit_exits_while_whatever_reads_its_log_stops_reading(
        tmp_path, fault):
    """A controller that cannot run must exit (and be restarted, or be seen down), not
    hang: what it says as it goes used to be a plain write to stderr, which waits
    forever on a full pipe that a hung log shipper keeps open."""
    cfg, port = write_config(tmp_path, "http://127.0.0.1:1")
    taken = None
    if fault == "a config it cannot load":
        cfg.write_text(cfg.read_text().replace("timeout: 1s", "timeout: 1 second"))
    else:
        taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
    r, w = os.pipe()
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:  # the pipe is full before canary writes a byte: a reader that hung
            os.write(w, b"x" * 65536)
    os.set_blocking(w, True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "canary.cli", "serve", "--config", str(cfg),
        stdin=asyncio.subprocess.DEVNULL, stdout=w, stderr=w, cwd=tmp_path)
    os.close(w)
    try:
        # (its last words wait on a thread of their own for 5 s, then are let go)
        assert await asyncio.wait_for(proc.wait(), 30) == 2, "it exits, as a usage error"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(r)
        if taken is not None:
            taken.close()
            await taken.wait_closed()


@contextlib.contextmanager
def pipe_log(*, size: int = 10_000, blocking: bool = True) -> Iterator[
        tuple[Any, Any, int]]:
    """A logger writing through canary's queued log into a pipe nobody reads yet:
    (logger, its QueuedLog, the pipe's read end)."""
    import logging

    from canary import logs

    r, w = os.pipe()
    os.set_blocking(w, blocking)
    handler = logs.queued(w, size)
    log = logging.getLogger(f"test.pipe-log.{id(handler)}")
    log.propagate = False
    log.addHandler(handler)
    try:
        yield log, handler, r
    finally:
        log.removeHandler(handler)
        handler.close()
        os.close(r)
        os.close(w)


PYTHON_REPORTS = """
import gc, os, sys, threading, warnings
from canary import logs
logs.setup()
warnings.simplefilter("always")
for i in range(1500):  # well past the 64 KiB the pipe holds
    warnings.warn(f"report {i} " + "x" * 100)
class Finalizer:
    def __del__(self):
        raise ValueError("in a finalizer")
for i in range(300):
    t = threading.Thread(target=lambda: 1 / 0, name=f"worker-{i}")
    t.start()
    t.join()
    Finalizer()
    gc.collect()
os.write(int(sys.argv[1]), b"carried on\\n")
"""


def test_warnings_and_dying_threads_do_not_wait_on_a_log_nobody_reads(tmp_path):
    """Python reports a warning, a thread's uncaught exception or one raised in a
    finalizer by writing to stderr itself. With serve's log set up, those reports go
    through the same bounded queue as every line: a hung reader costs lines, not the
    thread that warned (for a warning, the event loop)."""
    import subprocess

    status_r, status_w = os.pipe()
    log_r, log_w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", PYTHON_REPORTS, str(status_w)],
                            stdout=subprocess.DEVNULL, stderr=log_w, pass_fds=(status_w,),
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    os.close(status_w)
    os.close(log_w)
    try:
        # nobody reads log_r until the process says it carried on (or the deadline)
        os.set_blocking(status_r, False)

        def carried_on() -> bool:
            with contextlib.suppress(BlockingIOError):
                return os.read(status_r, 100) == b"carried on\n"
            return False
        deadline = time.monotonic() + 60
        while not carried_on():
            assert time.monotonic() < deadline, "a report waited on the log nobody reads"
            assert proc.poll() is None, "the process ended without carrying on"
            time.sleep(0.05)
        os.set_blocking(log_r, False)
        seen = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(log_r, 1 << 20):
                seen += chunk
        lines = [json.loads(line) for line in seen.splitlines()]
        assert any(x["logger"] == "py.warnings" for x in lines)
        assert all(line.startswith(b"{") for line in seen.splitlines()), "a report bypassed " \
                                                                        "the JSON log"
    finally:
        proc.kill()
        proc.wait()
        os.close(status_r)
        os.close(log_r)


def test_a_log_whose_reader_stopped_reading_drops_lines_beyond_its_queue_and_counts_them():
    """The queue in front of a stuck reader is bounded: past it lines are dropped, never
    waited for, and once the reader reads again the log says how many it lost."""
    with pipe_log(size=50) as (log, handler, r):
        for i in range(5000):  # ~1.2 MB, where the pipe holds 64 KiB: this returns at all
            log.warning("line %d %s", i, "x" * 200)
        assert handler.dropped > 0
        os.set_blocking(r, False)
        seen, end = b"", time.monotonic() + 30
        while b"log lines dropped: whatever reads this log was not reading" not in seen:
            assert time.monotonic() < end, seen[-500:]
            try:
                seen += os.read(r, 1 << 20)
            except BlockingIOError:
                log.warning("one more")  # the count is written before the next line
                time.sleep(0.01)
        said = next(line for line in seen.splitlines() if b"log lines dropped" in line)
        assert int(json.loads(said)["msg"].split()[0]) > 0


def test_the_dropped_lines_notice_stands_where_the_lines_went_missing():
    """The notice is written where the gap is: after the lines that were queued before
    the drops, not ahead of them (where no line is missing), and with nothing logged
    after the drops it still comes once the queue has drained."""
    with pipe_log(size=50) as (log, handler, r):
        for i in range(3000):  # ~700 KB, the pipe holds 64 KiB: the queue fills, then drops
            log.warning("line", extra={"i": i, "pad": "x" * 200})
        assert handler.dropped > 0
        os.set_blocking(r, False)
        seen, end = b"", time.monotonic() + 30
        next_i, gaps = 0, 0  # the i the next line must carry, after any notice before it
        while next_i < 3000:
            assert time.monotonic() < end, seen[-500:]
            try:
                seen += os.read(r, 1 << 20)
            except BlockingIOError:
                time.sleep(0.01)
            *lines, seen = seen.split(b"\n")
            for line in lines:
                d = json.loads(line)
                if "log lines dropped" in d["msg"]:
                    next_i += int(d["msg"].split()[0])
                    gaps += 1
                else:  # no line missing where the log does not say so, nor said missing
                    assert d["i"] == next_i, (d["i"], next_i)
                    next_i += 1
        assert next_i == 3000 and gaps > 0


def test_a_log_on_a_non_blocking_descriptor_waits_in_its_writer_rather_than_tearing_lines():
    """stderr may be a file description someone else made non-blocking (a parent sharing
    it): a full pipe then refuses a write (EAGAIN) instead of waiting. The writer thread
    waits for room itself; no line is lost uncounted or torn in half."""
    with pipe_log(blocking=False) as (log, _handler, r):
        for i in range(2000):  # ~500 KB, where the pipe holds 64 KiB (a 10 s wait, if lost)
            log.warning("line", extra={"i": i, "pad": "x" * 200})
        os.set_blocking(r, False)
        seen, end = b"", time.monotonic() + 10
        while seen.count(b"\n") < 2000 and time.monotonic() < end:
            try:
                seen += os.read(r, 1 << 20)
            except BlockingIOError:
                time.sleep(0.01)
        assert [json.loads(line)["i"] for line in seen.splitlines()] == list(range(2000))


async def test_a_read_command_piped_into_a_closed_pipe_ends_quietly(tmp_path):
    """`canary status | head -1` keeps the Unix habit: no BrokenPipeError traceback."""
    async with serve(tmp_path, seeded=30) as (_proc, api):
        r, w = os.pipe()
        os.close(r)  # head has already gone
        env = {**os.environ, "CANARY_SERVER": api.base, "CANARY_TOKEN": TOKENS["viewer"]}
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "canary.cli", "status", env=env, stdout=w,
            stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
        os.close(w)
        _, err = await asyncio.wait_for(cli.communicate(), 60)
        assert cli.returncode == -signal.SIGPIPE and err == b"", err


async def test_clients_hanging_up_mid_answer_under_load_do_not_stop_serve(tmp_path):
    async with serve(tmp_path, seeded=300, events=200) as (proc, api):
        ids = [f"seed-{i:04d}" for i in range(300)]
        # 400 viewers at once, each giving up after 1 to 30 ms: most leave mid-answer
        for _ in range(2):
            seen = await flood(api.base, requests=800, in_flight=400, ids=ids,
                               give_up=(0.001, 0.03))
            assert seen.get("gave up", 0) > 0, seen
            assert proc.returncode is None, "the controller died"
        assert (await api.call("GET", "/healthz", role=None))[0] == 200
        status, data = await api.call("GET", "/api/v1/rollouts?limit=500", role="viewer")
        assert status == 200 and len(data["rollouts"]) == 300
        r = await api.start(target="web1", canary_version="v9")
        status, _ = await api.call("POST", f"/api/v1/rollouts/{r['id']}/abort",
                                   {"reason": "after the storm"}, role="pipeline")
        assert status == 200
        await api.until(r["id"], lambda x: x["state"] == "rolled_back")
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    log = (tmp_path / "controller.log").read_text()
    assert "Traceback" not in log and '"level": "error"' not in log, log[-3000:]


async def test_stopping_right_after_a_read_flood_is_prompt_and_memory_stays_bounded(tmp_path):
    # big rollouts (1,000 events each) make every answer that is built for nobody costly
    async with serve(tmp_path, seeded=200, events=1000) as (proc, api):
        ids = [f"seed-{i:04d}" for i in range(200)]
        before, _ = rss_mb(proc.pid)
        seen = await flood(api.base, requests=3000, in_flight=500, ids=ids,
                           give_up=(0.05, 2.0))
        now, peak = rss_mb(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 15)  # (waits at most; not a timing claim)
        took = time.monotonic() - t0
    print(f"\nflood {seen}; rss before {before:.0f} MB, after {now:.0f} MB, peak {peak:.0f} MB; "
          f"exit {code} after {took:.2f}s")
    assert code == 0
    assert peak - before < 300, f"resident memory grew by {peak - before:.0f} MB"


async def test_under_a_read_flood_every_abort_lands_and_evaluations_go_on(tmp_path):
    async with serve(tmp_path, seeded=100, events=50) as (proc, api):
        live = {t: (await api.start(target=t, canary_version="v9"))["id"] for t in TARGETS}
        for rid in live.values():
            await api.until(rid, lambda x: x["applied_weight"] == 10)
        ids = list(live.values()) + [f"seed-{i:04d}" for i in range(100)]
        checked = asyncio.Event()
        flooding = asyncio.create_task(flood(api.base, requests=200_000, in_flight=500,
                                             ids=ids, until=checked))
        try:
            victims, survivors = list(live.values())[:2], list(live.values())[2:]
            marks = {}
            for rid in survivors:
                marks[rid] = (await until_answered(api, rid, lambda x: True))["gates"][0]["at"]
            for rid in victims:
                status, data = await api.call("POST", f"/api/v1/rollouts/{rid}/abort",
                                              {"reason": "flood drill"}, role="pipeline")
                assert status == 200, data  # (reads in flight never take a write's place)
            for rid in victims:
                await until_answered(api, rid, lambda x: x["state"] == "rolled_back",
                                     what="the abort in force")
            for rid in survivors:  # still evaluated, interval after interval
                await until_answered(api, rid, lambda x, m=marks[rid]: x["gates"][0]["at"] > m,
                                     what="a fresh evaluation")
            assert not flooding.done(), "the flood ended before the checks did"
        finally:
            checked.set()
            seen = await flooding
        assert set(seen) <= {"200", "503"}, seen  # never a 5xx but "busy, retry"
        assert proc.returncode is None


# ---- in one process: the bound itself, and writes whose client left --------------------


class GatedStore(SqliteStore):
    """A store whose listings (and, when asked, creates) wait until the test opens a gate
    (the controller itself lists only when it starts)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0
        self.gate_creates = False

    async def list(self, **kwargs: Any) -> Any:
        await self._wait()
        return await super().list(**kwargs)

    async def create(self, *, rollout: Any) -> Any:
        if self.gate_creates:
            await self._wait()
        return await super().create(rollout=rollout)

    async def _wait(self) -> None:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1


@contextlib.asynccontextmanager
async def app_with(tmp_path: Path, store: GatedStore, **bounds: int) -> AsyncIterator[
        tuple[Api, Controller]]:
    """The API in this process (one loop, as the tests' controllers run), over `store`."""
    t = NginxTarget(name="web", file=tmp_path / "web.conf", upstream="web",
                    stable=("127.0.0.1:9001",), canary=("127.0.0.1:9002",), test=("true",),
                    reload=("true",), policy="p", vars={"service": "web"}, stable_version="v1")
    ctl = Controller(store=store, policies={"p": simple_policy(hold=3600)},
                     targets={"web": t}, routers={"web": NginxRouter(t)}, source=SetSource(),
                     clock=RealClock())
    runner = make_runner(build_app(ctl, tokens(), **bounds))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as s:
            yield Api(f"http://127.0.0.1:{port}", s), ctl
    finally:
        store.gate.set()
        await runner.cleanup()
        await store.close()


async def test_reads_beyond_the_bound_get_503_at_once_and_writes_still_pass(tmp_path):
    store = GatedStore(str(tmp_path / "state.db"))
    async with app_with(tmp_path, store, max_reads=3) as (api, _ctl):
        r = await api.start(canary_version="v2")
        store.gate.clear()
        held = [asyncio.create_task(api.call("GET", "/api/v1/rollouts", role="viewer"))
                for _ in range(3)]
        await eventually(lambda: _true(store.waiting == 3), what="three reads in flight")
        async with api.s.get(f"{api.base}/api/v1/rollouts/{r['id']}",
                             headers={"Authorization": f"Bearer {TOKENS['viewer']}"}) as resp:
            body = await resp.json()
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert "answering 3 reads already; try again" in body["error"]
        assert (await api.call("GET", "/healthz", role=None))[0] == 200  # never bounded
        # writes have their own bound: reads in flight never take an override's place
        status, data = await api.call("POST", f"/api/v1/rollouts/{r['id']}/pause",
                                      {"reason": "look"}, role="oncall")
        assert status == 200 and data["state"] == "paused"
        store.gate.set()
        assert [s for s, _ in await asyncio.gather(*held)] == [200] * 3
        assert (await api.call("GET", f"/api/v1/rollouts/{r['id']}", role="viewer"))[0] == 200
        _, text = await api.call("GET", "/metrics", role=None)
        assert 'canary_api_refused_total{kind="read"} 1.0' in text


async def _true(value: bool) -> bool:
    return value


async def test_a_start_whose_client_hangs_up_is_carried_through(tmp_path):
    store = GatedStore(str(tmp_path / "state.db"))
    async with app_with(tmp_path, store) as (api, ctl):
        store.gate_creates = True
        store.gate.clear()
        with pytest.raises(TimeoutError):
            await api.s.post(f"{api.base}/api/v1/rollouts",
                             json={"target": "web", "canary_version": "v2"},
                             headers={"Authorization": f"Bearer {TOKENS['pipeline']}"},
                             timeout=aiohttp.ClientTimeout(total=0.3))
        assert store.waiting == 1  # the client has gone; the start is still on its way
        store.gate.set()

        async def running() -> list[Any]:
            got = await store.list(active_only=True)
            return got if got and got[0].applied_weight == 10 else []
        (r,) = await eventually(running, what="the rollout started and its weight applied")
        assert ctl.running() == 1 and r.canary_version == "v2"
