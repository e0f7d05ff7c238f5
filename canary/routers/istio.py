"""Istio: shift weights inside the user's own VirtualService.

Only the `weight` of the two destinations named by the target (in the http route named
by `route:`, or the first) is changed; the object is otherwise written back exactly as it
was read, fields canary does not know included. Every write is conditional on the
resourceVersion it read; a 409 means someone edited it in between, so canary reads again
and retries rather than overwrite their change.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Sequence
from typing import Any

from canary import kube, shapes
from canary.errors import InvalidInput, NotFound, RouterError, StoreConflict
from canary.executors import Pool
from canary.routers import write_route
from canary.targets import IstioDestination, IstioTarget

GROUP, VERSION = "networking.istio.io", "v1"
# a rollback decided while the state store could not record it; cleared by the next write
DECISION = "canary.dev/decision"
# the match or mirror canary added (a shapes.Shape key); removed with what it added
SHAPE = "canary.dev/shape"
MATCH_ROUTE = "canary-match"  # the name of canary's own http route, at the top


def _istio_value(c: shapes.Condition) -> dict[str, str]:
    return {c.how: c.value}


def header_match(shape: shapes.Shape) -> dict[str, dict[str, str]]:
    """A match stage's headers and cookie as an Istio `headers` match."""
    out = {r.name: _istio_value(r.condition) for r in shape.headers}
    for r in shape.cookies:
        out["cookie"] = {"regex": shapes.cookie_regex(r.name, r.condition)}
    return out


def shape_problem(shape: shapes.Shape) -> str | None:
    """What a mesh matching on whole headers cannot do with this shape."""
    if len(shape.cookies) > 1:
        return "match at most one cookie per stage (both match the one Cookie header)"
    if shape.cookies and any(r.name == "cookie" for r in shape.headers):
        return "match either the cookie header or a cookie, not both"
    return None


def _matches(route_dest: dict[str, Any], want: IstioDestination) -> bool:
    d = route_dest.get("destination") or {}
    return bool(d.get("host") == want.host and d.get("subset") == want.subset)


def _same_host(rule_host: str, host: str, namespace: str) -> bool:
    """A DestinationRule's host may be short (`api`) or fully qualified."""
    short = host.split(".")[0]
    return rule_host in (host, short, f"{short}.{namespace}", f"{short}.{namespace}.svc",
                         f"{short}.{namespace}.svc.cluster.local")


