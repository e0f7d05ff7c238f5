"""The controller config (`canary serve --config FILE`): listen address, state, Prometheus,
policies, tokens and targets. Its shape is written once, as models (ConfigDoc); what only
the machine can tell (files, environment variables) is checked after, with file:line."""

from __future__ import annotations

import enum
import fnmatch
import os
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass as std_dataclass
from dataclasses import field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic.json_schema import SkipJsonSchema

from canary import policy as policy_mod
from canary import validation, yamlsrc
from canary.errors import Problem, ValidationFailed
from canary.model import VERSION_PATTERN


class Role(enum.IntEnum):
    VIEWER = 1
    PIPELINE = 2
    ONCALL = 3


# ---- the config's shape: one definition each -------------------------------------------------
#
# Targets, tokens and leader election are frozen pydantic dataclasses: the same class
# validates the file, gives the JSON Schema (`canary schema config`) and is what the
# controller uses. Config itself is what the file resolves to (paths made absolute,
# secrets located), so the file's shape is ConfigDoc below.

_ADDRESS = r"^(?:unix:\S+|\[?[A-Za-z0-9.:-]+\]?:\d{1,5})$"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_DNS = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
_LISTEN = re.compile(r"\[?([^\]]*?)\]?:(\d{1,5})")
# headers that carry credentials: their values belong in a file or the environment
_SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie"}
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# a target name, or a glob over target names: *, ?, [abc], [!abc], [a-z]
_TARGET_GLOB = r"^(?:[A-Za-z0-9_.*?-]|\[!?[A-Za-z0-9_.-]+\])+$"
_CONFIG = ConfigDict(extra="forbid")

Text = Annotated[str, Field(strict=True, min_length=1, max_length=4096)]
Name = Annotated[str, Field(strict=True, pattern=_NAME)]
Dns = Annotated[str, Field(strict=True, pattern=_DNS, max_length=253)]
Version = Annotated[str, Field(strict=True, pattern=VERSION_PATTERN)]


def _role(value: object) -> object:
    if isinstance(value, str) and value.upper() in Role.__members__:
        return Role[value.upper()]
    return value


@dataclass(frozen=True, config=_CONFIG)
class Token:
    name: Annotated[Text, Field(max_length=100)]
    sha256: Annotated[str, Field(strict=True, pattern=r"^[0-9a-fA-F]{64}$"),
                      AfterValidator(str.lower)]
    role: Annotated[Role, BeforeValidator(_role),
                    WithJsonSchema({"enum": ["viewer", "pipeline", "oncall"]})]
    # globs of the targets this token may read or act on; None: every target
    targets: Annotated[tuple[Annotated[str, Field(strict=True, pattern=_TARGET_GLOB)], ...],
                       Field(min_length=1, max_length=1000)] | None = None

    def may_see(self, target: str) -> bool:
        return self.targets is None or any(fnmatch.fnmatchcase(target, g) for g in self.targets)


def _var_name(name: str) -> str:
    if name in policy_mod.BUILTIN_VARS:
        raise ValueError(f"{name!r} is filled by canary itself; pick another name")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError("variable names are letters, digits and _")
    return name


def _plain_value(value: object) -> str:
    if isinstance(value, str | int | float) and not isinstance(value, dict | list):
        return str(value)
    raise ValueError("must be a plain value")


Vars = Mapping[Annotated[str, AfterValidator(_var_name)],
               Annotated[str, BeforeValidator(_plain_value),
                         WithJsonSchema({"type": ["string", "number", "boolean"]})]]
Argv = Annotated[tuple[Annotated[str, Field(strict=True, min_length=1)], ...], Field(min_length=1)]
Addresses = Annotated[tuple[Annotated[str, Field(strict=True, pattern=_ADDRESS)], ...],
                      Field(min_length=1)]


Promotion = Literal["swap", "return"]
SIDES = ("stable", "canary")


