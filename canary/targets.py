"""What canary moves traffic for: a target of each router (nginx upstreams, an Istio
VirtualService, a Gateway API HTTPRoute), with its vars, versions, workload and version
probe. Each router's target is its own model, a union discriminated on `router`; the
routers take these as they are."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import KW_ONLY, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass

from canary import schema, validation
from canary.fields import (
    BUILTIN_VARS,
    IDENTIFIER,
    PORT,
    Dns,
    Duration,
    Name,
    NotInFiles,
    PositiveDuration,
    Setting,
    Version,
    a_path,
    an_argument,
)

_ADDRESS = rf"^(?:unix:\S+|\[?[A-Za-z0-9.:-]+\]?:{PORT})$"
_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def _var_name(name: str) -> str:
    if name in BUILTIN_VARS:
        raise ValueError(f"{name!r} is filled by canary itself; pick another name")
    if not re.fullmatch(IDENTIFIER, name):
        raise ValueError("variable names are letters, digits and _")
    return name


def _plain_value(value: object) -> str:
    if isinstance(value, str | int | float):
        return str(value)
    raise ValueError("must be a plain value")


Vars = Annotated[Mapping[Annotated[str, AfterValidator(_var_name),
                                   WithJsonSchema({"pattern": f"^{IDENTIFIER}$"})],
               Annotated[str, BeforeValidator(_plain_value),
                         WithJsonSchema({"type": ["string", "number", "boolean"]})]],
                Field(json_schema_extra=schema.refused_keys(
                    f"^({'|'.join(sorted(BUILTIN_VARS))})$"))]
Argv = Annotated[tuple[Annotated[str, Field(strict=True, min_length=1),
                                AfterValidator(an_argument)], ...], Field(min_length=1)]
Addresses = Annotated[tuple[Annotated[str, Field(strict=True, pattern=_ADDRESS)], ...],
                      Field(min_length=1)]


Promotion = Literal["swap", "return"]


@dataclass(frozen=True, config=_CONFIG)
class VersionProbe:
    """How canary learns what a server runs (README: Checking what a side runs): GET
    http://SERVER/path; the version is the trimmed body, or its `version` field when the
    body is a JSON object."""

    path: Annotated[str, Field(strict=True, pattern=r"^/[\x21-\x7e]*$", max_length=2048)] = "/version"
    """The URL path asked on every server, e.g. /version (default)."""
    timeout: PositiveDuration = 2.0
    """How long one server may take to answer, at most 60s (default 2s)."""

    @field_validator("timeout")
    @classmethod
    def _bounded(cls, value: float) -> float:
        if value > 60:
            raise ValueError("at most 60s: a probe that waits longer holds up a start")
        return value


@dataclass(frozen=True, config=_CONFIG)
class Workload:
    """The Deployment pair canary manages for a Kubernetes target (same namespace)."""

    stable: Dns
    """The Deployment that runs the stable version (same namespace as the target)."""
    canary: Dns
    """The Deployment the new version is deployed to; scaled to 0 when idle."""
    version_label: Annotated[str, Field(strict=True, pattern=r"^([a-z0-9.-]{1,253}/)?"
                                                              r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}"
                                                              r"[A-Za-z0-9])?$")] = "version"
    """The pod-template label naming a Deployment's version (default version)."""
    scale_canary: Literal["proportional", "fixed"] = "proportional"
    """proportional: before each step the canary gets its weight's share of the stable
    replicas (at least 1); fixed: canary leaves the replica count alone."""
    scale_down_delay: Duration = 30.0
    """After weight 0 is in force, how long before the idle Deployment is scaled to 0
    (default 30s)."""

    @model_validator(mode="after")
    def _apart(self) -> Workload:
        if self.stable == self.canary:
            raise ValueError("canary: the stable and canary Deployments must differ")
        return self


# a target with a workload hands over with return: stated in the schema too, so the editor
# and helm refuse `promotion: swap` beside a workload where canary does
_WORKLOAD_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True, json_schema_extra={
    "if": {"required": ["workload"], "properties": {"workload": {"type": "object"}}},
    "then": {"properties": {"promotion": {"not": {"const": "swap"}}}}})
_WORKLOAD_RETURNS = ("promotion: a target with a workload hands over with return (the stable "
                     "Deployment is brought to the new version); remove promotion or set it "
                     "to return")


