"""The API's OpenAPI 3.0 description, served at /api/v1/openapi.json and used to fuzz it."""

from __future__ import annotations

from typing import Any

_ERR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _responses(ok: int, ok_schema: dict[str, Any], *errors: int) -> dict[str, Any]:
    out: dict[str, Any] = {str(ok): {"description": "ok", **_json(ok_schema)}}
    for code in errors:
        out[str(code)] = {"description": "error", **_json(_ERR)}
    return out


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_ROLLOUT = {"$ref": "#/components/schemas/Rollout"}
_SUMMARY = {"$ref": "#/components/schemas/RolloutSummary"}
_AUTH: list[dict[str, list[str]]] = [{"bearer": []}]


def _override(kind: str, role: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    props: dict[str, Any] = {"reason": {"type": "string", "minLength": 1, "maxLength": 1000}}
    props.update(extra or {})
    return {"post": {
        "summary": f"{kind} a rollout (role {role})", "security": _AUTH, "parameters": [_ID],
        "requestBody": {"required": True, **_json({
            "type": "object", "required": ["reason"], "properties": props,
            "additionalProperties": False})},
        "responses": _responses(200, _ROLLOUT, 400, 401, 403, 404, 409, 413),
    }}


SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "canary", "version": "1", "description":
             "Staged canary releases with automatic rollback. Roles: viewer < pipeline < oncall. "
             "Any call but /healthz and /readyz may be answered 503 with Retry-After when "
             "too many of its kind (reads, writes) are in flight: retry after that long."},
    "paths": {
        "/healthz": {"get": {"summary": "liveness", "responses": _responses(200, {"type": "object"})}},
        "/readyz": {"get": {"summary": "readiness",
                            "responses": _responses(200, {"type": "object"}, 503)}},
        "/api/v1/targets": {"get": {"summary": "configured targets", "security": _AUTH,
                                    "responses": _responses(200, {"type": "object"}, 401, 403)}},
        "/api/v1/policies": {"get": {"summary": "loaded policies", "security": _AUTH,
                                     "responses": _responses(200, {"type": "object"}, 401, 403)}},
        "/api/v1/rollouts": {
            "get": {"summary": "rollouts, newest first, a page at a time; each without "
                               "its events (GET /api/v1/rollouts/{id} has them)",
                    "security": _AUTH,
                    "parameters": [
                        {"name": "target", "in": "query", "required": False,
                         "description": "only this target's rollouts",
                         "schema": {"type": "string"}},
                        {"name": "state", "in": "query", "required": False,
                         "description": "only rollouts in these states, comma-separated; "
                                        "`active` stands for every state not final",
                         "schema": {"type": "string"}},
                        {"name": "limit", "in": "query", "required": False,
                         "description": "rollouts per page",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 500,
                                    "default": 50}},
                        {"name": "before", "in": "query", "required": False,
                         "description": "a rollout id: the page starts with the rollout "
                                        "started just before it (pass the previous page's "
                                        "`next`)",
                         "schema": {"type": "string"}}],
                    "responses": _responses(200, {
                        "type": "object", "required": ["rollouts", "next"], "properties": {
                            "rollouts": {"type": "array", "items": _SUMMARY},
                            "next": {"type": "string", "nullable": True,
                                     "description": "the `before` of the next page; null "
                                                    "on the last page"}}},
                        400, 401, 403, 503)},
            "post": {"summary": "start a rollout (role pipeline)", "security": _AUTH,
                     "requestBody": {"required": True, **_json({
                         "type": "object", "required": ["target", "canary_version"],
                         "additionalProperties": False,
                         "properties": {
                             "target": {"type": "string"},
                             "canary_version": {"type": "string",
                                                "pattern": "^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$"},
                             "stable_version": {"type": "string",
                                                "pattern": "^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$"},
                             "policy": {"type": "string"}}})},
                     "responses": _responses(201, _ROLLOUT, 400, 401, 403, 404, 409, 413)},
        },
        "/api/v1/rollouts/{id}": {"get": {
            "summary": "one rollout", "security": _AUTH, "parameters": [_ID],
            "responses": _responses(200, _ROLLOUT, 401, 403, 404)}},
        "/api/v1/rollouts/{id}/pause": _override("pause", "oncall"),
        "/api/v1/rollouts/{id}/resume": _override("resume", "oncall"),
        "/api/v1/rollouts/{id}/promote": _override("promote", "oncall",
                                                   {"full": {"type": "boolean"}}),
        "/api/v1/rollouts/{id}/abort": _override("abort", "pipeline"),
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"],
                      "properties": {"error": {"type": "string"}}},
            "Rollout": {"type": "object", "required": [
                "id", "target", "policy", "canary_version", "stable_version", "state", "stage",
                "weight", "reason", "started_at", "updated_at", "gates", "events"],
                "properties": {
                    "id": {"type": "string"}, "target": {"type": "string"},
                    "policy": {"type": "string"}, "canary_version": {"type": "string"},
                    "stable_version": {"type": "string", "nullable": True},
                    "state": {"type": "string", "enum": [
                        "progressing", "paused", "rolling_back", "succeeded", "rolled_back"]},
                    "stage": {"type": "integer"}, "weight": {"type": "integer"},
                    "applied_weight": {"type": "integer", "nullable": True},
                    "reason": {"type": "string", "nullable": True},
                    "paused_for": {"type": "string", "nullable": True},
                    "started_at": {"type": "string"}, "updated_at": {"type": "string"},
                    "gates": {"type": "array", "items": {"type": "object"}},
                    "events": {"type": "array", "items": {"type": "object"}}}},
        },
    },
}
_FULL = SPEC["components"]["schemas"]["Rollout"]
SPEC["components"]["schemas"]["RolloutSummary"] = {
    "type": "object", "description": "a rollout as listed: every field but `events`",
    "required": [f for f in _FULL["required"] if f != "events"],
    "properties": {k: v for k, v in _FULL["properties"].items() if k != "events"}}
