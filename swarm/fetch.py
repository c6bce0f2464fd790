"""Fetch orchestration: what ``swarm fetch`` runs.

``fetch_direct`` is the no-tracker path: every missing piece straight from the
origin, a few pieces in flight, each read with several concurrent ranged requests
into a reused buffer, verified with blake3, written in place and recorded, so a
killed fetch resumes where it stopped (the store re-hashes what changed on disk,
so only pieces proven present are skipped). It is also the "every node downloads
from the origin" baseline that benchmarks compare the swarm against.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.buffers import BufferPool
from core.errors import SwarmError
from core.manifest import Manifest
from seeder.origin import Origin, open_origin
from seeder.reader import RangedReader
from seeder.retry import DEFAULT_RETRY_TIME
from seeder.role import DEFAULT_VERIFY_RETRIES, origin_window, pull_piece
from swarm.store import PieceStore


def process_age() -> float | None:
    """Seconds since this process was started (Linux ``/proc``), or None elsewhere.

    Reported as ``startup_seconds`` so a benchmark can tell the cost of starting a
    fetch (interpreter, imports, manifest look-up) from the transfer itself.
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return None
    # The command name (field 2) may hold spaces; the fields after it are fixed.
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


ProgressCallback = Callable[[int], None]
"""Called with the number of bytes that just became verified (or were found on disk)."""


@dataclass
class FetchConfig:
    """Knobs of one fetch; defaults suit 256 MiB pieces on a 2-core node."""

    pieces_in_flight: int = 4
    range_size: int = 16 * 1024 * 1024
    origin_concurrency: int = 16
    verify_retries: int = DEFAULT_VERIFY_RETRIES  # further reads of a piece that fails verification
    durable: bool = True
    direct_io: bool = True  # write pieces bypassing the page cache where possible
    origin_retry_time: float = (
        DEFAULT_RETRY_TIME  # seconds a throttled or failing origin range is retried
    )


@dataclass
class FetchResult:
    """The summary ``swarm fetch --json`` prints."""

    artifact: str
    root: str
    dest: str
    model_bytes: int
    origin_bytes: int = 0
    peer_bytes: int = 0
    reused_bytes: int = 0
    seconds: float = 0.0
    verified: bool = False
    pieces: int = 0
    origin_retries: int = 0
    verify_failures: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


async def fetch_direct(
    manifest: Manifest,
    dest: Path,
    *,
    origin: Origin | None = None,
    config: FetchConfig | None = None,
    progress: ProgressCallback | None = None,
) -> FetchResult:
    """Fetch every missing piece of ``manifest`` from its origin into ``dest``."""
    config = config or FetchConfig()
    started = time.monotonic()
    own_origin = origin is None
    origin = origin or open_origin(manifest.origin)
    store = PieceStore(dest, manifest, durable=config.durable, direct_io=config.direct_io)
    result = FetchResult(
        manifest.name, manifest.root_hex, str(dest), manifest.total_size, pieces=manifest.num_pieces
    )
    try:
        await asyncio.to_thread(store.open)
        result.reused_bytes = store.reused_bytes
        # Verified pieces of files changed since they were verified, hashed again on open.
        result.extra["rechecked_bytes"] = store.rechecked_bytes
        # Checked blocks of pieces a stopped run had not finished: not pulled again.
        result.extra["kept_block_bytes"] = store.kept_block_bytes
        if progress and store.reused_bytes:
            progress(store.reused_bytes)
        missing = store.missing()
        if missing:
            await _pull_pieces(manifest, store, origin, missing, config, progress, result)
        await asyncio.to_thread(store.finish)
        result.verified = True
    finally:
        store.close()
        result.origin_bytes = origin.counters.bytes_read
        result.origin_retries = origin.counters.retries
        result.seconds = time.monotonic() - started
        if own_origin:
            await origin.close()
    return result


async def _pull_pieces(
    manifest: Manifest,
    store: PieceStore,
    origin: Origin,
    missing: list[int],
    config: FetchConfig,
    progress: ProgressCallback | None,
    result: FetchResult,
) -> None:
    reader = RangedReader(
        origin,
        range_size=config.range_size,
        max_concurrency=config.origin_concurrency,
        retry_time=config.origin_retry_time,
    )
    in_flight = max(1, min(config.pieces_in_flight, len(missing)))
    pool = BufferPool(origin_window(manifest, config.range_size, relayed=False), in_flight)
    queue = iter(missing)

    async def worker() -> None:
        for index in queue:
            length = manifest.piece_lengths[index]
            async with pool.lease(min(length, pool.size)) as buf:
                result.verify_failures += await pull_piece(
                    reader, store, manifest, index, buf, verify_retries=config.verify_retries
                )
            if progress:
                progress(length)

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(in_flight):
                tg.create_task(worker())
    except* SwarmError as group:
        # Raise the first failure itself, not a group: callers and the CLI catch SwarmError.
        raise group.exceptions[0]  # noqa: B904 - keeps the failure's own cause
