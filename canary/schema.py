"""JSON Schemas of canary's files, from the same models that validate them.

`canary schema policy|config` prints them; the editor's YAML language server, the Helm
chart's values.schema.json and the OpenAPI description are made from these.
"""

from __future__ import annotations

from typing import Any

SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"


def policy_schema() -> dict[str, Any]:
    from pydantic import TypeAdapter

    from canary.policy import Policy

    return {"$schema": SCHEMA_DRAFT, **TypeAdapter(Policy).json_schema()}


def config_schema() -> dict[str, Any]:
    from canary.config import ConfigDoc

    return {"$schema": SCHEMA_DRAFT, **ConfigDoc.model_json_schema()}


SCHEMAS = {"policy": policy_schema, "config": config_schema}
