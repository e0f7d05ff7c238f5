"""Leader election with a coordination.k8s.io/v1 Lease, as client-go does it.

One replica holds the Lease and renews it every `retry_period`; the others watch its
renewals and take it over only after it went `lease_duration` without one (measured on
their own clock, so clocks need not agree). A leader that cannot renew for
`renew_deadline` (< lease_duration, and every API call is bounded well under the
difference) steps down and stops acting before anyone else may start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from canary import kube
from canary.executors import Pool

log = logging.getLogger("canary.leader")


def _now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, api: Any, namespace: str, identity: str, *,
                 name: str = "canary-leader", lease_duration: float = 15.0,
                 renew_deadline: float = 10.0, retry_period: float = 2.0,
                 on_start: Callable[[], Awaitable[None]], on_stop: Callable[[], Awaitable[None]]
                 ) -> None:
        assert renew_deadline < lease_duration
        self._api, self.namespace, self.identity, self.name = api, namespace, identity, name
        self.lease_duration, self.renew_deadline = lease_duration, renew_deadline
        self.retry_period = retry_period
        self._on_start, self._on_stop = on_start, on_stop
        self.leading = False
        self.leader: str | None = None
        self._last_renew = 0.0
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        # on_start runs beside the renewals (a slow start must not let the lease lapse
        # while this replica acts); a start that failed waits `_backoff` before the next
        self._starting: asyncio.Task[None] | None = None
        self._not_before = 0.0
        self._backoff = 0.0
        # renewals have a pool of their own: nothing else may delay them past the deadline
        self._pool = Pool("kube-lease", 2)

    def _coord(self) -> Any:
        from kubernetes import client

        return client.CoordinationV1Api(self._api)

    async def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        call = self._pool.run(fn, *args, _request_timeout=kube.REQUEST_TIMEOUT, **kw)
        if not self.leading:
            return await call
        # a leader's calls end by the renew deadline, answered or not (each is bounded,
        # but a read and a write together could outlast it): the step-down below then
        # comes before the others may take over. (Only the calls: on_start and on_stop
        # are never cut short.)
        left = self.renew_deadline - (time.monotonic() - self._last_renew)
        try:
            return await asyncio.wait_for(call, timeout=max(left, 0.001))
        except TimeoutError:
            raise TimeoutError("no answer from the API server before the renew deadline") \
                from None

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._try()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("lease: %s", kube.message_of(e),
                                extra={"lease": self.name, "identity": self.identity})
                await self._check_start()
                if self.leading and time.monotonic() - self._last_renew > self.renew_deadline:
                    log.warning("lost the lease: could not renew it in time; stepping down",
                                extra={"identity": self.identity})
                    await self._stop_leading()
                await asyncio.sleep(self.retry_period)
        finally:
            if self.leading:
                await self._stop_leading()
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._release())

    async def _try(self) -> None:
        coord = self._coord()
        try:
            resp = await self._call(coord.read_namespaced_lease, self.name, self.namespace,
                                    _preload_content=False)
            lease = json.loads(resp.data)
        except Exception as e:
            if kube.status_of(e) != 404:
                raise
            if time.monotonic() < self._not_before:
                return  # a start just failed here: give it time before leading again
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(transitions=0, acquire=True)}
            sent = time.monotonic()
            await self._call(coord.create_namespaced_lease, self.namespace, body)
            self._became_leader(sent)
            return
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        self.leader = holder
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        now = time.monotonic()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        if holder == self.identity and (self.leading or now >= self._not_before):
            lease["spec"] = {**spec, **self._spec(spec.get("leaseTransitions", 0), acquire=False)}
            # the renewal counts from when it was sent, not answered: the others count
            # from when they see it, which is after it was sent, however late the answer
            sent = time.monotonic()
            await self._call(coord.replace_namespaced_lease, self.name, self.namespace, lease)
            if self.leading:
                self._last_renew = sent
            else:
                self._became_leader(sent)
            return
        if self.leading:
            # someone else holds it now: we must not act
            await self._stop_leading()
        expired = not holder or now - self._observed_at > self.lease_duration
        if not expired or now < self._not_before:
            return
        lease["spec"] = self._spec(int(spec.get("leaseTransitions") or 0) + 1, acquire=True)
        sent = time.monotonic()
        await self._call(coord.replace_namespaced_lease, self.name, self.namespace, lease)
        log.info("took over the lease", extra={"identity": self.identity, "from": holder})
        self._became_leader(sent)

    def _spec(self, transitions: int, *, acquire: bool) -> dict[str, Any]:
        now = _now_micro()
        spec: dict[str, Any] = {"holderIdentity": self.identity,
                                "leaseDurationSeconds": max(1, round(self.lease_duration)),
                                "renewTime": now, "leaseTransitions": transitions}
        if acquire:
            spec["acquireTime"] = now
        return spec

    def _became_leader(self, sent: float) -> None:
        self._last_renew = sent
        self.leading, self.leader = True, self.identity
        log.info("leading", extra={"identity": self.identity, "lease": self.name})
        self._starting = asyncio.ensure_future(self._on_start())

    async def _check_start(self) -> None:
        """A start that failed (its rollouts not resumed) must not go on holding the
        lease: step down, hand it over, and wait longer each time before leading again,
        so this replica or another starts afresh."""
        start = self._starting
        if start is None or not start.done():
            return
        self._starting = None
        error = None if start.cancelled() else start.exception()
        if error is None:
            self._backoff = 0.0
            return
        self._backoff = min(max(2 * self._backoff, self.retry_period), 60.0)
        self._not_before = time.monotonic() + self._backoff
        log.error("could not start leading; stepping down, next try in %gs", self._backoff,
                  extra={"identity": self.identity}, exc_info=error)
        if self.leading:
            await self._stop_leading()
            with contextlib.suppress(Exception):
                await self._release()

    async def _stop_leading(self) -> None:
        self.leading = False
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
            self._starting = None
        # finished even if this task is cancelled meanwhile (a step-down cut short would
        # leave rollouts running on a replica that no longer leads), then the
        # cancellation goes on; a step-down that fails says so, here
        stop = asyncio.ensure_future(self._on_stop())
        cancelled = False
        while True:
            try:
                await asyncio.shield(stop)
                break
            except asyncio.CancelledError:
                if stop.done():
                    break
                cancelled = True
        if cancelled:
            if not stop.cancelled() and stop.exception() is not None:
                log.error("stepping down failed", exc_info=stop.exception(),
                          extra={"identity": self.identity})
            raise asyncio.CancelledError

    async def _release(self) -> None:
        """On a clean shutdown, hand the lease over at once instead of letting it expire."""
        coord = self._coord()
        resp = await self._call(coord.read_namespaced_lease, self.name, self.namespace,
                                _preload_content=False)
        lease = json.loads(resp.data)
        if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
            lease["spec"]["holderIdentity"] = None
            await self._call(coord.replace_namespaced_lease, self.name, self.namespace, lease)
