"""The nginx router: the canary's share of real requests equals the weight whatever the
number of servers on each side, writes are atomic, and a failing `test` keeps the old file."""

from __future__ import annotations

from pathlib import Path

import pytest

from canary.demo import procs
from canary.demo.procs import Nginx, free_port
from canary.demo.service import Service
from canary.errors import RouterError
from canary.routers.nginx import NginxRouter, parse_weight, render, server_weights
from canary.targets import NginxTarget
from tests.helpers import eventually


@pytest.mark.parametrize("n_stable", [1, 2, 3, 5])
@pytest.mark.parametrize("n_canary", [1, 2, 3])
def test_server_weights_give_the_canary_exactly_its_share(n_stable, n_canary):
    for w in range(0, 101):
        s, c = server_weights(n_stable, n_canary, w)
        total = s * n_stable + c * n_canary
        assert c * n_canary * 100 == w * total
        assert (s == 0) == (w == 100) and (c == 0) == (w == 0)


def test_server_weights_are_the_readmes_products_over_their_gcd_and_a_side_at_0_is_down(tmp_path):
    # README "nginx": each stable server (100-w)*n_canary, each canary server w*n_stable,
    # divided by their gcd; a side at 0% is written as `down`
    for n_stable, n_canary, w, want in ((2, 1, 25, (3, 2)), (3, 2, 10, (6, 1)),
                                        (1, 3, 50, (3, 1)), (2, 3, 0, (1, 0)),
                                        (2, 3, 100, (0, 1))):
        assert server_weights(n_stable, n_canary, w) == want, (n_stable, n_canary, w)
    t = target(tmp_path, [1, 2], [3])
    assert "server 127.0.0.1:1 weight=1;\n    server 127.0.0.1:2 weight=1;\n" \
           "    server 127.0.0.1:3 weight=2;" in render(t, 50)
    for w, down in ((0, ["127.0.0.1:3"]), (100, ["127.0.0.1:1", "127.0.0.1:2"])):
        text = render(t, w)
        assert [line.split()[1] for line in text.splitlines() if line.endswith(" down;")] == down
        assert parse_weight(t, text) == w


def target(tmp_path: Path, stable: list[int], canary: list[int], **kw: object) -> NginxTarget:
    return NginxTarget(name="web", file=tmp_path / "up.conf", upstream="web",
                       stable=tuple(f"127.0.0.1:{p}" for p in stable),
                       canary=tuple(f"127.0.0.1:{p}" for p in canary), **kw)  # type: ignore[arg-type]


def test_the_file_reads_back_as_the_weight_written(tmp_path):
    t = target(tmp_path, [1, 2], [3])
    for w in (0, 1, 5, 25, 33, 50, 99, 100):
        assert parse_weight(t, render(t, w)) == w
    assert parse_weight(t, "upstream web { }") is None


@pytest.mark.e2e
async def test_real_nginx_sends_the_canary_exactly_its_weight_with_two_stable_servers(tmp_path):
    services = [Service("web", v, free_port()) for v in ("v1", "v1", "v2")]
    nginx = Nginx(tmp_path / "nginx", free_port())
    t = NginxTarget(name="web", file=nginx.upstream_file, upstream="web",
                    stable=tuple(f"127.0.0.1:{s.port}" for s in services[:2]),
                    canary=(f"127.0.0.1:{services[2].port}",),
                    test=tuple(nginx.test_cmd), reload=tuple(nginx.reload_cmd))
    router = NginxRouter(t)
    try:
        for s in services:
            await s.start()
        nginx.write_conf()
        nginx.upstream_file.write_text(render(t, 0))
        nginx.start()
        for w in (5, 25, 50, 100, 0):
            await router.set_weight(w)
            assert await router.get_weight() == w

            async def exact(w: int = w) -> bool:
                # 200 requests are whole rounds of nginx's weighted round robin
                got = await procs.split(f"http://127.0.0.1:{nginx.port}/", 200)
                return got.get("v2", 0) == 2 * w
            await eventually(exact, deadline=20, what=f"exact split at {w}%")
    finally:
        nginx.stop()
        for s in services:
            await s.stop()


