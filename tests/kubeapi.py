"""A wire-level double of the Kubernetes API server, for the kinds canary uses:
configmaps, leases, virtualservices, destinationrules and apps/v1 deployments (with their
scale subresource).

The real `kubernetes` client talks to it over HTTP through a generated kubeconfig,
exactly as it would to a cluster. It keeps the API's semantics that canary relies on:
resourceVersion bumps on every write, 409 Conflict for a stale resourceVersion on PUT
and for creating an existing name, 404 with a Status body, merge-patch and JSON-patch,
label selectors on LIST, and 422 Invalid when a VirtualService or DestinationRule fails
the OpenAPI schema of Istio's own CRD (tests/data/istio/), or an HTTPRoute the schema of
the Gateway API's CRD (tests/data/gateway-api/, v1.6.1). An HTTPRoute is stored with the
schema's defaults filled in, as an API server does, and its CEL rules
(x-kubernetes-validations) are evaluated with cel-python; there is no watch.

Deployments keep `metadata.generation` (bumped when the spec changes) and a status the
test drives per Deployment (`rollout[name]`): `completes` (the controller catches up at
once: observedGeneration, updated and available replicas), `stalls` (observed, but no
pod of the new template becomes ready) or `never` (nothing is ever available). Every
Deployment or Scale written is validated against Kubernetes' own schema
(kubernetes-validate); a write that fails it is a 422.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import yaml
from aiohttp import web

from canary.demo.procs import free_port, serve_app

DATA = Path(__file__).parent / "data" / "istio"
KINDS = {
    ("", "v1", "configmaps"): "ConfigMap",
    ("coordination.k8s.io", "v1", "leases"): "Lease",
    ("networking.istio.io", "v1", "virtualservices"): "VirtualService",
    ("networking.istio.io", "v1", "destinationrules"): "DestinationRule",
    ("gateway.networking.k8s.io", "v1", "httproutes"): "HTTPRoute",
    ("apps", "v1", "deployments"): "Deployment",
}
GROUPS = {"VirtualService": "networking.istio.io", "DestinationRule": "networking.istio.io",
          "HTTPRoute": "gateway.networking.k8s.io", "Deployment": "apps"}
K8S_VERSION = "1.30.0"


def _openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI's `nullable: true` is JSON Schema's type [X, "null"]."""
    if isinstance(node, dict):
        out = {k: _openapi_to_jsonschema(v) for k, v in node.items()}
        if out.pop("nullable", False) and "type" in out:
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(node, list):
        return [_openapi_to_jsonschema(x) for x in node]
    return node


def _crd_openapi(path: Path) -> dict[str, Any]:
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def _crd_schema(file: str, data: Path = DATA) -> dict[str, Any]:
    return _openapi_to_jsonschema(_crd_openapi(data / file))  # type: ignore[no-any-return]


GATEWAY_DATA = Path(__file__).parent / "data" / "gateway-api"
HTTPROUTE_OPENAPI = _crd_openapi(GATEWAY_DATA / "httproutes.crd.yaml")
SCHEMAS = {"VirtualService": _crd_schema("virtualservices.crd.yaml"),
           "DestinationRule": _crd_schema("destinationrules.crd.yaml"),
           "HTTPRoute": _crd_schema("httproutes.crd.yaml", GATEWAY_DATA)}
