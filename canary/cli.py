"""The `canary` command: the only place that wires concrete parts together.

Exit codes: 0 ok (for `start --wait`: succeeded), 1 problems found (`validate`) or
rolled back (`start --wait`), 2 usage, config or connection error.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NoReturn

from canary import config as config_mod
from canary import policy as policy_mod
from canary import yamlsrc
from canary.errors import InvalidInput, Problem, RouterError, UserError, ValidationFailed
from canary.fields import format_duration
from canary.gates.kinds import Gate
from canary.hooks import HOOK_PREFIX
from canary.schema import SCHEMAS
from canary.stages import stage_shape
from canary.text import escape

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("canary.cli")


def die(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"canary: {escape(message)}", file=sys.stderr)
    raise SystemExit(code)


# ---- serve ----------------------------------------------------------------------------


async def serve(cfg: config_mod.Config, *, ready: asyncio.Event | None = None,
                signals: bool = True) -> None:
    from canary.api.app import ApiServer, bind, build_app
    from canary.clock import RealClock
    from canary.engine.controller import Controller
    from canary.gates.prometheus import CoalescingSource, PrometheusSource
    from canary.routers import Router, for_target
    from canary.store import open_store
    from canary.targets import GatewayTarget, IstioTarget

    policies = cfg.load_policies()
    ssl_ctx = None
    if cfg.tls is not None:
        import ssl

        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(cfg.tls.cert, cfg.tls.key)
    kube_api = None
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    if cfg.state.startswith("kubernetes:") or any(t.router in ("istio", "gateway")
                                                  for t in cfg.targets.values()):
        from canary.kube import api_client

        try:
            kube_api = api_client(user_agent=f"canary/{identity}")
        except Exception as e:  # the client's ConfigException and OSError
            raise InvalidInput(f"Kubernetes credentials: {e}") from e
    routers: dict[str, Router] = {}
    for name, target in cfg.targets.items():
        try:
            routers[name] = for_target(target, kube_api=kube_api)
        except RouterError as e:
            log.warning(str(e), extra={"target": name})
    workloads: dict[str, Any] = {}
    for name, target in cfg.targets.items():
        if (isinstance(target, IstioTarget | GatewayTarget) and target.workload is not None
                and kube_api):
            from canary.workload import Workloads

            workloads[name] = Workloads(target.namespace, target.workload, kube_api, name)
    prometheus = PrometheusSource(cfg.prometheus.url, timeout=cfg.prometheus.timeout,
                                  access=cfg.prometheus)
    store = open_store(cfg.state, kube_api=kube_api)
    lock = getattr(store, "lock", None)
    try:
        if lock is not None:
            lock()  # one controller per state file, taken before anything is resumed
        # bind before resuming anything: a controller that cannot listen must not act
        sock = bind(cfg.listen_host, cfg.listen_port)
    except BaseException:
        await store.close()
        raise
    controller = Controller(store=store, policies=policies, targets=cfg.targets, routers=routers,
                            source=CoalescingSource(prometheus),
                            clock=RealClock(), workloads=workloads)
    from canary.notify import Notifier

    controller.notifier = Notifier(
        cfg.notifications, store, clock=controller.clock, metrics=controller.metrics,
        reminder=cfg.approval_reminder, targets=cfg.targets,
        link=cfg.public_url or f"http://{cfg.listen_host}:{cfg.listen_port}")
    elector = None
    if cfg.state.startswith("kubernetes:"):
        from canary.leader import LeaderElector

        le = cfg.leader_election

        async def lead() -> None:
            controller.leading = True
            await controller.start()

        async def follow() -> None:
            controller.leading = False
            await controller.stop()

        elector = LeaderElector(kube_api, cfg.state.removeprefix("kubernetes:"), identity,
                                name=le.name, lease_duration=le.lease_duration,
                                renew_deadline=le.renew_deadline, retry_period=le.retry_period,
                                on_start=lead, on_stop=follow)
    app = build_app(controller, cfg.tokens, elector=elector)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM) if signals else ():
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    api: ApiServer | None = None
    try:
        # the API on its own thread, so no number of requests keeps an evaluation or an
        # abort waiting for long. Idle keep-alive connections are closed after 15 s, so
        # slow or stalled clients do not pile up; bodies have their own 10 s limit in the
        # API, and an unread body is drained for at most 1 s before the connection closes.
        # It serves on the socket bound above, before anything was resumed.
        api = ApiServer(app, sock, ssl_context=ssl_ctx, handle_signals=False,
                        keepalive_timeout=15, lingering_time=1.0)
        await api.start()
        log.info("canary serving", extra={"listen": f"{cfg.listen_host}:{cfg.listen_port}",
                                          "policies": sorted(policies),
                                          "targets": sorted(cfg.targets)})
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        if api is not None:
            await api.stop()
        sock.close()
        await store.close()
        prometheus.close()


@contextlib.asynccontextmanager
async def serving(cfg: config_mod.Config) -> AsyncIterator[None]:
    """The controller running in this event loop (the demo, benchmarks and tests), up and
    listening inside the block, stopped after it."""
    ready = asyncio.Event()
    task = asyncio.create_task(serve(cfg, ready=ready, signals=False))
    try:
        waiter = asyncio.ensure_future(ready.wait())
        done, _ = await asyncio.wait({task, waiter}, timeout=30,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            if task.done():
                task.result()  # serve() failed: raise its error
            raise TimeoutError("the controller did not start listening within 30 s")
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def cmd_serve(args: argparse.Namespace) -> int:
    from canary import logs

    logs.setup(os.environ.get("CANARY_LOG_LEVEL", "INFO"))
    logging.raiseExceptions = False  # a log that cannot be written is not a reason to stop
    try:
        cfg = config_mod.load_file(args.config)
        asyncio.run(serve(cfg))
        # everything is closed and saved: leave now rather than wait at exit for a thread
        # still blocked on a dependency that never answers (its pool cannot cancel it)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(EXIT_OK)
    # what it says as it exits must not wait on a log nobody reads: it exits regardless
    except ValidationFailed as e:
        logs.last_words([escape(p) for p in e.problems], EXIT_USAGE)
    except (UserError, OSError) as e:
        logs.last_words([f"canary: {escape(str(e))}"], EXIT_USAGE)
    except ImportError:
        raise
    except Exception as e:  # e.g. ssl.SSLError for a bad certificate
        logs.last_words([f"canary: {escape(f'{type(e).__name__}: {e}')}"], EXIT_USAGE)


# ---- validate and plan ------------------------------------------------------------------


def validate_files(files: list[str]) -> list[Problem]:
    problems: list[Problem] = []
    names: dict[str, str] = {}
    for f in files:
        try:
            raw = yamlsrc.read_bytes(f, named=True)
        except ValidationFailed as e:
            problems.extend(e.problems)
            continue
        try:
            doc = yamlsrc.load(raw, f)
            if config_mod.looks_like_config(doc.data):
                cfg = config_mod.parse(doc, base=Path(f).parent)
                try:
                    pols = cfg.load_policies()
                except ValidationFailed as e:
                    problems.extend(e.problems)
                    continue
                problems.extend(config_mod.cross_check(cfg, pols, doc))
            else:
                pol = policy_mod.parse(raw, file=f, default_name=Path(f).stem)
                if pol.name in names:
                    problems.append(Problem(f, doc.line(("name",)), "name",
                                            f"policy name {pol.name!r} is also used by "
                                            f"{names[pol.name]}"))
                names[pol.name] = f
        except ValidationFailed as e:
            problems.extend(e.problems)
    return problems


def cmd_validate(args: argparse.Namespace) -> int:
    problems = validate_files(args.files)
    for p in problems:
        print(escape(p))
    if problems:
        return EXIT_FAILED
    print(f"ok: {len(args.files)} file(s) valid")
    return EXIT_OK


def plan_text(pol: policy_mod.Policy) -> str:
    fmt = format_duration
    iv = pol.interval
    lines = [f"policy {pol.name}: interval {fmt(iv)}, failure_limit {pol.failure_limit}, "
             f"no_data {pol.no_data.value}, progress_deadline {fmt(pol.progress_deadline)}", ""]
    lines.append(f"{'stage':>5}  {'weight':>6}  {'hold':>8}  {'reached at':>10}  gates")
    at = 0.0
    manual = []
    full_at = 0.0
    for i, s in enumerate(pol.stages):
        gates = ", ".join(f"{g.name} ({g.bounds()})" for g in pol.gates_for(i)) or "none"
        shape = stage_shape(s)  # a match or mirror stage: weight 0 for users
        lines.append(f"{i:>5}  {s.weight:>5}%  {fmt(s.hold):>8}  {fmt(at):>10}  {gates}"
                     + ("  [approval]" if s.approval else "")
                     + (f"  [{shape.text()}]" if shape else ""))
        if s.weight == 100:
            full_at = at
        # a stage moves on at the first evaluation at or after its hold
        at += max(iv, math.ceil(s.hold / iv) * iv)
        if s.approval:
            manual.append(i)
    wait = (f", plus the wait for approval at stage {', '.join(map(str, manual))}"
            if manual else "")
    lines.append("")
    lines.append(f"fastest time to 100%: {fmt(full_at)}; to success: {fmt(at)}{wait}")
    breach = (pol.failure_limit) * iv
    lines.append(f"slowest time from a breach to rollback: {fmt(breach)} "
                 f"({pol.failure_limit} failing evaluations, {fmt(iv)} apart, the first up to "
                 "one interval after the breach shows in Prometheus)")
    if any(g.kind == "errors" for s in range(len(pol.stages)) for g in pol.gates_for(s)):
        lines.append("sequential (kind: errors) gates roll back as soon as their evidence "
                     "crosses 1/alpha, a crashing canary on its first full interval; a stage "
                     "they have not seen enough traffic to judge stays inconclusive and holds, "
                     "and the step to 100% waits until the canary is shown no worse than "
                     "stable x tolerance x final_gross")
    if pol.no_data.value == "hold":
        lines.append(f"with no data (Prometheus down): held, then rolled back after "
                     f"{fmt(pol.progress_deadline)} without progress")
    return "\n".join(lines)


def plan_on_traffic(pol: policy_mod.Policy, rps: float, rates: dict[str, float],
                    default_rate: float) -> str:
    """How the controller would move this policy's stages on `rps` requests/s, with each
    gate's error (or slow) share the same on both versions: the controller's own state
    machine fed the expected counts, interval by interval (no noise, so real rollouts vary
    around this; approvals taken as immediate). Every gate whose query shape canary
    models is fed (errors gates, error ratios, request rates, comparisons of two equal
    versions); the others - a latency threshold, a query it cannot read - are named, and
    read as passing."""
    from dataclasses import replace as dc_replace

    from canary.engine.dryrun import DryRun, Shape, Values, gate_shapes

    fmt = format_duration
    stages = tuple(dc_replace(s, approval=False) for s in pol.stages)
    dry = DryRun(dc_replace(pol, stages=stages))
    gates = {g.name: g for i in range(len(stages)) for g in pol.gates_for(i)}
    names = sorted(n for n, g in gates.items() if g.kind == "errors")

    def predictable(g: Gate) -> bool:
        shapes = gate_shapes(g)
        if any(s is None for s in shapes):
            return False
        # a latency threshold needs the service's latency, which plan does not know (two
        # versions compared are taken as equal, so a comparison is predicted)
        return g.kind != "threshold" or shapes[0] is None or shapes[0].measure != "quantile"

    # gating webhooks (pre-rollout, stage, pre-promotion): their answers are not known
    hooks = {HOOK_PREFIX + h.name for h in pol.gating_hooks(0, pre_rollout=True)}
    hooks |= {HOOK_PREFIX + h.name for i in range(len(stages))
              for h in pol.gating_hooks(i)}
    unknown = sorted({n for n, g in gates.items() if not predictable(g)} | hooks)
    # a match stage sends the canary the requests that match: plan does not know how many
    matched = {i: sh.text() for i, st in enumerate(stages)
               if (sh := stage_shape(st)) is not None and sh.mirror is None}
    counts = {n: dict.fromkeys(("canary_requests", "canary_errors", "stable_requests",
                                "stable_errors"), 0.0) for n in names}
    shares = ", ".join(f"{n} {rates.get(n, default_rate):.2%}" for n in sorted(gates)
                       if n not in unknown)
    lines = [f"on {rps:g} requests/s, with the same share on both versions for each gate "
             f"({shares or 'none'}):"]
    if unknown:
        lines.append(f"  not predicted, read as passing: {', '.join(unknown)} (a latency "
                     "threshold, a query shape canary does not model, or a webhook: plan does "
                     "not know your service's values or your hooks' answers)")
    for i, text in matched.items():
        lines.append(f"  not predicted, read as passing: every gate at stage {i} ({text}: "
                     "plan does not know how many requests match)")
    iv, t, entered, end = pol.interval, 0.0, [0.0], None
    history: list[float] = []  # canary requests per interval

    def windowed(s: Shape, p: float) -> float | None:
        if s.measure in ("requests", "errors", "slow"):  # a raw counter: all it counted
            return sum(history) * (1.0 if s.measure == "requests" else p)
        k = max(1, round(s.window / iv))
        n = sum(history[-k:])
        if s.measure == "request_rate":  # (a series younger than the window: its age)
            return n / min(s.window, len(history) * iv)
        if s.measure == "request_count":
            return n
        return None if n <= 0 else n * p / max(n, s.floor)

    horizon = sum(s.hold for s in stages) + len(stages) * (pol.progress_deadline + iv) + iv
    while end is None and t <= horizon:
        w, n = dry.weight / 100, rps * iv
        here = None if dry.r.pre_rollout else stage_shape(stages[dry.r.stage])
        # a mirror stage copies its share of the requests to the canary; stable serves all
        mirror = here.mirror / 100 if here is not None and here.mirror is not None else 0.0
        blind = here is not None and here.mirror is None  # a match stage: read as passing
        history.append(n * (w + mirror))
        for name, c in counts.items():
            p = rates.get(name, default_rate)
            c["canary_requests"] += n * (w + mirror)
            c["canary_errors"] += n * (w + mirror) * p
            c["stable_requests"] += n * (1 - w)
            c["stable_errors"] += n * (1 - w) * p
        values: dict[str, Values] = {}
        for name, g in gates.items():
            shape = gate_shapes(g)[0]
            if g.kind == "errors" or name in unknown or shape is None or blind:
                continue
            if g.kind == "compare":
                values[name] = (1.0, 1.0)  # the same on both versions: no difference
            else:
                values[name] = (windowed(shape, rates.get(name, default_rate)), None)
        t += iv
        stage, waiting = dry.r.stage, dry.r.pre_rollout
        end = dry.step(t, {} if blind else counts, values)
        if waiting and not dry.r.pre_rollout:  # past the pre-rollout hooks: stage 0 begins
            entered[0] = t
        elif dry.r.stage != stage:
            entered.append(t)
    for i, at in enumerate(entered):
        s = stages[i]
        shaped = stage_shape(s)
        what = shaped.text() if shaped is not None else f"{s.weight}%"
        if i + 1 < len(entered):
            took = entered[i + 1] - at
            wait = " (waiting for evidence)" if took > max(s.hold, iv) + iv else ""
            lines.append(f"  stage {i} ({what}): from about {fmt(at)}, moves on after "
                         f"{fmt(took)}{wait}; hold {fmt(s.hold)}")
        elif end == "promoted":
            lines.append(f"  stage {i} ({what}): from about {fmt(at)}; succeeded at "
                         f"about {fmt(t)}")
        elif end == "rolled_back":
            lines.append(f"  stage {i} ({what}): from about {fmt(at)}; rolled back at "
                         f"about {fmt(t)}: {dry.r.reason}")
        else:
            lines.append(f"  stage {i} ({what}): from about {fmt(at)}; still "
                         f"inconclusive at the progress deadline, so rolled back at about "
                         f"{fmt(t)}: on this traffic the gates cannot tell a healthy canary "
                         "from a bad one in time; give it more traffic (a bigger first "
                         "weight), longer holds and progress_deadline, or threshold gates")
    lines.append("(expected counts without noise: real rollouts vary around these times)")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        pol = policy_mod.load_file(args.policy_file)
    except ValidationFailed as e:
        for p in e.problems:
            print(escape(p))
        return EXIT_FAILED
    rates: dict[str, float] = {}
    default = 0.005
    if args.rps is not None:  # (checked before anything is printed)
        for item in args.error_rate or []:
            name, _, value = item.rpartition("=")
            try:
                rate = float(value)
            except ValueError:
                die(f"--error-rate {item!r}: give a share like 0.005, or GATE=0.005")
            if not 0 <= rate < 1:
                die(f"--error-rate {item!r}: the share must be from 0 to below 1")
            if name:
                rates[name] = rate
            else:
                default = rate
        if not 0 < args.rps <= 1e6:
            die(f"--rps {args.rps:g}: give requests per second, above 0")
    print(plan_text(pol))
    if args.rps is not None:
        print()
        print(plan_on_traffic(pol, args.rps, rates, default))
    return EXIT_OK


# ---- API client commands ----------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def call(args: argparse.Namespace, method: str, path: str,
         body: dict[str, Any] | None = None) -> Any:
    url = args.server.rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    token = os.environ.get("CANARY_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    context = _tls()
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except (ValueError, AttributeError):
            message = str(e.reason)
        try:
            retry_after: float | None = float(e.headers.get("Retry-After", ""))
        except ValueError:
            retry_after = None
        raise ApiError(e.code, message, retry_after) from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise ApiError(0, f"cannot reach the controller at {args.server}: {reason}") from None


RETRY_FOR = 30.0  # seconds the CLI keeps retrying a 503 (a follower, a store hiccup)


def call_retrying(args: argparse.Namespace, method: str, path: str,
                  body: dict[str, Any] | None = None, *,
                  sleep: Callable[[float], None] = time.sleep) -> Any:
    """`call`, retrying 503 answers for up to RETRY_FOR seconds. A 503 means the
    controller did not act: a follower replica (with leader election; each new connection
    may reach another replica through the Service) or a state store that is briefly
    unreachable. Retrying is safe: a command that did land is refused the second time
    with 409 and says why."""
    waited = 0.0
    while True:
        try:
            return call(args, method, path, body)
        except ApiError as e:
            if e.status != 503 or waited >= RETRY_FOR:
                raise
            pause = min(e.retry_after or 1.0, 5.0, RETRY_FOR - waited)
            print(f"canary: {escape(str(e))}; retrying in {pause:g}s", file=sys.stderr)
            sleep(pause)
            waited += pause


def api(args: argparse.Namespace, method: str, path: str,
        body: dict[str, Any] | None = None) -> Any:
    try:
        return call_retrying(args, method, path, body)
    except ApiError as e:
        die(f"{e} (HTTP {e.status})" if e.status else str(e))


# Everything printed from an API answer goes through escape(): a reason, a gate's detail
# or a name may hold control characters (stored before the API refused them, or from
# Prometheus), and a terminal must show them, not obey them.


def gate_line(g: dict[str, Any], *, detail: bool = False) -> str:
    value = "-" if g.get("value") is None else f"{g['value']:.4g}"
    if g.get("kind") == "errors" and g.get("max") is not None:
        bounds = f"log10 evidence, fires at {g['max']:g}"
    else:
        bounds = " ".join(f"{k} {g[k]:g}" for k in ("min", "max") if g.get(k) is not None)
    line = f"{escape(g['name'])} {value} ({bounds}) {escape(g['status'])} {g['failures']}"
    if detail and g.get("detail"):
        line += f": {escape(g['detail'])}"
    return line


def summary(r: dict[str, Any]) -> str:
    gates = "; ".join(gate_line(g) for g in r.get("gates", []))
    line = f"{escape(r['id'])} {escape(r['target'])} {escape(r['canary_version'])}: " \
           f"{escape(r['state'])} stage {r['stage']} weight {r['weight']}%"
    if gates:
        line += f" | {gates}"
    if r.get("reason"):
        line += f" | {escape(r['reason'])}"
    return line


def cmd_start(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"target": args.target, "canary_version": args.canary_version}
    if args.stable_version:
        body["stable_version"] = args.stable_version
    if args.policy:
        body["policy"] = args.policy
    r = api(args, "POST", "/api/v1/rollouts", body)
    if args.json and not args.wait:
        print(json.dumps(r, indent=2))
        return EXIT_OK
    print(f"started {escape(r['id'])}: {summary(r)}", flush=True)
    if not args.wait:
        return EXIT_OK
    return wait_for(args, r["id"])


def wait_for(args: argparse.Namespace, rollout_id: str) -> int:
    last = ""
    unreachable_since: float | None = None
    while True:
        try:
            r = call(args, "GET", f"/api/v1/rollouts/{rollout_id}")
            unreachable_since = None
        except ApiError as e:
            if e.status and e.status != 503:
                die(f"{e} (HTTP {e.status})")
            # the controller may be restarting, or its store briefly unreachable (503);
            # keep waiting for a while
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > args.unreachable_timeout:
                die(str(e))
            time.sleep(args.poll)
            continue
        line = summary(r)
        if line != last:
            stamp = time.strftime("%H:%M:%S")
            print(f"{stamp} {line}", flush=True)
            last = line
        if r["state"] == "succeeded":
            return EXIT_OK
        if r["state"] == "rolled_back":
            return EXIT_FAILED
        time.sleep(args.poll)


def watch(args: argparse.Namespace, rollout_id: str) -> int:
    """Follow GET /api/v1/rollouts/{id}/watch (Server-Sent Events) to the rollout's end,
    a line per change; exit codes as `start --wait`. A dropped stream (the controller
    restarting) is opened again for up to --unreachable-timeout seconds."""
    last = ""
    unreachable_since: float | None = None
    url = args.server.rstrip("/") + f"/api/v1/rollouts/{urllib.parse.quote(rollout_id)}/watch"
    while True:
        req = urllib.request.Request(url, headers={"Accept": "text/event-stream"})
        token = os.environ.get("CANARY_TOKEN")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        state = None
        try:
            # (a heartbeat comes every 15 s: a minute of silence is a dead connection)
            with urllib.request.urlopen(req, timeout=60, context=_tls()) as resp:
                unreachable_since = None
                kind = None
                for raw in resp:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:") and kind == "rollout":
                        r = json.loads(line[5:])
                        if args.json:
                            print(json.dumps(r), flush=True)
                        else:
                            text = summary(r)
                            if text != last:
                                print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)
                                last = text
                        state = r["state"]
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", e.reason)
            except (ValueError, AttributeError):
                message = str(e.reason)
            if e.code != 503:
                die(f"{message} (HTTP {e.code})")
        except (urllib.error.URLError, OSError, TimeoutError, ValueError):
            pass
        if state == "succeeded":
            return EXIT_OK
        if state == "rolled_back":
            return EXIT_FAILED
        unreachable_since = unreachable_since or time.monotonic()
        if time.monotonic() - unreachable_since > args.unreachable_timeout:
            die(f"lost the controller at {args.server} for longer than "
                f"{args.unreachable_timeout:g}s while watching {rollout_id}")
        time.sleep(args.poll)


def _tls() -> Any:
    """The TLS context trusting CANARY_CA_FILE's CAs (None: the system's); a file that
    cannot be used is a usage error, said in a line."""
    cafile = os.environ.get("CANARY_CA_FILE")
    if not cafile:
        return None
    import ssl

    try:
        return ssl.create_default_context(cafile=cafile)
    except FileNotFoundError:
        die(f"CANARY_CA_FILE: {cafile} does not exist; name a PEM file of the CA that "
            "signed the controller's certificate")
    except (OSError, ssl.SSLError, ValueError) as e:
        die(f"CANARY_CA_FILE: {cafile} is not a PEM CA certificate bundle ({e})")


def ago(stamp: str | None, now: float) -> str:
    """An API time as "5s ago", "3m ago", "2h ago", "4d ago" ("-" when missing)."""
    if not stamp:
        return "-"
    try:
        # (API times are UTC: timegm, not mktime, which reads them as local time)
        at = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return escape(stamp)
    d = max(0.0, now - at)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= size:
            return f"{int(d // size)}{unit} ago"
    return f"{int(d)}s ago"


def table(rollouts: list[dict[str, Any]], now: float) -> str:
    """Rollouts as aligned columns, every text escaped; the reason last and whole (it is
    what on-call reads)."""
    head = ("ID", "TARGET", "VERSION", "STATE", "STAGE", "WEIGHT", "STARTED", "UPDATED",
            "REASON")
    rows = []
    for r in rollouts:
        reason = escape(r.get("reason") or "")
        rows.append((escape(r["id"]), escape(r["target"]), escape(r["canary_version"]),
                     escape(r["state"]), str(r["stage"]), f"{r['weight']}%",
                     ago(r.get("started_at"), now), ago(r.get("updated_at"), now), reason))
    widths = [max(len(x[i]) for x in (head, *rows)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()
                     for x in (head, *rows))


def cmd_status(args: argparse.Namespace) -> int:
    if args.id and args.watch:
        return watch(args, args.id)
    if args.watch:
        die("status --watch: give the ID of the rollout to follow")
    if args.id:
        r = api(args, "GET", f"/api/v1/rollouts/{args.id}")
        if args.json:
            print(json.dumps(r, indent=2))
            return EXIT_OK
        print(summary(r))
        print(f"  started {escape(r['started_at'])}, updated {escape(r['updated_at'])}, "
              f"policy {escape(r['policy'])}, stable {escape(r['stable_version'])}")
        for g in r["gates"]:
            print(f"  gate {gate_line(g, detail=True)}")
        for e in r["events"]:
            print(f"  {escape(e['at'])} {escape(e['type']):<12} {escape(e['actor']):<16} "
                  f"{escape(e['message'])}")
        return EXIT_OK
    query = {k: v for k, v in (("limit", args.limit), ("target", args.target),
                               ("state", args.state), ("before", args.before))
             if v is not None}
    path = "/api/v1/rollouts" + ("?" + urllib.parse.urlencode(query) if query else "")
    data = api(args, "GET", path)
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    if data["rollouts"]:
        print(table(data["rollouts"], time.time()))
    else:
        print("no rollouts")
    if data.get("next"):
        print(f"canary: newest {len(data['rollouts'])} shown; older ones: --before "
              f"{data['next']}", file=sys.stderr)
    return EXIT_OK


def cmd_override(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"reason": args.reason}
    if args.command == "promote" and args.full:
        body["full"] = True
    try:
        r = call_retrying(args, "POST", f"/api/v1/rollouts/{args.id}/{args.command}", body)
    except ApiError as e:
        if not (args.command == "abort" and e.status == 409):
            die(f"{e} (HTTP {e.status})" if e.status else str(e))
        # an abort is done when the rollout is rolled back, whoever (or whichever retry of
        # ours, after a 503 whose abort was carried out anyway) got there first
        r = api(args, "GET", f"/api/v1/rollouts/{args.id}")
        if r.get("state") not in ("rolled_back", "rolling_back"):
            die(f"{e} (HTTP {e.status})")
        print(f"canary: {escape(str(e))}", file=sys.stderr)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(summary(r))
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        mine = version("canary")
    except PackageNotFoundError:  # (run from a source tree that was never installed)
        mine = "unknown"
    if args.json:
        print(json.dumps({"version": mine}))
    else:
        print(f"canary {mine}")
    return EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    from canary.completion import SHELLS

    print(SHELLS[args.shell](parser()), end="")
    return EXIT_OK


def target_lines(t: dict[str, Any]) -> list[str]:
    runs = t.get("runs") or {}
    line = (f"{escape(t['name'])}: {escape(t['router'])}, promotion {escape(t['promotion'])}; "
            f"serving: {escape(t['serving'])} side ({escape(runs.get(t['serving']) or '?')}); "
            f"deploy next to: {escape(t['deploy_to'])} side "
            f"(runs {escape(runs.get(t['deploy_to']) or '?')}); canary side carries "
            f"{'?' if t.get('live_weight') is None else t['live_weight']}%")
    out = [line]
    if t.get("active_rollout"):
        a = t.get("active") or {}
        out.append(f"  active rollout {escape(t['active_rollout'])}: "
                   f"{escape(str(a.get('state')))} at weight {a.get('weight')} toward the "
                   f"{escape(str(a.get('to_side')))} side ({escape(str(a.get('canary_version')))})")
    if t.get("warning"):
        out.append(f"  warning: {escape(t['warning'])}")
    return out


def cmd_targets(args: argparse.Namespace) -> int:
    """Which side of each target serves, and where the next version goes."""
    if args.name:
        names = [args.name]
    else:
        names = [t["name"] for t in api(args, "GET", "/api/v1/targets")["targets"]]
    items = [api(args, "GET", f"/api/v1/targets/{urllib.parse.quote(n, safe='')}")
             for n in names]
    if args.json:
        print(json.dumps(items[0] if args.name else {"targets": items}, indent=2))
        return EXIT_OK
    for t in items:
        print("\n".join(target_lines(t)))
    if not items:
        print("no targets")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from canary.schema import published

    print(json.dumps(published(args.name), indent=2, ensure_ascii=False))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from canary.demo.run import main as demo_main

    code: int = demo_main(args)
    return code


# ---- argument parsing -------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="canary", description="staged canary releases with "
                                "automatic rollback")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client(sp: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
        sp.add_argument("--server", default=os.environ.get("CANARY_SERVER",
                                                           "http://127.0.0.1:8080"),
                        help="controller URL (default $CANARY_SERVER or http://127.0.0.1:8080); "
                             "the token comes from $CANARY_TOKEN")
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print the API's JSON")

    sp = sub.add_parser("serve", help="run the controller")
    sp.add_argument("--config", required=True)
    sp.set_defaults(fn=cmd_serve)

    sp = sub.add_parser("validate", help="check policy files and controller configs")
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp.set_defaults(fn=cmd_validate)

    sp = sub.add_parser("plan", help="print a policy's stage timeline")
    sp.add_argument("policy_file", metavar="POLICY_FILE")
    sp.add_argument("--rps", type=float, help="also estimate how long the errors gates take "
                    "to let each stage go on this many requests per second")
    sp.add_argument("--error-rate", action="append", metavar="[GATE=]SHARE",
                    help="with --rps: the share of errors (or of slow requests, for a "
                         "latency gate) on both versions; default 0.005; repeat per gate")
    sp.set_defaults(fn=cmd_plan)

    sp = sub.add_parser("schema", help="print the JSON Schema of policy files or of the "
                        "controller config, for an editor's YAML language server")
    sp.add_argument("name", choices=list(SCHEMAS))
    sp.set_defaults(fn=cmd_schema)

    sp = sub.add_parser("start", help="start a rollout")
    sp.add_argument("target")
    sp.add_argument("--canary-version", required=True)
    sp.add_argument("--stable-version")
    sp.add_argument("--policy")
    sp.add_argument("--wait", action="store_true", help="show progress until it ends; exit 0 "
                    "succeeded (hand-over complete), 1 rolled back, 2 error")
    sp.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    sp.add_argument("--unreachable-timeout", type=float, default=300.0,
                    help="with --wait, how long to keep trying while the controller is "
                         "unreachable (seconds, default 300)")
    client(sp)
    sp.set_defaults(fn=cmd_start)

    sp = sub.add_parser("status", help="one rollout, or the newest ones")
    sp.add_argument("id", nargs="?")
    sp.add_argument("--limit", type=int, help="without ID: how many, newest first (default "
                    "50, at most 500)")
    sp.add_argument("--target", help="without ID: only this target's rollouts")
    sp.add_argument("--state", help="without ID: only these states (comma-separated; "
                    "`active` for those not yet final)")
    sp.add_argument("--before", metavar="ID", help="without ID: the rollouts started "
                    "before this one (the next page)")
    sp.add_argument("--watch", action="store_true", help="with ID: follow it until it ends; "
                    "exit 0 succeeded, 1 rolled back, 2 error (as start --wait)")
    sp.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    sp.add_argument("--unreachable-timeout", type=float, default=300.0,
                    help="with --watch, how long to keep trying while the controller is "
                         "unreachable (seconds, default 300)")
    client(sp)
    sp.set_defaults(fn=cmd_status)

    for name, text in (("pause", "hold the current weight"), ("resume", "continue"),
                       ("abort", "roll back now"), ("promote", "go to the next stage now"),
                       ("handover", "the serving side runs the new version now: return the "
                                    "traffic to it (promotion: return)")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("id")
        sp.add_argument("--reason", required=True)
        if name == "promote":
            sp.add_argument("--full", action="store_true", help="go straight to 100%%")
        client(sp)
        sp.set_defaults(fn=cmd_override)

    sp = sub.add_parser("version", help="print canary's version")
    sp.add_argument("--json", action="store_true", help="as JSON")
    sp.set_defaults(fn=cmd_version)

    sp = sub.add_parser("completion", help="print a shell completion script: "
                        'eval "$(canary completion bash)"')
    sp.add_argument("shell", choices=["bash", "zsh", "fish"])
    sp.set_defaults(fn=cmd_completion)
    sp = sub.add_parser("targets", help="which side of each target serves and where the "
                        "next version goes")
    sp.add_argument("name", nargs="?", metavar="NAME")
    client(sp)
    sp.set_defaults(fn=cmd_targets)

    sp = sub.add_parser("demo", help="a real local playground: nginx, Prometheus, two versions")
    sp.add_argument("--keep", action="store_true", help="leave the playground running at the end "
                    "until Ctrl-C")
    sp.set_defaults(fn=cmd_demo)
    return p


# Long-running commands keep Python's SIGPIPE handling (ignored: a write to a closed pipe
# or socket is an error to handle): a log reader or an API client going away must never
# kill the controller.
LONG_RUNNING = frozenset({"serve", "demo"})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if hasattr(signal, "SIGPIPE") and args.command not in LONG_RUNNING:
        # `canary status | head` ends quietly, as Unix tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        code: int = args.fn(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # (`canary demo | head`: the demo has stopped what it started on the way out)
        # whoever read our output has gone; stop without a traceback, and without
        # failing again when Python flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
