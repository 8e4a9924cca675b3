"""A worker starting without a save copies another worker's (`IndexFeeder._copy_from_peer`):
what it copies loads as the same index; a peer that is down, has no save, or sends other
than it announced is passed over, and leaves nothing on disk. (The route a real worker
serves it from is exercised in `tests/integration/test_similarity.py`.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from classify_app.dev.processes import free_port
from tables.similarity import SAVE_FILES, IndexFeeder, SimilarityIndex, newest_save_files
from tests.tables.test_similarity import DIM, ad, unit

ASKED = web.AppKey("asked", int)  # how often a peer's manifest was asked for


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def peer_app(folder: Path, manifest: Handler, file: Handler | None = None) -> web.Application:
    """A stand-in for a worker's save routes: `manifest`, and `file` (by default the file of
    the newest save under `folder`)."""

    async def newest_file(request: web.Request) -> web.StreamResponse:
        found = newest_save_files(folder)
        assert found is not None
        return web.FileResponse(found[1][0].parent / request.match_info["file"])

    application = web.Application()
    application.router.add_get("/classify/similarity/save", manifest)
    application.router.add_get("/classify/similarity/save/{save}/{file}", file or newest_file)
    return application


def honest(folder: Path) -> web.Application:
    """Serves the newest save under `folder` as a worker does."""

    async def manifest(request: web.Request) -> web.Response:
        found = newest_save_files(folder)
        if found is None:
            return web.json_response({"error": "no_saved_index"}, status=404)
        name, files = found
        sizes = [{"name": path.name, "bytes": path.stat().st_size} for path in files]
        return web.json_response({"save": name, "files": sizes})

    return peer_app(folder, manifest)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[web.Application], Any]]:
    runners: list[web.AppRunner] = []

    async def start(application: web.Application) -> str:
        runner = web.AppRunner(application, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def saved_index(folder: Path) -> SimilarityIndex:
    index = SimilarityIndex(DIM)
    for number in range(20):
        index.put(ad(f"ad-{number}", 1.0, [number, number + 100]))
    index.save(folder, {0: (20, 1234)})
    return index


def feeder(folder: Path, peers: list[str]) -> IndexFeeder:
    return IndexFeeder(
        SimilarityIndex(DIM),
        topic="vectors",
        bootstrap="127.0.0.1:1",
        options={},
        save_folder=folder,
        peers=lambda: peers,
    )


async def test_a_copied_save_loads_as_the_index_it_was(tmp_path: Path, serve: Any) -> None:
    original = saved_index(tmp_path / "peer")
    nothing = await serve(honest(tmp_path / "empty"))  # a worker without a save: 404
    down = f"http://127.0.0.1:{free_port()}"  # a worker not listening
    good = await serve(honest(tmp_path / "peer"))
    mine = tmp_path / "mine"
    assert await feeder(mine, [nothing, down, good])._copy_from_peer()
    copy = SimilarityIndex(DIM)
    assert copy.load(mine) == {0: (20, 1234)}
    assert copy.ads == original.ads == 20
    for number in (0, 7, 19):
        query = {0: unit(number + 100)}
        assert copy.similar(query, 3) == original.similar(query, 3)
        held = copy.vectors_of(f"ad-{number}")
        assert held is not None and float(held[1] @ unit(number + 100)) > 0.99
    assert sorted(path.name for path in mine.iterdir() if path.is_dir())[0].startswith("saved-")
    assert not list(mine.glob("incoming-*"))


def lying(folder: Path, how: str) -> web.Application:
    """A peer whose answers are not a save: each `how` breaks one promise."""

    async def manifest(request: web.Request) -> web.Response:
        request.app[ASKED] += 1
        found = newest_save_files(folder)
        assert found is not None
        name, files = found
        sizes: list[dict[str, Any]] = [
            {"name": path.name, "bytes": path.stat().st_size} for path in files
        ]
        if how == "path":
            name = "../../outside"
        elif how == "extra-file":
            sizes.append({"name": "run.sh", "bytes": 3})
        elif how == "longer":
            sizes[1]["bytes"] -= 10
        elif how == "shorter":
            sizes[1]["bytes"] += 10
        return web.json_response({"save": name, "files": sizes})

    async def file(request: web.Request) -> web.StreamResponse:
        found = newest_save_files(folder)
        assert found is not None
        if how == "replaced":  # a newer save meanwhile
            return web.json_response({"error": "no_saved_index"}, status=404)
        return web.FileResponse(found[1][0].parent / request.match_info["file"])

    application = peer_app(folder, manifest, file)
    application[ASKED] = 0
    return application


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ("path", "not a save"),
        ("extra-file", "not a save"),
        ("longer", "index.usearch is longer than the"),
        ("shorter", "index.usearch: "),
        ("replaced", "is gone"),
    ],
)
async def test_a_peer_sending_other_than_a_save_leaves_nothing(
    tmp_path: Path, serve: Any, how: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    saved_index(tmp_path / "peer")
    peer = lying(tmp_path / "peer", how)
    url = await serve(peer)
    mine = tmp_path / "mine"
    assert not await feeder(mine, [url])._copy_from_peer()
    assert peer[ASKED] == (2 if how == "replaced" else 1)  # a replaced save: asked again once
    [warning] = [r.getMessage() for r in caplog.records if "Copying the similarity" in r.msg]
    assert why in warning, warning
    assert not mine.exists() or list(mine.iterdir()) == []  # no CURRENT, no half copy
    assert SimilarityIndex.saved_positions(mine) is None
    assert not (tmp_path / "outside").exists()


async def test_no_peers_no_copy(tmp_path: Path) -> None:
    assert not await feeder(tmp_path, [])._copy_from_peer()
    without = IndexFeeder(
        SimilarityIndex(DIM), topic="v", bootstrap="127.0.0.1:1", options={}, save_folder=tmp_path
    )
    assert not await without._copy_from_peer()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
MANIFESTS = JSON | st.fixed_dictionaries(
    {"save": JSON | st.text(max_size=30), "files": st.lists(
        st.fixed_dictionaries({"name": JSON | st.sampled_from(SAVE_FILES), "bytes": JSON}),
        max_size=3,
    )}
)  # fmt: skip


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(manifest=MANIFESTS)
def test_any_manifest_but_a_save_copies_nothing(tmp_path: Path, manifest: Any) -> None:
    """Whatever JSON a peer answers with, short of a save's, nothing is copied or left."""

    async def run() -> bool:
        async def answer(request: web.Request) -> web.Response:
            return web.json_response(manifest)

        async def no_file(request: web.Request) -> web.Response:
            return web.json_response({"error": "no_saved_index"}, status=404)

        runner = web.AppRunner(peer_app(tmp_path, answer, no_file), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            return await feeder(tmp_path / "mine", [f"http://127.0.0.1:{port}"])._copy_from_peer()
        finally:
            await runner.cleanup()

    assert not asyncio.run(run())
    mine = tmp_path / "mine"
    assert not mine.exists() or list(mine.iterdir()) == []
    assert sorted(path.name for path in tmp_path.iterdir()) in ([], ["mine"])
