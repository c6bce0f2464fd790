"""The catalog on a ``file://`` directory and on S3: signed entries, capped reads, bombs.

With a cluster token, ``put`` signs each version (``<name>/<root>.mac``) and ``get``
serves only versions signed with that token, checking before it reads the manifest;
every catalog object is refused by its size before it is read.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zstandard
from conftest import S3Bucket
from servers import S3Server, populate

from core.auth import ClusterKey
from core.errors import CatalogError
from core.manifest import Manifest
from seeder.catalog import Catalog, entry_mac
from seeder.publish import publish

T = TypeVar("T")
KIB = 1024
MIB = 1024 * KIB
NAME = "org/tiny-llm"
TOKEN = ClusterKey(b"cluster-token-for-tests-0123456789")
OTHER_TOKEN = ClusterKey(b"another-cluster-token-9876543210")
UNSIGNED = "is not signed with this cluster's token (publish it with --token-file or SWARM_TOKEN)"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@dataclass(frozen=True)
class Place:
    """A catalog URL and the local directory its objects are files in."""

    url: str
    path: Path
    # How long the server may answer from what it listed before a file changed
    # behind its back (rclone's directory cache).
    stale_for: float = 0.0

    def settle(self) -> None:
        """Wait until the server sees files written straight into ``path``."""
        time.sleep(3 * self.stale_for)


@pytest.fixture(params=["file", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    if request.param == "file":
        path = tmp_path / "catalog"
        path.mkdir()
        return Place(path.as_uri(), path)
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    path = bucket.path / "catalog"
    path.mkdir()
    server: S3Server = request.getfixturevalue("s3_server")
    return Place(f"{bucket.url}/catalog", path, server.dir_cache_seconds)


def manifest(name: str = NAME, seed: int = 1) -> Manifest:
    rng = random.Random(seed)
    files = [("config.json", 100), ("weights.bin", 5 * KIB + 3)]
    layout = Manifest.layout(files, KIB)
    return Manifest.build(
        name=name,
        origin="s3://models/tiny",
        piece_size=KIB,
        files=files,
        digests=[rng.randbytes(32) for _ in layout],
    )


def test_signed_entries_round_trip(place: Place) -> None:
    m = manifest()

    async def main() -> tuple[Manifest, Manifest, Manifest]:
        async with Catalog(place.url, TOKEN) as catalog:
            assert await catalog.put(m) == m.ref
            by_name = await catalog.get(NAME)
            by_root = await catalog.get(m.ref)
        async with Catalog(place.url) as open_catalog:  # an open cluster checks nothing
            return by_name, by_root, await open_catalog.get(NAME)

    assert run(main()) == (m, m, m)
    mac = (place.path / NAME / f"{m.root_hex}.mac").read_text()
    assert mac == entry_mac(TOKEN, NAME, m.root_hex).hex()
    assert (place.path / NAME / "latest").read_text() == m.root_hex


def test_an_open_put_writes_no_signature(place: Place) -> None:
    m = manifest()

    async def main() -> None:
        async with Catalog(place.url) as catalog:
            await catalog.put(m)

    run(main())
    assert not (place.path / NAME / f"{m.root_hex}.mac").exists()
    assert (place.path / NAME / f"{m.root_hex}.manifest").exists()


@pytest.mark.parametrize(
    "tamper",
    ["unsigned", "other token", "not hex", "empty", "another root's mac", "another name's mac"],
)
def test_entries_not_signed_with_our_token_are_refused(place: Place, tamper: str) -> None:
    m = manifest()
    other = manifest("org/other", seed=2)
    mac_path = place.path / NAME / f"{m.root_hex}.mac"

    async def publish_both() -> None:
        async with Catalog(place.url, TOKEN) as signed:
            await signed.put(other)
        async with Catalog(place.url, None if tamper == "unsigned" else TOKEN) as catalog:
            await catalog.put(m)

    run(publish_both())
    if tamper == "other token":
        mac_path.write_text(entry_mac(OTHER_TOKEN, NAME, m.root_hex).hex())
    elif tamper == "not hex":
        mac_path.write_text("zz" * 32)
    elif tamper == "empty":
        mac_path.write_text("")
    elif tamper == "another root's mac":
        mac_path.write_text(entry_mac(TOKEN, NAME, other.root_hex).hex())
    elif tamper == "another name's mac":
        mac_path.write_text(entry_mac(TOKEN, other.name, m.root_hex).hex())
    place.settle()

    async def main() -> None:
        async with Catalog(place.url, TOKEN) as catalog:
            for ref in (NAME, m.ref, m.ref[: len(NAME) + 1 + 12]):
                with pytest.raises(CatalogError) as info:
                    await catalog.get(ref)
                assert str(info.value) == f"catalog entry {m.ref} {UNSIGNED}"
            assert await catalog.get(other.name) == other  # its own entry is fine

    run(main())


def test_an_unsigned_bomb_is_never_read(place: Place) -> None:
    """With a token, a planted entry without a valid MAC is refused before its manifest is read."""
    bomb = zstandard.ZstdCompressor().compress(bytes(50 * MIB))
    root = "ab" * 32
    populate(place.path / NAME, {f"{root}.manifest": bomb, "latest": root.encode()})

    async def main() -> int:
        async with Catalog(place.url, TOKEN) as catalog:
            with pytest.raises(CatalogError, match="not signed"):
                await catalog.get(NAME)
            return catalog.origin.counters.bytes_read

    assert run(main()) == len(root)  # ``latest`` only


def test_a_bomb_in_an_open_catalog_is_damaged_not_decoded(place: Place) -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(200 * MIB))
    root = "cd" * 32
    populate(place.path / NAME, {f"{root}.manifest": bomb, "latest": root.encode()})

    async def main() -> None:
        async with Catalog(place.url) as catalog:
            with pytest.raises(CatalogError, match=f"entry {NAME}@{root} is damaged.*bomb"):
                await catalog.get(NAME)

    run(main())


def test_a_huge_catalog_object_is_refused_without_reading_it(place: Place) -> None:
    m = manifest()
    huge = bytes(3 * MIB)

    async def main() -> tuple[str, int]:
        async with Catalog(place.url, max_manifest_size=MIB) as catalog:
            await catalog.put(m)
            # Through the store's API: behind its back, a server that caches
            # listings (rclone) may still report the old size.
            await catalog.origin.put_bytes(f"{NAME}/{m.root_hex}.manifest", huge)
            read_before = catalog.origin.counters.bytes_read
            with pytest.raises(CatalogError) as info:
                await catalog.get(m.ref)
            return str(info.value), catalog.origin.counters.bytes_read - read_before

    message, read = run(main())
    assert f"{NAME}/{m.root_hex}.manifest is {len(huge)} bytes" in message
    assert f"more than the {MIB} allowed: not read" in message
    assert read == 0


@pytest.mark.parametrize("latest", ["../../etc/passwd", "not-a-root", "ab" * 32 + "00", "x" * 4096])
def test_latest_must_hold_a_root(place: Place, latest: str) -> None:
    populate(place.path / NAME, {"latest": latest.encode()})

    async def main() -> None:
        async with Catalog(place.url) as catalog:
            with pytest.raises(CatalogError, match=f"{NAME}/latest"):
                await catalog.get(NAME)

    run(main())


def test_publish_signs_with_the_key_it_is_given(place: Place, tmp_path: Path) -> None:
    origin = populate(tmp_path / "origin", {"weights.bin": random.Random(9).randbytes(10_000)})

    async def main() -> tuple[Manifest, Manifest]:
        published = await publish(origin.as_uri(), NAME, place.url, piece_size=4 * KIB, key=TOKEN)
        async with Catalog(place.url, TOKEN) as catalog:
            got = await catalog.get(NAME)
        async with Catalog(place.url, OTHER_TOKEN) as other:
            with pytest.raises(CatalogError, match="not signed"):
                await other.get(NAME)
        return published, got

    published, got = run(main())
    assert got == published
