"""Prometheus instant queries through prometheus-api-client, off the event loop.

The client blocks (requests), so every call goes through asyncio.to_thread here and
nowhere else. Retries are tenacity's, on MetricsError only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from canary.errors import MetricsError
from canary.gates.evaluate import judge, judge_compare
from canary.model import Reading, Verdict
from canary.policy import Gate, format_duration, render


class MetricSource(Protocol):
    async def query(self, promql: str) -> float | None:
        """One number, None for no sample; MetricsError when it cannot say."""
        ...


class PrometheusSource:
    def __init__(self, url: str, *, timeout: float = 10.0, client: Any = None) -> None:
        if client is None:
            from prometheus_api_client import PrometheusConnect
            from urllib3.util.retry import Retry

            client = PrometheusConnect(url=url, disable_ssl=False, retry=Retry(total=0),
                                       timeout=timeout)
        self._client = client
        self._timeout = timeout

    def _query_blocking(self, promql: str) -> Any:
        try:
            return self._client.custom_query(
                promql, params={"timeout": format_duration(self._timeout)}, timeout=self._timeout)
        except Exception as e:  # requests and the client raise many kinds; all mean "no answer"
            text = str(e).replace("\n", " ")
            raise MetricsError(f"prometheus query failed: {type(e).__name__}: {text[:300]}") from e

    async def query(self, promql: str) -> float | None:
        result = await asyncio.to_thread(self._query_blocking, promql)
        return parse_result(result)

    async def query_series(self, promql: str) -> dict[str, float]:
        """Every series the query returns, by its labels: an `errors` gate's counters
        read per pod, so a pod that restarts resets only its own count."""
        result = await asyncio.to_thread(self._query_blocking, promql)
        return parse_series(result)


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

    async def query_series(self, promql: str) -> dict[str, float]:
        inner = getattr(self._inner, "query_series", None)
        if inner is None:
            value = await self.query(promql)
            return {} if value is None else {"": value}
        now = self._clock()
        hit = self._series.get(promql)
        if hit is not None and now - hit[0] < self._window:
            return await asyncio.shield(hit[1])
        if len(self._series) > 10_000:
            self._series = {q: v for q, v in self._series.items() if now - v[0] < self._window}
        future: asyncio.Future[dict[str, float]] = asyncio.ensure_future(inner(promql))
        future.add_done_callback(_consume)
        self._series[promql] = (now, future)
        self.sent += 1
        return await asyncio.shield(future)

    async def query(self, promql: str) -> float | None:
        now = self._clock()
        hit = self._recent.get(promql)
        if hit is not None and now - hit[0] < self._window:
            return await asyncio.shield(hit[1])
        if len(self._recent) > 10_000:
            self._recent = {q: v for q, v in self._recent.items() if now - v[0] < self._window}
        future = asyncio.ensure_future(self._inner.query(promql))
        future.add_done_callback(_consume)
        self._recent[promql] = (now, future)
        self.sent += 1
        return await asyncio.shield(future)


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

    async def ask(promql: str) -> float | None:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(MetricsError),
            stop=stop_after_attempt(attempts) | stop_after_delay(budget),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            reraise=True,
        ):
            with attempt:
                return await source.query(promql)
        return None  # pragma: no cover - AsyncRetrying either returns or raises

    async def ask_series(promql: str) -> dict[str, float]:
        many = getattr(source, "query_series", None)
        if many is None:  # a source that reads one number only
            value = await ask(promql)
            return {} if value is None else {"": value}
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(MetricsError),
            stop=stop_after_attempt(attempts) | stop_after_delay(budget),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            reraise=True,
        ):
            with attempt:
                series: dict[str, float] = await many(promql)
                return series
        return {}  # pragma: no cover - AsyncRetrying either returns or raises

    async def one(g: Gate) -> Reading:
        try:
            if g.kind == "compare":
                c, b = await asyncio.gather(
                    ask(render(g.query, canary)),
                    ask(render(g.baseline, stable) if g.baseline else render(g.query, stable)))
                return judge_compare(g, c, b)
            if g.kind == "errors":
                assert g.requests and g.errors
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
            return judge(g, None, error=str(e))

    return tuple(await asyncio.gather(*(one(g) for g in gates)))