def _a_path(value: object) -> object:
    """A file's path: "" would name the config's own directory."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("must be a file's path, relative to the config file or absolute")
    return a_path(value) if isinstance(value, str) else value


FilePath = Annotated[Path, BeforeValidator(_a_path),
                     WithJsonSchema({"type": "string", "minLength": 1, "pattern": r"\S"})]


@dataclass(frozen=True, config=_CONFIG)
class _TargetCommon:
    """What a target of every router has. Keyword-only, and described in Field: a subclass
    does not read its base's attribute docstrings."""

    _: KW_ONLY
    policy: Annotated[Name | None, Field(description=(
        "The policy of this target's rollouts when a start names none."))] = None
    vars: Annotated[Vars, Field(description=(
        "Values for {{ name }} in the policy's queries, e.g. {service: web}."))] = field(
        default_factory=dict)
    stable_version: Annotated[Version | None, Field(description=(
        "The stable version when a start names none."))] = None
    name: NotInFiles = ""  # the key it is configured under


@dataclass(frozen=True, config=_CONFIG)
class NginxTarget(_TargetCommon):
    file: FilePath
    """The nginx config file canary writes the upstream block to (it owns the file);
    relative to the config file."""
    upstream: Annotated[str, Field(strict=True, pattern=r"^[A-Za-z0-9_.-]+$")]
    """The name of the upstream block it writes."""
    stable: Addresses
    """Server addresses of the stable version: host:port or unix:PATH."""
    canary: Addresses
    """Server addresses of the canary version, none of them also stable's."""
    test: Argv = ("nginx", "-t")
    """Command run before every reload; if it fails, nginx is not reloaded."""
    reload: Argv = ("nginx", "-s", "reload")
    """Command that makes nginx read the file again."""
    router: Literal["nginx"] = "nginx"
    """nginx: canary writes weighted upstream servers and reloads nginx."""
    # match and mirror stages: a second file canary owns, included in the server block
    # (README "Traffic shapes"); `file` then also holds the maps that choose the upstream
    server_file: FilePath | None = None
    """For match and mirror stages: a file canary owns, included in the server block
    (README: Traffic shapes)."""
    promotion: Promotion = "swap"
    """How a release is carried through: swap (default: the sides take turns) or return
    (traffic goes back to the stable side once it runs the new version)."""
    version_probe: VersionProbe | None = None
    """How canary asks each server what it runs; a start is refused when a side runs an
    unexpected version."""

    @model_validator(mode="after")
    def _sides_apart(self) -> NginxTarget:
        if set(self.stable) & set(self.canary):
            raise ValueError("canary: an address cannot be both stable and canary")
        if self.server_file is not None and self.server_file == self.file:
            raise ValueError("server_file: must be another file than `file` (one is included "
                             "in the http block, the other in the server block)")
        return self


@dataclass(frozen=True, config=_CONFIG)
class IstioDestination:
    host: Setting
    """The destination's host, e.g. api.prod.svc.cluster.local."""
    subset: Setting | None = None
    """The DestinationRule subset of this version, e.g. stable."""


@dataclass(frozen=True, config=_WORKLOAD_CONFIG)
class IstioTarget(_TargetCommon):
    namespace: Dns
    """The namespace of the VirtualService."""
    virtual_service: Dns
    """The VirtualService whose route weights canary sets."""
    stable: IstioDestination
    """The stable version's destination."""
    canary: IstioDestination
    """The canary version's destination."""
    route: Setting | None = None
    """The name of the http route to weigh; default: the first."""
    router: Literal["istio"] = "istio"
    """istio: canary sets the weights of a VirtualService's route."""
    # default: return with a workload (the stable Deployment is brought to the new
    # version), else swap; see promotion_of
    promotion: Promotion | None = None
    """swap or return; default return with a workload (the stable Deployment is brought to
    the new version), else swap."""
    workload: Workload | None = None
    """The Deployment pair canary waits for, scales and hands over."""

    @model_validator(mode="after")
    def _workload_returns(self) -> IstioTarget:
        if self.stable == self.canary:
            raise ValueError("canary: must name another host or subset than stable (the "
                             "weights would move traffic from a destination to itself)")
        if self.workload is not None and self.promotion == "swap":
            raise ValueError(_WORKLOAD_RETURNS)
        return self


_SECTION_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # Gateway API's SectionName


