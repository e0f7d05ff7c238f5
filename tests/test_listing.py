"""Listing rollouts (interface.md section 8): newest first, a page at a time, filtered by
target and state, each rollout without its events; the store does the paging."""

from __future__ import annotations

import sqlite3

import pytest

from canary.model import Phase
from canary.store.sqlite import SqliteStore
from tests.helpers import Api, controller, seed, simple_policy


async def pages(api: Api, query: str = "", before: str | None = None) -> list[list[dict]]:
    """Every page of a listing (from `before`), following `next`."""
    out: list[list[dict]] = []
    while True:
        q = "&".join(x for x in (query, f"before={before}" if before else "") if x)
        status, data = await api.call("GET", "/api/v1/rollouts" + (f"?{q}" if q else ""),
                                      role="viewer")
        assert status == 200, data
        out.append(data["rollouts"])
        before = data["next"]
        if before is None:
            return out
        assert len(out) < 100, "paging does not end"


def newest_first(rollouts: list) -> list[str]:
    return [r.id for r in sorted(rollouts, key=lambda r: (r.started_at, r.id), reverse=True)]


async def test_listing_pages_newest_first_without_skipping_or_repeating(tmp_path):
    store = SqliteStore(str(tmp_path / "state.db"))
    seeded = await seed(store, 23, targets=("web", "api"), events=5)
    async with controller(tmp_path, store=store,
                          policies=[simple_policy(hold=3600)]) as (api, _c, _t):
        live = await api.start(canary_version="v100")
        want = [live["id"], *newest_first(seeded)]
        got = await pages(api, "limit=5")
        assert [len(p) for p in got] == [5, 5, 5, 5, 4]
        assert [r["id"] for p in got for r in p] == want
        # (a start time shared by two rollouts is ordered by id, and a page boundary
        # between them loses neither)
        assert [r["id"] for p in await pages(api, "limit=1") for r in p] == want
        _, data = await api.call("GET", "/api/v1/rollouts", role="viewer")
        assert len(data["rollouts"]) == 24 and data["next"] is None  # default: 50 a page
        # a rollout started while paging lands on the first page, not in the middle
        first = (await api.call("GET", "/api/v1/rollouts?limit=5", role="viewer"))[1]
        await api.call("POST", f"/api/v1/rollouts/{live['id']}/abort", {"reason": "next"})
        await api.until(live["id"], lambda r: r["state"] == "rolled_back")
        newer = await api.start(canary_version="v101")
        rest = await pages(api, "limit=5", before=first["next"])
        assert [r["id"] for r in first["rollouts"]] + [r["id"] for p in rest for r in p] == want
        assert newer["id"] not in [r["id"] for p in rest for r in p]


async def test_a_listing_leaves_events_out_and_one_rollout_has_them(tmp_path):
    store = SqliteStore(str(tmp_path / "state.db"))
    seeded = await seed(store, 3, events=40)
    async with controller(tmp_path, store=store) as (api, _c, _t):
        _, data = await api.call("GET", "/api/v1/rollouts", role="viewer")
        listed = data["rollouts"][0]
        assert "events" not in listed
        one = await api.rollout(listed["id"])
        assert len(one["events"]) == 40
        assert {k: v for k, v in one.items() if k != "events"} == listed
        assert listed["id"] == newest_first(seeded)[0]


async def test_listing_filters_by_target_and_state(tmp_path):
    store = SqliteStore(str(tmp_path / "state.db"))
    seeded = await seed(store, 12, targets=("web", "api"))
    async with controller(tmp_path, store=store,
                          policies=[simple_policy(hold=3600)]) as (api, _c, _t):
        live = await api.start(canary_version="v100")

        async def ids(query: str) -> list[str]:
            return [r["id"] for p in await pages(api, query) for r in p]

        assert await ids("target=api&limit=2") == newest_first(
            [r for r in seeded if r.target == "api"])
        assert await ids("state=succeeded") == newest_first(
            [r for r in seeded if r.state is Phase.SUCCEEDED])
        assert await ids("state=active") == [live["id"]]
        assert await ids("state=progressing,rolled_back&target=web&limit=3") == \
            [live["id"], *newest_first([r for r in seeded if r.target == "web"
                                         and r.state is Phase.ROLLED_BACK])]
        assert await ids("target=nope") == []
        # `before` taken from another listing still means "started before that one"
        ref = next(r for r in seeded if r.target == "api")
        assert [r["id"] for p in await pages(api, "target=web", before=ref.id)
                for r in p] == newest_first(
            [r for r in seeded if r.target == "web"
             and (r.started_at, r.id) < (ref.started_at, ref.id)])


