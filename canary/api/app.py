"""The HTTP API (interface.md section 3): aiohttp handlers over the Controller.

Handlers validate, call the controller, and render JSON. Overrides are recorded by the
controller, which wakes the rollout's task; the handler never moves traffic itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from canary import jsonsafe
from canary.api import bodies
from canary.api.auth import Forbidden, Unauthorized, authenticate
from canary.api.openapi import SPEC
from canary.config import NginxTarget, Role, Token
from canary.engine.controller import Controller
from canary.errors import Conflict, InvalidInput, NotFound, TransientError, UserError
from canary.leader import LeaderElector
from canary.model import Command, CommandKind
from canary.store import no_such_rollout

log = logging.getLogger("canary.api")
CONTROLLER = web.AppKey("controller", Controller)
TOKENS = web.AppKey("tokens", tuple[Token, ...])
ACTOR = web.RequestKey("actor", str)
REASON = web.RequestKey("reason", str)
ROLLOUT = web.RequestKey("rollout", str)
MAX_BODY = 64 * 1024
MAX_DEPTH = 64  # nesting of arrays and objects in a body
BODY_TIMEOUT = web.AppKey("body_timeout", float)


class SlowClient(Exception):
    pass

B = TypeVar("B", bound=bodies._Body)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
            "audit": True, "actor": request.get(ACTOR, "anonymous"),
            "method": request.method, "path": request.path, "status": response.status,
            "reason": request.get(REASON), "rollout": request.get(ROLLOUT),
            "peer": request.remote})
    return response


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
        return error(413, f"request body is larger than {MAX_BODY} bytes")
    except web.HTTPException as e:
        if e.status >= 400:
            return error(e.status, e.reason or "error")
        raise
    except Exception:
        log.exception("request failed", extra={"path": request.path, "method": request.method})
        return error(500, "internal error; the controller log has the details")


async def body(request: web.Request, model: type[B]) -> B:
    """The request's JSON body as `model` (api/bodies.py), or a 400 naming the field."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
    try:
        async with asyncio.timeout(request.app[BODY_TIMEOUT]):
            raw = await request.read()
    except TimeoutError:
        raise SlowClient(f"the request body did not arrive within "
                         f"{request.app[BODY_TIMEOUT]:g}s") from None
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


async def metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[CONTROLLER].metrics.registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return json_response(SPEC)


async def targets(request: web.Request) -> web.Response:
    token = _auth(request, Role.VIEWER)
    ctl = request.app[CONTROLLER]
    out = []
    for name, t in sorted(ctl.targets.items()):
        if not token.may_see(name):
            continue
        item: dict[str, Any] = {"name": name, "router": t.router, "policy": t.policy,
                                "vars": dict(t.vars), "stable_version": t.stable_version}
        if isinstance(t, NginxTarget):
            item.update(file=str(t.file), upstream=t.upstream, stable=list(t.stable),
                        canary=list(t.canary))
        else:
            item.update(namespace=t.namespace, virtual_service=t.virtual_service, route=t.route)
        router = ctl.routers.get(name)
        item["live_weight"] = await router.get_weight() if router else None
        if name in ctl.warnings:
            item["warning"] = ctl.warnings[name]
        out.append(item)
    return json_response({"targets": out})


async def policies(request: web.Request) -> web.Response:
    _auth(request, Role.VIEWER)
    ctl = request.app[CONTROLLER]
    return json_response({"policies": [p.to_dict() for _, p in sorted(ctl.policies.items())]})


async def list_rollouts(request: web.Request) -> web.Response:
    token = _auth(request, Role.VIEWER)
    ctl = request.app[CONTROLLER]
    rollouts = [r for r in await ctl.store.list() if token.may_see(r.target)]
    target = request.query.get("target")
    if target:
        rollouts = [r for r in rollouts if r.target == target]
    return json_response({"rollouts": [r.to_api() for r in rollouts]})


async def get_rollout(request: web.Request) -> web.Response:
    token = _auth(request, Role.VIEWER)
    r = await request.app[CONTROLLER].store.load(request.match_info["id"])
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


_ROLES = {CommandKind.PAUSE: Role.ONCALL, CommandKind.RESUME: Role.ONCALL,
          CommandKind.PROMOTE: Role.ONCALL, CommandKind.ABORT: Role.PIPELINE}


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


def build_app(controller: Controller, tokens: tuple[Token, ...], *,
              body_timeout: float = 10.0, elector: LeaderElector | None = None) -> web.Application:
    app = web.Application(middlewares=[audit, errors_as_json], client_max_size=MAX_BODY)
    app[BODY_TIMEOUT] = body_timeout
    app[CONTROLLER] = controller
    app[TOKENS] = tokens

    async def run_controller(app: web.Application) -> AsyncIterator[None]:
        if elector is None:
            await controller.start()
            yield
            await controller.stop()
            return
        # with leader election, rollouts run only while this replica holds the lease
        controller.leading = False
        controller.leader = lambda: elector.leader
        task = asyncio.create_task(elector.run(), name="leader-election")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(run_controller)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/openapi.json", openapi)
    app.router.add_get("/api/v1/targets", targets)
    app.router.add_get("/api/v1/policies", policies)
    app.router.add_get("/api/v1/rollouts", list_rollouts)
    app.router.add_post("/api/v1/rollouts", create_rollout)
    app.router.add_get("/api/v1/rollouts/{id}", get_rollout)
    for kind in CommandKind:
        app.router.add_post(f"/api/v1/rollouts/{{id}}/{kind.value}", override(kind))
    return app
