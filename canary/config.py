"""The controller config (`canary serve --config FILE`): listen address, state, Prometheus,
policies, tokens and targets. Its shape is written once, as models (Config); what only
the machine can tell (files, environment variables) is checked after, with file:line."""

from __future__ import annotations

import os
import re
import ssl
import stat
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, overload

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass

from canary import fields, notify, targets, validation, yamlsrc
from canary import policy as policy_mod
from canary.api import auth
from canary.api.auth import AuthDoc, Token
from canary.errors import Problem, ValidationFailed
from canary.fields import Dns, PositiveDuration, Section, SendUrl, Setting
from canary.gates import prometheus
from canary.gates.prometheus import PrometheusDoc
from canary.notify import Notification
from canary.targets import (
    NginxTarget,
    Target,
    TargetField,
)

# ---- the config's shape: one definition each -------------------------------------------------
#
# One class per part validates the file, gives the JSON Schema (`canary schema config`) and
# is what the controller uses. Each part lives with what it configures: the targets in
# targets.py, the tokens in api/auth.py, the Prometheus access in gates/prometheus.py, the
# receivers in notify.py; the rest, and Config the whole, here.

_LISTEN = re.compile(rf"\[?([^\]]*?)\]?:{fields.PORT}")
_VAR = fields.IDENTIFIER  # a template variable's or an environment variable's name
_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True)


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


def file_kind(p: Path) -> str:
    """"dir", "file", "missing", or why the path cannot be looked at (a name too long for
    the file system, a NUL in it): never an exception, whatever the config says."""
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return e.strerror or type(e).__name__
    except ValueError:
        return "a path cannot contain a NUL character"
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "neither"


def _read(p: Path) -> bytes:
    """A file the config names, read as yamlsrc reads one (a regular file, bounded, never
    waiting on a FIFO); ValueError `cannot read PATH: why` otherwise."""
    try:
        return yamlsrc.read_bytes(p)
    except ValidationFailed as e:
        why = e.problems[0].message.removeprefix("cannot read: ")
        raise ValueError(f"cannot read {p}: {why}") from None


def looks_like_config(data: Any) -> bool:
    return isinstance(data, dict) and bool(set(data) & {"targets", "listen", "auth", "prometheus"})


def load_file(path: str | Path) -> Config:
    return parse(yamlsrc.read(path), base=Path(path).parent)


class TlsDoc(Section):
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
class Config(Section):
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
    public_url: SendUrl | None = None
    """Where people open this controller: the base of links in notifications."""

    @field_validator("state")
    @classmethod
    def _state_path(cls, state: str) -> str:
        if state.startswith("sqlite:"):
            fields.a_path(state.removeprefix("sqlite:"))
        return state

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
            kind = file_kind(p)
            if kind == "dir":
                out.extend(sorted([*p.glob("*.yaml"), *p.glob("*.yml")]))
            elif kind == "file":
                out.append(p)
        return tuple(out)

    def load_policies(self) -> dict[str, policy_mod.Policy]:
        return policy_mod.load_many(self.policy_paths())


CONFIG_MESSAGES = {
    **targets.MESSAGES, **auth.MESSAGES, **prometheus.MESSAGES, **notify.MESSAGES,
    "listen": "must be host:port, like 127.0.0.1:8080",
    "state": "must be sqlite:PATH or kubernetes:NAMESPACE",
    "url": "must start with http:// or https://",
    "policies": "must be a directory or a list of policy files",
    **dict.fromkeys(("password_env", "secret_env", "url_env"), "must name an environment "
                    "variable (letters, digits and _)"),
    "leader_election.name": "must be a Kubernetes name (lowercase letters, digits, '-' and "
                            "'.'; at most 253 characters)",
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
        # read from a file: durations are text (10s) there, as the schema says
        model = Config.model_validate(doc.data, context={"file": True})
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
                if not _read(p).decode("utf-8").strip():
                    self.problem((*at, "bearer_token_file"), f"{p} is empty")
            except UnicodeDecodeError:
                self.problem((*at, "bearer_token_file"), f"cannot read {p}: not UTF-8 text")
            except ValueError as e:
                self.problem((*at, "bearer_token_file"), str(e))
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
            except (OSError, ssl.SSLError, ValueError) as e:
                self.problem((*at, "ca_file"), f"{p} is not a PEM CA certificate bundle: {e}")
        for key in ("cert", "key"):
            name = text("tls", key)
            if name is not None and file_kind(self.path(name)) != "file":
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
                kind = file_kind(p)
                if kind not in ("dir", "file"):
                    where: yamlsrc.Path = ("policies",) if isinstance(raw, str) else ("policies", i)
                    self.problem(where, f"{p} is neither a directory nor a file" + (
                        "" if kind in ("missing", "neither") else f" ({kind})"))

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
                raw = _read(path)
            except ValueError as e:  # the file itself: said where the config names it
                self.problem(("auth", "tokens_file"), str(e))
                return out
            try:
                doc = yamlsrc.load(raw, str(path))
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
