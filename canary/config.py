"""The controller config (`canary serve --config FILE`): listen address, state, Prometheus,
policies, tokens and targets. Its shape is written once, as models (Config); what only
the machine can tell (files, environment variables) is checked after, with file:line."""

from __future__ import annotations

import enum
import fnmatch
import os
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal, overload

import yarl
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

from canary import fields, targets, validation, yamlsrc
from canary import policy as policy_mod
from canary import schema as schema_mod
from canary.errors import Problem, ValidationFailed
from canary.fields import Dns, EnvName, HttpUrl, Name, PositiveDuration, Setting
from canary.targets import (
    NginxTarget,
    Target,
    TargetField,
)


class Role(enum.IntEnum):
    VIEWER = 1
    PIPELINE = 2
    ONCALL = 3


# ---- the config's shape: one definition each -------------------------------------------------
#
# One class per part validates the file, gives the JSON Schema (`canary schema config`) and
# is what the controller uses: the tokens, leader election and the targets (targets.py) are
# frozen pydantic dataclasses, the sections below frozen models, Config the whole.

_LISTEN = re.compile(rf"\[?([^\]]*?)\]?:{fields.PORT}")
# headers that carry credentials: their values belong in a file or the environment
_SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie"}
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# the schema's way to say it (no (?i) in editors' regexes): [Cc][Oo][Oo][Kk][Ii][Ee]
_SECRET_HEADER = "^(" + "|".join("".join(f"[{c.upper()}{c}]" if c.isalpha() else c for c in h)
                                 for h in sorted(_SECRET_HEADERS)) + ")$"
_VAR = fields.IDENTIFIER  # a template variable's or an environment variable's name


# a target name, or a glob over target names: *, ?, [abc], [!abc], [a-z]
_TARGET_GLOB = r"^(?:[A-Za-z0-9_.*?-]|\[!?[A-Za-z0-9_.-]+\])+$"
_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True)


_ROLES = tuple(r.name.lower() for r in Role)  # viewer, pipeline, oncall
# canary reads a role in any case (Oncall): so does the schema, which still offers the
# lower-case names to complete
_ROLE_SCHEMA = {"type": "string", "anyOf": [
    {"enum": list(_ROLES)},
    {"pattern": "^(" + "|".join("".join(f"[{c.upper()}{c}]" for c in r) for r in _ROLES) + ")$"}]}


def _role(value: object) -> object:
    if isinstance(value, str) and value.upper() in Role.__members__:
        return Role[value.upper()]
    return value


@dataclass(frozen=True, config=_CONFIG)
class Token:
    name: Annotated[Setting, Field(max_length=100)]
    """Who holds the token; events and reasons name them by it. Unique."""
    sha256: Annotated[str, Field(strict=True, pattern=r"^[0-9a-fA-F]{64}$"),
                      AfterValidator(str.lower)]
    """The sha256 of the bearer token, 64 hex digits (`printf %s "$TOKEN" | sha256sum`);
    the token itself is never stored."""
    role: Annotated[Role, BeforeValidator(_role), WithJsonSchema(_ROLE_SCHEMA)]
    """viewer reads; pipeline reads, starts and aborts; oncall does everything."""
    targets: Annotated[tuple[Annotated[str, Field(strict=True, pattern=_TARGET_GLOB)], ...],
                       Field(min_length=1, max_length=1000)] | None = None
    """Names or globs (* ? [abc] [!abc]) of the targets this token may read or act on;
    left out: every target."""

    def may_see(self, target: str) -> bool:
        return self.targets is None or any(fnmatch.fnmatchcase(target, g) for g in self.targets)


@dataclass(frozen=True, config=_CONFIG)
class LeaderElection:
    """Only with state: kubernetes:NS. Defaults as client-go's."""

    name: Dns = "canary-leader"
    """The name of the coordination.k8s.io Lease the replicas share."""
    lease_duration: PositiveDuration = 15.0
    """How long the others wait without a renewal before taking over (default 15s)."""
    renew_deadline: PositiveDuration = 10.0
    """A leader that cannot renew for this long stops acting (default 10s)."""
    retry_period: PositiveDuration = 2.0
    """How often the lease is renewed or tried (default 2s)."""

    @model_validator(mode="after")
    def _order(self) -> LeaderElection:
        if not self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("need retry_period < renew_deadline < lease_duration, so a leader "
                             "that cannot renew steps down before anyone else takes over")
        return self


