"""version_probe: ask each server of a side what it runs (interface.md section 5).

GET http://SERVER/path with a bounded timeout; the version is the trimmed body, or its
`version` field when the body is a JSON object. All servers are asked at once, on the
event loop (aiohttp), each bounded, so a server that never answers costs one timeout.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from canary.targets import VersionProbe

MAX_BODY = 4096
MAX_VERSION = 128  # the longest version canary takes (model.VERSION_PATTERN)


@dataclass(frozen=True)
class Answer:
    server: str
    version: str | None      # None: no usable answer
    problem: str | None = None  # why not

    def describe(self) -> str:
        if self.version is not None:
            return f"{self.server} answered {self.version!r}"
        return f"{self.server} did not answer a version ({self.problem})"


def version_of(body: bytes) -> str | None:
    text = body.decode("utf-8", errors="replace").strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):  # (4 KB can nest past the parser's depth)
            return None
        value = data.get("version") if isinstance(data, dict) else None
        # true/false and NaN/Infinity are JSON values, not versions: read as "True" they
        # would match no deploy and name a version nobody wrote
        if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            return None
        version = str(value).strip() if isinstance(value, str | int | float) else ""
        return version or None
    return text or None


async def _one(session: aiohttp.ClientSession, server: str, probe: VersionProbe) -> Answer:
    if server.startswith("unix:"):
        connector: aiohttp.BaseConnector | None = aiohttp.UnixConnector(path=server[5:])
        url = f"http://localhost{probe.path}"
    else:
        connector, url = None, f"http://{server}{probe.path}"
    try:
        async with asyncio.timeout(probe.timeout):
            if connector is not None:
                async with aiohttp.ClientSession(connector=connector) as own, \
                        own.get(url, allow_redirects=False) as resp:
                    return await _read(server, resp)
            async with session.get(url, allow_redirects=False) as resp:
                return await _read(server, resp)
    except TimeoutError:
        return Answer(server, None, f"no answer within {probe.timeout:g}s")
    except aiohttp.ClientError as e:
        return Answer(server, None, str(e) or type(e).__name__)
    except OSError as e:
        return Answer(server, None, e.strerror or str(e))


async def _read(server: str, resp: aiohttp.ClientResponse) -> Answer:
    if resp.status != 200:
        return Answer(server, None, f"HTTP {resp.status}")
    # read to the end (a body may come in pieces), but no more than MAX_BODY: a longer
    # one is not a version, and cutting it would make up one the server never said
    body = b""
    while len(body) <= MAX_BODY:
        chunk = await resp.content.read(MAX_BODY + 1 - len(body))
        if not chunk:
            break
        body += chunk
    if len(body) > MAX_BODY:
        return Answer(server, None, f"the body is longer than {MAX_BODY} bytes, not a version")
    version = version_of(body)
    if version is None:
        return Answer(server, None, "the body is not a version")
    if len(version) > MAX_VERSION:  # (cut, it could equal the version a rollout wants)
        return Answer(server, None, f"the answer is longer than a version ({len(version)} "
                                    f"characters, at most {MAX_VERSION})")
    return Answer(server, version)


async def ask(servers: Sequence[str], probe: VersionProbe) -> list[Answer]:
    """What each server runs, in the order given."""
    async with aiohttp.ClientSession(trust_env=False) as session:
        return list(await asyncio.gather(*(_one(session, s, probe) for s in servers)))


def mismatches(answers: Sequence[Answer], want: str) -> list[Answer]:
    return [a for a in answers if a.version != want]
