"""A state store that fails must not silently disable rollback. The faults are real: a
tmpfs that fills up, a mount remounted read-only, a file overwritten with garbage or
deleted under the running controller, a state file missing at start."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from canary.model import Phase
from canary.routers.nginx import parse_weight, render
from canary.store.sqlite import SqliteStore
from tests.helpers import SetSource, controller, eventually, simple_policy


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str = "4m") -> Iterator[Path]:
    """A real, small filesystem of our own (root only, as in CI)."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(fs: Path) -> Path:
    """Fill the filesystem to the last byte; the filler file, to delete for space."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 512)
    finally:
        os.close(fd)
    return filler


class Ext4:
    """A real ext4 filesystem on a loop device, mounted errors=remount-ro: `fail()` makes
    the kernel record a filesystem error, after which every write gets EROFS (as after a
    disk fault); `repair()` unmounts, runs e2fsck and mounts it writable again."""

    def __init__(self, image: Path, where: Path) -> None:
        self.image, self.where = image, where

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True)

    def mount(self) -> None:
        done = self._run("mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.where))
        if done.returncode != 0:
            pytest.skip(f"cannot mount a loop device here (needs root): {done.stderr.strip()}")

    def fail(self) -> None:
        dev = Path(self._run("findmnt", "-n", "-o", "SOURCE", str(self.where)).stdout.strip())
        Path(f"/sys/fs/ext4/{dev.name}/trigger_fs_error").write_text("canary test\n")

    def repair(self) -> None:
        self._run("umount", str(self.where))
        self._run("e2fsck", "-fy", str(self.image))
        self.mount()


@contextlib.contextmanager
def ext4(tmp_path: Path) -> Iterator[Ext4]:
    image, where = tmp_path / "disk.img", tmp_path / "ext4"
    where.mkdir()
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    done = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {done.stderr.strip()}")
    fs = Ext4(image, where)
    fs.mount()
    try:
        yield fs
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def weight_in(target: object) -> int | None:
    return parse_weight(target, target.file.read_text())  # type: ignore[attr-defined]


@pytest.mark.e2e
async def test_full_store_still_rolls_back_a_breach_and_saves_it_when_space_returns(tmp_path):
    with mounted_tmpfs(tmp_path / "fs") as fs:
        store = SqliteStore(str(fs / "state.db"))
        source = SetSource(0.0)
        pol = simple_policy(hold=30.0, interval=0.2)
        async with controller(tmp_path, policies=[pol], source=source, store=store) as (api, _ctl, t):
            rid = (await api.start(canary_version="v2"))["id"]
            await api.until(rid, lambda r: r["applied_weight"] == 10)
            filler = fill(fs)
            status, body = await api.call("GET", "/readyz", role=None)
            assert status == 503 and "full" in body["error"], body
            source.value = 0.5  # the canary fails half its requests
            await eventually(lambda: _async(weight_in(t) == 0), what="canary traffic at 0")
            assert "rollback " + rid in t.file.read_text(), "the router keeps the decision"
            # reads still answer, with the rollback in force and the reason it is unsaved
            shown = await api.until(rid, lambda r: r["state"] == "rolled_back")
            assert shown["weight"] == 0 and "not saved yet" in shown["reason"]
            _, metrics = await api.call("GET", "/metrics", role=None)
            assert "canary_store_writable 0.0" in metrics
            filler.unlink()
            r = await api.until(rid, lambda r: r["state"] == "rolled_back", deadline=15)
            assert "gate errors" in r["reason"] and "state store" in r["reason"]
            status, _ = await api.call("GET", "/readyz", role=None)
            assert status == 200
            assert weight_in(t) == 0


@pytest.mark.e2e
async def test_abort_on_a_read_only_store_answers_503_moves_traffic_and_survives_a_restart(
        tmp_path):
    with ext4(tmp_path) as fs:
        pol = simple_policy(hold=30.0, interval=0.2)
        nginx_file = tmp_path / "upstream.conf"
        db = str(fs.where / "state.db")
        store = SqliteStore(db)
        async with controller(tmp_path, policies=[pol], store=store,
                              file=nginx_file) as (api, _ctl, t):
            rid = (await api.start(canary_version="v2"))["id"]
            await api.until(rid, lambda r: r["applied_weight"] == 10)
            fs.fail()
            status, body = await api.call("POST", f"/api/v1/rollouts/{rid}/abort",
                                          {"reason": "bad deploy"}, role="pipeline")
            assert status == 503, body
            assert "abort is carried out anyway" in body["error"]
            await eventually(lambda: _async(weight_in(t) == 0), what="canary traffic at 0")
            status, body = await api.call("GET", "/readyz", role=None)
            assert status == 503 and "read" in body["error"].lower()
        # the controller stops before the store is back: the decision lives in the router
        fs.repair()
        store = SqliteStore(db)
        assert (await store.load(rid)).state is Phase.PROGRESSING
        async with controller(tmp_path, policies=[pol], store=store,
                              file=nginx_file) as (api, _ctl, t):
            r = await api.until(rid, lambda r: r["state"] == "rolled_back", deadline=15)
            assert "aborted by pipeline-token: bad deploy" in r["reason"]
            assert weight_in(t) == 0, "traffic never went back to the canary"


@pytest.mark.e2e
async def test_corrupt_store_still_rolls_back_a_breach(tmp_path):
    source = SetSource(0.0)
    pol = simple_policy(hold=30.0, interval=0.2)
    async with controller(tmp_path, policies=[pol], source=source) as (api, ctl, t):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        db = Path(ctl.store.path)  # type: ignore[attr-defined]
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            with open(path, "r+b") as f:  # overwrite in place, as a disk fault would
                f.write(os.urandom(path.stat().st_size))
        source.value = 0.5
        await eventually(lambda: _async(weight_in(t) == 0), what="canary traffic at 0")
        status, body = await api.call("GET", "/readyz", role=None)
        assert status == 503, body
        status, body = await api.call("POST", f"/api/v1/rollouts/{rid}/pause",
                                      {"reason": "look"}, role="oncall")
        assert status == 503 and body["error"], body


@pytest.mark.e2e
async def test_state_file_deleted_while_running_is_loud_and_rollback_still_wins(tmp_path):
    source = SetSource(0.0)
    pol = simple_policy(hold=30.0, interval=0.2)
    async with controller(tmp_path, policies=[pol], source=source) as (api, ctl, t):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        os.unlink(ctl.store.path)  # type: ignore[attr-defined]
        status, body = await api.call("GET", "/readyz", role=None)
        assert status == 503 and "deleted" in body["error"], body
        status, body = await api.call("POST", "/api/v1/rollouts", {"target": "web",
                                      "canary_version": "v9"}, role="pipeline")
        assert status in (409, 503), body
        source.value = 0.5
        await eventually(lambda: _async(weight_in(t) == 0), what="canary traffic at 0")


async def test_missing_state_file_with_canary_traffic_is_reported_and_left_alone(tmp_path):
    pol = simple_policy()
    nginx_file = tmp_path / "upstream.conf"
    async with controller(tmp_path, policies=[pol], file=nginx_file) as (_api, _ctl, t):
        pass  # only to get the target
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    nginx_file.write_text(render(t, 30))
    async with controller(tmp_path, policies=[pol], file=nginx_file) as (api, _ctl, t):
        status, body = await api.call("GET", "/readyz", role=None)
        assert status == 503 and "30% canary traffic" in body["error"], body
        _, targets = await api.call("GET", "/api/v1/targets", role="viewer")
        assert "state store may be missing" in targets["targets"][0]["warning"]
        status, body = await api.call("POST", "/api/v1/rollouts", {"target": "web",
                                      "canary_version": "v2"}, role="pipeline")
        assert status == 409 and "30% canary traffic" in body["error"], body
        assert weight_in(t) == 30, "never silently adopted or reset"
        nginx_file.write_text(render(t, 0))  # on-call sets the router back by hand
        status, _ = await api.call("GET", "/readyz", role=None)
        assert status == 200
        await api.start(canary_version="v2")


async def _async(value: object) -> object:
    return value


@pytest.mark.e2e
async def test_canary_abort_succeeds_once_the_rollout_is_rolled_back_whoever_got_there(tmp_path):
    """A retried abort (after a 503 whose abort was carried out anyway) meets a rollout
    already rolled back: the CLI says so and exits 0, the state it was asked for."""
    from tests.test_restart_and_cli import cli

    async with controller(tmp_path, policies=[simple_policy(hold=60)]) as (api, _ctl, _t):
        rid = (await api.start(canary_version="v2"))["id"]
        await api.until(rid, lambda r: r["applied_weight"] == 10)
        code, _out, err = await cli("abort", rid, "--reason", "bad", server=api.base)
        assert code == 0, err
        await api.until(rid, lambda r: r["state"] == "rolled_back")
        code, out, err = await cli("abort", rid, "--reason", "again", server=api.base)
        assert code == 0 and "already rolled_back" in err and "rolled_back" in out, (out, err)
        code, _out, err = await cli("pause", rid, "--reason", "late", server=api.base,
                                    token="tok-oncall")
        assert code == 2 and "already rolled_back" in err, "other overrides still refuse"
