"""The controller config (`canary serve --config FILE`): listen address, state, Prometheus,
policies, tokens and targets, checked field by field with file:line problems."""

from __future__ import annotations

import enum
import fnmatch
import os
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from canary import policy as policy_mod
from canary import yamlsrc
from canary.errors import Problem, ValidationFailed


class Role(enum.IntEnum):
    VIEWER = 1
    PIPELINE = 2
    ONCALL = 3


@dataclass(frozen=True)
class Token:
    name: str
    sha256: str
    role: Role
    # globs of the targets this token may read or act on; None: every target
    targets: tuple[str, ...] | None = None

    def may_see(self, target: str) -> bool:
        return self.targets is None or any(fnmatch.fnmatchcase(target, g) for g in self.targets)


@dataclass(frozen=True)
class NginxTarget:
    name: str
    file: Path
    upstream: str
    stable: tuple[str, ...]
    canary: tuple[str, ...]
    test: tuple[str, ...] = ("nginx", "-t")
    reload: tuple[str, ...] = ("nginx", "-s", "reload")
    policy: str | None = None
    vars: Mapping[str, str] = field(default_factory=dict)
    stable_version: str | None = None
    router: str = "nginx"


@dataclass(frozen=True)
class IstioDestination:
    host: str
    subset: str | None = None


@dataclass(frozen=True)
class IstioTarget:
    name: str
    namespace: str
    virtual_service: str
    stable: IstioDestination
    canary: IstioDestination
    route: str | None = None
    policy: str | None = None
    vars: Mapping[str, str] = field(default_factory=dict)
    stable_version: str | None = None
    router: str = "istio"


Target = NginxTarget | IstioTarget


@dataclass(frozen=True)
class LeaderElection:
    """Only with state: kubernetes:NS. Defaults as client-go's."""

    name: str = "canary-leader"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


@dataclass(frozen=True)
class PrometheusAccess:
    """How canary reaches Prometheus beyond its URL. It names where secrets are (a file, an
    environment variable), never holds their values, and keeps header values out of reprs."""

    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    bearer_token_file: Path | None = None
    basic_auth_username: str | None = None
    basic_auth_password_env: str | None = None
    ca_file: Path | None = None
    concurrency: int = 8  # queries in flight at once, each on its own thread


# headers that carry credentials: their values belong in a file or the environment
_SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie"}
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# a target name, or a glob over target names: *, ?, [abc], [!abc], [a-z]
_TARGET_GLOB = re.compile(r"^(?:[A-Za-z0-9_.*?-]|\[!?[A-Za-z0-9_.-]+\])+$")


@dataclass(frozen=True)
class Config:
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


_TOP = {"listen", "state", "prometheus", "policies", "auth", "targets", "tls",
        "leader_election"}
_NGINX = {"router", "file", "upstream", "stable", "canary", "test", "reload", "policy", "vars",
          "stable_version"}
_ISTIO = {"router", "namespace", "virtual_service", "route", "stable", "canary", "policy", "vars",
          "stable_version"}