@pytest.mark.parametrize("query,words", [
    ("limit=0", "limit: '0' must be a whole number from 1 to 500"),
    ("limit=501", "limit: '501'"),
    ("limit=ten", "limit: 'ten'"),
    ("limit=-1", "limit: '-1'"),
    ("limit=%C2%B2", "limit: "),
    ("limit=1&limit=2", "limit: given 2 times"),
    ("state=done", "state: 'done' is not a state; use one or more of progressing"),
    ("state=,", "state: empty"),
    ("before=no-such-id", "before: no rollout with id 'no-such-id'; pass the `next`"),
    ("before=", "before: empty"),
    ("page=2", "page: unknown query parameter; expected target, state, limit, before"),
])
async def test_bad_paging_parameters_are_a_400_naming_the_parameter(tmp_path, query, words):
    async with controller(tmp_path) as (api, _c, _t):
        status, data = await api.call("GET", f"/api/v1/rollouts?{query}", role="viewer")
        assert status == 400 and words in data["error"], data


async def test_a_state_file_from_before_paging_is_listed_and_filtered(tmp_path):
    db = tmp_path / "state.db"
    old = sqlite3.connect(db)  # the schema as it was: no `state` column
    old.executescript("""
        CREATE TABLE rollouts (id TEXT PRIMARY KEY, target TEXT NOT NULL,
            active INTEGER NOT NULL, started_at REAL NOT NULL, version INTEGER NOT NULL,
            data TEXT NOT NULL);
        CREATE UNIQUE INDEX one_active_per_target ON rollouts(target) WHERE active = 1;
        CREATE INDEX by_start ON rollouts(started_at);""")
    old.close()
    staging = SqliteStore(str(tmp_path / "staging.db"))
    seeded = await seed(staging, 4)
    await staging.close()
    src = sqlite3.connect(tmp_path / "staging.db")
    rows = src.execute("SELECT id, target, active, started_at, version, data FROM rollouts")
    old = sqlite3.connect(db)
    old.executemany("INSERT INTO rollouts VALUES (?, ?, ?, ?, ?, ?)", rows.fetchall())
    old.commit()
    old.close()
    src.close()
    store = SqliteStore(str(db))
    try:
        got = await store.list(state=Phase.SUCCEEDED)
        assert [r.id for r in got] == newest_first([r for r in seeded
                                                    if r.state is Phase.SUCCEEDED])
        assert len(await store.list(limit=3)) == 3
    finally:
        await store.close()


async def test_the_listing_query_uses_an_index(tmp_path):
    store = SqliteStore(str(tmp_path / "state.db"))
    try:
        await seed(store, 5)
        con = sqlite3.connect(tmp_path / "state.db")
        for where in ("", "WHERE target = 'web'"):
            plan = " ".join(str(row) for row in con.execute(
                f"EXPLAIN QUERY PLAN SELECT data FROM rollouts {where} "
                "ORDER BY started_at DESC, id DESC LIMIT 10"))
            assert "USING INDEX" in plan and "TEMP B-TREE" not in plan, plan
        con.close()
    finally:
        await store.close()


@pytest.mark.e2e
async def test_status_lists_the_newest_and_says_how_to_see_older_ones(tmp_path):
    from tests.test_restart_and_cli import cli

    store = SqliteStore(str(tmp_path / "state.db"))
    seeded = await seed(store, 5)
    async with controller(tmp_path, store=store) as (api, _c, _t):
        order = newest_first(seeded)
        code, out, err = await cli("status", "--limit", "2", server=api.base,
                                   token="tok-viewer")
        # (a table: its first line names the columns)
        assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == order[:2]
        assert f"--before {order[1]}" in err
        code, out, err = await cli("status", "--before", order[1], "--state", "rolled_back",
                                   server=api.base, token="tok-viewer")
        assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == \
            [rid for rid in order[2:] if int(rid[-1]) % 2 == 0]
        assert err == ""
        code, _out, err = await cli("status", "--limit", "0", server=api.base,
                                    token="tok-viewer")
        assert code == 2 and "limit: '0'" in err


async def test_the_openapi_description_of_state_refuses_what_the_api_refuses(tmp_path):
    """`state=` was any string in /api/v1/openapi.json, though the API answers 400 to
    anything but states and `active` separated by commas: a client built from the
    description offered values the API refuses."""
    import urllib.parse

    import jsonschema

    from canary.api.openapi import SPEC

    [param] = [p for p in SPEC["paths"]["/api/v1/rollouts"]["get"]["parameters"]
               if p["name"] == "state"]
    described = jsonschema.Draft202012Validator(param["schema"])
    async with controller(tmp_path) as (api, _ctl, _t):
        for text in ("active", "active,succeeded", " paused , rolled_back ", ",progressing,,",
                     "bogus", "active,bogus", "", " , ", "Active", "succeeded;paused"):
            status, data = await api.call(
                "GET", "/api/v1/rollouts?state=" + urllib.parse.quote(text), role="viewer")
            assert status in (200, 400), (text, status, data)
            assert described.is_valid(text) == (status == 200), (text, status, data)