@dataclass(frozen=True, config=_CONFIG)
class VersionProbe:
    """How canary learns what a server runs (interface.md section 5): GET
    http://SERVER/path; the version is the trimmed body, or its `version` field when the
    body is a JSON object."""

    path: Annotated[str, Field(strict=True, pattern=r"^/[\x21-\x7e]*$", max_length=2048)] = "/version"
    timeout: policy_mod.PositiveDuration = 2.0

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
    canary: Dns
    version_label: Annotated[str, Field(strict=True, pattern=r"^([a-z0-9.-]{1,253}/)?"
                                                              r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}"
                                                              r"[A-Za-z0-9])?$")] = "version"
    scale_canary: Literal["proportional", "fixed"] = "proportional"
    scale_down_delay: policy_mod.Duration = 30.0

    @model_validator(mode="after")
    def _apart(self) -> Workload:
        if self.stable == self.canary:
            raise ValueError("canary: the stable and canary Deployments must differ")
        return self


@dataclass(frozen=True, config=_CONFIG)
class NginxTarget:
    file: Annotated[Path, WithJsonSchema({"type": "string", "minLength": 1})]
    upstream: Annotated[str, Field(strict=True, pattern=r"^[A-Za-z0-9_.-]+$")]
    stable: Addresses
    canary: Addresses
    test: Argv = ("nginx", "-t")
    reload: Argv = ("nginx", "-s", "reload")
    policy: Name | None = None
    vars: Vars = field(default_factory=dict)
    stable_version: Version | None = None
    router: Literal["nginx"] = "nginx"
    name: SkipJsonSchema[str] = ""  # the key it is configured under
    promotion: Promotion = "swap"
    version_probe: VersionProbe | None = None

    @model_validator(mode="after")
    def _sides_apart(self) -> NginxTarget:
        if set(self.stable) & set(self.canary):
            raise ValueError("canary: an address cannot be both stable and canary")
        return self


@dataclass(frozen=True, config=_CONFIG)
class IstioDestination:
    host: Text
    subset: Text | None = None


@dataclass(frozen=True, config=_CONFIG)
class IstioTarget:
    namespace: Dns
    virtual_service: Dns
    stable: IstioDestination
    canary: IstioDestination
    route: Text | None = None
    policy: Name | None = None
    vars: Vars = field(default_factory=dict)
    stable_version: Version | None = None
    router: Literal["istio"] = "istio"
    name: SkipJsonSchema[str] = ""
    # default: return with a workload (the stable Deployment is brought to the new
    # version), else swap; see promotion_of
    promotion: Promotion | None = None
    workload: Workload | None = None

    @model_validator(mode="after")
    def _workload_returns(self) -> IstioTarget:
        if self.workload is not None and self.promotion == "swap":
            raise ValueError("promotion: a target with a workload hands over with return "
                             "(the stable Deployment is brought to the new version); remove "
                             "promotion or set it to return")
        return self


Target = NginxTarget | IstioTarget


def promotion_of(target: Target) -> Promotion:
    """How a release on this target is carried through (interface.md section 5)."""
    if target.promotion is not None:
        return target.promotion
    return "return" if getattr(target, "workload", None) is not None else "swap"


def other_side(side: str) -> str:
    return "stable" if side == "canary" else "canary"
ROUTERS = ("nginx", "istio")


def _router(value: Any) -> str | None:
    kind = value.get("router") if isinstance(value, dict) else getattr(value, "router", None)
    return f"router={kind}" if kind in ROUTERS else None


TargetField = Annotated[
    Annotated[NginxTarget, validation.tag("router", "nginx")]
    | Annotated[IstioTarget, validation.tag("router", "istio")],
    validation.union(_router, "target_router", "router", f"must be {' or '.join(ROUTERS)}",
                     "must be a mapping with router: nginx or router: istio")]