def _rule(value: object) -> str | int:
    """An HTTPRoute rule: its name, or its index among the route's rules."""
    value = validation.whole(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 64:
        return value
    if isinstance(value, str) and 0 < len(value) <= 253 and _SECTION_NAME.fullmatch(value):
        return value
    raise ValueError("must be the rule's name (lowercase letters, digits and '-', as in the "
                     "HTTPRoute), or its index (0 for the first rule); leave it out for the "
                     "first rule")


@dataclass(frozen=True, config=_CONFIG)
class GatewayBackend:
    """A backendRef of the HTTPRoute rule: a Service in the route's namespace."""

    name: Dns
    """The Service's name, as in the rule's backendRefs."""
    port: Annotated[int, Field(strict=True, ge=1, le=65535), BeforeValidator(validation.whole)]
    """The Service's port, as in the rule's backendRefs."""


@dataclass(frozen=True, config=_WORKLOAD_CONFIG)
class GatewayTarget(_TargetCommon):
    """A Gateway API HTTPRoute (gateway.networking.k8s.io/v1) whose rule carries both
    backendRefs (README: Traffic shapes)."""

    namespace: Dns
    """The namespace of the HTTPRoute and of both Services."""
    http_route: Dns
    """The HTTPRoute (gateway.networking.k8s.io/v1) whose rule canary drives."""
    stable: GatewayBackend
    """The stable version's backendRef in the rule."""
    canary: GatewayBackend
    """The canary version's backendRef in the rule (weight 0 between rollouts)."""
    rule: Annotated[str | int, PlainValidator(_rule),
                    WithJsonSchema({"type": ["string", "integer"], "minimum": 0,
                                    "maximum": 63, "minLength": 1, "maxLength": 253,
                                    "pattern": _SECTION_NAME.pattern})] | None = None
    """The rule's name, or its index among the route's rules; default the first rule."""
    router: Literal["gateway"] = "gateway"
    """gateway: a Gateway API HTTPRoute."""
    promotion: Promotion | None = None
    """swap or return; default return with a workload (the stable Deployment is brought to
    the new version), else swap."""
    workload: Workload | None = None
    """The Deployment pair canary waits for, scales and hands over."""

    @model_validator(mode="after")
    def _sides_apart(self) -> GatewayTarget:
        if self.stable == self.canary:
            raise ValueError("canary: must name another Service or port than stable")
        if self.workload is not None and self.promotion == "swap":
            raise ValueError(_WORKLOAD_RETURNS)
        return self


Target = NginxTarget | IstioTarget | GatewayTarget
ROUTERS = ("nginx", "istio", "gateway")


def promotion_of(target: Target) -> Promotion:
    """How a release on this target is carried through (interface.md section 5)."""
    if target.promotion is not None:
        return target.promotion
    return "return" if getattr(target, "workload", None) is not None else "swap"


TargetField = Annotated[
    Annotated[NginxTarget, validation.tag("router", "nginx")]
    | Annotated[IstioTarget, validation.tag("router", "istio")]
    | Annotated[GatewayTarget, validation.tag("router", "gateway")],
    validation.union(validation.kind_of("router", ROUTERS), "target_router", "router",
                     "must be nginx, istio or gateway",
                     "must be a mapping with router: nginx, istio or gateway")]


# what canary validate says of a bad value in a target's field (validation.problems)
MESSAGES = {
    "upstream": "letters, digits, '.', '_' and '-' only",
    "policy": "must be 1-63 letters, digits, '.', '_' or '-'",
    **dict.fromkeys(("file", "server_file"), "must be a file's path, relative to the config "
                                             "file or absolute"),
    **dict.fromkeys(("stable[]", "canary[]"), "{value} is not host:port or unix:PATH"),
    "stable_version": "must be 1-128 letters, digits or ._:+- starting with a letter or digit",
    **dict.fromkeys(("namespace", "virtual_service", "http_route"),
                    "must be a Kubernetes name (lowercase letters, digits, '-' and '.'; at most "
                    "253 characters)"),
    "port": "must be a port number from 1 to 65535",
    **dict.fromkeys(("stable.name", "canary.name"), "must be a Service's name (lowercase "
                    "letters, digits, '-' and '.')"),
    **dict.fromkeys(("test", "reload"), "must be a non-empty list of strings (a command and "
                                        "its arguments)"),
    **dict.fromkeys(("stable", "canary"), "must be a non-empty list of host:port or unix:PATH "
                                          "addresses"),
    "vars": "must be a mapping of variable name -> value, like {service: web}",
    "promotion": "must be swap (the sides take turns) or return (traffic goes back to the "
                 "stable side once it runs the new version)",
    "path": "must be an absolute URL path like /version (no spaces)",
    "scale_canary": "must be proportional (canary replicas follow the weight) or fixed",
    **dict.fromkeys(("workload.stable", "workload.canary"), "must be the name of a Deployment "
                    "(lowercase letters, digits, '-' and '.')"),
    "version_label": "must be a Kubernetes label key, like version or app.kubernetes.io/version",
}