async def test_the_file_is_replaced_whole_from_a_synced_temporary_file_then_tested_then_reloaded(
        tmp_path, monkeypatch):
    # README "nginx": written atomically (temporary file, fsync, rename), `test` first,
    # then `reload`. A reader holding the old file still reads it whole (a rewrite in
    # place would change it under the reader), and `test` already sees the new one.
    import os

    order, seen = tmp_path / "order", tmp_path / "seen-by-test"
    t = target(tmp_path, [1], [2],
               test=("sh", "-c", f'cp "$0" {seen}; echo test >> {order}', str(tmp_path / "up.conf")),
               reload=("sh", "-c", f"echo reload >> {order}"))
    t.file.write_text(render(t, 5))
    calls: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src: str, dst: str) -> None:
        calls.append(("rename", f"{src} -> {dst}"))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    with open(t.file) as reader:
        inode = os.fstat(reader.fileno()).st_ino
        await NginxRouter(t).set_weight(25)
        assert reader.read() == render(t, 5), "the old file was changed in place"
    assert t.file.read_text() == seen.read_text() == render(t, 25)
    assert os.stat(t.file).st_ino != inode
    assert order.read_text().split() == ["test", "reload"]
    (tmp,) = {c[1] for c in calls if c[0] == "fsync" and "/.up.conf." in c[1]}
    assert calls == [("fsync", tmp), ("rename", f"{tmp} -> {t.file}"), ("fsync", str(tmp_path))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["order", "seen-by-test", "up.conf"]


async def test_a_failing_test_command_keeps_the_old_file_and_skips_reload(tmp_path):
    marker = tmp_path / "reloaded"
    t = target(tmp_path, [1], [2], test=("false",), reload=("touch", str(marker)))
    t.file.write_text(render(t, 5))
    before = t.file.read_text()
    with pytest.raises(RouterError, match="nginx test failed"):
        await NginxRouter(t).set_weight(25)
    assert t.file.read_text() == before
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["up.conf"], "no temp files left"


async def test_a_failing_reload_restores_the_file_so_a_retry_writes_it_again(tmp_path):
    t = target(tmp_path, [1], [2], test=("true",), reload=("false",))
    t.file.write_text(render(t, 5))
    with pytest.raises(RouterError, match="nginx reload failed"):
        await NginxRouter(t).set_weight(25)
    assert parse_weight(t, t.file.read_text()) == 5


async def test_an_unwritable_directory_is_a_router_error(tmp_path):
    # (a path under a regular file: unwritable even for root, as CI runs)
    (tmp_path / "not-a-dir").write_text("")
    t = NginxTarget(name="web", file=tmp_path / "not-a-dir" / "up.conf", upstream="web",
                    stable=("127.0.0.1:1",), canary=("127.0.0.1:2",), test=("true",),
                    reload=("true",))
    with pytest.raises(RouterError, match="cannot"):
        await NginxRouter(t).set_weight(25)


async def test_commands_run_without_a_shell(tmp_path):
    t = target(tmp_path, [1], [2], test=("true; touch /tmp/canary-pwned",), reload=("true",))
    with pytest.raises(RouterError, match="could not start"):
        await NginxRouter(t).set_weight(25)
    assert not Path("/tmp/canary-pwned").exists()


async def test_a_reload_command_cut_short_by_a_stopping_controller_leaves_no_process(tmp_path):
    # stopping the controller cancels a rollout in the middle of `nginx -s reload`: the
    # command is killed and reaped, not left running past the controller
    import asyncio
    import os

    from canary.routers.nginx import _run

    pidfile = tmp_path / "pid"
    task = asyncio.create_task(_run(("sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"), "reload"))

    async def started() -> bool:
        return pidfile.exists() and pidfile.read_text().strip() != ""
    await eventually(started, deadline=10, what="the reload command started")
    pid = int(pidfile.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