@dataclass(frozen=True, config=_CONFIG)
class LeaderElection:
    """Only with state: kubernetes:NS. Defaults as client-go's."""

    name: Dns = "canary-leader"
    lease_duration: policy_mod.PositiveDuration = 15.0
    renew_deadline: policy_mod.PositiveDuration = 10.0
    retry_period: policy_mod.PositiveDuration = 2.0

    @model_validator(mode="after")
    def _order(self) -> LeaderElection:
        if not self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("need retry_period < renew_deadline < lease_duration, so a leader "
                             "that cannot renew steps down before anyone else takes over")
        return self


@std_dataclass(frozen=True)
class PrometheusAccess:
    """How canary reaches Prometheus beyond its URL. It names where secrets are (a file, an
    environment variable), never holds their values, and keeps header values out of reprs."""

    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    bearer_token_file: Path | None = None
    basic_auth_username: str | None = None
    basic_auth_password_env: str | None = None
    ca_file: Path | None = None
    concurrency: int = 8  # queries in flight at once, each on its own thread


@std_dataclass(frozen=True)
class Config:
    """What a config file resolves to: paths absolute, secrets located."""

    listen_host: str
    listen_port: int
    state: str
    prometheus_url: str
    prometheus_timeout: float
    policy_paths: tuple[Path, ...]
    tokens: tuple[Token, ...]
    targets: Mapping[str, Target]
    source: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    leader_election: LeaderElection = field(default_factory=LeaderElection)
    prometheus_access: PrometheusAccess = field(default_factory=PrometheusAccess)

    def load_policies(self) -> dict[str, policy_mod.Policy]:
        return policy_mod.load_many(self.policy_paths)


def looks_like_config(data: Any) -> bool:
    return isinstance(data, dict) and bool(set(data) & {"targets", "listen", "auth", "prometheus"})


def load_file(path: str | Path) -> Config:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ValidationFailed([Problem(str(p), 1, "(file)", f"cannot read: {e.strerror}")]) from e
    return parse(yamlsrc.load(raw, str(p)), base=p.parent)


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _header_name(name: str) -> str:
    if not _HEADER_NAME.match(name):
        raise ValueError("is not an HTTP header name")
    if name.lower() in _SECRET_HEADERS:
        raise ValueError("carries a credential, and a secret is never written in the config: "
                         "put a bearer token in a file named by prometheus.bearer_token_file, "
                         "or use prometheus.basic_auth {username, password_env}")
    return name


def _header_value(value: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("must not contain control characters (line breaks, tabs)")
    return value


def _no_password(value: object) -> None:
    raise ValueError("a secret is never written in the config: put the password in an "
                     "environment variable and name it in basic_auth.password_env")


class BasicAuthDoc(_Doc):
    username: Annotated[Text, Field(pattern=r"^[^:]*$")]
    password_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    password: SkipJsonSchema[Annotated[Any, AfterValidator(_no_password)]] = None


class PrometheusDoc(_Doc):
    url: Annotated[str, Field(pattern=r"^https?://", max_length=2048)] = "http://127.0.0.1:9090"
    timeout: policy_mod.PositiveDuration = 10.0
    headers: dict[Annotated[str, AfterValidator(_header_name)],
                  Annotated[str, Field(max_length=4096), AfterValidator(_header_value)]] = {}
    bearer_token_file: Text | None = None
    basic_auth: BasicAuthDoc | None = None
    ca_file: Text | None = None
    concurrency: Annotated[int, Field(ge=1, le=256)] = 8

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, url: str) -> str:
        if urllib.parse.urlsplit(url).username is not None:
            raise ValueError("carries credentials (user@ or user:password@); a secret is never "
                             "written in the config: use prometheus.basic_auth {username, "
                             "password_env}")
        return url


class AuthDoc(_Doc):
    tokens: Annotated[list[Token], Field(max_length=10_000)] = []
    tokens_file: Text | None = None


class TlsDoc(_Doc):
    cert: Text
    key: Text


def _listen(value: str) -> str:
    m = _LISTEN.fullmatch(value)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ValueError("must be host:port, like 127.0.0.1:8080")
    return value