# what a person cares to hear about; `events` of a notification picks among these
NotifyEvent = Literal["started", "stage", "paused", "approval", "drift", "router", "rolled_back",
                      "succeeded", "handover"]
NOTIFY_EVENTS: tuple[NotifyEvent, ...] = ("started", "stage", "paused", "approval", "drift",
                                          "router", "rolled_back", "succeeded", "handover")


def _send_url(value: str) -> str:
    """A receiver's URL that can be sent to: a host, a port in range. The message never
    repeats the URL (a chat's incoming-webhook URL is itself a secret)."""
    try:
        url = yarl.URL(value)
        url.port  # noqa: B018 (parses the port, raising when it is out of range)
    except ValueError as e:
        raise ValueError(f"is not a URL canary can send to ({e}); write "
                         "http(s)://HOST[:PORT]/PATH") from None
    if not url.host or any(c.isspace() for c in url.host):
        raise ValueError("has no valid host; write http(s)://HOST[:PORT]/PATH")
    return value


@dataclass(frozen=True, config=ConfigDict(
    extra="forbid", use_attribute_docstrings=True,
    json_schema_extra={"oneOf": [{"required": ["url"]}, {"required": ["url_env"]}]}))
class Notification:
    """A receiver of rollout events (README: Chat notifications): a chat's incoming webhook
    (slack, teams) or any HTTP endpoint (webhook: the rollout's JSON and the event)."""

    name: Name
    """The receiver's name, unique among notifications (in metrics and logs)."""
    url: Annotated[HttpUrl, AfterValidator(_send_url)] | None = None
    """http(s) URL messages are POSTed to (a chat's incoming webhook, or any endpoint).
    One of url and url_env."""
    format: Literal["slack", "teams", "webhook"] = "webhook"
    """slack or teams (readable text), or webhook (the rollout's JSON and the event)."""
    events: Annotated[tuple[NotifyEvent, ...], Field(min_length=1)] = NOTIFY_EVENTS
    """The event types sent (default: every type)."""
    secret_env: EnvName | None = None
    """Environment variable holding the HMAC-SHA256 key: the body is signed in
    X-Canary-Signature."""
    timeout: PositiveDuration = 10.0
    """How long one delivery attempt may take (default 10s)."""
    url_env: EnvName | None = None
    """Environment variable holding the URL, instead of url: a chat's incoming-webhook URL
    is a secret, kept out of the config (read when sending, never logged)."""

    @model_validator(mode="after")
    def _one_url(self) -> Notification:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give url, or url_env naming the environment variable that "
                             "holds it (for a URL that is a secret), not both")
        return self

    def send_url(self) -> str:
        """Where messages go now: url, or url_env's value (DeliveryFailed-worthy
        ValueError naming only the variable when it is unset or not a URL)."""
        if self.url is not None:
            return self.url
        assert self.url_env is not None
        value = os.environ.get(self.url_env, "")
        if not re.match(r"^https?://", value):
            raise ValueError(f"environment variable {self.url_env} (the URL) is "
                             + ("not set" if not value else "not an http(s):// URL"))
        try:
            return _send_url(value)
        except ValueError as e:
            raise ValueError(f"environment variable {self.url_env}: the URL {e}") from None


def looks_like_config(data: Any) -> bool:
    return isinstance(data, dict) and bool(set(data) & {"targets", "listen", "auth", "prometheus"})


def load_file(path: str | Path) -> Config:
    return parse(yamlsrc.read(path), base=Path(path).parent)


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True,
                              use_attribute_docstrings=True)


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
    username: Annotated[Setting, Field(pattern=r"^[^:]*$")]
    """The basic-auth user name (no ':')."""
    password_env: EnvName
    """The environment variable that holds the password; it must be set when canary
    starts."""
    password: SkipJsonSchema[Annotated[Any, AfterValidator(_no_password)]] = None