_ADDRESS = re.compile(r"^(?:unix:\S+|\[?[A-Za-z0-9.:-]+\]?:\d{1,5})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DNS = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def looks_like_config(data: Any) -> bool:
    return isinstance(data, dict) and bool(set(data) & {"targets", "listen", "auth", "prometheus"})


def load_file(path: str | Path) -> Config:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ValidationFailed([Problem(str(p), 1, "(file)", f"cannot read: {e.strerror}")]) from e
    return parse(yamlsrc.load(raw, str(p)), base=p.parent)


def parse(doc: yamlsrc.Doc, *, base: Path) -> Config:
    return _Checker(doc, base).config()


class _Checker:
    def __init__(self, doc: yamlsrc.Doc, base: Path) -> None:
        self.doc = doc
        self.base = base
        self.problems: list[Problem] = []

    def problem(self, path: yamlsrc.Path, message: str) -> None:
        name = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in path)
        self.problems.append(Problem(self.doc.file, self.doc.line(path),
                                     name.replace(".[", "[") or "(file)", message))

    def unknown(self, data: Mapping[str, Any], allowed: set[str], path: yamlsrc.Path) -> None:
        for key in data:
            if key not in allowed:
                self.problem((*path, key), f"unknown field; expected one of {', '.join(sorted(allowed))}")

    def string(self, data: Mapping[str, Any], key: str, path: yamlsrc.Path, *,
               required: bool = True, default: str | None = None) -> str | None:
        value = data.get(key, default)
        if value is None:
            if required:
                self.problem((*path, key), "required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.problem((*path, key), "must be a non-empty string")
            return None
        return value

    def duration(self, data: Mapping[str, Any], key: str, path: yamlsrc.Path,
                 default: float) -> float:
        """A duration above 0 (and, as every duration, whole milliseconds up to 30 days)."""
        if key not in data:
            return default
        try:
            value = policy_mod.parse_duration(data[key])
        except ValueError as e:
            self.problem((*path, key), str(e))
            return default
        if value <= 0:
            self.problem((*path, key), "must be longer than 0, e.g. 10s")
            return default
        return value

    def strings(self, data: Mapping[str, Any], key: str, path: yamlsrc.Path,
                default: tuple[str, ...] | None = None) -> tuple[str, ...]:
        value = data.get(key)
        if value is None:
            if default is None:
                self.problem((*path, key), "required: a list")
                return ()
            return default
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and v for v in value)):
            self.problem((*path, key), "must be a non-empty list of strings")
            return ()
        return tuple(value)

    def config(self) -> Config:
        data = self.doc.data
        if not isinstance(data, dict):
            self.problem((), "a controller config is a YAML mapping (listen, state, prometheus, "
                             "policies, auth, targets)")
            raise ValidationFailed(self.problems)
        self.unknown(data, _TOP, ())
        host, port = "127.0.0.1", 8080
        listen = data.get("listen", "127.0.0.1:8080")
        m = re.fullmatch(r"\[?([^\]]*?)\]?:(\d{1,5})", str(listen))
        if not m or not 0 < int(m.group(2)) < 65536:
            self.problem(("listen",), "must be host:port, like 127.0.0.1:8080")
        else:
            host, port = m.group(1) or "0.0.0.0", int(m.group(2))
        state = str(data.get("state", "sqlite:canary-state.db"))
        if state.startswith("sqlite:") and len(state) > len("sqlite:"):
            path = Path(state[len("sqlite:"):])
            state = "sqlite:" + str(path if path.is_absolute() else self.base / path)
        elif not (state.startswith("kubernetes:") and _DNS.match(state[len("kubernetes:"):])):
            self.problem(("state",), "must be sqlite:PATH or kubernetes:NAMESPACE")
        prom = data.get("prometheus", {})
        url, timeout = "http://127.0.0.1:9090", 10.0
        access = PrometheusAccess()
        if not isinstance(prom, dict):
            self.problem(("prometheus",), "must be a mapping with url")
        else:
            self.unknown(prom, {"url", "timeout", "headers", "bearer_token_file", "basic_auth",
                                "ca_file", "concurrency"}, ("prometheus",))
            url = self.string(prom, "url", ("prometheus",), default=url) or url
            if not re.match(r"^https?://", url):
                self.problem(("prometheus", "url"), "must start with http:// or https://")
            elif urllib.parse.urlsplit(url).username is not None:
                self.problem(("prometheus", "url"), "carries credentials (user@ or user:password@); "
                             "a secret is never written in the config: use prometheus.basic_auth "
                             "{username, password_env}")
            if "timeout" in prom:
                timeout = self.duration(prom, "timeout", ("prometheus",), timeout)
            access = self.prometheus_access(prom)
        policy_paths = self.policy_paths(data.get("policies", "policies/"))
        tokens = self.tokens(data.get("auth"))
        targets = self.targets(data.get("targets"))
        cert, key = self.tls(data.get("tls"))
        election = self.election(data.get("leader_election"))
        if self.problems:
            raise ValidationFailed(self.problems)
        return Config(listen_host=host, listen_port=port, state=state, prometheus_url=url,
                      prometheus_timeout=timeout, policy_paths=policy_paths, tokens=tokens,
                      targets=targets, source=self.doc.file, tls_cert=cert, tls_key=key,
                      leader_election=election, prometheus_access=access)

    def prometheus_access(self, prom: Mapping[str, Any]) -> PrometheusAccess:
        """headers, bearer_token_file, basic_auth, ca_file, concurrency. A secret is named
        (a file, an environment variable), never written here: one that is is refused."""
        at: yamlsrc.Path = ("prometheus",)
        headers: dict[str, str] = {}
        raw = prom.get("headers", {})
        if not isinstance(raw, dict):
            self.problem((*at, "headers"), "must be a mapping of header name -> value, like "
                                           "{X-Scope-OrgID: team-a}")
            raw = {}
        for name, value in raw.items():
            where = (*at, "headers", name)
            if not isinstance(name, str) or not _HEADER_NAME.match(name):
                self.problem(where, "is not an HTTP header name")
            elif name.lower() in _SECRET_HEADERS:
                self.problem(where, "carries a credential, and a secret is never written in the "
                                    "config: put a bearer token in a file named by "
                                    "prometheus.bearer_token_file, or use prometheus.basic_auth "
                                    "{username, password_env}")
            elif not isinstance(value, str | int) or isinstance(value, bool):
                self.problem(where, "must be a plain string")
            elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in str(value)):
                self.problem(where, "must not contain control characters (line breaks, tabs)")
            else:
                headers[name] = str(value)
        token_file = None
        if "bearer_token_file" in prom:
            value = self.string(prom, "bearer_token_file", at)
            if value is not None:
                token_file = self.path(value)
                try:
                    text = token_file.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as e:
                    why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
                    self.problem((*at, "bearer_token_file"), f"cannot read {token_file}: {why}")
                else:
                    if not text.strip():
                        self.problem((*at, "bearer_token_file"), f"{token_file} is empty")
        username = password_env = None
        if "basic_auth" in prom:
            username, password_env = self.basic_auth(prom["basic_auth"], (*at, "basic_auth"))
            if token_file is not None:
                self.problem((*at, "basic_auth"), "use basic_auth or bearer_token_file, not both: "
                                                  "each sets the Authorization header")
        ca_file = None
        if "ca_file" in prom:
            value = self.string(prom, "ca_file", at)
            if value is not None:
                ca_file = self.path(value)
                try:
                    ssl.create_default_context(cafile=str(ca_file))
                except FileNotFoundError:
                    self.problem((*at, "ca_file"), f"{ca_file} does not exist")
                except (OSError, ssl.SSLError) as e:
                    self.problem((*at, "ca_file"), f"{ca_file} is not a PEM CA certificate "
                                                   f"bundle: {e}")
        concurrency = prom.get("concurrency", PrometheusAccess.concurrency)
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) \
                or not 1 <= concurrency <= 256:
            self.problem((*at, "concurrency"), "must be a whole number from 1 to 256: how many "
                                               "queries may wait on Prometheus at once")
            concurrency = PrometheusAccess.concurrency
        return PrometheusAccess(headers=headers, bearer_token_file=token_file,
                                basic_auth_username=username, basic_auth_password_env=password_env,
                                ca_file=ca_file, concurrency=concurrency)

    def basic_auth(self, raw: Any, at: yamlsrc.Path) -> tuple[str | None, str | None]:
        if not isinstance(raw, dict):
            self.problem(at, "must be a mapping {username, password_env}")
            return None, None
        if "password" in raw:
            self.problem((*at, "password"), "a secret is never written in the config: put the "
                                            "password in an environment variable and name it in "
                                            "basic_auth.password_env")
        self.unknown({k: v for k, v in raw.items() if k != "password"},
                     {"username", "password_env"}, at)
        username = self.string(raw, "username", at)
        if username is not None and ":" in username:
            self.problem((*at, "username"), "cannot contain ':' (HTTP basic auth)")
            username = None
        env = self.string(raw, "password_env", at)
        if env is not None:
            if not _ENV_NAME.match(env):
                self.problem((*at, "password_env"), "must name an environment variable "
                                                    "(letters, digits and _)")
                env = None
            elif env not in os.environ:
                self.problem((*at, "password_env"), f"environment variable {env} is not set; "
                                                    f"export it with the Prometheus password "
                                                    "before starting canary")
                env = None
            elif not os.environ[env]:
                self.problem((*at, "password_env"), f"environment variable {env} is empty")
                env = None
        return username, env

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.base / p

    def election(self, raw: Any) -> LeaderElection:
        if raw is None:
            return LeaderElection()
        path: yamlsrc.Path = ("leader_election",)
        if not isinstance(raw, dict):
            self.problem(path, "must be a mapping {name, lease_duration, renew_deadline, "
                               "retry_period}")
            return LeaderElection()
        self.unknown(raw, {"name", "lease_duration", "renew_deadline", "retry_period"}, path)
        d = LeaderElection()
        name = self.string(raw, "name", path, default=d.name) or d.name
        times = {key: self.duration(raw, key, path, getattr(d, key))
                 for key in ("lease_duration", "renew_deadline", "retry_period")}
        if not times["retry_period"] < times["renew_deadline"] < times["lease_duration"]:
            self.problem(path, "need retry_period < renew_deadline < lease_duration, so a leader "
                               "that cannot renew steps down before anyone else takes over")
        return LeaderElection(name=name, **times)

    def tls(self, raw: Any) -> tuple[Path | None, Path | None]:
        """Optional TLS for the API: `tls: {cert: FILE, key: FILE}` (PEM)."""
        if raw is None:
            return None, None
        if not isinstance(raw, dict):
            self.problem(("tls",), "must be a mapping {cert, key} of PEM files")
            return None, None
        self.unknown(raw, {"cert", "key"}, ("tls",))
        out: list[Path | None] = []
        for key in ("cert", "key"):
            value = self.string(raw, key, ("tls",))
            if value is None:
                out.append(None)
                continue
            p = Path(value)
            p = p if p.is_absolute() else self.base / p
            if not p.is_file():
                self.problem(("tls", key), f"{p} is not a readable file")
            out.append(p)
        return out[0], out[1]

    def policy_paths(self, raw: Any) -> tuple[Path, ...]:
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            self.problem(("policies",), "must be a directory or a list of policy files")
            return ()
        out: list[Path] = []
        for i, item in enumerate(items):
            p = Path(item)
            p = p if p.is_absolute() else self.base / p
            if p.is_dir():
                out.extend(sorted([*p.glob("*.yaml"), *p.glob("*.yml")]))
            elif p.is_file():
                out.append(p)
            else:
                where: yamlsrc.Path = ("policies",) if isinstance(raw, str) else ("policies", i)
                self.problem(where, f"{p} is neither a directory nor a file")
        return tuple(out)

    def tokens(self, raw: Any) -> tuple[Token, ...]:
        if raw is None:
            self.problem(("auth",), "required: auth.tokens lists who may call the API")
            return ()
        if not isinstance(raw, dict):
            self.problem(("auth",), "must be a mapping with tokens and/or tokens_file")
            return ()
        self.unknown(raw, {"tokens", "tokens_file"}, ("auth",))
        items = raw.get("tokens", [])
        if not isinstance(items, list):
            self.problem(("auth", "tokens"), "must be a list of {name, sha256, role}")
            items = []
        out = self.token_list(items, ("auth", "tokens"), self)
        if "tokens_file" in raw:
            # token hashes kept apart from the config, e.g. in a Kubernetes Secret
            path = Path(str(raw["tokens_file"]))
            path = path if path.is_absolute() else self.base / path
            try:
                doc = yamlsrc.load(path.read_bytes(), str(path))
            except OSError as e:
                self.problem(("auth", "tokens_file"), f"cannot read {path}: {e.strerror}")
            except ValidationFailed as e:
                self.problems.extend(e.problems)
            else:
                sub = _Checker(doc, self.base)
                data = doc.data.get("tokens") if isinstance(doc.data, dict) else doc.data
                if not isinstance(data, list):
                    sub.problem((), "must be a list of {name, sha256, role} (or tokens: [...])")
                    data = []
                path_: yamlsrc.Path = ("tokens",) if isinstance(doc.data, dict) else ()
                out += sub.token_list(data, path_, sub)
                self.problems.extend(sub.problems)
        if not out and not self.problems:
            self.problem(("auth", "tokens"), "no tokens: list at least one {name, sha256, role}")
        names = [t.name for t in out]
        for name in sorted({n for n in names if names.count(n) > 1}):
            self.problem(("auth", "tokens"), f"token name {name!r} is used twice")
        return tuple(out)

    @staticmethod
    def token_list(items: list[Any], at: yamlsrc.Path, where: _Checker) -> tuple[Token, ...]:
        out: list[Token] = []
        for i, item in enumerate(items):
            path: yamlsrc.Path = (*at, i)
            if not isinstance(item, dict):
                where.problem(path, "must be a mapping {name, sha256, role}")
                continue
            where.unknown(item, {"name", "sha256", "role", "targets"}, path)
            name = where.string(item, "name", path)
            digest = item.get("sha256")
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                where.problem((*path, "sha256"),
                              "must be 64 hex digits: the sha256 of the token, e.g. "
                              "`printf %s \"$TOKEN\" | sha256sum`")
                continue
            try:
                role = Role[str(item.get("role")).upper()]
            except KeyError:
                where.problem((*path, "role"), "must be one of viewer, pipeline, oncall")
                continue
            scope: tuple[str, ...] | None = None
            if "targets" in item:
                scope = where.token_scope(item["targets"], (*path, "targets"))
                if scope is None:
                    continue
            if name is not None:
                out.append(Token(name=name, sha256=digest.lower(), role=role, targets=scope))
        return tuple(out)

    def token_scope(self, raw: Any, at: yamlsrc.Path) -> tuple[str, ...] | None:
        """A token's `targets`: target names or globs (fnmatch: *, ?, [...])."""
        if not isinstance(raw, list) or not raw:
            self.problem(at, "must be a non-empty list of target names or globs, like "
                             "[\"shop\", \"shop-*\"]; leave it out for every target")
            return None
        ok = True
        for j, glob in enumerate(raw):
            if not isinstance(glob, str) or not _TARGET_GLOB.match(glob):
                self.problem((*at, j), f"{glob!r} is not a target name or glob: letters, digits, "
                                       "'.', '_', '-' and the wildcards * ? [abc] [!abc] [a-z]")
                ok = False
        return tuple(raw) if ok else None

    def targets(self, raw: Any) -> dict[str, Target]:
        if not isinstance(raw, dict) or not raw:
            self.problem(("targets",), "required: a mapping of target name -> router settings")
            return {}
        out: dict[str, Target] = {}
        for name, item in raw.items():
            path: yamlsrc.Path = ("targets", name)
            if not _NAME.match(name):
                self.problem(path, "target names are 1-63 letters, digits, '.', '_' or '-'")
                continue
            if not isinstance(item, dict):
                self.problem(path, "must be a mapping with router: nginx or router: istio")
                continue
            router = item.get("router")
            common = self.common(item, path)
            if router == "nginx":
                self.unknown(item, _NGINX, path)
                file = self.string(item, "file", path)
                upstream = self.string(item, "upstream", path)
                if upstream and not re.fullmatch(r"[A-Za-z0-9_.-]+", upstream):
                    self.problem((*path, "upstream"), "letters, digits, '.', '_' and '-' only")
                stable = self.strings(item, "stable", path)
                canary = self.strings(item, "canary", path)
                for side, addrs in (("stable", stable), ("canary", canary)):
                    for j, a in enumerate(addrs):
                        if not _ADDRESS.match(a):
                            self.problem((*path, side, j), f"{a!r} is not host:port or unix:PATH")
                if set(stable) & set(canary):
                    self.problem((*path, "canary"), "an address cannot be both stable and canary")
                test = self.strings(item, "test", path, default=("nginx", "-t"))
                reload = self.strings(item, "reload", path, default=("nginx", "-s", "reload"))
                if file and upstream:
                    fp = Path(file)
                    out[name] = NginxTarget(
                        name=name, file=fp if fp.is_absolute() else self.base / fp,
                        upstream=upstream, stable=stable, canary=canary, test=test,
                        reload=reload, **common)
            elif router == "istio":
                self.unknown(item, _ISTIO, path)
                ns = self.string(item, "namespace", path)
                vs = self.string(item, "virtual_service", path)
                route = self.string(item, "route", path, required=False)
                dests = [self.destination(item.get(side), (*path, side))
                         for side in ("stable", "canary")]
                if ns and vs and dests[0] and dests[1]:
                    out[name] = IstioTarget(name=name, namespace=ns, virtual_service=vs,
                                            route=route, stable=dests[0], canary=dests[1],
                                            **common)
            else:
                self.problem((*path, "router"), "must be nginx or istio")
        return out

    def common(self, item: Mapping[str, Any], path: yamlsrc.Path) -> dict[str, Any]:
        pol = self.string(item, "policy", path, required=False)
        stable_version = self.string(item, "stable_version", path, required=False)
        raw_vars = item.get("vars", {})
        variables: dict[str, str] = {}
        if not isinstance(raw_vars, dict):
            self.problem((*path, "vars"), "must be a mapping of name -> value")
        else:
            for k, v in raw_vars.items():
                if k in policy_mod.BUILTIN_VARS:
                    self.problem((*path, "vars", k), f"{k!r} is filled by canary itself; pick another name")
                elif not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                    self.problem((*path, "vars", k), "variable names are letters, digits and _")
                elif isinstance(v, dict | list) or v is None:
                    self.problem((*path, "vars", k), "must be a plain value")
                else:
                    variables[k] = str(v)
        return {"policy": pol, "vars": variables, "stable_version": stable_version}

    def destination(self, raw: Any, path: yamlsrc.Path) -> IstioDestination | None:
        if not isinstance(raw, dict):
            self.problem(path, "must be a mapping {host, subset}")
            return None
        self.unknown(raw, {"host", "subset"}, path)
        host = self.string(raw, "host", path)
        subset = self.string(raw, "subset", path, required=False)
        return IstioDestination(host=host, subset=subset) if host else None


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