class ConfigDoc(_Doc):
    """The controller config (interface.md sections 2 and 9)."""

    model_config = ConfigDict(title="canary controller config")
    listen: Annotated[str, AfterValidator(_listen)] = "127.0.0.1:8080"
    state: Annotated[str, Field(pattern=r"^(sqlite:.+|kubernetes:[a-z0-9]([-a-z0-9.]*[a-z0-9])?)$",
                                max_length=4096)] = "sqlite:canary-state.db"
    prometheus: PrometheusDoc = PrometheusDoc()
    policies: Text | Annotated[list[Text], Field(min_length=1)] = "policies/"
    auth: AuthDoc
    targets: Annotated[dict[Annotated[str, Field(pattern=_NAME)], TargetField],
                       Field(min_length=1, max_length=10_000)]
    tls: TlsDoc | None = None
    leader_election: LeaderElection = LeaderElection()


CONFIG_MESSAGES = {
    "state": "must be sqlite:PATH or kubernetes:NAMESPACE",
    "url": "must start with http:// or https://",
    "sha256": "must be 64 hex digits: the sha256 of the token, e.g. "
              "`printf %s \"$TOKEN\" | sha256sum`",
    "role": "must be one of viewer, pipeline, oncall",
    "concurrency": "must be a whole number from 1 to 256: how many queries may wait on "
                   "Prometheus at once",
    "upstream": "letters, digits, '.', '_' and '-' only",
    "policies": "must be a directory or a list of policy files",
    "password_env": "must name an environment variable (letters, digits and _)",
    "username": "cannot contain ':' (HTTP basic auth)",
    "targets": "must be a non-empty list of target names or globs, like [\"shop\", \"shop-*\"] "
               "(letters, digits, '.', '_', '-' and the wildcards * ? [abc] [!abc] [a-z]); "
               "leave it out for every target",
    "targets[]": "{value} is not a target name or glob: letters, digits, '.', '_', '-' and the "
                 "wildcards * ? [abc] [!abc] [a-z]",
    "stable[]": "{value} is not host:port or unix:PATH",
    "canary[]": "{value} is not host:port or unix:PATH",
    "stable_version": "must be 1-128 letters, digits or ._:+- starting with a letter or digit",
    "namespace": "must be a Kubernetes name (lowercase letters, digits, '-' and '.')",
    "virtual_service": "must be a Kubernetes name (lowercase letters, digits, '-' and '.')",
    "test": "must be a non-empty list of strings (a command and its arguments)",
    "reload": "must be a non-empty list of strings (a command and its arguments)",
    "stable": "must be a non-empty list of host:port or unix:PATH addresses",
    "canary": "must be a non-empty list of host:port or unix:PATH addresses",
    "vars": "must be a plain value",
    "promotion": "must be swap (the sides take turns) or return (traffic goes back to the "
                 "stable side once it runs the new version)",
    "path": "must be an absolute URL path like /version (no spaces)",
    "scale_canary": "must be proportional (canary replicas follow the weight) or fixed",
    "workload.stable": "must be the name of a Deployment (lowercase letters, digits, '-' "
                       "and '.')",
    "workload.canary": "must be the name of a Deployment (lowercase letters, digits, '-' "
                       "and '.')",
    "version_label": "must be a Kubernetes label key, like version or app.kubernetes.io/version",
}
CONFIG_REQUIRED = {
    "auth": "required: auth.tokens lists who may call the API",
    "targets": "required: a mapping of target name -> router settings",
}


def parse(doc: yamlsrc.Doc, *, base: Path) -> Config:
    if not isinstance(doc.data, dict):
        raise ValidationFailed([Problem(doc.file, doc.line(()), "(file)",
                                        "a controller config is a YAML mapping (listen, state, "
                                        "prometheus, policies, auth, targets)")])
    resolver = _Resolver(doc, base)
    resolver.machine(doc.data)  # reported beside the shape's problems
    try:
        model = ConfigDoc.model_validate(doc.data)
    except ValidationError as e:
        problems = validation.problems(doc, e, ConfigDoc, messages=CONFIG_MESSAGES,
                                       required=CONFIG_REQUIRED) + resolver.problems
        raise ValidationFailed(sorted(problems, key=lambda p: p.line)) from None
    return resolver.config(model)