class PrometheusDoc(_Doc):
    model_config = ConfigDict(json_schema_extra={  # each sets the Authorization header
        "not": {"required": ["basic_auth", "bearer_token_file"]}})
    url: Annotated[HttpUrl, Field(json_schema_extra={
        "pattern": r"^https?://[^/?#@]*([/?#]|$)"})] = "http://127.0.0.1:9090"  # no user@
    """Prometheus's base URL, http:// or https://, without credentials."""
    timeout: PositiveDuration = 10.0
    """How long one query may take, a duration (default 10s)."""
    headers: Annotated[dict[Annotated[str, AfterValidator(_header_name),
                                      WithJsonSchema({"pattern": _HEADER_NAME.pattern})],
                  Annotated[str, Field(max_length=4096, json_schema_extra={
                      "pattern": r"^[^\x00-\x1f\x7f]*$"}), AfterValidator(_header_value)]],
                       Field(json_schema_extra=schema_mod.refused_keys(_SECRET_HEADER),
                             repr=False, exclude=True)] = {}  # values may be credentials
    """Headers sent with every query, e.g. {X-Scope-OrgID: team-a}; never credentials."""
    bearer_token_file: Setting | None = None
    """A file whose contents are sent as `Authorization: Bearer`, re-read when it changes."""
    basic_auth: BasicAuthDoc | None = None
    """Basic auth, the password from an environment variable (not with bearer_token_file)."""
    ca_file: Setting | None = None
    """A PEM bundle of the CAs that Prometheus's TLS certificate is verified against."""
    concurrency: Annotated[int, Field(ge=1, le=256), BeforeValidator(validation.whole)] = 8
    """Queries in flight at once, each on its own thread, 1-256 (default 8)."""

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, url: str) -> str:
        if urllib.parse.urlsplit(url).username is not None:
            raise ValueError("carries credentials (user@ or user:password@); a secret is never "
                             "written in the config: use prometheus.basic_auth {username, "
                             "password_env}")
        return url


class AuthDoc(_Doc):
    model_config = ConfigDict(json_schema_extra={"anyOf": [  # at least one token
        {"required": ["tokens"], "properties": {"tokens": {"minItems": 1}}},
        {"required": ["tokens_file"], "properties": {"tokens_file": {"type": "string"}}}]})
    tokens: Annotated[list[Token], Field(max_length=10_000)] = []
    """Who may call the API: {name, sha256, role, targets?} each."""
    tokens_file: Setting | None = None
    """A YAML file with more tokens (a list, or tokens: [...]), e.g. from a Secret."""


class TlsDoc(_Doc):
    cert: Setting
    """The API's certificate chain, a PEM file."""
    key: Setting
    """Its private key, a PEM file."""


def _policy_files(value: object) -> object:
    """One message for the field, not one per member of its union (which read
    `policies.constrained-str: must be a string`)."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip()
                                                 for v in value):
        return value
    raise ValueError("must be a directory of policy files, like policies/, or a non-empty "
                     "list of policy files")


# the file's shape, and, once parse() has resolved it (relative paths taken from the config
# file's directory, tokens_file's tokens added, targets named), what the controller runs with
class Config(_Doc):
    """The controller config (README: Configuring the controller)."""

    model_config = ConfigDict(title="canary controller config")
    listen: Annotated[str, Field(pattern=f"^{_LISTEN.pattern}$")] = "127.0.0.1:8080"
    """host:port the API listens on (default 127.0.0.1:8080)."""
    state: Annotated[str, Field(pattern=r"^(sqlite:.+|kubernetes:[a-z0-9]([-a-z0-9.]*[a-z0-9])?)$",
                                max_length=4096)] = "sqlite:canary-state.db"
    """Where rollouts are kept: sqlite:PATH (embedded) or kubernetes:NAMESPACE."""
    prometheus: PrometheusDoc = PrometheusDoc()
    """The Prometheus the gates query."""
    policies: Annotated[Setting | Annotated[list[Setting], Field(min_length=1)],
                        BeforeValidator(_policy_files)] = "policies/"
    """A directory of policy files (*.yaml), or a list of files (default policies/)."""
    auth: AuthDoc
    """The API's bearer tokens."""
    targets: Annotated[dict[Annotated[str, Field(pattern=fields.NAME_PATTERN)], TargetField],
                       Field(min_length=1, max_length=10_000)]
    """What canary moves traffic for: target name -> its router (nginx or istio)."""
    tls: TlsDoc | None = None
    """Serve the API over TLS with this certificate and key."""
    leader_election: LeaderElection = LeaderElection()
    """Only with state: kubernetes:NS: the Lease the replicas elect a leader with."""
    notifications: Annotated[list[Notification], Field(max_length=100)] = []
    """Chat and webhook receivers told about rollout events (at least once)."""
    approval_reminder: PositiveDuration = 1800.0
    """How often a waiting approval is announced again (default 30m)."""
    public_url: HttpUrl | None = None
    """Where people open this controller: the base of links in notifications."""

    @property
    def listen_host(self) -> str:
        m = _LISTEN.fullmatch(self.listen)
        assert m is not None
        return m.group(1) or "0.0.0.0"

    @property
    def listen_port(self) -> int:
        m = _LISTEN.fullmatch(self.listen)
        assert m is not None
        return int(m.group(2))

    @property
    def tokens(self) -> tuple[Token, ...]:
        return tuple(self.auth.tokens)

    def policy_paths(self) -> tuple[Path, ...]:
        """The policy files: each listed file, and the *.yaml and *.yml of each directory."""
        out: list[Path] = []
        for item in [self.policies] if isinstance(self.policies, str) else self.policies:
            p = Path(item)
            if p.is_dir():
                out.extend(sorted([*p.glob("*.yaml"), *p.glob("*.yml")]))
            elif p.is_file():
                out.append(p)
        return tuple(out)

    def load_policies(self) -> dict[str, policy_mod.Policy]:
        return policy_mod.load_many(self.policy_paths())


