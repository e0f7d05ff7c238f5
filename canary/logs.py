"""Logs are one JSON object per line; anything about a rollout carries its id.

A log is never a reason to stop moving traffic safely: when whatever reads the log goes
away (`canary serve ... 2>&1 | head -1`, a log shipper that dies), lines are dropped and
the controller keeps serving; when it stops reading but keeps the pipe open (a shipper
that hangs), lines wait in a bounded queue for a writer thread of their own, and those
beyond it are dropped and counted: the event loop never waits on a write.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import logging.handlers
import os
import queue
import select
import sys
import threading
import time
from typing import Any, NoReturn

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


class FdStream:
    """A stream straight onto a file descriptor: no buffer, so no buffer lock that a write
    blocked on a full pipe would hold against everyone else (logging.shutdown's flush,
    Python's own at exit). Only the log's writer thread writes here, so it may wait: on a
    descriptor made non-blocking (EAGAIN) it waits for room rather than lose or tear a
    line."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "backslashreplace")
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:  # a descriptor someone made non-blocking: wait here
                select.select([], [self.fd], [])
        return len(text)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self.fd


class _Written(logging.Formatter):
    """The line as the queue's side formatted it."""

    def format(self, record: logging.LogRecord) -> str:
        return str(record.msg)


class QueuedLog(logging.handlers.QueueHandler):
    """Formats each line where it is logged and hands it to one writer thread through a
    bounded queue; a full queue (the reader stopped reading) drops the line and counts
    it, and the writer says how many it lost once lines flow again, where they went
    missing: ahead of the first line queued after them, or, if none was, once the queue
    has drained."""

    def __init__(self, out: PipeSafeHandler, size: int = 10_000) -> None:
        self.lines: queue.Queue[logging.LogRecord | None] = queue.Queue(maxsize=size)
        super().__init__(self.lines)
        self.out = out
        self.dropped = 0
        self._gap = 0  # dropped since the last line queued (not yet told)
        self._gap_lock = threading.Lock()  # (not the handler's: close holds that)
        self._thread = threading.Thread(target=self._write, name="canary-log", daemon=True)
        self._thread.start()

    def enqueue(self, record: logging.LogRecord) -> None:
        with self._gap_lock:
            record._dropped_before = self._gap
            try:
                self.lines.put_nowait(record)
            except queue.Full:
                self.dropped += 1
                self._gap += 1
                return
            self._gap = 0

    def _tell(self, lost: int) -> None:
        if lost:
            self.out.emit(logging.makeLogRecord({
                "msg": self.format(logging.makeLogRecord({
                    "name": "canary.logs", "levelname": "WARNING",
                    "levelno": logging.WARNING,
                    "msg": f"{lost} log lines dropped: whatever reads this log was "
                           "not reading"}))}))

    def _untold(self) -> int:
        """Lines dropped after the last one queued, once all of those are written (the
        queue is empty: under the lock no line can be queued, nor dropped, meanwhile)."""
        with self._gap_lock:
            if not self.lines.empty():
                return 0
            lost, self._gap = self._gap, 0
            return lost

    def _write(self) -> None:
        while (record := self.lines.get()) is not None:
            self._tell(getattr(record, "_dropped_before", 0))
            # (emit, not handle: this thread is the only writer, and a write blocked on
            # a full pipe must not hold the handler's lock against logging.shutdown)
            self.out.emit(record)
            self._tell(self._untold())
        self._tell(self._untold())

    def close(self, timeout: float = 1.0) -> None:
        """Let the writer finish what is queued, for at most `timeout` seconds (a writer
        stuck on a pipe nobody reads is left behind: it is a daemon)."""
        try:
            self.lines.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)
        super().close()


def queued(fd: int, size: int = 10_000) -> QueuedLog:
    """JSON lines onto `fd` through the queue and its writer thread."""
    out = PipeSafeHandler(FdStream(fd))
    out.setFormatter(_Written())
    handler = QueuedLog(out, size)
    handler.setFormatter(JsonFormatter())
    return handler


def setup(level: str = "INFO") -> None:
    sys.stderr.flush()
    handler = queued(sys.stderr.fileno())
    handler.addFilter(HideRequestContent())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Python's own reports (warnings, a thread's or a finalizer's uncaught exception) write
    # straight to stderr: on a pipe nobody reads that write would wait forever, in the
    # event loop's thread for a warning. They go through the queue like every other line.
    logging.captureWarnings(True)
    threading.excepthook = _thread_died
    sys.unraisablehook = _unraisable
    atexit.register(handler.close)


def last_words(lines: list[str], code: int, *, within: float = 5.0) -> NoReturn:
    """Say `lines` on stderr as the process exits, and exit whether or not anyone reads
    it: the queued log gets a second to drain, the words `within` seconds on a thread of
    their own, then the process ends with `code`. (A plain print would wait forever on a
    pipe a hung log shipper keeps open, and a controller that should exit and be
    restarted would hang instead.)"""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, QueuedLog):
            handler.close(timeout=1.0)

    def say() -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write("".join(f"{line}\n" for line in lines))
            sys.stderr.flush()
    words = threading.Thread(target=say, name="canary-last-words", daemon=True)
    words.start()
    words.join(within)
    os._exit(code)


_python = logging.getLogger("canary.python")


def _thread_died(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    _python.error(f"thread {name} died: {args.exc_type.__name__}: {args.exc_value}",
                  exc_info=(args.exc_type, args.exc_value or args.exc_type(),
                            args.exc_traceback))


def _unraisable(args: Any) -> None:
    what = f"{args.err_msg or 'exception ignored in'}: {args.object!r}"
    _python.warning(f"{what}: {args.exc_type.__name__}: {args.exc_value}",
                    exc_info=(args.exc_type, args.exc_value or args.exc_type(),
                              args.exc_traceback))
