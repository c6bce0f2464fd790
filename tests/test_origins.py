"""Origin backends against real servers on loopback: S3 (rclone), GCS (emulator), HTTP, file.

Every backend gets the same multi-file artifact (an empty file, sizes that are not
multiples of anything) under a prefix and must list, stat, read ranges byte-exactly,
get and put, counting exactly the bytes asked for; then the error cases per backend.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import ARTIFACT as FILES
from conftest import GCSBucket, S3Bucket, SeededOrigin
from servers import FaultPlan, FaultyHTTPServer, GCSServer, S3Server, populate

from core.errors import ConfigError, ManifestError
from seeder.backends.common import (
    OriginThrottledError,
    check_range_reply,
    parse_content_range,
    parse_retry_after,
)
from seeder.backends.gcs import GCSOrigin
from seeder.backends.http import HTTPOrigin
from seeder.backends.s3 import S3Origin
from seeder.errors import (
    OriginError,
    OriginNotFoundError,
    OriginPermissionError,
    OriginTransientError,
    OriginUnsupportedError,
)
from seeder.origin import ObjectInfo, Origin, open_origin
from seeder.publish import list_files

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# -- the round trip, every backend --------------------------------------------------


def test_open_origin_picks_the_backend_by_scheme() -> None:
    assert isinstance(open_origin("s3://bucket/p"), S3Origin)
    assert isinstance(open_origin("gs://bucket/p"), GCSOrigin)
    assert isinstance(open_origin("http://127.0.0.1:1/p"), HTTPOrigin)
    with pytest.raises(ConfigError, match="s3://bucket"):
        S3Origin("s3:///no-bucket")
    with pytest.raises(ConfigError, match="gs://bucket"):
        GCSOrigin("gs://")


def test_list_returns_every_object_relative_to_the_prefix(seeded_origin: SeededOrigin) -> None:
    async def main() -> list[ObjectInfo]:
        async with open_origin(seeded_origin.url) as origin:
            return await origin.list()

    if not seeded_origin.listable:
        with pytest.raises(OriginUnsupportedError, match="explicit file list"):
            run(main())
        return
    expected = [ObjectInfo(k, len(v)) for k, v in sorted(FILES.items())]
    assert run(main()) == expected


def test_stat_gives_each_size(seeded_origin: SeededOrigin) -> None:
    async def main() -> list[ObjectInfo]:
        async with open_origin(seeded_origin.url) as origin:
            return [await origin.stat(key) for key in FILES]

    assert run(main()) == [ObjectInfo(k, len(v)) for k, v in FILES.items()]


def test_read_into_is_byte_exact_and_counts_the_bytes(seeded_origin: SeededOrigin) -> None:
    shard = FILES["weights/shard-0.bin"]
    reads = [
        ("weights/shard-0.bin", 0, len(shard)),
        ("weights/shard-0.bin", 0, 1),
        ("weights/shard-0.bin", len(shard) - 1, 1),
        ("weights/shard-0.bin", 123_457, 400_001),
        ("weights/shard-1.bin", 65_536, 1),
        ("config.json", 3, 5),
    ]

    async def main() -> tuple[list[bytes], int, int]:
        async with open_origin(seeded_origin.url) as origin:
            got = []
            for key, offset, length in reads:
                buf = bytearray(length)
                await origin.read_into(key, offset, memoryview(buf))
                got.append(bytes(buf))
            return got, origin.counters.bytes_read, origin.counters.requests

    got, bytes_read, requests = run(main())
    for (key, offset, length), data in zip(reads, got, strict=True):
        assert data == FILES[key][offset : offset + length], (key, offset, length)
    assert bytes_read == sum(length for _, _, length in reads)
    assert requests == len(reads)


def test_get_bytes_returns_whole_objects(seeded_origin: SeededOrigin) -> None:
    async def main() -> dict[str, bytes]:
        async with open_origin(seeded_origin.url) as origin:
            return {key: await origin.get_bytes(key) for key in FILES}

    assert run(main()) == FILES


def test_put_bytes_round_trips(seeded_origin: SeededOrigin) -> None:
    data = os.urandom(3000)

    async def main() -> tuple[bytes, list[str]]:
        async with open_origin(seeded_origin.url) as origin:
            await origin.put_bytes(".swarm/catalog/tiny.json", data)
            await origin.put_bytes(".swarm/catalog/tiny.json", data[::-1])
            return await origin.get_bytes(".swarm/catalog/tiny.json"), [
                o.key for o in await origin.list()
            ]

    if not seeded_origin.writable:
        with pytest.raises(OriginUnsupportedError, match="read-only"):
            run(main())
        return
    got, keys = run(main())
    assert got == data[::-1]
    if seeded_origin.kind != "file":  # the file origin hides its .swarm folder from list()
        assert ".swarm/catalog/tiny.json" in keys


def test_missing_object_is_not_found_and_named(seeded_origin: SeededOrigin) -> None:
    async def main(op: str) -> None:
        async with open_origin(seeded_origin.url) as origin:
            if op == "stat":
                await origin.stat("weights/nope.bin")
            elif op == "get":
                await origin.get_bytes("weights/nope.bin")
            else:
                await origin.read_into("weights/nope.bin", 0, memoryview(bytearray(10)))

    for op in ("stat", "get", "read"):
        with pytest.raises(OriginNotFoundError, match=r"weights/nope\.bin"):
            run(main(op))


def test_reading_past_the_end_is_a_permanent_error(seeded_origin: SeededOrigin) -> None:
    async def main() -> None:
        async with open_origin(seeded_origin.url) as origin:
            await origin.read_into("config.json", 1000, memoryview(bytearray(10)))

    with pytest.raises(OriginError, match=r"config\.json") as info:
        run(main())
    assert not isinstance(info.value, OriginTransientError)


# -- backend-specific errors --------------------------------------------------------


def test_s3_wrong_secret_is_a_permission_error(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(s3_bucket.path, {"a.bin": b"abc"})
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-right-secret")

    async def main() -> None:
        async with S3Origin(s3_bucket.url) as origin:
            await origin.read_into("a.bin", 0, memoryview(bytearray(3)))

    with pytest.raises(OriginPermissionError, match=rf"s3://{s3_bucket.name}/a\.bin"):
        run(main())


def test_s3_unknown_key_id_is_a_permission_error(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(s3_bucket.path, {"a.bin": b"abc"})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody-we-know")

    async def main() -> None:
        async with S3Origin(s3_bucket.url) as origin:
            await origin.stat("a.bin")

    with pytest.raises(OriginPermissionError, match="access denied"):
        run(main())


def test_s3_missing_bucket_is_not_found(s3_bucket: S3Bucket) -> None:
    async def main() -> None:
        async with S3Origin("s3://no-such-bucket-here/x") as origin:
            await origin.list()

    with pytest.raises(OriginNotFoundError, match=r"no-such-bucket-here.*no such bucket"):
        run(main())


def test_s3_unreachable_endpoint_is_transient(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    from servers import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")

    async def main() -> None:
        async with S3Origin(s3_bucket.url) as origin:
            await origin.read_into("a.bin", 0, memoryview(bytearray(3)))

    with pytest.raises(OriginTransientError, match=r"a\.bin"):
        run(main())


def test_gcs_missing_bucket_is_not_found(gcs_bucket: GCSBucket) -> None:
    async def main() -> None:
        async with GCSOrigin("gs://no-such-bucket-here/x") as origin:
            await origin.list()

    with pytest.raises(OriginNotFoundError, match="no-such-bucket-here"):
        run(main())


def test_file_listing_of_a_very_deep_tree_is_not_recursive(tmp_path: Path) -> None:
    """1,500 levels (past Python's recursion limit): listed, then refused by name, not a crash."""
    depth = 1500
    root = tmp_path / "deep"
    root.mkdir()
    # Built and removed one level at a time: pathlib's mkdir(parents=True) and
    # shutil.rmtree recurse per level themselves.
    leaf = str(root)
    for _ in range(depth):
        leaf += "/d"
        os.mkdir(leaf)
    Path(leaf, "w.bin").write_bytes(b"x")
    populate(root, {"top.bin": b"yz"})
    try:

        async def main() -> list[ObjectInfo]:
            async with open_origin(root.as_uri()) as origin:
                listed = await origin.list()
                with pytest.raises(ManifestError, match="1501 components deep, more than 128"):
                    await list_files(origin, None)
                return listed

        listed = run(main())
    finally:
        os.remove(os.path.join(leaf, "w.bin"))
        for _ in range(depth):
            os.rmdir(leaf)
            leaf = os.path.dirname(leaf)
    assert [o.size for o in listed] == [1, 2]
    assert listed[0].key == "d/" * depth + "w.bin" and listed[1].key == "top.bin"


def test_http_accepts_200_with_exact_content_range(
    tmp_path: Path, faulty_http_server: Callable[..., FaultyHTTPServer]
) -> None:
    populate(tmp_path, FILES)
    server = faulty_http_server(directory=tmp_path, plan=FaultPlan(every=0, range_status=200))
    key = "weights/shard-1.bin"

    async def main() -> bytes:
        async with HTTPOrigin(server.url()) as origin:
            buf = bytearray(1000)
            await origin.read_into(key, 500, memoryview(buf))
            return bytes(buf)

    assert run(main()) == FILES[key][500:1500]


def test_http_unreachable_server_is_transient() -> None:
    from servers import free_port

    async def main() -> None:
        async with HTTPOrigin(f"http://127.0.0.1:{free_port()}/x") as origin:
            await origin.read_into("a", 0, memoryview(bytearray(1)))

    with pytest.raises(OriginTransientError, match=r"127\.0\.0\.1"):
        run(main())


@pytest.mark.parametrize(
    ("status", "retry_after", "throttled"),
    [(503, "2", True), (429, None, True), (500, None, False), (502, "1", False)],
)
def test_http_error_statuses_are_transient_with_retry_after(
    tmp_path: Path,
    faulty_http_server: Callable[..., FaultyHTTPServer],
    status: int,
    retry_after: str | None,
    throttled: bool,
) -> None:
    populate(tmp_path, FILES)
    server = faulty_http_server(
        directory=tmp_path, plan=FaultPlan(every=1, status=status, retry_after=retry_after)
    )

    async def main() -> None:
        async with HTTPOrigin(server.url()) as origin:
            await origin.read_into("config.json", 0, memoryview(bytearray(4)))

    with pytest.raises(OriginTransientError, match=rf"config\.json.*HTTP {status}") as info:
        run(main())
    assert info.value.retry_after == (float(retry_after) if retry_after else None)
    assert isinstance(info.value, OriginThrottledError) == throttled


def test_s3_slowdown_through_a_front_is_throttled_with_retry_after(
    s3_server: S3Server,
    s3_bucket: S3Bucket,
    faulty_http_server: Callable[..., FaultyHTTPServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    populate(s3_bucket.path, FILES)
    front = faulty_http_server(
        upstream=s3_server.endpoint,
        plan=FaultPlan(every=2, status=503, retry_after="3", style="s3"),
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)

    async def main() -> list[BaseException | None]:
        outcomes: list[BaseException | None] = []
        async with S3Origin(s3_bucket.url) as origin:
            for _ in range(2):
                buf = bytearray(10)
                try:
                    await origin.read_into("config.json", 0, memoryview(buf))
                    assert bytes(buf) == FILES["config.json"][:10]
                    outcomes.append(None)
                except OriginError as exc:
                    outcomes.append(exc)
        return outcomes

    first, second = run(main())
    assert first is None  # proxied through the front unchanged, signature intact
    assert isinstance(second, OriginThrottledError)
    assert second.retry_after == 3.0
    assert "SlowDown" in str(second) and "config.json" in str(second)


def test_gcs_503_through_a_front_is_throttled(
    gcs_server: GCSServer,
    gcs_bucket: GCSBucket,
    faulty_http_server: Callable[..., FaultyHTTPServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gcs_server.upload(gcs_bucket.name, "a.bin", b"0123456789")
    front = faulty_http_server(
        upstream=gcs_server.endpoint,
        plan=FaultPlan(every=1, status=503, retry_after="1", style="gcs"),
    )
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", front.endpoint)

    async def main() -> None:
        async with GCSOrigin(gcs_bucket.url) as origin:
            await origin.read_into("a.bin", 2, memoryview(bytearray(4)))

    with pytest.raises(OriginThrottledError, match=r"a\.bin.*HTTP 503") as info:
        run(main())
    assert info.value.retry_after == 1.0


@pytest.mark.parametrize("kind", ["s3", "gcs", "http"])
def test_a_body_cut_short_is_transient_and_its_bytes_counted(
    kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    faulty_http_server: Callable[..., FaultyHTTPServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = "weights/shard-1.bin"
    plan = FaultPlan(every=1, kind="truncate")
    if kind == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        populate(bucket.path, FILES)
        front = faulty_http_server(upstream=s3.endpoint, plan=plan)
        monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)
        origin: Origin = S3Origin(bucket.url)
    elif kind == "gcs":
        gcs: GCSServer = request.getfixturevalue("gcs_server")
        gbucket: GCSBucket = request.getfixturevalue("gcs_bucket")
        gcs.upload(gbucket.name, key, FILES[key])
        front = faulty_http_server(upstream=gcs.endpoint, plan=plan)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", front.endpoint)
        origin = GCSOrigin(gbucket.url)
    else:
        populate(tmp_path, FILES)
        front = faulty_http_server(directory=tmp_path, plan=plan)
        origin = HTTPOrigin(front.url())

    async def main() -> None:
        async with origin:
            await origin.read_into(key, 0, memoryview(bytearray(len(FILES[key]))))

    with pytest.raises(OriginTransientError, match=r"shard-1\.bin"):
        run(main())
    assert front.faults == 1
    # Half the body arrived before the cut; all of it is counted, none of it beyond.
    assert 0 < origin.counters.bytes_read < len(FILES[key])


# -- small pure helpers ------------------------------------------------------------


def test_parse_retry_after_seconds_and_dates() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(" 0.5 ", now) == 0.5
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("-3", now) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert parse_retry_after(date, now) == pytest.approx(30.0)
    past = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now - 30))
    assert parse_retry_after(past, now) == 0.0


def test_content_range_checks() -> None:
    assert parse_content_range("bytes 10-19/1000") == (10, 19, 1000)
    assert parse_content_range("bytes 0-0/*") == (0, 0, None)
    assert parse_content_range("items 1-2/3") is None
    check_range_reply("x", 206, "bytes 10-19/1000", 10, 10, 10)
    check_range_reply("x", 200, "bytes 10-19/1000", 10, 10, 10)  # rclone's way
    check_range_reply("x", 200, None, 10, 0, 10)  # the whole object was asked for
    with pytest.raises(OriginError, match="ignored the Range"):
        check_range_reply("x", 200, None, 1000, 10, 10)
    with pytest.raises(OriginError, match="server sent 0-9"):
        check_range_reply("x", 206, "bytes 0-9/1000", 10, 10, 10)
    with pytest.raises(OriginError, match="Content-Length 11"):
        check_range_reply("x", 206, "bytes 10-19/1000", 11, 10, 10)