CONFIG_MESSAGES = {
    **targets.MESSAGES,
    "listen": "must be host:port, like 127.0.0.1:8080",
    "state": "must be sqlite:PATH or kubernetes:NAMESPACE",
    "url": "must start with http:// or https://",
    "sha256": "must be 64 hex digits: the sha256 of the token, e.g. "
              "`printf %s \"$TOKEN\" | sha256sum`",
    "role": "must be one of viewer, pipeline, oncall",
    "concurrency": "must be a whole number from 1 to 256: how many queries may wait on "
                   "Prometheus at once",
    "notifications.name": "must be 1-63 letters, digits, '.', '_' or '-'",
    "policies": "must be a directory or a list of policy files",
    **dict.fromkeys(("password_env", "secret_env", "url_env"), "must name an environment "
                    "variable (letters, digits and _)"),
    "username": "cannot contain ':' (HTTP basic auth)",
    "targets": "must be a non-empty list of target names or globs, like [\"shop\", \"shop-*\"] "
               "(letters, digits, '.', '_', '-' and the wildcards * ? [abc] [!abc] [a-z]); "
               "leave it out for every target",
    "targets[]": "{value} is not a target name or glob: letters, digits, '.', '_', '-' and the "
                 "wildcards * ? [abc] [!abc] [a-z]",
    "leader_election.name": "must be a Kubernetes name (lowercase letters, digits, '-' and "
                            "'.'; at most 253 characters)",
    "format": "must be one of slack, teams, webhook",
    "events": f"must be a non-empty list of: {', '.join(NOTIFY_EVENTS)}",
    "events[]": f"{{value}} is not an event type; use one of {', '.join(NOTIFY_EVENTS)}",
    "notifications": "must be a list of receivers, each with name and url",
    "public_url": "must start with http:// or https://: where people open this controller "
                  "(links in notifications)",
}
CONFIG_REQUIRED = {
    "auth": "required: auth.tokens lists who may call the API",
    "targets": "required: a mapping of target name -> router settings",
    "url": "required: the URL canary POSTs each message to",
}