DEFAULTED = {"HTTPRoute": HTTPROUTE_OPENAPI}  # kinds stored with their schema's defaults


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Structural defaulting, as the API server does before validation and storage."""
    if isinstance(obj, dict) and schema.get("type") == "object":
        props = schema.get("properties") or {}
        out = dict(obj)
        for name, sub in props.items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(sub, out[name])
        return out
    if isinstance(obj, list) and "items" in schema:
        return [apply_defaults(schema["items"], x) for x in obj]
    return obj


_CEL: dict[str, Any] = {}


def cel_violations(schema: dict[str, Any], obj: Any, where: str = "") -> list[str]:
    """Every x-kubernetes-validations rule of `schema` that `obj` breaks, evaluated with
    cel-python on the defaulted object, as `where: message`."""
    import celpy

    out: list[str] = []
    for rule in schema.get("x-kubernetes-validations") or []:
        prg = _CEL.get(rule["rule"])
        if prg is None:
            env = celpy.Environment()
            prg = _CEL[rule["rule"]] = env.program(env.compile(rule["rule"]))
        try:
            ok = prg.evaluate({"self": celpy.json_to_cel(obj)})
        except Exception as e:  # a rule that cannot be evaluated on this object fails it
            ok = False
            rule = {**rule, "message": f"{rule.get('message', rule['rule'])} ({e})"}
        if not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
            out.append(f"{where or '(root)'}: {rule.get('message', rule['rule'])}")
    if isinstance(obj, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in obj:
                out += cel_violations(sub, obj[name], f"{where}.{name}" if where else name)
    elif isinstance(obj, list) and "items" in schema:
        for i, x in enumerate(obj):
            out += cel_violations(schema["items"], x, f"{where}[{i}]")
    return out


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {},
                              "status": "Failure", "message": message, "reason": reason,
                              "code": code}, status=code)


@dataclass
class KubeApiDouble:
    port: int = field(default_factory=free_port)
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    writes: list[tuple[float, str, str, str, str]] = field(default_factory=list)
    requests: list[tuple[str, str, str, bool]] = field(default_factory=list)  # verb, group,
    #   plural, named: every request, for checking RBAC against what is really used
    fail_next: list[int] = field(default_factory=list)  # statuses to answer next writes with
    before_write: Callable[[str, str, str], None] | None = None
    validated: list[tuple[str, str | None]] = field(default_factory=list)  # every write's
    #   kind and schema problem (None: valid)
    cel_checked: int = 0
    rollout: dict[str, str] = field(default_factory=dict)  # deployment -> completes|stalls|never
    invalid: list[str] = field(default_factory=list)  # writes kubernetes-validate refused
    _rv: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "canary", "user": {"token": "double-token"}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "canary",
                                                        "namespace": namespace}}]}))
        return path

    # ---- direct access for tests ---------------------------------------------------

    def put(self, plural: str, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Store an object as a user's `kubectl apply` would (schema-checked)."""
        kind = next(k for (g, v, p), k in KINDS.items() if p == plural)
        if kind in DEFAULTED:
            obj = apply_defaults(DEFAULTED[kind], obj)
        problem = self._invalid(kind, obj)
        assert problem is None, problem
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta["resourceVersion"] = str(next(self._rv))
        if kind == "Deployment":
            meta["generation"] = 1
            self._settle(obj, new_template=False)
        self.objects[(plural, namespace, meta["name"])] = obj
        return obj

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.objects[(plural, namespace, name)])

    # ---- HTTP ------------------------------------------------------------------------

    def _invalid(self, kind: str, obj: dict[str, Any]) -> str | None:
        if kind in ("Deployment", "Scale"):
            import kubernetes_validate
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                message = f"{kind} {obj.get('metadata', {}).get('name')!r} is invalid: {e}"
                self.invalid.append(message)
                return message
            return None
        schema = SCHEMAS.get(kind)
        if schema is None:
            return None
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj),
                        key=lambda e: list(e.path))
        name = f'{kind}.{GROUPS[kind]} "{obj.get("metadata", {}).get("name")}" is invalid: '
        if not errors:
            if kind in DEFAULTED:
                broken = cel_violations(DEFAULTED[kind], obj)
                self.cel_checked += 1
                if broken:
                    return name + "; ".join(broken)
            return None
        e = errors[0]
        where = ".".join(str(p) for p in e.path) or "(root)"
        return f"{name}{where}: {e.message}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        # /api/v1/namespaces/{ns}/{plural}[/{name}]
        # /apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}]
        if parts[:1] == ["api"]:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return status(404, "NotFound", f"the server could not find {request.path}")
        if len(rest) < 3 or rest[0] != "namespaces":
            return status(404, "NotFound", f"the server could not find {request.path}")
        ns, plural = rest[1], rest[2]
        name = rest[3] if len(rest) > 3 else None
        if plural == "deployments" and name and rest[4:] == ["scale"]:
            return await self._scale(request, ns, name)
        kind = KINDS.get((group, version, plural))
        if kind is None:
            return status(404, "NotFound", f"the server could not find the requested resource "
                                           f"({group}/{version} {plural})")
        api_version = f"{group}/{version}" if group else version
        key = (plural, ns, name or "")
        method = request.method
        verb = {"GET": "get" if name else "list", "POST": "create", "PUT": "update",
                "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())
        self.requests.append((verb, group, plural, name is not None))
        if method != "GET":
            if self.fail_next:
                code = self.fail_next.pop(0)
                return status(code, "InternalError" if code >= 500 else "Conflict",
                              f"injected failure {code}")
            if self.before_write is not None:
                self.before_write(method, plural, name or "")
        if method == "GET" and name is None:
            selector = request.query.get("labelSelector", "")
            want = dict(x.split("=", 1) for x in selector.split(",") if "=" in x)
            items = [copy.deepcopy(o) for (p, n, _), o in sorted(self.objects.items())
                     if p == plural and n == ns
                     and all(o["metadata"].get("labels", {}).get(k) == v for k, v in want.items())]
            return web.json_response({"apiVersion": api_version, "kind": f"{kind}List",
                                      "metadata": {"resourceVersion": str(next(self._rv))},
                                      "items": items})
        if method == "POST" and name is None:
            obj = await request.json()
            name = obj.get("metadata", {}).get("name")
            if not name:
                return status(422, "Invalid", "metadata.name: Required value")
            if (plural, ns, name) in self.objects:
                return status(409, "AlreadyExists", f'{plural} "{name}" already exists')
            return self._store(kind, api_version, plural, ns, name, obj, request, 201)
        if name is None:
            return status(405, "MethodNotAllowed", f"{method} on a collection")
        current = self.objects.get(key)
        if current is None:
            return status(404, "NotFound", f'{plural} "{name}" not found')
        if method == "GET":
            return web.json_response(current)
        if method == "DELETE":
            del self.objects[key]
            self.writes.append((time.monotonic(), method, plural, name, request.headers.get(
                "User-Agent", "")))
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success"})
        if method == "PUT":
            obj = await request.json()
            rv = obj.get("metadata", {}).get("resourceVersion")
            if rv and rv != current["metadata"]["resourceVersion"]:
                return status(409, "Conflict",
                              f'Operation cannot be fulfilled on {plural} "{name}": the object '
                              "has been modified; please apply your changes to the latest "
                              "version and try again")
            return self._store(kind, api_version, plural, ns, name, obj, request, 200, current)
        if method == "PATCH":
            ctype = request.content_type
            patch = await request.json()
            if ctype == "application/merge-patch+json":
                if not isinstance(patch, dict):
                    return status(400, "BadRequest", "a merge patch must be a JSON object")
                obj = merge_patch(current, patch)
            elif ctype == "application/json-patch+json":
                try:
                    obj = jsonpatch.apply_patch(current, patch)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                    return status(422, "Invalid", f"json patch: {e}")
            else:
                return status(415, "UnsupportedMediaType",
                              f"the body of the request was in an unknown format - accepted "
                              f"media types include: application/json-patch+json, "
                              f"application/merge-patch+json (got {ctype})")
            rv = patch.get("metadata", {}).get("resourceVersion") if isinstance(patch, dict) \
                else None
            if rv and rv != current["metadata"]["resourceVersion"]:
                return status(409, "Conflict", f'Operation cannot be fulfilled on {plural} "{name}"')
            return self._store(kind, api_version, plural, ns, name, obj, request, 200, current)
        return status(405, "MethodNotAllowed", method)

    def _store(self, kind: str, api_version: str, plural: str, ns: str, name: str,
               obj: dict[str, Any], request: web.Request, code: int,
               current: dict[str, Any] | None = None) -> web.Response:
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", kind)
        meta = obj.setdefault("metadata", {})
        if meta.get("name", name) != name:
            return status(400, "BadRequest", "the name of the object does not match the URL")
        if kind in DEFAULTED:
            obj = apply_defaults(DEFAULTED[kind], obj)
            meta = obj["metadata"]
        problem = self._invalid(kind, obj)
        self.validated.append((kind, problem))
        if problem:
            return status(422, "Invalid", problem)
        meta.update(name=name, namespace=ns)
        meta["uid"] = current["metadata"]["uid"] if current else str(uuid.uuid4())
        meta["resourceVersion"] = str(next(self._rv))
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if kind == "Deployment":
            old_gen = int((current or {}).get("metadata", {}).get("generation", 0))
            changed = current is None or current.get("spec") != obj.get("spec")
            meta["generation"] = old_gen + 1 if changed else old_gen
            obj["status"] = (current or {}).get("status", obj.get("status") or {})
            self._settle(obj, new_template=current is not None and
                         current["spec"].get("template") != obj["spec"].get("template"))
        self.objects[(plural, ns, name)] = obj
        self.writes.append((time.monotonic(), request.method, plural, name,
                            request.headers.get("User-Agent", "")))
        return web.json_response(obj, status=code)

    # ---- Deployments -------------------------------------------------------------------

    def _settle(self, dep: dict[str, Any], *, new_template: bool) -> None:
        """What the Deployment controller would make of it, as the test says."""
        name = dep["metadata"]["name"]
        mode = self.rollout.get(name, "completes")
        replicas = int(dep["spec"].get("replicas", 1))
        st = dep.setdefault("status", {})
        if mode == "never":
            st.update(observedGeneration=dep["metadata"]["generation"], replicas=replicas,
                      updatedReplicas=replicas, readyReplicas=0, availableReplicas=0,
                      unavailableReplicas=replicas)
        elif mode == "stalls" and new_template:
            st.update(observedGeneration=dep["metadata"]["generation"], updatedReplicas=0,
                      replicas=replicas)
        elif mode == "stalls":
            st["observedGeneration"] = dep["metadata"]["generation"]
        else:
            st.update(observedGeneration=dep["metadata"]["generation"], replicas=replicas,
                      updatedReplicas=replicas, readyReplicas=replicas,
                      availableReplicas=replicas)
        for k in [k for k, v in st.items() if v == 0 and k != "observedGeneration"]:
            del st[k]  # as the API server leaves zero counts out

    def set_rollout(self, ns: str, name: str, mode: str) -> None:
        """Change how a Deployment's rollout goes, and apply it to its current state."""
        self.rollout[name] = mode
        dep = self.objects[("deployments", ns, name)]
        self._settle(dep, new_template=mode == "stalls")
        dep["metadata"]["resourceVersion"] = str(next(self._rv))

    async def _scale(self, request: web.Request, ns: str, name: str) -> web.Response:
        verb = {"GET": "get", "PUT": "update", "PATCH": "patch"}.get(request.method, "?")
        self.requests.append((verb, "apps", "deployments/scale", True))
        dep = self.objects.get(("deployments", ns, name))
        if dep is None:
            return status(404, "NotFound", f'deployments.apps "{name}" not found')

        def scale_of(d: dict[str, Any]) -> dict[str, Any]:
            return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                    "metadata": {"name": name, "namespace": ns,
                                 "resourceVersion": d["metadata"]["resourceVersion"]},
                    "spec": {"replicas": int(d["spec"].get("replicas", 1))},
                    "status": {"replicas": int(d.get("status", {}).get("replicas", 0))}}
        if request.method == "GET":
            return web.json_response(scale_of(dep))
        if request.method not in ("PUT", "PATCH"):
            return status(405, "MethodNotAllowed", request.method)
        if self.fail_next:
            code = self.fail_next.pop(0)
            return status(code, "InternalError", f"injected failure {code}")
        body = await request.json()
        if request.method == "PATCH":
            if request.content_type != "application/merge-patch+json":
                return status(415, "UnsupportedMediaType", f"got {request.content_type}")
            new_scale = merge_patch(scale_of(dep), body)
        else:
            new_scale = body
        problem = self._invalid("Scale", new_scale)
        if problem:
            return status(422, "Invalid", problem)
        new = copy.deepcopy(dep)
        new["spec"]["replicas"] = int(new_scale["spec"]["replicas"])
        resp = self._store("Deployment", "apps/v1", "deployments", ns, name, new, request, 200,
                           dep)
        if resp.status != 200:
            return resp
        return web.json_response(scale_of(self.objects[("deployments", ns, name)]))

    async def start(self) -> None:
        app = web.Application(client_max_size=10 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = await serve_app(app, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
