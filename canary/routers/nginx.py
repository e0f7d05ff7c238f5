"""Nginx: canary owns one file holding one upstream block, and reloads nginx after
`test` accepts it. The file is the truth: its server weights are read back to know
the live split.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import tempfile
from pathlib import Path

from canary import faults
from canary.config import NginxTarget
from canary.errors import InvalidInput, RouterError
from canary.executors import Pool

COMMAND_TIMEOUT = 30.0
_SERVER = re.compile(r"^\s*server\s+(\S+)((?:\s+[^;\s]+)*)\s*;", re.M)


def server_weights(n_stable: int, n_canary: int, weight: int) -> tuple[int, int]:
    """Per-server weights (stable, canary) giving the canary exactly `weight`% of requests.

    Each stable server gets (100-w)*n_canary and each canary server w*n_stable, so the
    canary's total is w*n_s*n_c out of 100*n_s*n_c; divided by their gcd to stay small.
    A side at 0 gets 0 (its servers are left out: nginx has no weight 0).
    """
    s = (100 - weight) * n_canary
    c = weight * n_stable
    g = math.gcd(s, c) or 1
    return s // g, c // g


_DECISION = re.compile(r"^# canary-decision: (.*)$", re.M)


def render(target: NginxTarget, weight: int, decision: str | None = None) -> str:
    ws, wc = server_weights(len(target.stable), len(target.canary), weight)
    lines = [
        f"# Written by canary for target {target.name}: canary weight {weight}%.",
        "# canary owns this file and rewrites it at every step; edits here show up as drift.",
    ]
    if decision:
        # one printable line: a controller restarted without its store reads it back
        text = "".join(c if c.isprintable() else " " for c in decision)[:2000]
        lines.append(f"# canary-decision: {text}")
    lines.append(f"upstream {target.upstream} {{")
    for addr in target.stable:
        lines.append(f"    server {addr} weight={ws};" if ws else f"    server {addr} down;")
    for addr in target.canary:
        lines.append(f"    server {addr} weight={wc};" if wc else f"    server {addr} down;")
    lines.append("}")
    return "\n".join(lines) + "\n"


def parse_weight(target: NginxTarget, text: str) -> int | None:
    """The canary's share in the file, rounded to a whole percent; None if unreadable."""
    stable_total = canary_total = 0
    for m in _SERVER.finditer(text):
        addr, params = m.group(1), m.group(2).split()
        if "down" in params or "backup" in params:
            continue
        w = 1
        for p in params:
            if p.startswith("weight="):
                try:
                    w = int(p.split("=", 1)[1])
                except ValueError:
                    return None
        if addr in target.canary:
            canary_total += w
        elif addr in target.stable:
            stable_total += w
    total = stable_total + canary_total
    if total == 0:
        return None
    return round(100 * canary_total / total)


class NginxRouter:
    def __init__(self, target: NginxTarget) -> None:
        self.target = target
        self._lock = asyncio.Lock()
        self._pool = Pool(f"nginx-{target.name}"[:40], 2)

    async def get_weight(self) -> int | None:
        try:
            text = await self._pool.run(self.target.file.read_text)
        except OSError:
            return None
        return parse_weight(self.target, text)

    async def decision(self) -> str | None:
        try:
            text = await self._pool.run(self.target.file.read_text)
        except OSError:
            return None
        m = _DECISION.search(text)
        return m.group(1).strip() if m else None

    async def check(self) -> None:
        if not await self._pool.run(self.target.file.parent.is_dir):
            raise InvalidInput(f"target {self.target.name}: directory {self.target.file.parent} "
                               "for the upstream file does not exist")

    async def set_weight(self, weight: int, *, decision: str | None = None) -> None:
        async with self._lock:
            path = self.target.file
            new = render(self.target, weight, decision)
            try:
                old: str | None = await self._pool.run(path.read_text)
            except FileNotFoundError:
                old = None
            except OSError as e:
                raise RouterError(f"cannot read {path}: {e.strerror}") from e
            # Test and reload even when the file already says `weight`: a controller that
            # died between writing and reloading must still get nginx to load it.
            if old != new:
                await self._pool.run(_write_atomic, path, new)
            faults.point("nginx_written")
            try:
                await _run(self.target.test, "test")
                faults.point("nginx_tested")
                await _run(self.target.reload, "reload")
            except RouterError:
                # keep the file saying what nginx really runs, so a retry writes it again
                if old != new:
                    await self._pool.run(_restore, path, old)
                raise


def _write_atomic(path: Path, text: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise RouterError(f"cannot write {path}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise RouterError(f"cannot write {path}: {e.strerror}") from e


def _restore(path: Path, old: str | None) -> None:
    if old is None:
        path.unlink(missing_ok=True)
    else:
        _write_atomic(path, old)


async def _run(argv: tuple[str, ...], what: str) -> None:
    """Run a configured command without a shell; its output explains a failure."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
    except OSError as e:
        raise RouterError(f"nginx {what} command {argv[0]!r} could not start: {e.strerror}") from e
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):  # (not wait_for: see clock.py)
            out, _ = await proc.communicate()
    except TimeoutError as e:
        proc.kill()
        await proc.wait()
        raise RouterError(f"nginx {what} command timed out after {COMMAND_TIMEOUT:g}s") from e
    if proc.returncode != 0:
        text = out.decode(errors="replace").strip().replace("\n", " | ")
        raise RouterError(f"nginx {what} failed (exit {proc.returncode}): {text[-500:]}")
