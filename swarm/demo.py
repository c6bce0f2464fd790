"""``swarm demo``: a whole swarm on this machine, with real parts.

It starts a real S3-compatible server on loopback (``rclone serve s3``), writes a
synthetic model into a bucket (a few weight shards plus small config files),
publishes it, starts a tracker process and N ``swarm fetch`` processes, shows each
peer's progress live, checks every copy against the manifest, and sums up: wall
time, origin bytes ÷ model bytes, bytes exchanged peer to peer, aggregate rate.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from core.auth import TOKEN_ENV, ClusterKey
from core.errors import SwarmError
from core.manifest import Manifest
from core.units import format_size
from seeder.local_s3 import LocalS3Server, free_port
from seeder.publish import publish
from swarm.demo_config import DemoConfig
from swarm.store import STATE_DIR, read_complete_marker

BUCKET = "models"


@dataclass
class PeerRun:
    index: int
    dest: Path
    proc: subprocess.Popen[bytes]
    log: Path
    result: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


def write_model(directory: Path, size: int, shards: int, seed: int) -> None:
    """Synthetic weights: ``shards`` shards of pseudo-random bytes plus small JSON files."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    # Uneven shard sizes, so pieces don't line up with file boundaries.
    lengths = [max(0, size // shards - i * 4099) for i in range(shards - 1)]
    lengths.append(size - sum(lengths))
    chunk = 16 * 1024 * 1024
    for i, length in enumerate(lengths):
        with open(directory / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            left = length
            while left:
                n = min(chunk, left)
                f.write(rng.randbytes(n))
                left -= n
    (directory / "config.json").write_text(
        json.dumps({"architectures": ["DemoForCausalLM"], "hidden_size": 7168})
    )
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 131072}))
    (directory / "generation_config.json").write_text("{}")


def verify_copy(dest: Path, manifest: Manifest) -> bool:
    """Re-hash every piece of the copy in ``dest`` against the manifest."""
    marker = read_complete_marker(dest)
    if marker is None or marker.get("root") != manifest.root_hex:
        return False
    for index in range(manifest.num_pieces):
        piece = manifest.piece(index)
        with open(dest / piece.path, "rb") as f:
            f.seek(piece.offset)
            if manifest.piece_digest(f.read(piece.length)) != manifest.digests[index]:
                return False
    return all((dest / f.path).stat().st_size == f.size for f in manifest.files)


def _pieces_done(dest: Path, manifest: Manifest) -> int:
    try:
        return (dest / STATE_DIR / f"{manifest.root_hex}.state").read_bytes().count(1)
    except OSError:
        return 0


def _table(manifest: Manifest, runs: list[PeerRun], started: float) -> Table:
    table = Table(
        title=f"swarm demo: {manifest.ref[:40]}…  {format_size(manifest.total_size)}", expand=False
    )
    for col in ("peer", "pieces", "progress", "state", "seconds"):
        table.add_column(col, justify="right" if col != "state" else "left")
    total = manifest.num_pieces
    for run in runs:
        done = _pieces_done(run.dest, manifest)
        width = 30
        filled = int(width * done / max(total, 1))
        bar = "█" * filled + "·" * (width - filled)
        code = run.proc.poll()
        state = "fetching" if code is None else ("done" if code == 0 else f"failed ({code})")
        seconds = run.result.get("seconds", time.monotonic() - started)
        table.add_row(f"peer-{run.index}", f"{done}/{total}", bar, state, f"{seconds:.1f}")
    return table


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


