"""The API's OpenAPI 3.1 description, generated from the body models (api/bodies.py, and
the rollout's view in model.py), served at /api/v1/openapi.json and used to fuzz the API
with every response checked against it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from canary.api import bodies
from canary.model import Phase, RolloutView

_REF = "#/components/schemas/{model}"
_MODELS: list[type[BaseModel]] = [
    bodies.StartRollout, bodies.Override, bodies.Promote, bodies.Error, RolloutView,
    bodies.RolloutList, bodies.TargetList, bodies.TargetDetail, bodies.PolicyList,
    bodies.Health, bodies.Ready, bodies.AlertmanagerWebhook, bodies.AlertsAnswer,
    bodies.ReadingsView, bodies.WhoAmI]


def _schemas() -> dict[str, Any]:
    _, top = models_json_schema([(m, "validation") for m in _MODELS], ref_template=_REF)
    schemas: dict[str, Any] = top["$defs"]
    return schemas


def _ref(model: type[BaseModel] | str) -> dict[str, str]:
    name = model if isinstance(model, str) else model.__name__
    return {"$ref": _REF.format(model=name)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _responses(ok: int, model: type[BaseModel], *errors: int) -> dict[str, Any]:
    out: dict[str, Any] = {str(ok): {"description": "ok", **_json(_ref(model))}}
    for code in errors:
        out[str(code)] = {"description": "error", **_json(_ref(bodies.Error))}
    return out


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
# `state=`: one or more states or `active`, separated by commas (the API refuses others)
_STATE = "(?:" + "|".join([*(p.value for p in Phase), "active"]) + ")"
_STATES = rf"^[\s,]*{_STATE}\s*(?:,\s*(?:{_STATE}\s*)?)*$"
_AUTH: list[dict[str, list[str]]] = [{"bearer": []}]
_WRITE_ERRORS = (400, 401, 403, 404, 408, 409, 413, 503)  # 408: a body that stalls


def _override(kind: str, role: str, body: type[BaseModel]) -> dict[str, Any]:
    return {"post": {
        "summary": f"{kind} a rollout (role {role})", "security": _AUTH, "parameters": [_ID],
        "requestBody": {"required": True, **_json(_ref(body))},
        "responses": _responses(200, RolloutView, *_WRITE_ERRORS),
    }}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "canary", "version": "1", "description":
             "Staged canary releases with automatic rollback. Roles: viewer < pipeline < oncall. "
             "Any call but /healthz and /readyz may be answered 503 with Retry-After when "
             "too many of its kind (reads, writes) are in flight: retry after that long."},
    "paths": {
        "/healthz": {"get": {"summary": "liveness", "responses": _responses(200, bodies.Health)}},
        "/readyz": {"get": {"summary": "readiness",
                            "responses": _responses(200, bodies.Ready, 503)}},
        "/api/v1/targets": {"get": {"summary": "configured targets", "security": _AUTH,
                                    "responses": _responses(200, bodies.TargetList, 401, 403)}},
        "/api/v1/targets/{name}": {"get": {
            "summary": "one target: which side serves, where the next version goes, what "
                       "each side runs", "security": _AUTH,
            "parameters": [{"name": "name", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": _responses(200, bodies.TargetDetail, 401, 403, 404)}},
        "/api/v1/policies": {"get": {"summary": "loaded policies", "security": _AUTH,
                                     "responses": _responses(200, bodies.PolicyList, 401, 403)}},
        "/api/v1/rollouts": {
            "get": {"summary": "rollouts, newest first, a page at a time; each without "
                               "its events (GET /api/v1/rollouts/{id} has them)",
                    "security": _AUTH,
                    "parameters": [
                        _query("target", {"type": "string"}, "only this target's rollouts"),
                        _query("state", {"type": "string", "pattern": _STATES},
                               "only rollouts in these states, comma-separated; `active` "
                               "stands for every state not final"),
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": 500,
                                         "default": 50}, "rollouts per page"),
                        _query("before", {"type": "string"},
                               "a rollout id: the page starts with the rollout started just "
                               "before it (pass the previous page's `next`)")],
                    "responses": _responses(200, bodies.RolloutList, 400, 401, 403, 503)},
            "post": {"summary": "start a rollout (role pipeline)", "security": _AUTH,
                     "requestBody": {"required": True, **_json(_ref(bodies.StartRollout))},
                     "responses": _responses(201, RolloutView, *_WRITE_ERRORS)},
        },
        "/api/v1/rollouts/{id}": {"get": {
            "summary": "one rollout", "security": _AUTH, "parameters": [_ID],
            "responses": _responses(200, RolloutView, 401, 403, 404, 503)}},
        "/api/v1/rollouts/{id}/readings": {"get": {
            "summary": "every gate's readings and the weight over the rollout's life",
            "security": _AUTH, "parameters": [_ID],
            "responses": _responses(200, bodies.ReadingsView, 401, 403, 404, 503)}},
        "/api/v1/rollouts/{id}/watch": {"get": {
            "summary": "Server-Sent Events: `rollout` events carrying the rollout's JSON "
                       "each time it changes, until it is final; a comment line as a "
                       "heartbeat every 15 s",
            "security": _AUTH, "parameters": [_ID],
            "responses": {"200": {"description": "an event stream",
                                  "content": {"text/event-stream": {"schema": {
                                      "type": "string"}}}},
                          **{str(c): {"description": "error", **_json(_ref(bodies.Error))}
                             for c in (401, 403, 404, 503)}}}},
        "/api/v1/whoami": {"get": {
            "summary": "the calling token's name, role and what it may do",
            "security": _AUTH, "responses": _responses(200, bodies.WhoAmI, 401, 503)}},
        "/api/v1/rollouts/{id}/pause": _override("pause", "oncall", bodies.Override),
        "/api/v1/rollouts/{id}/resume": _override("resume", "oncall", bodies.Override),
        "/api/v1/rollouts/{id}/promote": _override("promote", "oncall", bodies.Promote),
        "/api/v1/rollouts/{id}/abort": _override("abort", "pipeline", bodies.Override),
        "/api/v1/alerts": {"post": {
            "summary": "an Alertmanager webhook (version 4): firing alerts matching an active "
                       "rollout's policy `alerts` roll it back (role pipeline)",
            "security": _AUTH,
            "requestBody": {"required": True, **_json(_ref(bodies.AlertmanagerWebhook))},
            "responses": _responses(200, bodies.AlertsAnswer, 400, 401, 403, 408, 413, 503)}},
        "/api/v1/rollouts/{id}/handover": _override("handover", "pipeline", bodies.Override),
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": _schemas(),
    },
}
