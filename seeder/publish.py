"""Publishing: list and hash an artifact at its origin, and write its manifest to the catalog."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from core.auth import ClusterKey
from core.buffers import BufferPool
from core.digest import block_layer, piece_digest
from core.errors import ConfigError, SwarmError
from core.manifest import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_PIECE_SIZE,
    Manifest,
    block_size_for,
    validate_path,
)
from seeder.catalog import Catalog
from seeder.origin import ObjectInfo, Origin, open_origin
from seeder.reader import RangedReader


async def list_files(origin: Origin, files: Sequence[str] | None) -> list[ObjectInfo]:
    """The objects to publish: the given keys, or everything under the origin's prefix."""
    if files:
        for key in files:
            validate_path(key)
        return [await origin.stat(key) for key in files]
    listed = await origin.list()
    if not listed:
        raise ConfigError(f"nothing to publish: {origin.url} has no objects")
    for info in listed:
        validate_path(info.key)
    return listed


async def build_manifest(
    origin_url: str,
    name: str,
    *,
    piece_size: int = DEFAULT_PIECE_SIZE,
    block_size: int = DEFAULT_BLOCK_SIZE,
    files: Sequence[str] | None = None,
    pieces_in_flight: int = 4,
    range_size: int = 16 * 1024 * 1024,
    progress: Callable[[int, int], None] | None = None,
    origin: Origin | None = None,
    retry_time: float | None = None,
) -> Manifest:
    """Hash every block of the artifact at ``origin_url`` (parallel ranged reads).

    The manifest is of format 2: every piece's block layer, so peers check each
    block as it lands (see :mod:`core.manifest`), of ``block_size`` (see
    :func:`core.manifest.block_size_for`).

    ``retry_time`` is how long a failing origin read keeps being retried (default:
    ``seeder.retry.DEFAULT_RETRY_TIME``).
    """
    block_size_for([], piece_size, block_size)  # a bad size fails before any read
    own = origin is None
    origin = origin or open_origin(origin_url)
    try:
        objects = await list_files(origin, files)
        sizes = [(o.key, o.size) for o in objects]
        layout = Manifest.layout(sizes, piece_size)
        total = sum(size for _, size in sizes)
        if progress:
            progress(0, total)
        block_size = block_size_for([size for _, size in sizes], piece_size, block_size)
        layers: list[bytes] = [b""] * len(layout)
        reader = RangedReader(origin, range_size=range_size, retry_time=retry_time)
        in_flight = max(1, min(pieces_in_flight, len(layout)))
        pool = BufferPool(min(piece_size, max((n for _, _, n in layout), default=1)), in_flight)
        todo = iter(enumerate(layout))

        async def worker() -> None:
            for index, (key, offset, length) in todo:
                async with pool.lease(length) as buf:
                    await reader.read(key, offset, buf)
                    # Format 2: the piece's block layer; format 1: its digest.
                    layers[index] = await asyncio.to_thread(
                        block_layer if block_size else piece_digest, buf, block_size
                    )
                if progress:
                    progress(length, total)

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(in_flight):
                    tg.create_task(worker())
        except* SwarmError as group:
            # Raise the first failure itself, not a group: callers and the CLI catch SwarmError.
            raise group.exceptions[0]  # noqa: B904 - keeps the failure's own cause
        return Manifest.build(
            name=name,
            origin=origin_url,
            piece_size=piece_size,
            files=sizes,
            block_size=block_size,
            layers=layers if block_size else (),
            digests=() if block_size else layers,
        )
    finally:
        if own:
            await origin.close()


async def publish(
    origin_url: str,
    name: str,
    catalog_url: str,
    *,
    piece_size: int = DEFAULT_PIECE_SIZE,
    block_size: int = DEFAULT_BLOCK_SIZE,
    files: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    key: ClusterKey | None = None,
    retry_time: float | None = None,
) -> Manifest:
    """Build the manifest of ``origin_url`` and make it the latest version of ``name``.

    With a cluster token (``key`` not open) the catalog entry is signed with it, and
    only clusters holding that token will serve it.
    """
    manifest = await build_manifest(
        origin_url,
        name,
        piece_size=piece_size,
        block_size=block_size,
        files=files,
        progress=progress,
        retry_time=retry_time,
    )
    async with Catalog(catalog_url, key) as catalog:
        await catalog.put(manifest)
    return manifest
