"""Logs are one JSON object per line; anything about a rollout carries its id.

A log is never a reason to stop moving traffic safely: when whatever reads the log goes
away (`canary serve ... 2>&1 | head -1`, a log shipper that dies), lines are dropped and
the controller keeps serving.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
from typing import Any

from canary import jsonsafe

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return jsonsafe.dumps(out, default=str)


class HideRequestContent(logging.Filter):
    """aiohttp logs a request it cannot parse (a header over its 8 KiB line limit, bytes
    that are not HTTP) with a traceback whose message quotes the offending line: that line
    may be `Authorization: Bearer <token>`. Keep the fact, the peer and the kind of error;
    drop the content."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        from aiohttp.http_exceptions import HttpProcessingError

        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else None
            record.msg = ("refused a malformed HTTP request from %s: %s (HTTP %s); its content "
                          "is not logged, as it may hold a token")
            record.args = (peer, type(exc).__name__, exc.code)
            record.exc_info = None
            record.exc_text = None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class PipeSafeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that survives its reader going away. On EPIPE (and other errors
    that mean the stream is gone for good) the stream's descriptor is pointed at
    /dev/null, so nothing else that writes there later (logging's own error report,
    Python's flush at exit) fails either, and further lines are counted and dropped."""

    GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.EBADF})  # (not ENOSPC: it passes)

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self.gone = False
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.gone:
            self.dropped += 1
            return
        try:
            self.stream.write(self.format(record) + self.terminator)
            self.flush()
        except OSError as e:
            if e.errno not in self.GONE:
                self.handleError(record)
                return
            self.dropped += 1
            self.gone = True
            self._silence()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        if not self.gone:
            super().flush()

    def _silence(self) -> None:
        try:
            fd = self.stream.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, fd)
            finally:
                os.close(devnull)
            self.stream.flush()  # what the failed write left buffered goes to /dev/null
        except (OSError, ValueError, AttributeError):
            pass


def setup(level: str = "INFO") -> None:
    handler = PipeSafeHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(HideRequestContent())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
