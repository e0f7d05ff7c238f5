"""The Kubernetes client, built the way every Kubernetes tool builds it: the in-cluster
service account when running in a pod, else KUBECONFIG / ~/.kube/config. Only the
adapters (routers/istio.py, store/kubernetes.py, leader.py) use it, and only through
asyncio.to_thread, because the official client blocks."""

from __future__ import annotations

import json
import os
from typing import Any

from canary.errors import NotFound, RouterError, StoreConflict
from canary.executors import Pool

# every call is bounded so a leader that loses its lease (renew deadline 10 s) cannot
# still be writing when the lease expires for the others (15 s)
REQUEST_TIMEOUT = 4.0


def api_client(kubeconfig: str | None = None, *, user_agent: str | None = None) -> Any:
    from kubernetes import client, config

    cfg = client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=cfg)
    else:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    # no retries inside a call: urllib3's default three would make one call to an API
    # server that never answers last 4 x REQUEST_TIMEOUT, past the lease; our callers
    # retry on their own schedule
    cfg.retries = 0
    api = client.ApiClient(cfg)
    if user_agent:
        api.user_agent = user_agent
    return api


def status_of(e: BaseException) -> int | None:
    """The HTTP status of a kubernetes ApiException, else None."""
    from kubernetes.client.exceptions import ApiException

    return e.status if isinstance(e, ApiException) else None


def message_of(e: BaseException) -> str:
    """The API server's own message (its Status body), or the exception's text."""
    body = getattr(e, "body", None)
    if body:
        try:
            data = json.loads(body)
            return str(data.get("message") or data.get("reason") or body)[:500]
        except (ValueError, AttributeError):
            return str(body)[:500]
    return f"{type(e).__name__}: {e}"[:500]


def describe(e: BaseException, what: str) -> Exception:
    """Turn a client exception into ours: 404 NotFound, else a retryable RouterError."""
    code = status_of(e)
    if code == 404:
        return NotFound(f"{what} not found")
    if code in (401, 403):
        return RouterError(f"{what}: the API server refused us ({code}): {message_of(e)}; "
                           "check the controller's ServiceAccount and RBAC")
    return RouterError(f"{what}: API server error{f' {code}' if code else ''}: {message_of(e)}")


async def call_router(pool: Pool, what: str, fn: Any, *args: Any) -> Any:
    """One blocking client call of a router, on the router's own pool: a 409 (someone
    else's write moved the object) is StoreConflict, to re-read and try again; any other
    failure is described (`describe`)."""
    try:
        return await pool.run(fn, *args)
    except Exception as e:  # the client raises ApiException, urllib3 and socket errors
        if status_of(e) == 409:
            raise StoreConflict(f"{what}: changed by someone else; re-reading") from e
        raise describe(e, what) from e
