"""The HTTP API (interface.md section 3): aiohttp handlers over the Controller.

Handlers validate, call the controller, and render JSON. Overrides are recorded by the
controller, which wakes the rollout's task; the handler never moves traffic itself.
In `canary serve` the API has its own thread and event loop (`ApiServer`): HTTP parsing,
refusals and the reads marked `on_api_thread` run there; every other handler, and the
controller's start and stop, run on the control loop (`on_control`). An event loop only
changes task at an await, so a flood of requests on the rollouts' loop would delay every
evaluation and abort; two threads take turns at least every few milliseconds.
The API is also bounded: reads and writes each have a cap on requests in flight (beyond
it: 503 at once, with Retry-After), a read whose client hung up is cancelled
(`make_runner`), and a write is carried through (`carry_writes`), so an accepted command
is never half-done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from canary import history, jsonsafe
from canary.api import bodies, ui, watch
from canary.api.auth import Forbidden, Role, Token, Unauthorized, authenticate
from canary.api.openapi import SPEC
from canary.engine.controller import Controller
from canary.errors import Conflict, InvalidInput, NotFound, TransientError, UserError
from canary.leader import LeaderElector
from canary.model import Command, CommandKind, Phase, Rollout
from canary.store import no_such_rollout
from canary.targets import GatewayTarget, NginxTarget, promotion_of

log = logging.getLogger("canary.api")
CONTROLLER = web.AppKey("controller", Controller)
TOKENS = web.AppKey("tokens", tuple[Token, ...])
ACTOR = web.RequestKey("actor", str)
REASON = web.RequestKey("reason", str)
ROLLOUT = web.RequestKey("rollout", str)
MAX_BODY = 64 * 1024
# Alertmanager sends a whole group of alerts in one message, and does not send again a
# message refused with a 4xx: its endpoint reads more (the parsing runs off the control loop)
MAX_ALERTS_BODY = 1024 * 1024
BODY_LIMITS = {"/api/v1/alerts": MAX_ALERTS_BODY}
MAX_DEPTH = 64  # nesting of arrays and objects in a body
BODY_TIMEOUT = web.AppKey("body_timeout", float)
MAX_READS = 32    # API reads in flight at once (GET); more are refused with 503
MAX_WRITES = 64   # API writes in flight at once (starts, overrides); more get 503
SHUTDOWN_TIMEOUT = 5.0  # how long requests in flight get to finish at shutdown
PAGE_DEFAULT, PAGE_MAX = 50, 500
SCOPED_PAGES = 20  # store pages read at most to fill one page for a scoped token
UNBOUNDED = frozenset({"/healthz", "/readyz"})  # liveness answers however busy the API is


class InFlight:
    """Requests being handled now, per kind, against their caps."""

    def __init__(self, *, reads: int, writes: int) -> None:
        self.cap = {"read": reads, "write": writes}
        self.busy = {"read": 0, "write": 0}


IN_FLIGHT = web.AppKey("in_flight", InFlight)
HUB = web.AppKey("watch_hub", watch.Hub)
HEARTBEAT = web.AppKey("watch_heartbeat", float)
CONTROL_LOOP = web.AppKey("control_loop", asyncio.AbstractEventLoop)
T = TypeVar("T")


class SlowClient(Exception):
    pass

B = TypeVar("B", bound=bodies._Body)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)


def on_api_thread(handler: H) -> H:
    """Mark a handler that may run on the API's own loop: it reads the store (which is
    thread-safe and loop-agnostic) and nothing else of the controller's, so a flood of it
    never takes the control loop's time. Unmarked handlers run on the control loop."""
    handler._on_api_thread = True  # type: ignore[attr-defined]
    return handler


async def on_control(app: web.Application, work: Coroutine[Any, Any, T]) -> T:
    """Run `work` on the control loop (the rollouts' loop) and wait for it from here."""
    loop = app.get(CONTROL_LOOP)
    if loop is None or loop is asyncio.get_running_loop():
        return await work
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, loop))


def json_response(data: Any, *, status: int = 200) -> web.Response:
    """Strict JSON: a non-finite number (a gate's value, say) is sent as null, never as
    the `NaN` / `Infinity` that JSON parsers refuse."""
    return web.json_response(data, status=status, dumps=jsonsafe.dumps)


def error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


