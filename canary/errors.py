"""Every error canary raises on purpose, in one tree.

    CanaryError
    ├── UserError                 the user's to fix; never retried
    │   ├── InvalidInput          bad field in a file or request body (-> 400 / exit 1)
    │   │   └── ValidationFailed  a file with one or more problems, each with file:line
    │   ├── NotFound              unknown rollout, target or policy (-> 404)
    │   └── Conflict              the request clashes with a rollout's state (-> 409)
    └── TransientError            a dependency failed; worth a retry with backoff
        ├── RouterError           nginx test/reload failed, file not writable, API server error
        ├── MetricsError          Prometheus unreachable, slow or answering an error
        ├── StoreConflict         someone else wrote the rollout first (expected version moved)
        ├── StoreUnavailable      the state store cannot be read or written (full, read-only,
        │                         corrupt, deleted); rollbacks still reach the router (-> 503)
        └── NotLeader             a write sent to a replica that does not hold the lease (-> 503)

tenacity retries only TransientError subclasses, and only where the caller says so.
"""

from __future__ import annotations

from dataclasses import dataclass


class CanaryError(Exception):
    """Base of every error canary raises on purpose."""


class UserError(CanaryError):
    """Something the user must fix; retrying will not help."""


class InvalidInput(UserError):
    pass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a file: where, which field, and what to do."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class ValidationFailed(InvalidInput):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class NotFound(UserError):
    pass


class Conflict(UserError):
    pass


class TransientError(CanaryError):
    """A dependency failed; the same call may succeed later."""


class RouterError(TransientError):
    pass


class MetricsError(TransientError):
    pass


class StoreConflict(TransientError):
    pass


class StoreUnavailable(TransientError):
    pass


class NotLeader(TransientError):
    pass
