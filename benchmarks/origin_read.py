"""Origin read throughput: RangedReader into a reused buffer vs boto3's download_file.

Scenario: ``rclone serve s3`` on loopback serves one object of ``--size`` bytes
(default 1 GiB, random bytes, written into the bucket folder before the server
starts, so it is on disk and in the page cache). In the same run we time

- ``RangedReader`` (``--range-size`` ranges, ``--concurrency`` requests in flight)
  reading the whole object into one pre-touched buffer, reused across repeats;
- the same with ``SWARM_S3_BOTO3=1``: its ranged GETs through boto3 in threads rather
  than signed in-process on ``http.client`` connections (``seeder.backends.s3``), with
  the CPU time this process spent per GiB for each;
- boto3's ``download_file`` (s3transfer, its default 8 MiB parts and 10 threads) of
  the same object to a file in the same temporary folder;

each ``--repeat`` times after one warm-up, and report MB/s (10^6 bytes/s) of the
best run, the median, and the ratio reader/boto3. Results go to
``benchmarks/results/origin-read-<YYYY-MM-DD>.json``.

    .venv/bin/python -m benchmarks.origin_read [--size 1GiB] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import blake3
import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from core.units import format_size, parse_size
from seeder.backends.s3 import S3Origin
from seeder.reader import DEFAULT_MAX_CONCURRENCY, DEFAULT_RANGE_SIZE, RangedReader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import S3Server, environ

RESULTS = Path(__file__).resolve().parent / "results"
KEY = "model/weights.bin"


def write_object(path: Path, size: int) -> str:
    """Random bytes to ``path`` in 64 MiB blocks; returns their blake3 hex digest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = blake3.blake3()
    block = 64 * 1024 * 1024
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(block, left))
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return str(digest.hexdigest())


async def time_reader(
    url: str, buf: bytearray, range_size: int, concurrency: int, runs: int
) -> tuple[list[float], list[float], int, int, bool]:
    """Wall and CPU seconds of each read of the whole object; retries, requests, signed."""
    view = memoryview(buf)
    times: list[float] = []
    cpu: list[float] = []
    async with S3Origin(url) as origin:
        reader = RangedReader(origin, range_size=range_size, max_concurrency=concurrency)
        await reader.read(KEY, 0, view)  # warm-up: connections, page cache
        for _ in range(runs):
            start, cpu0 = time.perf_counter(), time.process_time()
            await reader.read(KEY, 0, view)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu0)
        counters = origin.counters
        return times, cpu, counters.retries, counters.requests, origin.signs_requests


def time_boto3(bucket: str, dest: Path, runs: int) -> list[float]:
    client = boto3.session.Session().client(
        "s3",
        config=Config(
            response_checksum_validation="when_required",
            request_checksum_calculation="when_required",
        ),
    )
    config = TransferConfig()
    client.download_file(bucket, KEY, str(dest), Config=config)  # warm-up
    times = []
    for _ in range(runs):
        dest.unlink()
        start = time.perf_counter()
        client.download_file(bucket, KEY, str(dest), Config=config)
        times.append(time.perf_counter() - start)
    client.close()
    return times


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--range-size", default=str(DEFAULT_RANGE_SIZE))
    parser.add_argument("--concurrency", type=int, default=DEFAULT_MAX_CONCURRENCY)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    range_size = parse_size(args.range_size)

    with tempfile.TemporaryDirectory(prefix="swarm-origin-bench-") as tmp:
        root = Path(tmp) / "s3"
        bucket = "bench"
        # The object is in place before the server starts, so rclone may cache listings.
        source_digest = write_object(root / bucket / KEY, size)
        with S3Server(root, dir_cache_time="1h") as server, environ(server.env()):
            buf = bytearray(size)
            buf[::4096] = b"\x01" * len(range(0, size, 4096))  # touch every page once
            reader_times, reader_cpu, retries, requests, signed = asyncio.run(
                time_reader(f"s3://{bucket}", buf, range_size, args.concurrency, args.repeat)
            )
            if blake3.blake3(buf).hexdigest() != source_digest:
                raise SystemExit("RangedReader returned bytes that differ from the object")
            buf[::4096] = b"\x01" * len(range(0, size, 4096))
            with environ({"SWARM_S3_BOTO3": "1"}):
                via_times, via_cpu, _, _, via_signed = asyncio.run(
                    time_reader(f"s3://{bucket}", buf, range_size, args.concurrency, args.repeat)
                )
            if signed == via_signed or blake3.blake3(buf).hexdigest() != source_digest:
                raise SystemExit("RangedReader through boto3: not boto3, or wrong bytes")
            boto_times = time_boto3(bucket, Path(tmp) / "download.bin", args.repeat)
            if (
                blake3.blake3((Path(tmp) / "download.bin").read_bytes()).hexdigest()
                != source_digest
            ):
                raise SystemExit("boto3 download differs from the object")

    def mbps(seconds: float) -> float:
        return round(size / seconds / 1e6, 1)

    def cpu_per_gib(seconds: list[float]) -> float:
        return round(statistics.median(seconds) * (1 << 30) / size, 3)

    reader_best, boto_best = min(reader_times), min(boto_times)
    result: dict[str, object] = {
        "benchmark": "origin_read",
        "date": dt.date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "server": "rclone serve s3 on 127.0.0.1 (objects on local disk, page-cached)",
        "object_bytes": size,
        "range_size": range_size,
        "concurrency": args.concurrency,
        "repeat": args.repeat,
        "reader": {
            "best_mb_s": mbps(reader_best),
            "median_mb_s": mbps(statistics.median(reader_times)),
            "runs_s": [round(t, 3) for t in reader_times],
            "requests": requests,
            "retries": retries,
            "signed_in_process": signed,
            "cpu_s_per_gib": cpu_per_gib(reader_cpu),
        },
        "reader_through_boto3": {
            "best_mb_s": mbps(min(via_times)),
            "median_mb_s": mbps(statistics.median(via_times)),
            "runs_s": [round(t, 3) for t in via_times],
            "cpu_s_per_gib": cpu_per_gib(via_cpu),
        },
        "boto3_download_file": {
            "best_mb_s": mbps(boto_best),
            "median_mb_s": mbps(statistics.median(boto_times)),
            "runs_s": [round(t, 3) for t in boto_times],
        },
        "ratio_best": round(boto_best / reader_best, 3),
        "ratio_median": round(statistics.median(boto_times) / statistics.median(reader_times), 3),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"origin-read-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{format_size(size)}: RangedReader {result['reader']['best_mb_s']} MB/s "  # type: ignore[index]
        f"(median {result['reader']['median_mb_s']}, "  # type: ignore[index]
        f"{result['reader']['cpu_s_per_gib']} CPU-s/GiB), through boto3 "  # type: ignore[index]
        f"{result['reader_through_boto3']['best_mb_s']} MB/s "  # type: ignore[index]
        f"({result['reader_through_boto3']['cpu_s_per_gib']} CPU-s/GiB), boto3 download_file "  # type: ignore[index]
        f"{result['boto3_download_file']['best_mb_s']} MB/s "  # type: ignore[index]
        f"(median {result['boto3_download_file']['median_mb_s']}); "  # type: ignore[index]
        f"ratio {result['ratio_best']} (median {result['ratio_median']}) -> {out}"
    )
    return result


if __name__ == "__main__":
    main()