class IstioRouter:
    def __init__(self, target: IstioTarget, api: Any) -> None:
        self.target = target
        self._api = api
        self._lock = asyncio.Lock()
        self._pool = Pool(f"kube-router-{target.name}"[:40], 2)

    @property
    def _what(self) -> str:
        return f"VirtualService {self.target.namespace}/{self.target.virtual_service}"

    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self._api)

    def _get(self, plural: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._custom().get_namespaced_custom_object(
            GROUP, VERSION, self.target.namespace, plural, name,
            _request_timeout=kube.REQUEST_TIMEOUT)
        return result

    def _replace(self, obj: dict[str, Any]) -> None:
        self._custom().replace_namespaced_custom_object(
            GROUP, VERSION, self.target.namespace, "virtualservices",
            self.target.virtual_service, obj, _request_timeout=kube.REQUEST_TIMEOUT)

    def _list(self, plural: str) -> list[dict[str, Any]]:
        result = self._custom().list_namespaced_custom_object(
            GROUP, VERSION, self.target.namespace, plural, _request_timeout=kube.REQUEST_TIMEOUT)
        items: list[dict[str, Any]] = result.get("items", [])
        return items

    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        return await kube.call_router(self._pool, what, fn, *args)

    def route(self, vs: dict[str, Any]) -> dict[str, Any]:
        routes = [r for r in (vs.get("spec") or {}).get("http") or []
                  if r.get("name") != MATCH_ROUTE]
        if not routes:
            raise InvalidInput(f"{self._what} has no http routes")
        if self.target.route is None:
            first: dict[str, Any] = routes[0]
            return first
        for r in routes:
            if r.get("name") == self.target.route:
                found: dict[str, Any] = r
                return found
        names = ", ".join(repr(r.get("name")) for r in routes)
        raise NotFound(f"{self._what} has no http route named {self.target.route!r} "
                       f"(routes: {names}); set the target's route to one of them")

    def _destinations(self, route: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        entries = route.get("route") or []
        found = []
        for side, want in (("stable", self.target.stable), ("canary", self.target.canary)):
            entry = next((e for e in entries if _matches(e, want)), None)
            if entry is None:
                sub = f" subset {want.subset}" if want.subset else ""
                raise InvalidInput(f"{self._what}: the route has no destination for the {side} "
                                   f"version (host {want.host}{sub}); list both destinations, "
                                   "the canary with weight 0")
            found.append(entry)
        others = [e for e in entries if not any(e is f for f in found) and e.get("weight")]
        if others:
            raise InvalidInput(f"{self._what}: the route sends traffic to destinations other "
                               "than stable and canary; canary cannot keep weights at 100")
        return found[0], found[1]

    async def get_weight(self) -> int | None:
        try:
            vs = await self._call(self._what, self._get, "virtualservices",
                                  self.target.virtual_service)
            stable, canary = self._destinations(self.route(vs))
        except (RouterError, NotFound, InvalidInput, StoreConflict):
            return None
        ws, wc = stable.get("weight"), canary.get("weight")
        if ws is None and wc is None:
            return None
        return int(wc or 0)

    async def decision(self) -> str | None:
        try:
            vs = await self._call(self._what, self._get, "virtualservices",
                                  self.target.virtual_service)
        except (RouterError, NotFound, StoreConflict):
            return None
        value = ((vs.get("metadata") or {}).get("annotations") or {}).get(DECISION)
        return str(value) if value else None

    async def set_weight(self, weight: int, *, decision: str | None = None,
                         shape: str | None = None) -> None:
        async with self._lock:
            await write_route(self._what, lambda: self._write(weight, decision, shape),
                              self.get_weight, weight)

    def _canary_dest(self) -> dict[str, str]:
        d = {"host": self.target.canary.host}
        if self.target.canary.subset:
            d["subset"] = self.target.canary.subset
        return d

    def _match_route(self, shape: shapes.Shape, driven: dict[str, Any]) -> dict[str, Any]:
        ours = header_match(shape)
        matches = [{**copy.deepcopy(m), "headers": {**(m.get("headers") or {}), **ours}}
                   for m in driven.get("match") or []] or [{"headers": ours}]
        # the route's rewrite, headers, timeout, retries, ... apply to the matched requests
        # too: the canary is judged on what users will send it. Not its mirror: users'
        # mirroring is the driven route's, and canary's own never overlaps a match stage.
        rest = {k: copy.deepcopy(v) for k, v in driven.items()
                if k not in ("name", "match", "route", "mirror", "mirrorPercentage", "mirrors")}
        return {**rest, "name": MATCH_ROUTE, "match": matches,
                "route": [{"destination": self._canary_dest()}]}

    def _strip(self, vs: dict[str, Any]) -> None:
        """Remove what canary added for a shape, leaving the user's routes as they wrote
        them (a match route canary did not record is someone's edit: left for drift)."""
        meta = vs.get("metadata") or {}
        key = (meta.get("annotations") or {}).get(SHAPE)
        if key is None:
            return
        shape = shapes.from_key(key)
        http = (vs.get("spec") or {}).get("http") or []
        if http and http[0].get("name") == MATCH_ROUTE:
            del http[0]
        if shape is not None and shape.mirror is not None:
            driven = self.route(vs)
            driven.pop("mirror", None)
            driven.pop("mirrorPercentage", None)
        del meta["annotations"][SHAPE]
        if not meta["annotations"]:
            del meta["annotations"]

    def _add(self, vs: dict[str, Any], key: str) -> None:
        shape = shapes.from_key(key)
        if shape is None:
            raise InvalidInput(f"not a shape canary writes: {key}")
        driven = self.route(vs)
        if shape.mirror is not None:
            if "mirror" in driven or "mirrors" in driven:
                raise InvalidInput(f"{self._what}: the route already mirrors traffic; canary "
                                   "does not replace a mirror it did not add")
            driven["mirror"] = self._canary_dest()
            driven["mirrorPercentage"] = {"value": float(shape.mirror)}
        else:
            problem = shape_problem(shape)
            if problem:
                raise InvalidInput(f"{self._what}: {problem}")
            vs["spec"]["http"].insert(0, self._match_route(shape, driven))
        vs.setdefault("metadata", {}).setdefault("annotations", {})[SHAPE] = key

    async def get_shape(self) -> str | None:
        try:
            vs = await self._call(self._what, self._get, "virtualservices",
                                  self.target.virtual_service)
        except (NotFound, StoreConflict) as e:
            raise RouterError(str(e)) from e
        key: str | None = ((vs.get("metadata") or {}).get("annotations") or {}).get(SHAPE)
        http = (vs.get("spec") or {}).get("http") or []
        ours = [r for r in http if r.get("name") == MATCH_ROUTE]
        if key is None:
            return (f"{shapes.EDITED}{self._what} has a route {MATCH_ROUTE!r} canary did not "
                    "record" if ours else None)
        shape = shapes.from_key(key)
        try:
            driven = self.route(vs)
        except (NotFound, InvalidInput) as e:
            return f"{shapes.EDITED}{e}"
        if shape is None:
            return f"{shapes.EDITED}{self._what} records a shape canary does not know: {key}"
        if shape.mirror is not None:
            if (driven.get("mirror") != self._canary_dest()
                    or (driven.get("mirrorPercentage") or {}).get("value") != shape.mirror):
                return (f"{shapes.EDITED}{self._what}: canary's mirror to the canary "
                        f"({shape.mirror}%) was removed or changed")
            return key
        if not http or http[0] != self._match_route(shape, driven):
            return (f"{shapes.EDITED}{self._what}: canary's match route {MATCH_ROUTE!r} was "
                    "removed, moved or changed")
        return key

    async def check_shapes(self, wanted: Sequence[shapes.Shape]) -> None:
        for shape in wanted:
            problem = shape_problem(shape)
            if problem:
                raise InvalidInput(f"target {self.target.name}: {problem}")
        if any(s.mirror is not None for s in wanted):
            vs = await self._call(self._what, self._get, "virtualservices",
                                  self.target.virtual_service)
            driven = self.route(vs)
            key = ((vs.get("metadata") or {}).get("annotations") or {}).get(SHAPE)
            if ("mirror" in driven or "mirrors" in driven) and key is None:
                raise InvalidInput(f"{self._what}: the route already mirrors traffic; a mirror "
                                   "stage would replace it. Remove the mirror stage or the "
                                   "route's mirror")

    async def _write(self, weight: int, decision: str | None = None,
                     shape: str | None = None) -> None:
        vs = await self._call(self._what, self._get, "virtualservices", self.target.virtual_service)
        new = copy.deepcopy(vs)
        self._strip(new)
        if shape is not None:
            self._add(new, shape)
        stable, canary = self._destinations(self.route(new))
        # weights that already say `weight` stay as the user wrote them (a canary with no
        # weight is at 0): a match or mirror stage and its rollback move no user
        if (int(stable.get("weight") or 0), int(canary.get("weight") or 0)) != (100 - weight,
                                                                                 weight):
            stable["weight"], canary["weight"] = 100 - weight, weight
        meta = new.setdefault("metadata", {})
        if decision:
            meta.setdefault("annotations", {})[DECISION] = decision[:2000]
        elif DECISION in (meta.get("annotations") or {}):
            del meta["annotations"][DECISION]
            if not meta["annotations"]:
                del meta["annotations"]
        if new == vs:
            return
        await self._call(self._what, self._replace, new)

    async def check(self) -> None:
        """Everything a rollout will need, before its first step: the VirtualService, its
        route, both destinations, and the DestinationRule subsets they name."""
        vs = await self._call(self._what, self._get, "virtualservices", self.target.virtual_service)
        self._destinations(self.route(vs))
        for side, dest in (("stable", self.target.stable), ("canary", self.target.canary)):
            if dest.subset is None:
                continue
            rules = await self._call(f"DestinationRules in {self.target.namespace}", self._list,
                                     "destinationrules")
            subsets = {s.get("name") for r in rules
                       if _same_host((r.get("spec") or {}).get("host", ""), dest.host,
                                     self.target.namespace)
                       for s in (r.get("spec") or {}).get("subsets") or []}
            if dest.subset not in subsets:
                raise InvalidInput(f"no DestinationRule in {self.target.namespace} defines subset "
                                   f"{dest.subset!r} for host {dest.host} (the {side} version); "
                                   "define it so Istio knows which pods are which")
