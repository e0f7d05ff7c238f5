"""Gateway API: shift weights inside the user's own HTTPRoute (gateway.networking.k8s.io/v1).

Only the `weight` of the two backendRefs named by the target, in the rule named by
`rule:` (or at that index, or the first), is changed; a match stage adds canary's own
rule, a mirror stage a RequestMirror filter, and both are removed again, so the object
is otherwise written back exactly as it was read. Every write is conditional on the
resourceVersion it read; a 409 means someone edited it in between, so canary reads again
and retries rather than overwrite their change. The Kubernetes client is called only
here, on this router's own executor.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Sequence
from typing import Any

from canary import kube, shapes
from canary.errors import InvalidInput, NotFound, RouterError
from canary.executors import Pool
from canary.routers import write_route
from canary.routers.istio import DECISION, SHAPE, shape_problem
from canary.targets import GatewayBackend, GatewayTarget

GROUP, VERSION, PLURAL = "gateway.networking.k8s.io", "v1", "httproutes"
MATCH_RULE = "canary-match"  # the name of canary's own rule for a match stage


def _is(ref: dict[str, Any], want: GatewayBackend, namespace: str) -> bool:
    """A backendRef to the Service `want` (core group, kind Service, the route's namespace,
    whether or not the ref names it)."""
    return (ref.get("name") == want.name and ref.get("port") == want.port
            and ref.get("group", "") == "" and ref.get("kind", "Service") == "Service"
            and ref.get("namespace", namespace) == namespace)


def _ref(b: GatewayBackend) -> dict[str, Any]:
    # with the schema's defaults written out: the API server stores them, and canary
    # compares what it reads back with what it wrote
    return {"group": "", "kind": "Service", "name": b.name, "port": b.port}


def header_matches(shape: shapes.Shape) -> list[dict[str, str]]:
    """A match stage's headers and cookie as HTTPRoute header matches. Gateway API has
    Exact and RegularExpression: a prefix is a regular expression."""
    out = []
    for r in shape.headers:
        if r.condition.how == "exact":
            out.append({"name": r.name, "type": "Exact", "value": r.condition.value})
        else:
            # anchored: whether an implementation matches the whole value (Envoy) or finds
            # the regex in it (nginx, Go) is implementation-specific; this holds for both
            out.append({"name": r.name, "type": "RegularExpression",
                        "value": f"^(?:{r.condition.regex()})$"})
    for r in shape.cookies:
        out.append({"name": "cookie", "type": "RegularExpression",
                    "value": shapes.cookie_regex(r.name, r.condition)})
    return out


class GatewayRouter:
    def __init__(self, target: GatewayTarget, api: Any) -> None:
        self.target = target
        self._api = api
        self._lock = asyncio.Lock()
        self._pool = Pool(f"kube-gateway-{target.name}"[:40], 2)

    @property
    def _what(self) -> str:
        return f"HTTPRoute {self.target.namespace}/{self.target.http_route}"

    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self._api)

    def _get_route(self) -> dict[str, Any]:
        result: dict[str, Any] = self._custom().get_namespaced_custom_object(
            GROUP, VERSION, self.target.namespace, PLURAL, self.target.http_route,
            _request_timeout=kube.REQUEST_TIMEOUT)
        return result

    def _replace(self, obj: dict[str, Any]) -> None:
        self._custom().replace_namespaced_custom_object(
            GROUP, VERSION, self.target.namespace, PLURAL, self.target.http_route, obj,
            _request_timeout=kube.REQUEST_TIMEOUT)

    async def _read(self) -> dict[str, Any]:
        result: dict[str, Any] = await kube.call_router(self._pool, self._what, self._get_route)
        return result

    async def _write_obj(self, obj: dict[str, Any]) -> None:
        await kube.call_router(self._pool, self._what, self._replace, obj)

    # ---- the rule and its backends ----------------------------------------------------

    def rule(self, route: dict[str, Any]) -> dict[str, Any]:
        rules = [r for r in (route.get("spec") or {}).get("rules") or []
                 if r.get("name") != MATCH_RULE]
        if not rules:
            raise InvalidInput(f"{self._what} has no rules")
        want = self.target.rule
        if want is None:
            first: dict[str, Any] = rules[0]
            return first
        if isinstance(want, int):
            if want >= len(rules):
                raise NotFound(f"{self._what} has no rule at index {want} (it has "
                               f"{len(rules)}); set the target's rule to a name or an index "
                               "below that")
            found: dict[str, Any] = rules[want]
            return found
        for r in rules:
            if r.get("name") == want:
                named: dict[str, Any] = r
                return named
        names = ", ".join(repr(r.get("name")) for r in rules if r.get("name")) or "none named"
        raise NotFound(f"{self._what} has no rule named {want!r} (rules: {names}); set the "
                       "target's rule to one of them, or to an index")

    def _backends(self, rule: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        refs = rule.get("backendRefs") or []
        found = []
        for side, want in (("stable", self.target.stable), ("canary", self.target.canary)):
            ref = next((r for r in refs if _is(r, want, self.target.namespace)), None)
            if ref is None:
                raise InvalidInput(f"{self._what}: the rule has no backendRef for the {side} "
                                   f"version (Service {want.name} port {want.port}); list both "
                                   "backendRefs, the canary with weight 0")
            found.append(ref)
        others = [r for r in refs if not any(r is f for f in found) and r.get("weight", 1)]
        if others:
            raise InvalidInput(f"{self._what}: the rule sends traffic to backends other than "
                               "stable and canary; canary cannot keep weights at 100")
        return found[0], found[1]

    async def get_weight(self) -> int | None:
        try:
            route = await self._read()
            stable, canary = self._backends(self.rule(route))
        except (RouterError, NotFound, InvalidInput):
            return None
        ws, wc = int(stable.get("weight", 1)), int(canary.get("weight", 1))
        if ws + wc == 0:
            return None
        return round(100 * wc / (ws + wc))

    async def decision(self) -> str | None:
        try:
            route = await self._read()
        except (RouterError, NotFound):
            return None
        value = ((route.get("metadata") or {}).get("annotations") or {}).get(DECISION)
        return str(value) if value else None

    async def check(self) -> None:
        """Before a rollout's first step: the HTTPRoute, its rule and both backendRefs."""
        route = await self._read()
        self._backends(self.rule(route))

    # ---- shapes -----------------------------------------------------------------------

    def _mirror_filter(self, percent: int) -> dict[str, Any]:
        return {"type": "RequestMirror",
                "requestMirror": {"backendRef": _ref(self.target.canary), "percent": percent}}

    def _match_rule(self, shape: shapes.Shape, driven: dict[str, Any]) -> dict[str, Any]:
        ours = header_matches(shape)
        base = driven.get("matches") or [{"path": {"type": "PathPrefix", "value": "/"}}]
        matches = [{**copy.deepcopy(m), "headers": [*(m.get("headers") or []), *ours]}
                   for m in base]
        # the rule's filters (rewrites, header changes), timeouts and retries apply to the
        # matched requests too: the canary is judged on what users will send it. Canary's
        # own mirror is not copied: a match and a mirror stage never overlap.
        rest = {k: copy.deepcopy(v) for k, v in driven.items()
                if k not in ("name", "matches", "backendRefs")}
        return {**rest, "name": MATCH_RULE, "matches": matches,
                "backendRefs": [{**_ref(self.target.canary), "weight": 1}]}

    def _strip(self, route: dict[str, Any]) -> None:
        meta = route.get("metadata") or {}
        key = (meta.get("annotations") or {}).get(SHAPE)
        if key is None:
            return
        rules = (route.get("spec") or {}).get("rules") or []
        rules[:] = [r for r in rules if r.get("name") != MATCH_RULE]
        shape = shapes.from_key(key)
        if shape is not None and shape.mirror is not None:
            driven = self.rule(route)
            filters = [f for f in driven.get("filters") or []
                       if f != self._mirror_filter(shape.mirror)]
            if filters:
                driven["filters"] = filters
            else:
                driven.pop("filters", None)
        del meta["annotations"][SHAPE]
        if not meta["annotations"]:
            del meta["annotations"]

    def _add(self, route: dict[str, Any], key: str) -> None:
        shape = shapes.from_key(key)
        if shape is None:
            raise InvalidInput(f"not a shape canary writes: {key}")
        driven = self.rule(route)
        if shape.mirror is not None:
            driven["filters"] = [*(driven.get("filters") or []),
                                 self._mirror_filter(shape.mirror)]
        else:
            problem = shape_problem(shape)
            if problem:
                raise InvalidInput(f"{self._what}: {problem}")
            rules = route["spec"]["rules"]
            if len(rules) >= 16:
                raise InvalidInput(f"{self._what} already has 16 rules, the most an HTTPRoute "
                                   "may have; canary needs one more for a match stage")
            rules.insert(rules.index(driven), self._match_rule(shape, driven))
        route.setdefault("metadata", {}).setdefault("annotations", {})[SHAPE] = key

    async def get_shape(self) -> str | None:
        try:
            route = await self._read()
        except NotFound as e:
            raise RouterError(str(e)) from e
        key: str | None = ((route.get("metadata") or {}).get("annotations") or {}).get(SHAPE)
        rules = (route.get("spec") or {}).get("rules") or []
        ours = [r for r in rules if r.get("name") == MATCH_RULE]
        if key is None:
            return (f"{shapes.EDITED}{self._what} has a rule {MATCH_RULE!r} canary did not "
                    "record" if ours else None)
        shape = shapes.from_key(key)
        try:
            driven = self.rule(route)
        except (NotFound, InvalidInput) as e:
            return f"{shapes.EDITED}{e}"
        if shape is None:
            return f"{shapes.EDITED}{self._what} records a shape canary does not know: {key}"
        if shape.mirror is not None:
            if self._mirror_filter(shape.mirror) not in (driven.get("filters") or []):
                return (f"{shapes.EDITED}{self._what}: canary's RequestMirror filter "
                        f"({shape.mirror}%) was removed or changed")
            return key
        if ours != [self._match_rule(shape, driven)]:
            return (f"{shapes.EDITED}{self._what}: canary's rule {MATCH_RULE!r} was removed or "
                    "changed")
        return key

    async def check_shapes(self, wanted: Sequence[shapes.Shape]) -> None:
        for shape in wanted:
            problem = shape_problem(shape)
            if problem:
                raise InvalidInput(f"target {self.target.name}: {problem}")
        if not wanted:
            return
        # what the API server would refuse at the stage, refused at the start instead
        route = await self._read()
        self._strip(route)
        if any(s.rules for s in wanted) and len(route["spec"]["rules"]) >= 16:
            raise InvalidInput(f"{self._what} already has 16 rules, the most an HTTPRoute may "
                               "have; canary needs one more for a match stage. Merge two "
                               "rules, or leave the match stages out of the policy")
        if any(s.mirror is not None for s in wanted) and \
                len(self.rule(route).get("filters") or []) >= 16:
            raise InvalidInput(f"{self._what}: the rule already has 16 filters, the most a "
                               "rule may have; canary needs one more for a mirror stage")

    # ---- writing ----------------------------------------------------------------------

    async def set_weight(self, weight: int, *, decision: str | None = None,
                         shape: str | None = None) -> None:
        async with self._lock:
            await write_route(self._what, lambda: self._write(weight, decision, shape),
                              self.get_weight, weight)

    async def _write(self, weight: int, decision: str | None, shape: str | None) -> None:
        route = await self._read()
        new = copy.deepcopy(route)
        self._strip(new)
        if shape is not None:
            self._add(new, shape)
        stable, canary = self._backends(self.rule(new))
        ws, wc = int(stable.get("weight", 1)), int(canary.get("weight", 1))
        # weights that already say `weight` stay as the user wrote them (e.g. stable's 1,
        # the schema's default): a match or mirror stage and its rollback move no user
        if not ((weight == 0 and wc == 0 and ws > 0) or (weight == 100 and ws == 0 and wc > 0)):
            stable["weight"], canary["weight"] = 100 - weight, weight
        meta = new.setdefault("metadata", {})
        if decision:
            meta.setdefault("annotations", {})[DECISION] = decision[:2000]
        elif DECISION in (meta.get("annotations") or {}):
            del meta["annotations"][DECISION]
            if not meta["annotations"]:
                del meta["annotations"]
        if new == route:
            return
        await self._write_obj(new)
