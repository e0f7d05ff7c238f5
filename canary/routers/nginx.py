"""Nginx: canary owns one file holding one upstream block, and reloads nginx after
`test` accepts it. The file is the truth: its server weights are read back to know
the live split.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from canary import faults, shapes
from canary.errors import InvalidInput, RouterError
from canary.executors import Pool
from canary.targets import NginxTarget

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


# ---- match and mirror stages: maps in `file`, a mirror in `server_file` -------------------

_SHAPE = re.compile(r"^# canary-shape: (.*)$", re.M)


def variable(target: NginxTarget, what: str) -> str:
    """An nginx variable of this target's, e.g. `canary_web_upstream`."""
    return f"canary_{re.sub(r'[^A-Za-z0-9_]', '_', target.upstream)}_{what}"


def canary_upstream(target: NginxTarget) -> str:
    return f"{target.upstream}__canary_only"


def mirror_location(target: NginxTarget) -> str:
    return f"/_canary_mirror_{re.sub(r'[^A-Za-z0-9_]', '_', target.upstream)}"


def _quoted(text: str) -> str:
    """A double-quoted nginx string holding `text` exactly."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _nginx_var(rule: shapes.Rule) -> str:
    if rule.where == "cookie":
        return f"$cookie_{rule.name}"
    return "$http_" + rule.name.lower().replace("-", "_")


def render_routes(target: NginxTarget, shape: shapes.Shape | None) -> str:
    """The http-context part for shapes: an upstream of the canary's servers only, the
    map choosing the upstream (`$canary_<upstream>_upstream`) and the mirror sample."""
    up, chosen = canary_upstream(target), variable(target, "upstream")
    lines = ["", "# match and mirror stages: the server block proxies to "
             f"http://${chosen} (README: Traffic shapes)",
             f"upstream {up} {{"]
    lines += [f"    server {addr};" for addr in target.canary]
    lines.append("}")
    rules = shape.rules if shape else ()
    for i, rule in enumerate(rules):
        lines.append(f"map {_nginx_var(rule)} ${variable(target, f'm{i}')} {{ default \"\"; "
                     f"{_quoted('~^(?:' + rule.condition.regex() + ')$')} 1; }}")
    if rules:
        joined = "".join(f"${variable(target, f'm{i}')}" for i in range(len(rules)))
        lines.append(f'map "{joined}" ${chosen} {{ default {target.upstream}; '
                     f'"{"1" * len(rules)}" {up}; }}')
    else:
        lines.append(f"map $host ${chosen} {{ default {target.upstream}; }}")
    sample = variable(target, "mirror")
    if shape is not None and shape.mirror is not None and shape.mirror < 100:
        lines.append(f'split_clients "${{request_id}}" ${sample} {{ {shape.mirror}% 1; * ""; }}')
    else:
        every = "1" if shape is not None and shape.mirror else '""'
        lines.append(f"map $host ${sample} {{ default {every}; }}")
    return "\n".join(lines) + "\n"


def render_server(target: NginxTarget, shape: shapes.Shape | None) -> str:
    """The server-context file: during a mirror stage, the mirror and its location."""
    lines = [f"# Written by canary for target {target.name}; include it in the server block.",
             "# canary owns this file and rewrites it at every step."]
    if shape is not None and shape.mirror is not None:
        loc = mirror_location(target)
        lines += [f"mirror {loc};",
                  "mirror_request_body on;",
                  f"location = {loc} {{",
                  "    internal;",
                  f'    if (${variable(target, "mirror")} = "") {{ return 204; }}',
                  # (no proxy_set_header here: it would drop every one the server block
                  # sets, and the canary would see other requests than users send)
                  f"    proxy_pass http://{canary_upstream(target)}$request_uri;",
                  "}"]
    return "\n".join(lines) + "\n"


def render_all(target: NginxTarget, weight: int, decision: str | None,
               shape: str | None) -> tuple[str, str | None]:
    """Both files: (file, server_file or None when the target has none)."""
    text = render(target, weight, decision)
    if target.server_file is None:
        return text, None
    parsed = shapes.from_key(shape) if shape else None
    if shape:
        text = text.replace("upstream ", f"# canary-shape: {shape}\nupstream ", 1)
    return text + render_routes(target, parsed), render_server(target, parsed)


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

    async def get_shape(self) -> str | None:
        """The shape the files say, if they are exactly what canary wrote for it."""
        if self.target.server_file is None:
            return None
        try:
            text = await self._pool.run(self.target.file.read_text)
            server = await self._pool.run(self.target.server_file.read_text)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RouterError(f"cannot read {e.filename}: {e.strerror}") from e
        m = _SHAPE.search(text)
        if m is None:
            return None  # no shape recorded: what is in force is a weight (or a hand edit)
        key = m.group(1).strip()
        weight = parse_weight(self.target, text)
        d = _DECISION.search(text)
        want = render_all(self.target, weight if weight is not None else 0,
                          d.group(1).strip() if d else None, key)
        if weight is None or want != (text, server):
            return (f"{shapes.EDITED}nginx files {self.target.file} and "
                    f"{self.target.server_file} that differ from what canary wrote for "
                    f"{shapes.describe(key)}")
        return key

    async def check_shapes(self, wanted: Sequence[shapes.Shape]) -> None:
        if self.target.server_file is None:
            raise InvalidInput(f"target {self.target.name}: match and mirror stages need "
                               "server_file, a file canary owns that the server block includes "
                               "(see README: Traffic shapes)")
        if not await self._pool.run(self.target.server_file.parent.is_dir):
            raise InvalidInput(f"target {self.target.name}: directory "
                               f"{self.target.server_file.parent} for server_file does not exist")

    async def check(self) -> None:
        if not await self._pool.run(self.target.file.parent.is_dir):
            raise InvalidInput(f"target {self.target.name}: directory {self.target.file.parent} "
                               "for the upstream file does not exist")

    async def set_weight(self, weight: int, *, decision: str | None = None,
                         shape: str | None = None) -> None:
        if shape is not None and self.target.server_file is None:
            raise RouterError(f"target {self.target.name} has no server_file; match and "
                              "mirror stages need one")
        async with self._lock:
            new, new_server = render_all(self.target, weight, decision, shape)
            files = [(self.target.file, new)]
            if self.target.server_file is not None and new_server is not None:
                files.append((self.target.server_file, new_server))
            olds: list[str | None] = []
            for path, _ in files:
                try:
                    olds.append(await self._pool.run(path.read_text))
                except FileNotFoundError:
                    olds.append(None)
                except OSError as e:
                    raise RouterError(f"cannot read {path}: {e.strerror}") from e
            # Test and reload even when the file already says `weight`: a controller that
            # died between writing and reloading must still get nginx to load it.
            written = []
            try:
                for (path, text), old in zip(files, olds, strict=True):
                    if old != text:
                        written.append((path, old))
                        await self._pool.run(_write_atomic, path, text)
                faults.point("nginx_written")
                await _run(self.target.test, "test")
                faults.point("nginx_tested")
                await _run(self.target.reload, "reload")
            except RouterError:
                # keep the files saying what nginx really runs, so a retry writes them again
                for path, old in reversed(written):
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
    except (TimeoutError, asyncio.CancelledError) as e:
        # timed out, or the controller is stopping: reap the command either way, so
        # neither it nor its pipe outlives the call (a transport left behind warns, or
        # stops a test, when collected)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        if isinstance(e, asyncio.CancelledError):
            raise
        raise RouterError(f"nginx {what} command timed out after {COMMAND_TIMEOUT:g}s") from e
    if proc.returncode != 0:
        text = out.decode(errors="replace").strip().replace("\n", " | ")
        raise RouterError(f"nginx {what} failed (exit {proc.returncode}): {text[-500:]}")