def parse(doc: yamlsrc.Doc, *, base: Path) -> Config:
    if not isinstance(doc.data, dict):
        raise ValidationFailed([validation.problem(doc, (), "a controller config is a YAML "
                                                            "mapping (listen, state, prometheus, "
                                                            "policies, auth, targets)")])
    resolver = _Resolver(doc, base)
    resolver.machine(doc.data)  # reported beside the shape's problems
    try:
        model = Config.model_validate(doc.data)
    except ValidationError as e:
        problems = validation.problems(doc, e, Config, messages=CONFIG_MESSAGES,
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
        self.problems.append(validation.problem(self.doc, path, message))

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.base / p

    def env(self, path: yamlsrc.Path, name: object, what: str) -> None:
        """A variable the config names must be set (to `what`) when canary starts."""
        if isinstance(name, str) and re.fullmatch(_VAR, name) and not os.environ.get(name):
            self.problem(path, f"environment variable {name} is " + (
                "empty" if name in os.environ else f"not set; export it with {what} before "
                                                   "starting canary"))

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
        self.env((*at, "basic_auth", "password_env"),
                 text("prometheus", "basic_auth", "password_env"), "the Prometheus password")
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
        notes = data.get("notifications")
        seen: set[str] = set()
        for i, n in enumerate(notes if isinstance(notes, list) else []):
            if not isinstance(n, dict):
                continue
            name = n.get("name")
            if isinstance(name, str):
                if name in seen:
                    self.problem(("notifications", i, "name"),
                                 f"receiver name {name!r} is used twice; give each its own")
                seen.add(name)
            env = n.get("url_env")
            if isinstance(env, str) and re.fullmatch(_VAR, env) and "url" not in n:
                try:
                    Notification(name="x", url_env=env).send_url()
                except ValueError as e:
                    self.problem(("notifications", i, "url_env"),
                                 f"{e}; export it with the receiver's URL before starting "
                                 "canary")
            self.env(("notifications", i, "secret_env"), n.get("secret_env"),
                     "the signing secret")
        raw = data.get("policies", "policies/")
        for i, item in enumerate([raw] if isinstance(raw, str) else
                                 raw if isinstance(raw, list) else []):
            if isinstance(item, str) and item:
                p = self.path(item)
                if not (p.is_dir() or p.is_file()):
                    where: yamlsrc.Path = ("policies",) if isinstance(raw, str) else ("policies", i)
                    self.problem(where, f"{p} is neither a directory nor a file")

    def config(self, m: Config) -> Config:
        """The config with its relative paths taken from the config file's directory,
        tokens_file's tokens added and each target given its name."""
        sqlite = m.state.removeprefix("sqlite:")
        p = m.prometheus
        tokens = self.tokens(m.auth)
        targets: dict[str, Target] = {}
        for name, t in m.targets.items():
            if isinstance(t, NginxTarget):  # its files, relative to the config file
                t = replace(t, file=self.path(str(t.file)), server_file=None
                            if t.server_file is None else self.path(str(t.server_file)))
            targets[name] = replace(t, name=name)
        if self.problems:
            raise ValidationFailed(self.problems)
        policies = m.policies
        return m.model_copy(update={
            "state": m.state if sqlite == m.state else f"sqlite:{self.path(sqlite)}",
            "prometheus": p.model_copy(update={
                "bearer_token_file": self.absolute(p.bearer_token_file),
                "ca_file": self.absolute(p.ca_file)}),
            "policies": self.absolute(policies) if isinstance(policies, str)
            else [self.absolute(item) for item in policies],
            "auth": m.auth.model_copy(update={"tokens": tokens, "tokens_file": None}),
            "tls": m.tls and TlsDoc(cert=self.absolute(m.tls.cert), key=self.absolute(m.tls.key)),
            "targets": targets})

    @overload
    def absolute(self, value: str) -> str: ...
    @overload
    def absolute(self, value: None) -> None: ...
    def absolute(self, value: str | None) -> str | None:
        return None if value is None else str(self.path(value))

    def tokens(self, auth: AuthDoc) -> list[Token]:
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
        return out

    def tokens_file(self, doc: yamlsrc.Doc) -> list[Token]:
        wrapped = isinstance(doc.data, dict)
        data = doc.data.get("tokens") if wrapped else doc.data
        if not isinstance(data, list):
            self.problems.append(validation.problem(doc, (), "must be a list of {name, sha256, "
                                                             "role} (or tokens: [...])"))
            return []
        try:
            return _TOKEN_LIST.validate_python(data)
        except ValidationError as e:
            self.problems.extend(validation.problems(
                doc, e, AuthDoc, at=("tokens",) if wrapped else (), messages=CONFIG_MESSAGES))
            return []


_TOKEN_LIST: TypeAdapter[list[Token]] = TypeAdapter(list[Token])


def cross_check(cfg: Config, policies: Mapping[str, policy_mod.Policy],
                doc: yamlsrc.Doc) -> list[Problem]:
    """Problems that need both the config and its policies: unknown policy names and
    query templates that no target var fills."""
    problems: list[Problem] = []
    for name, target in cfg.targets.items():
        pol = policies.get(target.policy) if target.policy is not None else None
        if pol is None:
            if target.policy is not None:
                problems.append(validation.problem(doc, ("targets", name, "policy"),
                                                   f"no policy named {target.policy!r}; loaded: "
                                                   f"{', '.join(sorted(policies)) or 'none'}"))
            continue
        missing = pol.template_names() - set(target.vars) - fields.BUILTIN_VARS
        if missing:
            problems.append(validation.problem(doc, ("targets", name, "vars"),
                                               f"policy {pol.name!r} uses "
                                               f"{', '.join(sorted(missing))}; add them to vars"))
    return problems