@web.middleware
async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every mutating call is logged: who, what, when (the log's ts), reason and result,
    whether it was accepted or refused. Tokens themselves are never logged."""
    response = await handler(request)
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        log.info("audit", extra={
            "audit": True, "actor": request.get(ACTOR) or _bearer(request),
            "method": request.method, "path": request.path, "status": response.status,
            "reason": request.get(REASON), "rollout": request.get(ROLLOUT),
            "peer": request.remote})
    return response


def _bearer(request: web.Request) -> str:
    """Whose token a request refused before it was authenticated (405, 408, 413) carried:
    the audit line names them as it names everyone else."""
    tokens: tuple[Token, ...] = request.app[TOKENS]
    try:
        return authenticate(request.headers.get("Authorization"), tokens).name
    except Unauthorized:
        return "anonymous"


def _kind(request: web.Request) -> str:
    return "read" if request.method in ("GET", "HEAD", "OPTIONS") else "write"


@web.middleware
async def carry_writes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A write runs to its end even if its client hangs up (the runner cancels the
    handlers of gone clients): a start cancelled between the store and the rollout's task
    would leave a rollout nobody runs. Its answer is dropped; the audit line is kept."""
    if _kind(request) == "read":
        return await handler(request)
    task = asyncio.ensure_future(handler(request))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_retrieve)  # nobody else will look at how it ended
        raise


