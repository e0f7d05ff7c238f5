"""nginx and Prometheus as real processes on loopback, each in its own directory, and a
bounded load generator. Everything started here is stopped by `stop()`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

_handed: set[int] = set()


def _port_range() -> tuple[int, int]:
    """Ports below the kernel's ephemeral range, where no outgoing connection lands: a
    port asked of the kernel (bind to 0) comes from that range, and between handing it
    out and the server binding it, any client connection - of this process, a parallel
    test worker, nginx proxying - can take it as its own local port. Under pytest-xdist
    each worker draws from its own slice."""
    try:
        start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0, 0
    lo, hi = 10000, min(32000, start)
    if hi - lo < 8000:
        return 0, 0
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker[2:].isdigit() and count.isdigit() and int(count) > 0):
        return lo, lo + 4000  # a process of its own (the demo, a serial test run)
    span = (hi - lo - 4000) // int(count)
    lo += 4000 + int(worker[2:]) * span
    return lo, lo + span


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on, never handed out twice by this process."""
    lo, hi = _port_range()
    for _ in range(200 if hi > lo else 0):
        port = random.randrange(lo, hi)
        if port in _handed:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        got: int = s.getsockname()[1]
        return got


async def serve_app(app: web.Application, port: int) -> web.AppRunner:
    """Serve an aiohttp app on 127.0.0.1:port; stop it with `runner.cleanup()`."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


class Blackhole:
    """A server that accepts connections and never answers: the hung dependency (a
    Prometheus behind a wedged proxy, a stopped VM) that a timeout alone does not make
    cheap. `async with Blackhole() as url:`; every connection is closed on exit."""

    def __init__(self) -> None:
        self.port = free_port()
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):  # read what comes, answer nothing
                pass

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", self.port)
        return f"http://127.0.0.1:{self.port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()


def require(binary: str, package: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}")
                                    else None)
    if path is None:
        raise RuntimeError(f"{binary} is not installed; run scripts/setup (it installs Debian's "
                           f"{package})")
    return path


async def wait_http(url: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status < 500:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"{url} did not come up within {deadline}s")
            await asyncio.sleep(0.1)


@dataclass
class Nginx:
    """nginx with one server block proxying to `upstream`, defined in `upstream_file`."""

    dir: Path
    port: int
    upstream: str = "web"
    binary: str = field(default_factory=lambda: require("nginx", "nginx-light"))

    @property
    def conf(self) -> Path:
        return self.dir / "nginx.conf"

    @property
    def upstream_file(self) -> Path:
        return self.dir / "upstream.conf"

    def argv(self, *extra: str) -> list[str]:
        return [self.binary, "-p", str(self.dir), "-c", str(self.conf), "-e",
                str(self.dir / "error.log"), *extra]

    @property
    def test_cmd(self) -> list[str]:
        return self.argv("-t", "-q")

    @property
    def reload_cmd(self) -> list[str]:
        return self.argv("-s", "reload")

    def write_conf(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("body", "proxy", "conf.d"):
            (self.dir / sub).mkdir(exist_ok=True)
        self.conf.write_text(f"""
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {self.dir}/body;
    proxy_temp_path {self.dir}/proxy;
    include {self.upstream_file};
    include {self.dir}/conf.d/*.conf;
    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            proxy_pass http://{self.upstream};
            proxy_next_upstream off;
        }}
    }}
}}
""")

    def start(self) -> None:
        self.write_conf()
        subprocess.run(self.argv(), check=True, capture_output=True, timeout=30)

    def pid(self) -> int | None:
        try:
            return int((self.dir / "nginx.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Prometheus:
    dir: Path
    port: int
    targets: list[int]
    scrape_interval: str = "1s"
    proc: subprocess.Popen[bytes] | None = None
    # Prometheus's --web.config.file (basic_auth_users, tls_server_config), for tests of
    # a Prometheus that wants credentials; with tls_server_config set scheme to https
    web_config: str | None = None
    scheme: str = "http"
    # alerting: rule files' text (written as rules.yml) and the Alertmanagers' ports
    rules: str | None = None
    alertmanagers: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = require("prometheus", "prometheus")
        self.dir.mkdir(parents=True, exist_ok=True)
        targets = ", ".join(f'"127.0.0.1:{p}"' for p in self.targets)
        (self.dir / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {self.scrape_interval}\n"
            f"  evaluation_interval: {self.scrape_interval}\n"
            f"scrape_configs:\n  - job_name: app\n    static_configs:\n"
            f"      - targets: [{targets}]\n" + self._alerting())
        extra = []
        if self.web_config is not None:
            (self.dir / "web.yml").write_text(self.web_config)
            extra.append(f"--web.config.file={self.dir / 'web.yml'}")
        log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
             "--storage.tsdb.retention.time=1h", *extra],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def _alerting(self) -> str:
        out = ""
        if self.rules is not None:
            (self.dir / "rules.yml").write_text(self.rules)
            out += f"rule_files: [{str(self.dir / 'rules.yml')!r}]\n"
        if self.alertmanagers:
            ams = ", ".join(f'"127.0.0.1:{p}"' for p in self.alertmanagers)
            out += f"alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [{ams}]\n"
        return out

    async def ready(self) -> None:
        await wait_http(f"{self.url}/-/ready", 60)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 10 s; reaped either way."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Alertmanager:
    """Debian's prometheus-alertmanager on 127.0.0.1:port, clustering off, with the config
    (YAML text) it is given."""

    dir: Path
    port: int
    config: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = require("prometheus-alertmanager", "prometheus-alertmanager")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "alertmanager.yml").write_text(self.config)
        log = open(self.dir / "alertmanager.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.dir / 'alertmanager.yml'}",
             f"--storage.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--cluster.listen-address=", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    async def ready(self) -> None:
        await wait_http(f"{self.url}/-/ready", 60)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


@dataclass
class Load:
    """Requests through nginx at a steady rate, stopped by `stop()` or after `limit`
    requests; counts which version answered and with which status."""

    url: str
    rate: float = 50.0
    limit: int = 100_000
    versions: Counter[str] = field(default_factory=Counter)
    codes: Counter[tuple[str, int]] = field(default_factory=Counter)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            sent = 0
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            pending: set[asyncio.Task[None]] = set()
            try:
                while sent < self.limit:
                    pending.add(asyncio.create_task(self.one(s)))
                    pending = {t for t in pending if not t.done()}
                    sent += 1
                    await asyncio.sleep(max(0.0, t0 + sent / self.rate - loop.time()))
            finally:
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    async def one(self, s: aiohttp.ClientSession) -> None:
        try:
            async with s.get(self.url) as r:
                await r.read()
                v = r.headers.get("X-Version", "?")
                self.versions[v] += 1
                self.codes[(v, r.status)] += 1
        except (aiohttp.ClientError, TimeoutError):
            self.versions["(error)"] += 1

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def split(url: str, n: int) -> Counter[str]:
    """Send `n` requests one after another; which version answered each."""
    out: Counter[str] = Counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        for _ in range(n):
            async with s.get(url) as r:
                await r.read()
                out[r.headers.get("X-Version", "?")] += 1
    return out
