"""Prometheus instant queries through prometheus-api-client, off the event loop.

The client blocks (requests), so every call runs here, and nowhere else, on a small
thread pool of Prometheus's own: a Prometheus that accepts connections and never answers
can hold those threads, never the default pool that the store, the routers and leader
election use. Credentials (headers, a bearer token file, basic auth) and a CA file come
from the config's `prometheus:` block; no secret value reaches a log line or an error.
Retries are tenacity's, on MetricsError only.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from canary import schema, validation
from canary.errors import InvalidInput, MetricsError
from canary.fields import (
    SECTION,
    EnvName,
    PositiveDuration,
    Section,
    SendUrl,
    Setting,
    format_duration,
    render,
)
from canary.gates.evaluate import judge, judge_compare
from canary.gates.kinds import CompareGate, ErrorsGate, Gate
from canary.model import Reading, Verdict

T = TypeVar("T")
R = TypeVar("R")


# ---- the config's `prometheus:` block --------------------------------------------------

# headers that carry credentials: their values belong in a file or the environment
_SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie"}
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# the schema's way to say it (no (?i) in editors' regexes): [Cc][Oo][Oo][Kk][Ii][Ee]
_SECRET_HEADER = "^(" + "|".join("".join(f"[{c.upper()}{c}]" if c.isalpha() else c for c in h)
                                 for h in sorted(_SECRET_HEADERS)) + ")$"


def _header_name(name: str) -> str:
    if not _HEADER_NAME.fullmatch(name):  # (match: `$` would let "X-A\n" through)
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


class BasicAuthDoc(Section):
    username: Annotated[Setting, Field(pattern=r"^[^:]*$")]
    """The basic-auth user name (no ':')."""
    password_env: EnvName
    """The environment variable that holds the password; it must be set when canary
    starts."""
    password: SkipJsonSchema[Annotated[Any, AfterValidator(_no_password)]] = None


class PrometheusDoc(BaseModel):
    model_config = ConfigDict(**SECTION, json_schema_extra={  # each sets the Authorization header
        "not": {"required": ["basic_auth", "bearer_token_file"]}})
    url: SendUrl = "http://127.0.0.1:9090"
    """Prometheus's base URL, http:// or https://, without credentials."""
    timeout: PositiveDuration = 10.0
    """How long one query may take, a duration (default 10s)."""
    headers: Annotated[dict[Annotated[str, AfterValidator(_header_name),
                                      WithJsonSchema({"pattern": _HEADER_NAME.pattern})],
                  Annotated[str, Field(max_length=4096, json_schema_extra={
                      "pattern": r"^[^\x00-\x1f\x7f]*$"}), AfterValidator(_header_value)]],
                       Field(json_schema_extra=schema.refused_keys(_SECRET_HEADER),
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

    @field_validator("url", mode="before")  # (before the URL's form: say this first)
    @classmethod
    def _no_credentials(cls, url: object) -> object:
        try:
            user = urllib.parse.urlsplit(url).username if isinstance(url, str) else None
        except ValueError:  # not a URL at all: the URL's own check says so
            return url
        if user is not None:
            raise ValueError("carries credentials (user@ or user:password@); a secret is never "
                             "written in the config: use prometheus.basic_auth {username, "
                             "password_env}")
        return url



MESSAGES = {
    "concurrency": "must be a whole number from 1 to 256: how many queries may wait on "
                   "Prometheus at once",
    "username": "cannot contain ':' (HTTP basic auth)",
}


class MetricSource(Protocol):
    async def query(self, promql: str) -> float | None:
        """One number, None for no sample; MetricsError when it cannot say."""
        ...


class TokenFile:
    """A bearer token kept in a file (a mounted Secret, a sidecar's output), re-read when the
    file changes (another inode, mtime or size), so a rotated token is used at the next
    query without a restart; and every few seconds anyway, since a same-size rewrite within
    one tick of the file system's clock leaves mtime as it was. Called from the query
    threads, hence the lock."""

    REREAD = 5.0  # seconds

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._read_at = 0.0
        self._token = ""

    @property
    def last(self) -> str:
        """The token read last ("" before the first read), for redaction."""
        return self._token

    def token(self) -> str:
        """The current token; MetricsError (naming the file, never its contents) if it
        cannot be read or cannot be sent as a header."""
        try:
            st = os.stat(self.path)
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
            with self._lock:
                now = self._clock()
                if seen != self._seen or now - self._read_at >= self.REREAD:
                    text = self.path.read_bytes().decode("utf-8").strip()
                    if not text:
                        raise MetricsError(f"bearer_token_file {self.path} is empty")
                    if not all(0x20 < ord(c) < 0x7F for c in text):
                        raise MetricsError(f"bearer_token_file {self.path} holds characters a "
                                           "token cannot have (spaces, line breaks, non-ASCII)")
                    self._token, self._seen, self._read_at = text, seen, now
                return self._token
        except OSError as e:
            raise MetricsError(f"cannot read bearer_token_file {self.path}: "
                               f"{e.strerror or type(e).__name__}") from None
        except UnicodeDecodeError:
            raise MetricsError(f"bearer_token_file {self.path} is not UTF-8 text") from None


class _Authorization:
    """A requests auth hook (any callable taking the prepared request): sets Authorization
    from basic auth or the current bearer token, per request."""

    def __init__(self, *, basic: tuple[str, str] | None, token_file: TokenFile | None) -> None:
        self._basic = None
        if basic is not None:
            self._basic = "Basic " + base64.b64encode(":".join(basic).encode()).decode()
        self._token_file = token_file

    def __call__(self, request: Any) -> Any:
        if self._basic is not None:
            request.headers["Authorization"] = self._basic
        elif self._token_file is not None:
            request.headers["Authorization"] = f"Bearer {self._token_file.token()}"
        return request


class PrometheusSource:
    def __init__(self, url: str, *, timeout: float = 10.0, client: Any = None,
                 access: PrometheusDoc | None = None) -> None:
        access = access or PrometheusDoc()
        self._secrets: list[str] = [v for v in access.headers.values() if len(v) >= 4]
        self._token_file = (TokenFile(Path(access.bearer_token_file))
                            if access.bearer_token_file is not None else None)
        self._session: Any = None
        if client is None:
            import requests
            from prometheus_api_client import PrometheusConnect
            from urllib3.util.retry import Retry

            basic = None
            if access.basic_auth is not None:
                password = os.environ.get(access.basic_auth.password_env)
                if not password:
                    raise InvalidInput(f"prometheus.basic_auth.password_env: environment variable "
                                       f"{access.basic_auth.password_env} is not set")
                basic = (access.basic_auth.username, password)
                self._secrets += [password, base64.b64encode(":".join(basic).encode()).decode()]
            if self._token_file is not None:
                try:
                    self._secrets.append(self._token_file.token())
                except MetricsError as e:
                    raise InvalidInput(f"prometheus.{e}") from None
            self._session = requests.Session()
            # requests takes a CA bundle's path where it takes True/False
            self._session.verify = str(access.ca_file) if access.ca_file else True
            auth = (_Authorization(basic=basic, token_file=self._token_file)
                    if basic or self._token_file else None)
            client = PrometheusConnect(url=url, headers=dict(access.headers) or None,
                                       retry=Retry(total=0), auth=auth, session=self._session,
                                       timeout=timeout)
        self._client = client
        self._timeout = timeout
        # requests' timeout bounds connecting and each read; this bounds the whole wait,
        # queueing for a thread included, a little past it
        self._deadline = timeout + min(2.0, 0.5 + timeout / 10)
        self._concurrency = access.concurrency
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=access.concurrency, thread_name_prefix="prometheus")

    def _redact(self, text: str) -> str:
        secrets = self._secrets
        if self._token_file is not None and self._token_file.last:
            secrets = [*secrets, self._token_file.last]
        for s in secrets:
            text = text.replace(s, "<redacted>")
        return text

    def _query_blocking(self, promql: str) -> Any:
        try:
            return self._client.custom_query(
                promql, params={"timeout": format_duration(self._timeout)}, timeout=self._timeout)
        except MetricsError:
            raise
        except Exception as e:  # requests and the client raise many kinds; all mean "no answer"
            text = self._redact(str(e).replace("\n", " "))
            raise MetricsError(f"prometheus query failed: {type(e).__name__}: {text[:300]}") from e

    async def _ask(self, promql: str) -> Any:
        """The query's raw result, on Prometheus's own threads, within the deadline."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._deadline):
                return await loop.run_in_executor(self._executor, self._query_blocking, promql)
        except TimeoutError:
            raise MetricsError(f"prometheus did not answer within {self._deadline:g}s "
                               f"(at most {self._concurrency} queries wait on it at once; "
                               "prometheus.concurrency)") from None
        except RuntimeError as e:  # the executor is shut down: the controller is stopping
            raise MetricsError(f"prometheus source closed: {e}") from None

    async def query(self, promql: str) -> float | None:
        return parse_result(await self._ask(promql))

    async def query_series(self, promql: str) -> dict[str, float]:
        """Every series the query returns, by its labels: an `errors` gate's counters
        read per pod, so a pod that restarts resets only its own count."""
        return parse_series(await self._ask(promql))

    def close(self) -> None:
        """Stop taking queries; threads still waiting on Prometheus end at their timeout."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._session is not None:
            self._session.close()


class CoalescingSource:
    """Identical queries asked within `window` seconds share one request: rollouts whose
    gates read the same series (the same service-wide query) cost Prometheus one query
    per tick, not one each."""

    def __init__(self, inner: MetricSource, *, window: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._inner, self._window, self._clock = inner, window, clock
        self._recent: dict[str, tuple[float, asyncio.Future[float | None]]] = {}
        self._series: dict[str, tuple[float, asyncio.Future[dict[str, float]]]] = {}
        self.sent = 0

    async def _shared(self, recent: dict[str, tuple[float, asyncio.Future[R]]], promql: str,
                      ask: Callable[[str], Awaitable[R]]) -> R:
        """The answer to `promql`, shared with whoever asked the same within the window."""
        now = self._clock()
        hit = recent.get(promql)
        if hit is not None and now - hit[0] < self._window:
            return await asyncio.shield(hit[1])
        if len(recent) > 10_000:
            for q in [q for q, v in recent.items() if now - v[0] >= self._window]:
                del recent[q]
        future: asyncio.Future[R] = asyncio.ensure_future(ask(promql))
        future.add_done_callback(_consume)
        recent[promql] = (now, future)
        self.sent += 1
        return await asyncio.shield(future)

    async def query_series(self, promql: str) -> dict[str, float]:
        inner = getattr(self._inner, "query_series", None)
        if inner is None:
            value = await self.query(promql)
            return {} if value is None else {"": value}
        return await self._shared(self._series, promql, inner)

    async def query(self, promql: str) -> float | None:
        return await self._shared(self._recent, promql, self._inner.query)


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark a shared query's error as seen even when no one is waiting any more."""
    if not future.cancelled():
        future.exception()


def parse_result(result: Any) -> float | None:
    """An instant-query `result` -> one float, None for no sample."""
    if isinstance(result, list) and len(result) == 2 and not isinstance(result[0], dict):
        return float(result[1])  # scalar
    if not isinstance(result, list):
        raise MetricsError(f"unexpected query result {str(result)[:200]}")
    if not result:
        return None
    if len(result) > 1:
        raise MetricsError(f"query returned {len(result)} series; a gate needs one number "
                           "(aggregate it with sum(), max() or similar)")
    try:
        value = float(result[0]["value"][1])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise MetricsError(f"unexpected query result {str(result)[:200]}") from e
    return value


def parse_series(result: Any) -> dict[str, float]:
    """An instant-query `result` -> {labels: value} for every series ("" for a scalar or
    a series without labels)."""
    if isinstance(result, list) and len(result) == 2 and not isinstance(result[0], dict):
        return {"": float(result[1])}
    if not isinstance(result, list):
        raise MetricsError(f"unexpected query result {str(result)[:200]}")
    out: dict[str, float] = {}
    try:
        for item in result:
            labels = ",".join(f"{k}={v}" for k, v in sorted(item.get("metric", {}).items()))
            out[labels] = float(item["value"][1])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise MetricsError(f"unexpected query result {str(result)[:200]}") from e
    return out


async def measure(source: MetricSource, gates: Iterable[Gate], values: Mapping[str, str], *,
                  attempts: int = 3, budget: float = 10.0) -> tuple[Reading, ...]:
    """Query every gate (concurrently), retrying failures with backoff within `budget`
    seconds; a gate whose query keeps failing reads as `error`, never as a pass.
    `{{ version }}` is the canary's version, or stable's for the other side of a
    comparison."""
    canary = {**values, "version": values.get("canary_version", "")}
    stable = {**values, "version": values.get("stable_version", "")}

    async def retrying(call: Callable[[str], Awaitable[T]], promql: str) -> T:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(MetricsError),
            stop=stop_after_attempt(attempts) | stop_after_delay(budget),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            reraise=True,
        ):
            with attempt:
                return await call(promql)
        raise AssertionError("unreachable: AsyncRetrying either returns or raises")

    async def ask(promql: str) -> float | None:
        return await retrying(source.query, promql)

    async def ask_series(promql: str) -> dict[str, float]:
        many = getattr(source, "query_series", None)
        if many is None:  # a source that reads one number only
            value = await ask(promql)
            return {} if value is None else {"": value}
        series: dict[str, float] = await retrying(many, promql)
        return series

    async def one(g: Gate) -> Reading:
        try:
            if isinstance(g, CompareGate):
                c, b = await asyncio.gather(
                    ask(render(g.query, canary)),
                    ask(render(g.baseline, stable) if g.baseline else render(g.query, stable)))
                return judge_compare(g, c, b)
            if isinstance(g, ErrorsGate):
                got = await asyncio.gather(*(ask_series(render(q, side))
                                             for side in (canary, stable)
                                             for q in (g.requests, g.errors)))
                raw: dict[str, float | None] = {}
                for key, series in zip(("canary_requests", "canary_errors", "stable_requests",
                                        "stable_errors"), got, strict=True):
                    # the total, and each series apart ("key|labels"), so the gate handles
                    # a counter reset per series (one pod restarting), not of the whole sum
                    raw[key] = sum(series.values()) if series else None
                    if len(series) > 1 or (series and next(iter(series))):
                        raw.update({f"{key}|{labels}": v for labels, v in series.items()})
                return Reading(gate=g.name, verdict=Verdict.PENDING, raw=raw)
            return judge(g, await ask(render(g.query, canary)))
        except MetricsError as e:
            return Reading(gate=g.name, verdict=Verdict.ERROR, detail=str(e))

    return tuple(await asyncio.gather(*(one(g) for g in gates)))
