"""A test mesh: routes requests by the live VirtualService or HTTPRoute held in the API
double (tests/kubeapi.py), the way Istio and a Gateway API implementation would for the
fields canary writes (weights, header matches, mirrors), and counts who served each
request and who got a mirrored copy. Deterministic: weights and mirror percentages are
applied as exact shares over whole rounds of requests."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


def _value_ok(spec: dict[str, str], value: str | None) -> bool:
    if value is None:
        return False
    if "exact" in spec:
        return value == spec["exact"]
    if "prefix" in spec:
        return value.startswith(spec["prefix"])
    return re.fullmatch(spec["regex"], value) is not None


def _request_headers(headers: dict[str, str], cookies: dict[str, str]) -> dict[str, str]:
    out = {k.lower(): v for k, v in headers.items()}
    if cookies:
        out["cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    return out


@dataclass
class Mesh:
    """`version_of` maps a destination (Istio `subset`, or a Gateway backendRef `name`) to
    the version it runs."""

    version_of: dict[str, str]
    served: Counter[str] = field(default_factory=Counter)
    mirrored: Counter[str] = field(default_factory=Counter)
    _n: int = 0

    def _pick(self, entries: list[tuple[str, int]]) -> str:
        total = sum(w for _, w in entries)
        slot = self._n % total
        for name, w in entries:
            if slot < w:
                return name
            slot -= w
        raise AssertionError("unreachable")

    def _mirror(self, name: str | None, percent: float) -> None:
        if name is not None and (self._n % 100) < percent:
            self.mirrored[self.version_of[name]] += 1

    def send_virtualservice(self, vs: dict[str, Any], path: str = "/", headers: dict[str, str]
                            | None = None, cookies: dict[str, str] | None = None) -> str:
        hdrs = _request_headers(headers or {}, cookies or {})
        for route in vs["spec"]["http"]:
            matches = route.get("match") or [{}]
            if any(all(_value_ok(v, hdrs.get(k)) for k, v in (m.get("headers") or {}).items())
                   and path.startswith((m.get("uri") or {}).get("prefix", "/"))
                   for m in matches):
                dests = [(d["destination"].get("subset") or d["destination"]["host"],
                          d.get("weight", 100)) for d in route["route"]]
                served = self.version_of[self._pick(dests)]
                mirror = route.get("mirror")
                if mirror is not None:
                    self._mirror(mirror.get("subset") or mirror["host"],
                                 (route.get("mirrorPercentage") or {}).get("value", 100))
                self.served[served] += 1
                self._n += 1
                return served
        raise AssertionError(f"no route matches {path} {hdrs}")

    def send_httproute(self, route: dict[str, Any], path: str = "/", headers: dict[str, str]
                       | None = None, cookies: dict[str, str] | None = None) -> str:
        hdrs = _request_headers(headers or {}, cookies or {})
        best: tuple[int, int, dict[str, Any]] | None = None
        for i, rule in enumerate(route["spec"]["rules"]):
            for m in rule.get("matches") or [{"path": {"type": "PathPrefix", "value": "/"}}]:
                p = m.get("path") or {"type": "PathPrefix", "value": "/"}
                if not (path == p["value"] if p["type"] == "Exact"
                        else path.startswith(p["value"])):
                    continue
                ok = all(_value_ok({"exact": h["value"]} if h.get("type", "Exact") == "Exact"
                                   else {"regex": h["value"]}, hdrs.get(h["name"].lower()))
                         for h in m.get("headers") or [])
                n = len(m.get("headers") or [])
                # precedence: the most header matches, then the earliest rule
                if ok and (best is None or n > best[0]):
                    best = (n, i, rule)
        assert best is not None, f"no rule matches {path} {hdrs}"
        rule = best[2]
        served = self.version_of[self._pick([(b["name"], b.get("weight", 1))
                                             for b in rule["backendRefs"]])]
        for f in rule.get("filters") or []:
            if f["type"] == "RequestMirror":
                rm = f["requestMirror"]
                self._mirror(rm["backendRef"]["name"], rm.get("percent", 100))
        self.served[served] += 1
        self._n += 1
        return served