class _Resolver:
    """What the shape cannot say: files that must exist, variables that must be set, paths
    relative to the config file, token names used once."""

    def __init__(self, doc: yamlsrc.Doc, base: Path) -> None:
        self.doc, self.base = doc, base
        self.problems: list[Problem] = []

    def problem(self, path: yamlsrc.Path, message: str) -> None:
        self.problems.append(Problem(self.doc.file, self.doc.line(path),
                                     validation.field_name(path), message))

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.base / p

    def machine(self, data: dict[str, Any]) -> None:
        """Files that must exist and variables that must be set, read from the document
        itself: these are reported even when the rest of it is malformed."""
        def text(*path: str) -> str | None:
            node: Any = data
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            return node if isinstance(node, str) and node else None

        at: yamlsrc.Path = ("prometheus",)
        token_file = text("prometheus", "bearer_token_file")
        if token_file is not None:
            p = self.path(token_file)
            try:
                if not p.read_text(encoding="utf-8").strip():
                    self.problem((*at, "bearer_token_file"), f"{p} is empty")
            except (OSError, UnicodeDecodeError) as e:
                why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
                self.problem((*at, "bearer_token_file"), f"cannot read {p}: {why}")
        env = text("prometheus", "basic_auth", "password_env")
        if env is not None and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env) \
                and not os.environ.get(env):
            self.problem((*at, "basic_auth", "password_env"),
                         f"environment variable {env} is "
                         + ("empty" if env in os.environ else "not set; export it with the "
                            "Prometheus password before starting canary"))
        prom = data.get("prometheus")
        if isinstance(prom, dict) and "basic_auth" in prom and "bearer_token_file" in prom:
            self.problem((*at, "basic_auth"), "use basic_auth or bearer_token_file, not both: "
                                              "each sets the Authorization header")
        ca = text("prometheus", "ca_file")
        if ca is not None:
            p = self.path(ca)
            try:
                ssl.create_default_context(cafile=str(p))
            except FileNotFoundError:
                self.problem((*at, "ca_file"), f"{p} does not exist")
            except (OSError, ssl.SSLError) as e:
                self.problem((*at, "ca_file"), f"{p} is not a PEM CA certificate bundle: {e}")
        for key in ("cert", "key"):
            name = text("tls", key)
            if name is not None and not self.path(name).is_file():
                self.problem(("tls", key), f"{self.path(name)} is not a readable file")
        raw = data.get("policies", "policies/")
        for i, item in enumerate([raw] if isinstance(raw, str) else
                                 raw if isinstance(raw, list) else []):
            if isinstance(item, str) and item:
                p = self.path(item)
                if not (p.is_dir() or p.is_file()):
                    where: yamlsrc.Path = ("policies",) if isinstance(raw, str) else ("policies", i)
                    self.problem(where, f"{p} is neither a directory nor a file")

    def config(self, m: ConfigDoc) -> Config:
        lm = _LISTEN.fullmatch(m.listen)
        assert lm is not None
        state = m.state
        if state.startswith("sqlite:"):
            state = "sqlite:" + str(self.path(state[len("sqlite:"):]))
        access = self.prometheus(m.prometheus)
        policy_paths = self.policy_paths(m.policies)
        tokens = self.tokens(m.auth)
        cert = self.path(m.tls.cert) if m.tls else None
        key = self.path(m.tls.key) if m.tls else None
        targets: dict[str, Target] = {name: replace(t, name=name) for name, t in m.targets.items()}
        targets = {name: replace(t, file=self.path(str(t.file)))
                   if isinstance(t, NginxTarget) else t for name, t in targets.items()}
        if self.problems:
            raise ValidationFailed(self.problems)
        return Config(listen_host=lm.group(1) or "0.0.0.0", listen_port=int(lm.group(2)),
                      state=state, prometheus_url=m.prometheus.url,
                      prometheus_timeout=m.prometheus.timeout, policy_paths=policy_paths,
                      tokens=tokens, targets=targets, source=self.doc.file, tls_cert=cert,
                      tls_key=key, prometheus_access=access, leader_election=m.leader_election)

    def prometheus(self, p: PrometheusDoc) -> PrometheusAccess:
        return PrometheusAccess(
            headers=dict(p.headers),
            bearer_token_file=self.path(p.bearer_token_file) if p.bearer_token_file else None,
            basic_auth_username=p.basic_auth.username if p.basic_auth else None,
            basic_auth_password_env=p.basic_auth.password_env if p.basic_auth else None,
            ca_file=self.path(p.ca_file) if p.ca_file else None, concurrency=p.concurrency)

    def policy_paths(self, raw: str | list[str]) -> tuple[Path, ...]:
        out: list[Path] = []
        for item in [raw] if isinstance(raw, str) else raw:
            p = self.path(item)
            if p.is_dir():
                out.extend(sorted([*p.glob("*.yaml"), *p.glob("*.yml")]))
            elif p.is_file():
                out.append(p)
        return tuple(out)

    def tokens(self, auth: AuthDoc) -> tuple[Token, ...]:
        out = list(auth.tokens)
        if auth.tokens_file is not None:
            # token hashes kept apart from the config, e.g. in a Kubernetes Secret
            path = self.path(auth.tokens_file)
            try:
                doc = yamlsrc.load(path.read_bytes(), str(path))
            except OSError as e:
                self.problem(("auth", "tokens_file"), f"cannot read {path}: {e.strerror}")
            except ValidationFailed as e:
                self.problems.extend(e.problems)
            else:
                out += self.tokens_file(doc)
        if not out and not self.problems:
            self.problem(("auth", "tokens"), "no tokens: list at least one {name, sha256, role}")
        names = [t.name for t in out]
        for name in sorted({n for n in names if names.count(n) > 1}):
            self.problem(("auth", "tokens"), f"token name {name!r} is used twice")
        return tuple(out)

    def tokens_file(self, doc: yamlsrc.Doc) -> list[Token]:
        wrapped = isinstance(doc.data, dict)
        data = doc.data.get("tokens") if wrapped else doc.data
        if not isinstance(data, list):
            self.problems.append(Problem(doc.file, doc.line(()), "(file)", "must be a list of "
                                         "{name, sha256, role} (or tokens: [...])"))
            return []
        try:
            items = _TOKEN_LIST.validate_python(data)
        except ValidationError as e:
            self.problems.extend(validation.problems(
                doc, e, AuthDoc, at=("tokens",) if wrapped else (), messages=CONFIG_MESSAGES))
            return []
        return items



_TOKEN_LIST: TypeAdapter[list[Token]] = TypeAdapter(list[Token])


def cross_check(cfg: Config, policies: Mapping[str, policy_mod.Policy],
                doc: yamlsrc.Doc) -> list[Problem]:
    """Problems that need both the config and its policies: unknown policy names and
    query templates that no target var fills."""
    problems: list[Problem] = []
    for name, target in cfg.targets.items():
        path: yamlsrc.Path = ("targets", name)
        if target.policy is not None and target.policy not in policies:
            problems.append(Problem(doc.file, doc.line((*path, "policy")), f"targets.{name}.policy",
                                    f"no policy named {target.policy!r}; loaded: "
                                    f"{', '.join(sorted(policies)) or 'none'}"))
        candidates = [policies[target.policy]] if target.policy and target.policy in policies else []
        for pol in candidates:
            missing = pol.template_names() - set(target.vars) - policy_mod.BUILTIN_VARS
            if missing:
                problems.append(Problem(
                    doc.file, doc.line((*path, "vars")), f"targets.{name}.vars",
                    f"policy {pol.name!r} uses {', '.join(sorted(missing))}; add them to vars"))
    return problems
