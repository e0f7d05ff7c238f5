"""Cluster state: one ConfigMap per rollout in the controller's namespace, so a new
controller pod resumes every rollout.

- `canary-rollout-<id>`: the rollout as JSON under `rollout.json`, and our version
  counter under `version`. Labels: managed-by, target, active.
- `canary-readings-<id>`: the rollout's reading history (canary/history.py) under
  `readings.json`, written after each save that adds to it, so a rollout's own object
  stays small (a failure to write it is logged; the rollout's save stands).
- `canary-target-<name>`: which rollout holds the target (`active`), and which side
  serves and what each runs (`sides.json`, written when a rollout ends). A start writes its
  rollout as `pending`, claims the target with a resourceVersion-guarded write, then
  marks the rollout active, so two racing starts give one rollout, and a claim always
  names a rollout that exists.

Every write is conditional on the resourceVersion it read (409 -> StoreConflict).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

from canary import history, jsonsafe, kube
from canary.errors import Conflict, NotFound, StoreConflict, StoreUnavailable
from canary.executors import Pool
from canary.model import Phase, Rollout, Sides
from canary.store import no_such_rollout, phases

log = logging.getLogger("canary.store")
MANAGED = {"app.kubernetes.io/managed-by": "canary"}
PENDING_GRACE = 60.0  # a start takes three quick writes; one pending longer than this crashed


def _dns(text: str) -> str:
    clean = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40] or "x"
    return f"{clean}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


READINGS_BYTES = 800_000  # a ConfigMap holds at most 1 MiB


def _fit(stored: list[history.Point]) -> str:
    """The history as JSON within READINGS_BYTES: past it, the details of older readings
    go first, then every second older point (the newest RECENT are kept whole)."""
    text = jsonsafe.dumps(stored)
    while len(text) > READINGS_BYTES and len(stored) > history.RECENT:
        old = len(stored) - history.RECENT
        if any("detail" in p for p in stored[:old]):
            stored = [{k: v for k, v in p.items() if k != "detail"} for p in stored[:old]] \
                + stored[old:]
        else:
            stored = stored[:old:2] + stored[old:]
        text = jsonsafe.dumps(stored)
    return text


class KubernetesStore:
    def __init__(self, namespace: str, api: Any) -> None:
        self.namespace = namespace
        self._api = api
        self._pool = Pool("kube-store", 4)

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self._api)

    async def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", kube.REQUEST_TIMEOUT)
        try:
            return await self._pool.run(fn, *args, **kwargs)
        except Exception as e:
            code = kube.status_of(e)
            if code == 404:
                raise NotFound(f"{what} not found") from e
            if code == 409:
                raise StoreConflict(f"{what}: changed by someone else") from e
            raise StoreUnavailable(f"state store ({what}): {kube.message_of(e)}") from e

    async def _get(self, name: str) -> dict[str, Any]:
        resp = await self._call(f"ConfigMap {self.namespace}/{name}",
                                self._core().read_namespaced_config_map, name, self.namespace,
                                _preload_content=False)
        data: dict[str, Any] = json.loads(resp.data)
        return data

    @staticmethod
    def _name(rollout_id: str) -> str:
        return f"canary-rollout-{rollout_id.lower()}"

    def _body(self, r: Rollout, version: int, rv: str | None = None, *,
              active: str | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": self._name(r.id), "namespace": self.namespace,
            "labels": {**MANAGED, "canary.dev/target": _dns(r.target),
                       "canary.dev/active": active or ("false" if r.state.final else "true")},
            "annotations": {"canary.dev/target": r.target}}
        if rv:
            meta["resourceVersion"] = rv
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                "data": {"rollout.json": jsonsafe.dumps(r.to_store()), "version": str(version)}}

    @staticmethod
    def _parse(cm: dict[str, Any]) -> Rollout:
        data = cm.get("data") or {}
        return Rollout.from_store(json.loads(data["rollout.json"]), version=int(data["version"]))

    async def create(self, *, rollout: Rollout) -> Rollout:
        """Write the rollout as `pending`, claim the target, then mark it active. A claim
        always points at a rollout that exists, so a racing start can tell a live claim
        from one left by a crash (pending for over PENDING_GRACE seconds)."""
        core = self._core()
        name = self._name(rollout.id)
        await self._call(f"ConfigMap {name}", core.create_namespaced_config_map, self.namespace,
                         self._body(rollout, 1, active="pending"))
        try:
            await self._claim(rollout)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._call(f"ConfigMap {name}", core.delete_namespaced_config_map, name,
                                 self.namespace)
            raise
        cm = await self._get(name)
        await self._call(f"ConfigMap {name}", core.replace_namespaced_config_map, name,
                         self.namespace,
                         self._body(rollout, 1, cm["metadata"]["resourceVersion"]))
        return Rollout.from_store(rollout.to_store(), version=1)

    async def _claim(self, rollout: Rollout) -> None:
        lock = f"canary-target-{_dns(rollout.target)}"
        core = self._core()
        try:
            cm: dict[str, Any] | None = await self._get(lock)
        except NotFound:
            cm = None
        if cm is None:
            body = {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": lock, "namespace": self.namespace, "labels": MANAGED,
                                 "annotations": {"canary.dev/target": rollout.target}},
                    "data": {"active": rollout.id}}
            try:
                await self._call(f"ConfigMap {lock}", core.create_namespaced_config_map,
                                 self.namespace, body)
            except StoreConflict as e:
                raise Conflict(f"target {rollout.target}: another start won the race") from e
            return
        holder = (cm.get("data") or {}).get("active")
        if holder:
            try:
                other_cm = await self._get(self._name(holder))
            except NotFound:
                other_cm = None
            if other_cm is not None:
                other = self._parse(other_cm)
                pending = other_cm["metadata"].get("labels", {}).get("canary.dev/active") == \
                    "pending"
                stale = pending and time.time() - other.started_at > PENDING_GRACE
                if not other.state.final and not stale:
                    raise Conflict(f"target {rollout.target} already has an active rollout "
                                   f"({other.id}); abort it or wait for it to end")
        cm["data"] = {**(cm.get("data") or {}), "active": rollout.id}
        try:
            await self._call(f"ConfigMap {lock}", core.replace_namespaced_config_map, lock,
                             self.namespace, cm)
        except StoreConflict as e:
            raise Conflict(f"target {rollout.target}: another start won the race") from e

    async def load(self, rollout_id: str) -> Rollout:
        try:
            return self._parse(await self._get(self._name(rollout_id)))
        except NotFound:
            raise no_such_rollout(rollout_id) from None
        except (KeyError, ValueError) as e:
            raise StoreUnavailable(f"rollout {rollout_id}: stored data unreadable: {e}") from e

    async def save(self, *, rollout: Rollout, expected_version: int,
                   readings: Sequence[history.Point] = ()) -> Rollout:
        name = self._name(rollout.id)
        cm = await self._get(name)
        current = int((cm.get("data") or {}).get("version", "0"))
        if current != expected_version:
            raise StoreConflict(f"rollout {rollout.id} changed since version {expected_version}")
        body = self._body(rollout, expected_version + 1, cm["metadata"]["resourceVersion"])
        await self._call(f"ConfigMap {name}", self._core().replace_namespaced_config_map, name,
                         self.namespace, body)
        if readings:
            try:
                await self._add_readings(rollout.id, readings)
            except (StoreUnavailable, StoreConflict) as e:
                # the rollout is saved: its history misses these points, nothing else
                log.warning("reading history not written: %s", e, extra={"rollout": rollout.id})
        return Rollout.from_store(rollout.to_store(), version=expected_version + 1)

    @staticmethod
    def _readings_name(rollout_id: str) -> str:
        return f"canary-readings-{rollout_id.lower()}"

    async def _add_readings(self, rollout_id: str, readings: Sequence[history.Point]) -> None:
        """Append to the history object (created on first use); a conflicting write (only
        this rollout's task writes it, so: a retried request) is retried on a fresh read."""
        name = self._readings_name(rollout_id)
        core = self._core()
        for attempt in range(3):
            try:
                cm: dict[str, Any] | None = await self._get(name)
            except NotFound:
                cm = None
            stored = json.loads(((cm or {}).get("data") or {}).get("readings.json", "[]"))
            stored += list(readings)
            for series in {p["series"] for p in readings}:
                mine = [i for i, p in enumerate(stored) if p["series"] == series]
                drop = {mine[i] for i in history.thin([stored[i] for i in mine])}
                stored = [p for i, p in enumerate(stored) if i not in drop]
            body: dict[str, Any] = {
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": self.namespace,
                                 # (not `managed-by`: listing rollouts never reads these)
                                 "labels": {"app.kubernetes.io/part-of": "canary",
                                            "canary.dev/readings": "true"}},
                    "data": {"readings.json": _fit(stored)}}
            try:
                if cm is None:
                    await self._call(f"ConfigMap {name}", core.create_namespaced_config_map,
                                     self.namespace, body)
                else:
                    body["metadata"]["resourceVersion"] = cm["metadata"]["resourceVersion"]
                    await self._call(f"ConfigMap {name}", core.replace_namespaced_config_map,
                                     name, self.namespace, body)
                return
            except StoreConflict:
                if attempt == 2:
                    raise

    async def readings(self, rollout_id: str) -> list[history.Point]:
        await self.load(rollout_id)  # NotFound for an unknown rollout
        try:
            cm = await self._get(self._readings_name(rollout_id))
        except NotFound:
            return []
        stored: list[history.Point] = json.loads((cm.get("data") or {}).get("readings.json",
                                                                            "[]"))
        return sorted(stored, key=lambda p: p["at"])

    async def list(self, *, active_only: bool = False, target: str | None = None,
                   state: Phase | Iterable[Phase] | None = None, limit: int | None = None,
                   before: str | None = None, events: bool = True) -> list[Rollout]:
        selector = ",".join(f"{k}={v}" for k, v in MANAGED.items())
        if active_only:
            selector += ",canary.dev/active=true"
        if target is not None:
            selector += f",canary.dev/target={_dns(target)}"
        resp = await self._call("ConfigMaps", self._core().list_namespaced_config_map,
                                self.namespace, label_selector=selector, _preload_content=False)
        items = json.loads(resp.data).get("items", [])
        out = [self._parse(cm) for cm in items if "rollout.json" in (cm.get("data") or {})
               and cm["metadata"].get("labels", {}).get("canary.dev/active") != "pending"]
        wanted = phases(state)
        out = [r for r in out if (target is None or r.target == target)
               and (wanted is None or r.state.value in wanted)]
        out.sort(key=lambda r: (r.started_at, r.id), reverse=True)
        if before is not None:
            at = next((i for i, r in enumerate(out) if r.id == before), None)
            if at is None:
                try:  # it exists, but another filter leaves it out: start where it would be
                    ref = await self.load(before)
                except NotFound:
                    raise NotFound(f"no rollout with id {before!r}") from None
                at = sum(1 for r in out if (r.started_at, r.id) > (ref.started_at, ref.id)) - 1
            out = out[at + 1:]
        if limit is not None:
            out = out[:limit]
        if not events:
            out = [dataclasses.replace(r, events=()) for r in out]
        return out

    async def ping(self) -> None:
        await self._call("ConfigMaps", self._core().list_namespaced_config_map, self.namespace,
                         limit=1, _preload_content=False)

    async def sides(self, target: str) -> Sides | None:
        try:
            cm = await self._get(f"canary-target-{_dns(target)}")
        except NotFound:
            return None
        raw = (cm.get("data") or {}).get("sides.json")
        try:
            return Sides.from_store(json.loads(raw)) if raw else None
        except (ValueError, TypeError) as e:
            raise StoreUnavailable(f"target {target}: stored sides unreadable: {e}") from e

    async def save_sides(self, target: str, sides: Sides) -> None:
        """Beside the target's claim, in the same ConfigMap; a write conditional on the
        resourceVersion read, retried when a start claimed the target in between."""
        name = f"canary-target-{_dns(target)}"
        core = self._core()
        for _ in range(5):
            try:
                cm: dict[str, Any] | None = await self._get(name)
            except NotFound:
                cm = None
            data = {"sides.json": jsonsafe.dumps(sides.to_store())}
            try:
                if cm is None:
                    body = {"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": name, "namespace": self.namespace,
                                         "labels": MANAGED,
                                         "annotations": {"canary.dev/target": target}},
                            "data": data}
                    await self._call(f"ConfigMap {name}", core.create_namespaced_config_map,
                                     self.namespace, body)
                else:
                    cm["data"] = {**(cm.get("data") or {}), **data}
                    await self._call(f"ConfigMap {name}", core.replace_namespaced_config_map,
                                     name, self.namespace, cm)
                return
            except StoreConflict:
                continue
        raise StoreConflict(f"ConfigMap {name} kept changing; try again")

    async def close(self) -> None:
        self._pool.shutdown()