async def run_demo(config: DemoConfig, console: Console) -> dict[str, Any]:
    """Run the demo; returns the summary that ``--json`` prints."""
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="swarm-demo-"))
    own_workdir = config.workdir is None
    tracker: subprocess.Popen[bytes] | None = None
    runs: list[PeerRun] = []
    server = LocalS3Server(workdir / "s3")
    try:
        console.print(
            f"[bold]1/5[/] generating a {format_size(config.size)} synthetic model in {workdir}"
        )
        write_model(server.bucket(BUCKET) / "demo-model", config.size, config.shards, config.seed)
        server.bucket("catalog")
        console.print(
            f"[bold]2/5[/] starting an S3-compatible server (rclone serve s3) on {server.endpoint}"
        )
        server.start()
        # A cluster token of its own, as a real cluster has: the catalog entry is
        # signed with it, and the tracker and peers answer only each other.
        token = secrets.token_urlsafe(32)
        env = {**os.environ, **server.env(), TOKEN_ENV: token}
        os.environ.update(server.env())
        origin, catalog = f"s3://{BUCKET}/demo-model", "s3://catalog/manifests"
        console.print(
            f"[bold]3/5[/] publishing {origin} (blake3, {format_size(config.piece_size)} pieces, "
            "signed with a fresh cluster token)"
        )
        manifest = await publish(
            origin,
            "demo-model",
            catalog,
            piece_size=config.piece_size,
            key=ClusterKey(token.encode()),
        )
        port = free_port()
        console.print(
            f"[bold]4/5[/] starting a tracker on 127.0.0.1:{port} and {config.peers} peers"
        )
        tracker_log = workdir / "tracker.log"
        with open(tracker_log, "wb") as log_file:
            tracker = subprocess.Popen(
                _cli("tracker", "--listen", f"127.0.0.1:{port}", "--catalog", catalog, "--announce-interval", "0.5",
                     "--peer-ttl", "5", "--stall-timeout", "30"),
                env=env, stdout=subprocess.DEVNULL, stderr=log_file,
            )  # fmt: skip
        await _wait_http(f"http://127.0.0.1:{port}/healthz", 15.0)
        started = time.monotonic()
        for i in range(config.peers):
            dest = workdir / f"node-{i + 1}"
            log_path = workdir / f"node-{i + 1}.log"
            with (
                open(log_path, "wb") as log_file,
                open(workdir / f"node-{i + 1}.json", "wb") as out,
            ):
                proc = subprocess.Popen(
                    _cli("fetch", manifest.ref, "--tracker", f"http://127.0.0.1:{port}", "--dest", str(dest),
                         "--listen", "127.0.0.1:0", "--linger", "60", "--json", "--no-fsync"),
                    env=env, stdout=out, stderr=log_file,
                )  # fmt: skip
            runs.append(PeerRun(i + 1, dest, proc, log_path))
        deadline = started + config.timeout
        with Live(_table(manifest, runs, started), console=console, refresh_per_second=5) as live:
            while any(r.proc.poll() is None for r in runs):
                if time.monotonic() > deadline:
                    raise SwarmError(f"demo did not finish within {config.timeout:.0f}s")
                for run in runs:
                    if run.proc.poll() is not None and not run.result:
                        run.result = _read_result(workdir / f"node-{run.index}.json")
                live.update(_table(manifest, runs, started))
                await asyncio.sleep(0.2)
            for run in runs:
                run.result = run.result or _read_result(workdir / f"node-{run.index}.json")
            live.update(_table(manifest, runs, started))
        wall = max((r.result.get("seconds", 0.0) for r in runs), default=0.0)
        failed = [r for r in runs if r.proc.returncode != 0]
        for r in failed:
            console.print(f"[red]peer-{r.index} failed[/]; its log:\n{r.log.read_text()[-2000:]}")
        console.print("[bold]5/5[/] verifying every copy against the manifest")
        verified = not failed and all(
            await asyncio.gather(*(asyncio.to_thread(verify_copy, r.dest, manifest) for r in runs))
        )
        origin_bytes = sum(int(r.result.get("origin_bytes", 0)) for r in runs)
        peer_bytes = sum(int(r.result.get("peer_bytes", 0)) for r in runs)
        summary: dict[str, Any] = {
            "peers": config.peers,
            "artifact": manifest.ref,
            "model_bytes": manifest.total_size,
            "piece_size": manifest.piece_size,
            "pieces": manifest.num_pieces,
            "origin_bytes": origin_bytes,
            "origin_ratio": origin_bytes / manifest.total_size,
            "peer_bytes": peer_bytes,
            "seconds": wall,
            "aggregate_mb_per_s": config.peers * manifest.total_size / wall / 1e6 if wall else 0.0,
            "verified": verified,
            "per_peer": [
                {
                    "peer": f"peer-{r.index}",
                    "seconds": r.result.get("seconds"),
                    "origin_bytes": r.result.get("origin_bytes"),
                    "peer_bytes": r.result.get("peer_bytes"),
                    "uploaded_bytes": r.result.get("uploaded_bytes"),
                    "origin_pieces": r.result.get("origin_pieces"),
                    "exit_code": r.proc.returncode,
                }
                for r in runs
            ],
        }
        return summary
    finally:
        for run in runs:
            if run.proc.poll() is None:
                run.proc.kill()
            run.proc.wait()
        if tracker is not None:
            tracker.terminate()
            try:
                tracker.wait(10)
            except subprocess.TimeoutExpired:
                tracker.kill()
                tracker.wait()
        server.stop()
        if own_workdir and not config.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _read_result(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


async def _wait_http(url: str, timeout: float) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError, OSError):
                pass
            await asyncio.sleep(0.1)
    raise SwarmError(f"{url} did not answer within {timeout:.0f}s")