def _retrieve(task: asyncio.Future[web.StreamResponse]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("request failed after its client left", exc_info=task.exception())


@web.middleware
async def bounded(request: web.Request, handler: Handler) -> web.StreamResponse:
    """At most `cap` reads (and, apart, writes) in flight; the next one is answered 503
    at once instead of queueing, so a read flood neither piles up work and memory nor
    delays the rollouts' evaluations, and never takes a slot an abort needs."""
    if request.path in UNBOUNDED or _is_watch(request):
        return await handler(request)  # (streams have their own cap: watch.MAX_WATCHERS)
    limits = request.app[IN_FLIGHT]
    kind = _kind(request)
    if limits.busy[kind] >= limits.cap[kind]:
        request.app[CONTROLLER].metrics.api_refused.labels(kind).inc()
        response = error(503, f"the controller is answering {limits.cap[kind]} {kind}s "
                              "already; try again in a second")
        response.headers["Retry-After"] = "1"
        return response
    limits.busy[kind] += 1
    try:
        return await handler(request)
    finally:
        limits.busy[kind] -= 1


@web.middleware
async def to_control_loop(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unmarked handlers run on the control loop. The body is read here first (on the
    API's loop, which owns the connection), so the handler finds it already read."""
    if (request.app.get(CONTROL_LOOP) is None
            or getattr(request.match_info.handler, "_on_api_thread", False)):
        return await handler(request)
    if request.body_exists:
        await read_body(request)

    async def run() -> web.StreamResponse:
        return await handler(request)

    return await on_control(request.app, run())


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SlowClient as e:
        response = error(408, str(e))
        response.force_close()  # the rest of its body may never come: drop the connection
        return response
    except Unauthorized as e:
        return error(401, str(e))
    except Forbidden as e:
        return error(403, str(e))
    except NotFound as e:
        return error(404, str(e))
    except Conflict as e:
        return error(409, str(e))
    except (InvalidInput, UserError) as e:
        return error(400, str(e))
    except TransientError as e:
        response = error(503, f"{e}; try again shortly")
        response.headers["Retry-After"] = "5"
        return response
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"request body is larger than {body_limit(request)} bytes")
    except web.HTTPException as e:
        if e.status >= 400:
            return error(e.status, e.reason or "error")
        raise
    except Exception:
        log.exception("request failed", extra={"path": request.path, "method": request.method})
        return error(500, "internal error; the controller log has the details")


def body_limit(request: web.Request) -> int:
    """How many bytes a body to this path may have (MAX_BODY but for BODY_LIMITS)."""
    return BODY_LIMITS.get(request.path, MAX_BODY)


async def read_body(request: web.Request) -> bytes:
    """The raw body, at most body_limit bytes, arriving within BODY_TIMEOUT (read once,
    then kept by the request)."""
    limit = body_limit(request)
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    try:
        async with asyncio.timeout(request.app[BODY_TIMEOUT]):
            raw = await request.read()  # (at most the app's client_max_size, the largest)
        if len(raw) > limit:  # a body sent without a Content-Length
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(raw))
        return raw
    except TimeoutError:
        raise SlowClient(f"the request body did not arrive within "
                         f"{request.app[BODY_TIMEOUT]:g}s") from None
    except ConnectionError:  # the client hung up mid-body: nothing to answer, nothing done
        raise SlowClient("the client closed the connection before its body arrived") from None


async def body(request: web.Request, model: type[B]) -> B:
    """The request's JSON body as `model` (api/bodies.py), or a 400 naming the field."""
    raw = await read_body(request)
    if not raw.strip():
        data: Any = {}
    else:
        depth = json_depth(raw)
        if depth > MAX_DEPTH:
            raise InvalidInput(f"body nests {depth} levels deep (at most {MAX_DEPTH}); send a "
                               "flat JSON object of the documented fields")
        try:
            data = json.loads(raw, object_pairs_hook=_no_duplicates,
                              parse_constant=_no_constants)
        except DuplicateKey as e:
            raise InvalidInput(f"{e.key}: appears twice in the body; send each field once") \
                from None
        except RecursionError:  # (json_depth already refuses this; a last line of defence)
            raise InvalidInput("body nests too deep; send a flat JSON object") from None
        except (ValueError, UnicodeDecodeError) as e:
            if "int_max_str_digits" in str(e):
                raise InvalidInput("body holds a number with thousands of digits; send "
                                   "the documented fields") from None
            raise InvalidInput(f"body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise InvalidInput("body must be a JSON object")
    parsed: B = bodies.parse(model, data)
    return parsed


class DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key sent twice is refused: which one counts would be the parser's choice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in `raw`, counted outside strings, so a body is
    refused before the (recursive) parser could run out of stack."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return 1  # (the usual body: too few brackets to nest deeply, no need to scan)
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _auth(request: web.Request, role: Role) -> Token:
    tokens: tuple[Token, ...] = request.app[TOKENS]
    token = authenticate(request.headers.get("Authorization"), tokens)
    request[ACTOR] = token.name  # refused for its role or not, the audit log names it
    if token.role < role:
        raise Forbidden(f"token {token.name!r} has role {token.role.name.lower()}; this needs "
                        f"{role.name.lower()} or above")
    return token


@on_api_thread
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ctl = request.app[CONTROLLER]
    problem = await ctl.check_store()
    if problem:
        return error(503, f"state store cannot be written: {problem}")
    if not ctl.policies:
        return error(503, "no policies loaded")
    warnings = await ctl.unexplained()
    if warnings:
        return error(503, "; ".join(warnings[t] for t in sorted(warnings)))
    return json_response({"status": "ready", "policies": len(ctl.policies),
                          "active_rollouts": ctl.running(), "leader": ctl.leading})


@on_api_thread
async def metrics(request: web.Request) -> web.Response:
    request.app[CONTROLLER].metrics.expire()
    data = generate_latest(request.app[CONTROLLER].metrics.registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


@on_api_thread
async def openapi(request: web.Request) -> web.Response:
    return json_response(SPEC)


async def targets(request: web.Request) -> web.Response:
    token = _auth(request, Role.VIEWER)
    ctl = request.app[CONTROLLER]
    await ctl.unexplained()  # re-checked: on-call may have set a router back by hand
    out = []
    for name, t in sorted(ctl.targets.items()):
        if not token.may_see(name):
            continue
        item: dict[str, Any] = {"name": name, "router": t.router, "policy": t.policy,
                                "vars": dict(t.vars), "stable_version": t.stable_version}
        if isinstance(t, NginxTarget):
            item.update(file=str(t.file), upstream=t.upstream, stable=list(t.stable),
                        canary=list(t.canary))
        elif isinstance(t, GatewayTarget):
            item.update(namespace=t.namespace, http_route=t.http_route, rule=t.rule)
        else:
            item.update(namespace=t.namespace, virtual_service=t.virtual_service, route=t.route)
        router = ctl.routers.get(name)
        item["live_weight"] = await router.get_weight() if router else None
        if name in ctl.warnings:
            item["warning"] = ctl.warnings[name]
        out.append(item)
    return json_response({"targets": out})


async def one_target(request: web.Request) -> web.Response:
    """GET /api/v1/targets/{name}: where the target's traffic is and where the next
    version goes (interface.md section 5)."""
    token = _auth(request, Role.VIEWER)
    ctl = request.app[CONTROLLER]
    name = request.match_info["name"]
    t = ctl.targets.get(name) if token.may_see(name) else None
    if t is None:
        raise NotFound(f"no target named {name[:100]!r}; configured: "
                       f"{', '.join(sorted(n for n in ctl.targets if token.may_see(n))) or 'none'}")
    await ctl.unexplained()
    sides = await ctl.target_sides(name)
    active = await ctl.store.list(target=name, active_only=True, limit=1, events=False)
    router = ctl.routers.get(name)
    runs = {"stable": sides.stable_runs, "canary": sides.canary_runs}
    if active:  # during a rollout, each side runs what the rollout was started with
        runs[active[0].to_side] = active[0].canary_version
        runs[sides.serving] = active[0].stable_version or runs[sides.serving]
    item: dict[str, Any] = {
        "name": name, "router": t.router, "policy": t.policy, "promotion": promotion_of(t),
        "live_weight": await router.get_weight() if router else None,
        "active_rollout": active[0].id if active else None,
        "serving": sides.serving, "deploy_to": sides.deploy_to,
        "runs": runs}
    if isinstance(t, NginxTarget):
        item["servers"] = {"stable": list(t.stable), "canary": list(t.canary)}
        item["version_probe"] = t.version_probe.path if t.version_probe else None
    else:
        if isinstance(t, GatewayTarget):
            item["destinations"] = {side: {"service": b.name, "port": str(b.port)}
                                    for side, b in (("stable", t.stable), ("canary", t.canary))}
        else:
            item["destinations"] = {side: {"host": d.host, "subset": d.subset}
                                    for side, d in (("stable", t.stable), ("canary", t.canary))}
        if t.workload is not None:
            item["workload"] = {"stable": t.workload.stable, "canary": t.workload.canary}
    if active:
        r = active[0]
        item["active"] = {"state": r.state.value, "weight": r.weight, "to_side": r.to_side,
                          "canary_version": r.canary_version}
    if name in ctl.warnings:
        item["warning"] = ctl.warnings[name]
    return json_response(bodies.TargetDetail.model_validate(item).model_dump(mode="json"))


async def policies(request: web.Request) -> web.Response:
    _auth(request, Role.VIEWER)
    ctl = request.app[CONTROLLER]
    return json_response({"policies": [p.to_dict() for _, p in sorted(ctl.policies.items())]})


def summary(r: Rollout) -> dict[str, Any]:
    """A rollout in a listing: everything but its events (GET /api/v1/rollouts/{id})."""
    out = r.to_api()
    out.pop("events", None)
    return out


def _one(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise InvalidInput(f"{name}: given {len(values)} times; give it once")
    return values[0] if values else None


def _states(text: str) -> set[Phase]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    allowed = [p.value for p in Phase]
    out: set[Phase] = set()
    for name in names:
        if name == "active":
            out.update(p for p in Phase if not p.final)
        elif name in allowed:
            out.add(Phase(name))
        else:
            raise InvalidInput(f"state: {name[:40]!r} is not a state; use one or more of "
                               f"{', '.join(allowed)} or active, separated by commas")
    if not out:
        raise InvalidInput("state: empty; leave it out for every state")
    return out


LIST_PARAMS = ("target", "state", "limit", "before")


@on_api_thread
async def list_rollouts(request: web.Request) -> web.Response:
    """Paged, newest first (interface.md section 8): `next` is the `before` of the next
    page, null on the last. Summaries only; the store pages and filters."""
    token = _auth(request, Role.VIEWER)
    for name in request.query:
        if name not in LIST_PARAMS:
            raise InvalidInput(f"{name[:40]}: unknown query parameter; expected "
                               f"{', '.join(LIST_PARAMS)}")
    limit_text = _one(request, "limit")
    limit = PAGE_DEFAULT
    if limit_text is not None:
        if not limit_text.isascii() or not limit_text.isdigit() or not 1 <= int(limit_text) \
                <= PAGE_MAX:
            raise InvalidInput(f"limit: {limit_text[:40]!r} must be a whole number from 1 to "
                               f"{PAGE_MAX} (default {PAGE_DEFAULT})")
        limit = int(limit_text)
    state_text = _one(request, "state")
    states = _states(state_text) if state_text is not None else None
    target = _one(request, "target") or None
    before = _one(request, "before")
    if before is not None and not before.strip():
        raise InvalidInput("before: empty; pass the `next` of the previous page")
    store = request.app[CONTROLLER].store
    unknown = InvalidInput(f"before: no rollout with id {str(before)[:100]!r}; pass the `next` "
                           "of the previous page")
    if before is not None and token.targets is not None:
        try:  # a rollout out of scope is as unknown here as anywhere
            if not token.may_see((await store.load(before)).target):
                raise unknown
        except NotFound:
            raise unknown from None
    seen: list[Rollout] = []
    cursor = before
    for _ in range(SCOPED_PAGES):  # a scoped token's page is filled from several store pages
        try:
            batch = await store.list(target=target, state=states, limit=limit + 1,
                                     before=cursor, events=False)
        except NotFound:
            raise unknown from None
        seen += [r for r in batch if token.may_see(r.target)]
        if len(seen) > limit or len(batch) <= limit:
            break
        cursor = batch[-1].id
    page = seen[:limit]
    # `next` names only a rollout this token may see
    return json_response({"rollouts": [summary(r) for r in page],
                          "next": page[-1].id if len(seen) > limit else None})


@on_api_thread
async def get_rollout(request: web.Request) -> web.Response:
    token = _auth(request, Role.VIEWER)
    ctl = request.app[CONTROLLER]
    # while the store cannot be written, a rollback in force is shown, not the stale row
    r = ctl.unsaved_view.get(request.match_info["id"]) or \
        await ctl.store.load(request.match_info["id"])
    if not token.may_see(r.target):  # out of scope reads exactly like an unknown id
        raise no_such_rollout(request.match_info["id"])
    return json_response(r.to_api())


async def create_rollout(request: web.Request) -> web.Response:
    token = _auth(request, Role.PIPELINE)
    data = await body(request, bodies.StartRollout)
    r = await request.app[CONTROLLER].create(
        target=data.target, canary_version=data.canary_version,
        stable_version=data.stable_version, policy=data.policy, actor=token.name,
        scope=token.may_see)
    request[ROLLOUT] = r.id
    return json_response(r.to_api(), status=201)


@on_api_thread
async def alerts(request: web.Request) -> web.Response:
    """Alertmanager's webhook (interface.md section 6): firing alerts that match an active
    rollout's policy `alerts` roll it back; resolved ones change nothing. The body (up to
    MAX_ALERTS_BODY) is parsed here, on the API's loop; only the matching runs on the
    control loop."""
    token = _auth(request, Role.PIPELINE)
    data = await body(request, bodies.AlertmanagerWebhook)
    firing = [(a.labels, a.annotations) for a in data.alerts if a.status == "firing"]
    request[REASON] = (f"alertmanager: {len(firing)} firing, "
                       f"{len(data.alerts) - len(firing)} resolved")
    ids = await on_control(request.app, request.app[CONTROLLER].alerts(
        firing, actor=token.name, scope=token.may_see))
    if ids:
        request[ROLLOUT] = ",".join(ids)[:1000]
    return json_response(bodies.AlertsAnswer(rolled_back=ids).model_dump(mode="json"))


_ROLES = {CommandKind.PAUSE: Role.ONCALL, CommandKind.RESUME: Role.ONCALL,
          CommandKind.PROMOTE: Role.ONCALL, CommandKind.ABORT: Role.PIPELINE,
          CommandKind.HANDOVER: Role.PIPELINE}


def override(kind: CommandKind) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        request[ROLLOUT] = request.match_info["id"][:100]
        token = _auth(request, _ROLES[kind])
        data = await body(request, bodies.Promote if kind is CommandKind.PROMOTE
                          else bodies.Override)
        request[REASON] = data.reason
        cmd = Command(kind=kind, actor=token.name, reason=data.reason.strip(),
                      full=isinstance(data, bodies.Promote) and data.full)
        r = await request.app[CONTROLLER].command(request.match_info["id"], cmd,
                                                  scope=token.may_see)
        return json_response(r.to_api())

    return handler


def _is_watch(request: web.Request) -> bool:
    return request.method == "GET" and request.path.endswith("/watch") and \
        request.path.startswith("/api/v1/rollouts/")


async def _visible(request: web.Request, token: Token) -> Rollout:
    r = await request.app[CONTROLLER].store.load(request.match_info["id"])
    if not token.may_see(r.target):  # out of scope reads exactly like an unknown id
        raise no_such_rollout(request.match_info["id"])
    return r


@on_api_thread
async def rollout_readings(request: web.Request) -> web.Response:
    """Every gate's readings and the weight over the rollout's life (canary/history.py)."""
    token = _auth(request, Role.VIEWER)
    r = await _visible(request, token)
    points = await request.app[CONTROLLER].store.readings(r.id)
    return json_response(history.view(r, points))


@on_api_thread
async def whoami(request: web.Request) -> web.Response:
    token = _auth(request, Role.VIEWER)
    may = [k.value for k, role in _ROLES.items() if token.role >= role]
    if token.role >= Role.PIPELINE:
        may.insert(0, "start")
    return json_response({"name": token.name, "role": token.role.name.lower(),
                          "targets": list(token.targets) if token.targets is not None else None,
                          "may": may})


@on_api_thread
async def watch_rollout(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the rollout's JSON (`event: rollout`) now and after each change,
    until it is final; a comment line every HEARTBEAT seconds keeps proxies from closing a
    quiet stream. Runs on the API's loop; the control loop only pokes it (watch.Hub)."""
    token = _auth(request, Role.VIEWER)
    hub = request.app[HUB]
    refused = None
    if hub.count() >= watch.MAX_WATCHERS:
        refused = error(503, f"{watch.MAX_WATCHERS} watchers are open already; try again "
                             "later, or poll GET /api/v1/rollouts/{id}")
    elif hub.held(token.name) >= watch.MAX_PER_TOKEN:
        refused = error(429, f"token {token.name!r} holds {watch.MAX_PER_TOKEN} open "
                             "watch streams already (the most one token may); close one, "
                             "or poll GET /api/v1/rollouts/{id}")
    if refused is not None:
        request.app[CONTROLLER].metrics.api_refused.labels("watch").inc()
        refused.headers["Retry-After"] = "5"
        return refused
    rid = request.match_info["id"]
    resp: web.StreamResponse | None = None
    ev = hub.join(rid)  # before the first read, so no change can fall between the two
    hub.hold(token.name, 1)
    try:
        r = await _visible(request, token)
        ctl = request.app[CONTROLLER]
        beat = request.app[HEARTBEAT]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        stream = resp

        async def send(data: bytes) -> None:
            """A write that cannot go out within WRITE_TIMEOUT (a client that stopped
            reading) ends the stream: it would otherwise hold its place forever."""
            try:
                async with asyncio.timeout(watch.WRITE_TIMEOUT):
                    await stream.write(data)
            except TimeoutError:
                if request.transport is not None:
                    request.transport.abort()
                raise ConnectionResetError("the watcher stopped reading") from None

        latest = hub.offer(r)
        sent = -1
        while True:
            if latest.version > sent:
                await send(f"event: rollout\nid: {latest.version}\ndata: {latest.data}"
                           "\n\n".encode())
                sent = latest.version
                if latest.final:
                    break
            if hub.closing:
                break
            wait = beat if ctl.leading else min(beat, watch.FOLLOWER_POLL)
            try:
                async with asyncio.timeout(wait):
                    await ev.wait()
            except TimeoutError:
                if not ctl.leading:  # another replica saves: read the store
                    latest = hub.offer(await ctl.store.load(rid))
                    if latest.version > sent:
                        continue
                await send(b": heartbeat\n\n")
            ev.clear()
            latest = hub.latest(rid) or latest
        try:
            async with asyncio.timeout(watch.WRITE_TIMEOUT):
                await resp.write_eof()
        except TimeoutError:
            if request.transport is not None:
                request.transport.abort()
        return resp
    except ConnectionError:  # the watcher went away: nothing to answer, nothing to log
        if resp is None:
            raise
        return resp
    finally:
        hub.hold(token.name, -1)
        hub.leave(rid, ev)


def make_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """The runner every server of this app uses. handler_cancellation: a request whose
    client has hung up stops being answered (reads are cancelled; writes run to their
    end, see `carry_writes`), so a flood of impatient clients leaves no work behind and a
    shutdown waits at most SHUTDOWN_TIMEOUT for what is left."""
    kwargs.setdefault("access_log", None)
    kwargs.setdefault("shutdown_timeout", SHUTDOWN_TIMEOUT)
    return web.AppRunner(app, handler_cancellation=True, **kwargs)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or InvalidInput naming the address and why."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InvalidInput(f"listen: cannot resolve {host!r}: {e.strerror}") from e
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
    except OSError as e:
        sock.close()
        raise InvalidInput(f"listen: cannot listen on {host}:{port}: {e.strerror}; is another "
                           "process using it?") from e
    sock.setblocking(False)
    return sock


class ApiServer:
    """The API listening on its own thread and event loop, started and stopped from the
    control loop (the one that runs the rollouts, and the controller's start and stop)."""

    def __init__(self, app: web.Application, sock: socket.socket, *,
                 ssl_context: Any = None, **runner_kwargs: Any) -> None:
        self.app, self.sock = app, sock
        self.ssl_context = ssl_context
        self.runner = make_runner(app, **runner_kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def _on_api(self, work: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self._loop))

    async def start(self) -> None:
        """Set up the app (which starts the controller, on this loop) and serve on the
        socket, bound before anything was resumed."""
        self.app[CONTROL_LOOP] = asyncio.get_running_loop()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="canary-api",
                                        daemon=True)
        self._thread.start()
        await self._on_api(self.runner.setup())
        site = web.SockSite(self.runner, self.sock, ssl_context=self.ssl_context)
        await self._on_api(site.start())

    async def stop(self) -> None:
        """Stop listening, let requests in flight finish (at most SHUTDOWN_TIMEOUT), stop
        the controller (on this loop), and end the thread."""
        if self._loop is None or self._thread is None:
            self.sock.close()
            return
        loop, thread = self._loop, self._thread
        try:
            await self._on_api(self.runner.cleanup())
        finally:
            async def drain() -> None:  # what is left (e.g. the executor's threads)
                await loop.shutdown_default_executor()
                loop.stop()
            asyncio.run_coroutine_threadsafe(drain(), loop)
            await asyncio.to_thread(thread.join, 10)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None
            self.sock.close()


def build_app(controller: Controller, tokens: tuple[Token, ...], *,
              body_timeout: float = 10.0, elector: LeaderElector | None = None,
              max_reads: int = MAX_READS, max_writes: int = MAX_WRITES,
              heartbeat: float = watch.HEARTBEAT) -> web.Application:
    # (audit outside the bound, so a refused write is audited too; both inside
    # carry_writes, so a write whose client left is still audited; errors rendered on the
    # API's loop, whichever loop raised them)
    app = web.Application(middlewares=[carry_writes, audit, bounded, errors_as_json,
                                       to_control_loop],
                          client_max_size=max(MAX_BODY, *BODY_LIMITS.values()))
    app[BODY_TIMEOUT] = body_timeout
    app[IN_FLIGHT] = InFlight(reads=max_reads, writes=max_writes)
    app[CONTROLLER] = controller
    app[TOKENS] = tokens
    app[HUB] = hub = watch.Hub()
    app[HEARTBEAT] = heartbeat
    controller.listeners.append(hub.notify)

    async def close_watchers(app: web.Application) -> None:
        hub.close()
        controller.listeners[:] = [x for x in controller.listeners if x != hub.notify]

    app.on_shutdown.append(close_watchers)

    async def start_elector() -> asyncio.Task[None]:
        assert elector is not None
        return asyncio.create_task(elector.run(), name="leader-election")

    async def stop_elector(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def run_controller(app: web.Application) -> AsyncIterator[None]:
        # (the controller's tasks belong to the control loop, wherever the app runs)
        if elector is None:
            await on_control(app, controller.start())
            yield
            await on_control(app, controller.stop())
            return
        # with leader election, rollouts run only while this replica holds the lease
        controller.leading = False
        controller.leader = lambda: elector.leader
        task = await on_control(app, start_elector())
        yield
        await on_control(app, stop_elector(task))

    app.cleanup_ctx.append(run_controller)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/openapi.json", openapi)
    app.router.add_get("/api/v1/targets", targets)
    app.router.add_get("/api/v1/targets/{name}", one_target)
    app.router.add_get("/api/v1/policies", policies)
    app.router.add_get("/api/v1/rollouts", list_rollouts)
    app.router.add_post("/api/v1/rollouts", create_rollout)
    app.router.add_get("/api/v1/rollouts/{id}", get_rollout)
    app.router.add_get("/api/v1/rollouts/{id}/readings", rollout_readings)
    app.router.add_get("/api/v1/rollouts/{id}/watch", watch_rollout)
    app.router.add_get("/api/v1/whoami", whoami)
    ui.add_routes(app)
    for kind in CommandKind:
        app.router.add_post(f"/api/v1/rollouts/{{id}}/{kind.value}", override(kind))
    app.router.add_post("/api/v1/alerts", alerts)
    return app
