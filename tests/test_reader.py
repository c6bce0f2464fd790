"""RangedReader against real servers, with and without injected faults; RetryPolicy properties."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import ARTIFACT, GCSBucket, S3Bucket, SeededOrigin
from hypothesis import given, settings
from hypothesis import strategies as st
from servers import FaultPlan, FaultyHTTPServer, GCSServer, S3Server, populate

from core.errors import ConfigError
from seeder.backends.gcs import GCSOrigin
from seeder.backends.http import HTTPOrigin
from seeder.backends.s3 import S3Origin
from seeder.errors import OriginError, OriginNotFoundError, RetryBudgetExceeded
from seeder.origin import Origin, open_origin
from seeder.reader import RangedReader
from seeder.retry import DEFAULT_RETRY_TIME, RetryPolicy

T = TypeVar("T")
SHARD = "weights/shard-0.bin"
SHARD_DATA = ARTIFACT[SHARD]
# Retries in tests wait milliseconds, never seconds.
FAST = RetryPolicy(base_delay=0.001, max_delay=0.05, budget=5.0)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def read_with(
    origin: Origin, key: str, offset: int, length: int, **options: Any
) -> tuple[bytes, RangedReader]:
    reader = RangedReader(origin, rng=random.Random(7), **options)
    buf = bytearray(length)
    await reader.read(key, offset, memoryview(buf))
    return bytes(buf), reader


# -- splitting and concurrency -------------------------------------------------------


def test_read_splits_into_ranges_on_every_backend(seeded_origin: SeededOrigin) -> None:
    offset, length, range_size = 111_111, 777_777, 65_536

    async def main() -> tuple[bytes, int, int, int, bytes]:
        async with open_origin(seeded_origin.url) as origin:
            data, _ = await read_with(
                origin, SHARD, offset, length, range_size=range_size, max_concurrency=4
            )
            # An empty file and a zero-length read cost no request.
            await RangedReader(origin).read("empty.txt", 0, memoryview(bytearray()))
            # A whole small file in one range.
            whole, _ = await read_with(origin, "config.json", 0, len(ARTIFACT["config.json"]))
            c = origin.counters
            return data, c.requests, c.bytes_read, c.retries, whole

    data, requests, bytes_read, retries, whole = run(main())
    assert data == SHARD_DATA[offset : offset + length]
    assert whole == ARTIFACT["config.json"]
    assert requests == math.ceil(length / range_size) + 1
    assert bytes_read == length + len(whole)
    assert retries == 0


def test_concurrency_is_capped_across_reads_sharing_a_reader(
    tmp_path: Path, faulty_http_server: Callable[..., FaultyHTTPServer]
) -> None:
    populate(tmp_path, ARTIFACT)
    server = faulty_http_server(directory=tmp_path, plan=FaultPlan(every=0, response_delay=0.03))

    async def main() -> tuple[bytes, bytes]:
        async with HTTPOrigin(server.url()) as origin:
            reader = RangedReader(origin, range_size=20_000, max_concurrency=3)
            a, b = bytearray(200_000), bytearray(150_000)
            await asyncio.gather(
                reader.read(SHARD, 0, memoryview(a)),
                reader.read(SHARD, 500_000, memoryview(b)),
            )
            return bytes(a), bytes(b)

    a, b = run(main())
    assert a == SHARD_DATA[:200_000]
    assert b == SHARD_DATA[500_000:650_000]
    assert server.requests == 10 + 8
    assert server.max_in_flight == 3


# -- transient faults are retried ------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retry_after", "throttled"),
    [(503, None, True), (503, "0.02", True), (429, "0", True), (500, None, False)],
)
def test_http_faults_are_retried_and_counted(
    tmp_path: Path,
    faulty_http_server: Callable[..., FaultyHTTPServer],
    caplog: pytest.LogCaptureFixture,
    status: int,
    retry_after: str | None,
    throttled: bool,
) -> None:
    populate(tmp_path, ARTIFACT)
    server = faulty_http_server(
        directory=tmp_path, plan=FaultPlan(every=3, status=status, retry_after=retry_after)
    )
    length = 600_000

    async def main() -> tuple[bytes, RangedReader]:
        async with HTTPOrigin(server.url()) as origin:
            return await read_with(
                origin, SHARD, 1, length, range_size=50_000, max_concurrency=4, retry=FAST
            )

    with caplog.at_level(logging.WARNING, logger="swarm.origin"):
        data, reader = run(main())
    counters = reader.origin.counters
    assert data == SHARD_DATA[1 : 1 + length]
    assert server.faults > 0
    assert counters.retries == server.faults
    assert counters.throttled == (server.faults if throttled else 0)
    assert counters.requests == 12 + server.faults
    # Error replies carry no object bytes: the origin still gave each byte once.
    assert counters.bytes_read == length
    retries = [r for r in caplog.records if r.name == "swarm.origin"]
    assert len(retries) == server.faults
    assert all(SHARD in r.getMessage() and "attempt" in r.getMessage() for r in retries)
    assert all(getattr(r, "origin_key") == SHARD for r in retries)  # noqa: B009
    if retry_after is not None:
        assert all(getattr(r, "delay") >= float(retry_after) for r in retries)  # noqa: B009


def test_cut_short_bodies_are_retried_and_the_extra_bytes_counted(
    tmp_path: Path, faulty_http_server: Callable[..., FaultyHTTPServer]
) -> None:
    populate(tmp_path, ARTIFACT)
    server = faulty_http_server(directory=tmp_path, plan=FaultPlan(every=4, kind="truncate"))

    async def main() -> tuple[bytes, RangedReader]:
        async with HTTPOrigin(server.url()) as origin:
            return await read_with(
                origin, SHARD, 0, len(SHARD_DATA), range_size=100_000, retry=FAST
            )

    data, reader = run(main())
    counters = reader.origin.counters
    assert data == SHARD_DATA
    assert server.faults > 0
    assert counters.retries == server.faults
    assert counters.throttled == 0
    # Each cut range delivered half its bytes before the retry re-read all of it.
    assert len(SHARD_DATA) < counters.bytes_read < len(SHARD_DATA) + server.faults * 100_000


@pytest.mark.parametrize("kind", ["s3", "gcs"])
@pytest.mark.parametrize("retry_after", [None, "0.01"])
def test_object_store_throttling_is_retried(
    kind: str,
    retry_after: str | None,
    request: pytest.FixtureRequest,
    faulty_http_server: Callable[..., FaultyHTTPServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if kind == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        populate(bucket.path, {SHARD: SHARD_DATA})
        front = faulty_http_server(
            upstream=s3.endpoint,
            plan=FaultPlan(every=3, status=503, retry_after=retry_after, style="s3"),
        )
        monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)
        origin: Origin = S3Origin(bucket.url)
    else:
        gcs: GCSServer = request.getfixturevalue("gcs_server")
        gbucket: GCSBucket = request.getfixturevalue("gcs_bucket")
        gcs.upload(gbucket.name, SHARD, SHARD_DATA)
        front = faulty_http_server(
            upstream=gcs.endpoint,
            plan=FaultPlan(every=3, status=429, retry_after=retry_after, style="gcs"),
        )
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", front.endpoint)
        origin = GCSOrigin(gbucket.url)

    async def main() -> tuple[bytes, RangedReader]:
        async with origin:
            return await read_with(
                origin, SHARD, 0, len(SHARD_DATA), range_size=100_000, retry=FAST
            )

    data, reader = run(main())
    counters = reader.origin.counters
    assert data == SHARD_DATA
    assert front.faults >= 3
    assert counters.retries == front.faults
    assert counters.throttled == front.faults
    assert counters.bytes_read == len(SHARD_DATA)


# -- permanent errors and the budget --------------------------------------------------


@pytest.mark.parametrize("kind", ["s3", "gcs", "http"])
def test_missing_object_fails_fast_without_retries(
    kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    faulty_http_server: Callable[..., FaultyHTTPServer],
) -> None:
    if kind == "s3":
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        origin: Origin = S3Origin(bucket.url)
    elif kind == "gcs":
        gbucket: GCSBucket = request.getfixturevalue("gcs_bucket")
        origin = GCSOrigin(gbucket.url)
    else:
        origin = HTTPOrigin(faulty_http_server(directory=tmp_path, plan=FaultPlan(every=0)).url())
    slow = RetryPolicy(base_delay=5.0, max_delay=5.0)  # any retry would show in the time

    async def main() -> None:
        async with origin:
            await read_with(origin, "weights/gone.bin", 0, 300_000, range_size=100_000, retry=slow)

    started = time.monotonic()
    with pytest.raises(OriginNotFoundError, match=r"weights/gone\.bin"):
        run(main())
    assert time.monotonic() - started < 3.0
    assert origin.counters.retries == 0
    assert origin.counters.requests <= 3


def test_a_permanent_error_in_one_range_cancels_the_others(
    tmp_path: Path, faulty_http_server: Callable[..., FaultyHTTPServer]
) -> None:
    populate(tmp_path, ARTIFACT)
    server = faulty_http_server(directory=tmp_path, plan=FaultPlan(every=0, response_delay=0.02))
    key = "weights/shard-1.bin"  # 65,537 bytes; ask for more than it holds

    async def main() -> None:
        async with HTTPOrigin(server.url()) as origin:
            reader = RangedReader(origin, range_size=10_000, max_concurrency=2, retry=FAST)
            await reader.read(key, 0, memoryview(bytearray(200_000)))

    with pytest.raises(
        OriginError, match=r"shard-1\.bin bytes 60000-69999.*sent 60000-65536"
    ) as info:
        run(main())
    assert not isinstance(info.value, RetryBudgetExceeded)
    assert server.requests < 20  # the ranges after the failure were never asked for


def test_retry_budget_exhausted_names_object_and_range(
    tmp_path: Path, faulty_http_server: Callable[..., FaultyHTTPServer]
) -> None:
    populate(tmp_path, ARTIFACT)
    server = faulty_http_server(directory=tmp_path, plan=FaultPlan(every=1, status=503))
    policy = RetryPolicy(base_delay=0.001, max_delay=0.01, max_attempts=3)

    async def main() -> None:
        async with HTTPOrigin(server.url()) as origin:
            reader = RangedReader(origin, retry=policy, rng=random.Random(1))
            try:
                await reader.read("config.json", 2, memoryview(bytearray(5)))
            finally:
                assert origin.counters.retries == 2
                assert origin.counters.throttled == 3
                assert origin.counters.requests == 3

    with pytest.raises(RetryBudgetExceeded, match=r"config\.json bytes 2-6.*3 attempt"):
        run(main())


def test_retry_after_beyond_the_time_budget_gives_up(
    tmp_path: Path, faulty_http_server: Callable[..., FaultyHTTPServer]
) -> None:
    populate(tmp_path, ARTIFACT)
    server = faulty_http_server(
        directory=tmp_path, plan=FaultPlan(every=1, status=429, retry_after="0.2")
    )
    policy = RetryPolicy(base_delay=0.001, max_delay=1.0, budget=0.3)

    async def main() -> None:
        async with HTTPOrigin(server.url()) as origin:
            reader = RangedReader(origin, retry=policy)
            await reader.read("config.json", 0, memoryview(bytearray(4)))

    started = time.monotonic()
    with pytest.raises(RetryBudgetExceeded, match="429") as info:
        run(main())
    elapsed = time.monotonic() - started
    assert server.faults == 2  # one retry after 0.2 s; a second would pass 0.3 s
    assert 0.2 <= elapsed < 2.0
    assert "2 attempt(s)" in str(info.value) and "retry budget 0.3 s" in str(info.value)


def test_an_origin_brownout_is_waited_out(
    s3_server: S3Server,
    s3_bucket: S3Bucket,
    faulty_http_server: Callable[..., FaultyHTTPServer],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every request gets 503 SlowDown for a while; the reader keeps trying, then reads."""
    populate(s3_bucket.path, {SHARD: SHARD_DATA})
    front = faulty_http_server(
        upstream=s3_server.endpoint, plan=FaultPlan(every=1, status=503, style="s3")
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)
    brownout = 1.5
    # Small knobs: a 0.2 s cap means many retries inside the brownout, all counted.
    policy = RetryPolicy(base_delay=0.02, max_delay=0.2, budget=30.0)
    length = 200_000

    async def main() -> tuple[bytes, RangedReader]:
        loop = asyncio.get_running_loop()
        # The brownout ends on the server's side, whatever the reader is doing.
        loop.call_later(brownout, setattr, front, "plan", FaultPlan(every=0))
        async with S3Origin(s3_bucket.url) as origin:
            return await read_with(
                origin, SHARD, 3, length, range_size=50_000, max_concurrency=4, retry=policy
            )

    with caplog.at_level(logging.WARNING, logger="swarm.origin"):
        data, reader = run(main())
    counters = reader.origin.counters
    assert data == SHARD_DATA[3 : 3 + length]
    assert front.faults > 4 * 3  # each of the 4 ranges failed again and again
    assert counters.retries == counters.throttled == front.faults
    assert counters.bytes_read == length
    records = [r for r in caplog.records if r.name == "swarm.origin"]
    assert len(records) == front.faults
    assert all(r.levelno == logging.WARNING for r in records)
    message = records[-1].getMessage()
    assert "origin throttling for" in message and "SlowDown (HTTP 503)" in message
    assert "giving up after 30 s" in message
    # It kept going past the brownout's length, which ten quick tries would not have.
    assert max(getattr(r, "failing_for") for r in records) >= brownout * 0.5  # noqa: B009
    assert all(getattr(r, "delay") <= 0.2 for r in records)  # noqa: B009


@pytest.mark.parametrize(("status", "error"), [(404, OriginNotFoundError), (403, OriginError)])
def test_permanent_statuses_fail_at_once_whatever_the_budget(
    tmp_path: Path,
    faulty_http_server: Callable[..., FaultyHTTPServer],
    status: int,
    error: type[Exception],
) -> None:
    populate(tmp_path, ARTIFACT)
    server = faulty_http_server(directory=tmp_path, plan=FaultPlan(every=1, status=status))

    async def main() -> None:
        async with HTTPOrigin(server.url()) as origin:
            reader = RangedReader(origin, retry=RetryPolicy(base_delay=5.0, max_delay=5.0))
            await reader.read(SHARD, 0, memoryview(bytearray(1000)))

    with pytest.raises(error, match=f"HTTP {status}") as info:
        run(main())
    assert not isinstance(info.value, RetryBudgetExceeded)
    assert server.requests == 1


def test_retry_time_replaces_the_policy_budget(tmp_path: Path) -> None:
    origin = open_origin(tmp_path.as_uri())
    assert RangedReader(origin).retry.budget == DEFAULT_RETRY_TIME == 600.0
    reader = RangedReader(origin, retry=FAST, retry_time=42.0)
    assert reader.retry.budget == 42.0 and reader.retry.max_delay == FAST.max_delay


# -- cancellation ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_cancelled_read_stops_writing_into_the_buffer(
    kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    faulty_http_server: Callable[..., FaultyHTTPServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = FaultPlan(every=0, response_delay=0.1)
    if kind == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        populate(bucket.path, {SHARD: SHARD_DATA})
        front = faulty_http_server(upstream=s3.endpoint, plan=plan)
        monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)
        origin: Origin = S3Origin(bucket.url)
    else:
        populate(tmp_path, ARTIFACT)
        front = faulty_http_server(directory=tmp_path, plan=plan)
        origin = HTTPOrigin(front.url())

    async def main() -> tuple[bytes, bytes, int]:
        buf = bytearray(len(SHARD_DATA))
        async with origin:
            reader = RangedReader(origin, range_size=50_000, max_concurrency=4)
            task = asyncio.create_task(reader.read(SHARD, 0, memoryview(buf)))
            await asyncio.sleep(0.15)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            snapshot = bytes(buf)
            await asyncio.sleep(0.3)
            others = len(asyncio.all_tasks()) - 1
        return snapshot, bytes(buf), others

    snapshot, later, others = run(main())
    assert snapshot == later  # nothing wrote into the buffer after cancellation
    assert others == 0
    assert front.requests < 20  # 20 ranges: the read really was cut short


# -- RetryPolicy (pure) ----------------------------------------------------------------

policies = st.builds(
    lambda base, factor, multiplier, jitter, budget: RetryPolicy(
        base_delay=base,
        max_delay=base * factor,
        multiplier=multiplier,
        jitter=jitter,
        budget=budget,
    ),
    st.floats(min_value=1e-4, max_value=5.0),
    st.floats(min_value=1.0, max_value=1000.0),
    st.floats(min_value=1.0, max_value=16.0),
    st.floats(min_value=0.0, max_value=1.0),
    st.floats(min_value=0.0, max_value=3600.0),
)


@settings(deadline=None)  # pure and fast; a loaded CI box must not make it flaky
@given(policies, st.integers(min_value=1, max_value=10_000), st.integers(0, 2**32))
def test_delay_is_jittered_within_the_exponential_ceiling(
    policy: RetryPolicy, attempt: int, seed: int
) -> None:
    delay = policy.delay(attempt, None, random.Random(seed))
    ceiling = policy.ceiling(attempt)
    assert ceiling * (1 - policy.jitter) - 1e-9 <= delay <= ceiling <= policy.max_delay
    assert ceiling == pytest.approx(
        min(policy.max_delay, policy.base_delay * policy.multiplier ** min(attempt - 1, 62))
    )


@settings(deadline=None)  # pure and fast; a loaded CI box must not make it flaky
@given(
    policies,
    st.integers(min_value=1, max_value=100),
    st.floats(min_value=0.0, max_value=10_000.0),
    st.integers(0, 2**32),
)
def test_retry_after_is_a_floor_up_to_its_cap(
    policy: RetryPolicy, attempt: int, retry_after: float, seed: int
) -> None:
    delay = policy.delay(attempt, retry_after, random.Random(seed))
    honoured = min(retry_after, policy.max_retry_after)
    assert honoured <= delay <= max(honoured, policy.ceiling(attempt))


@settings(deadline=None)  # pure and fast; a loaded CI box must not make it flaky
@given(policies, st.integers(min_value=1, max_value=30), st.integers(0, 2**32))
def test_delay_is_deterministic_for_a_seed(policy: RetryPolicy, attempt: int, seed: int) -> None:
    a = policy.delay(attempt, None, random.Random(seed))
    b = policy.delay(attempt, None, random.Random(seed))
    assert a == b


def test_ceiling_grows_by_the_multiplier_until_the_cap() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=1.0)
    assert [policy.ceiling(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    triple = RetryPolicy(base_delay=1.0, max_delay=20.0, multiplier=3.0)
    assert [triple.ceiling(n) for n in range(1, 5)] == pytest.approx([1.0, 3.0, 9.0, 20.0])


def test_jitter_spreads_over_the_window() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    rng = random.Random(3)
    delays = [policy.delay(4, None, rng) for _ in range(2000)]
    assert min(delays) < 0.5 and max(delays) > 7.5  # full jitter, not a fixed delay
    assert 3.5 < sum(delays) / len(delays) < 4.5
    half = RetryPolicy(base_delay=1.0, max_delay=8.0, jitter=0.5)
    delays = [half.delay(4, None, rng) for _ in range(2000)]
    assert min(delays) >= 4.0 and max(delays) > 7.5
    exact = RetryPolicy(base_delay=1.0, max_delay=8.0, jitter=0.0)
    assert {exact.delay(n, None, rng) for n in (4, 5, 9)} == {8.0}


@settings(deadline=None)  # pure and fast; a loaded CI box must not make it flaky
@given(
    policies,
    st.none() | st.integers(1, 60),
    st.integers(0, 60),
    st.floats(0.0, 4000.0),
    st.floats(0.0, 100.0),
)
def test_budget_bounds_time_and_optionally_attempts(
    policy: RetryPolicy,
    max_attempts: int | None,
    failures: int,
    elapsed: float,
    next_delay: float,
) -> None:
    policy = dataclasses.replace(policy, max_attempts=max_attempts)
    allowed = policy.allows(failures, elapsed, next_delay)
    assert allowed == (
        (max_attempts is None or failures < max_attempts) and elapsed + next_delay <= policy.budget
    )


@dataclass
class Outcome:
    succeeded: bool
    failures: int
    gave_up_at: float | None
    delays: list[float]


def drive(
    policy: RetryPolicy, outage: float, *, retry_after: float | None = None, seed: int = 1
) -> Outcome:
    """One request against an origin failing for ``outage`` seconds, on a fake clock.

    Each try takes 50 ms. This is the loop ``RangedReader._read_range`` runs, minus I/O.
    """
    rng = random.Random(seed)
    now = 0.0
    first = 0.0
    delays: list[float] = []
    for failures in range(1, 100_000):
        now += 0.05
        if now >= outage:
            return Outcome(True, failures - 1, None, delays)
        if failures == 1:
            first = now
        wait = policy.delay(failures, retry_after, rng)
        if not policy.allows(failures, now - first, wait):
            return Outcome(False, failures, now - first, delays)
        delays.append(wait)
        now += wait
    raise AssertionError("the retry loop did not end")


@pytest.mark.parametrize("seed", range(20))
def test_default_policy_waits_out_a_minute_long_brownout(seed: int) -> None:
    """The 50 s of SlowDown that ten tries could not survive, and a five-minute one."""
    policy = RetryPolicy()
    for outage in (50.0, 300.0):
        outcome = drive(policy, outage, seed=seed)
        assert outcome.succeeded, f"{outage} s outage: gave up after {outcome.failures} tries"
        assert max(outcome.delays) <= policy.max_delay == 20.0
    # Backoff keeps the request count low: a retry every 10 s on average once capped.
    assert drive(policy, 300.0, seed=seed).failures < 300.0 / 5


@pytest.mark.parametrize("seed", range(20))
def test_default_policy_gives_up_at_its_budget(seed: int) -> None:
    policy = RetryPolicy()
    outcome = drive(policy, 3600.0, seed=seed)
    assert not outcome.succeeded and outcome.gave_up_at is not None
    # Never past the budget; at most one capped delay short of it.
    assert policy.budget - policy.max_delay - 0.05 <= outcome.gave_up_at <= policy.budget
    short = drive(dataclasses.replace(policy, budget=30.0), 3600.0, seed=seed)
    assert short.gave_up_at is not None and short.gave_up_at <= 30.0


def test_retry_after_is_honoured_during_a_brownout() -> None:
    policy = RetryPolicy()
    outcome = drive(policy, 200.0, retry_after=30.0)
    assert outcome.succeeded and all(d >= 30.0 for d in outcome.delays)
    asked_a_day = drive(policy, 400.0, retry_after=86_400.0)
    assert asked_a_day.succeeded and set(asked_a_day.delays) == {policy.max_retry_after}


def test_bad_policies_and_reader_settings_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="base_delay"):
        RetryPolicy(base_delay=0)
    with pytest.raises(ConfigError, match="max_delay"):
        RetryPolicy(base_delay=2, max_delay=1)
    with pytest.raises(ConfigError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ConfigError, match="multiplier"):
        RetryPolicy(multiplier=0.5)
    with pytest.raises(ConfigError, match="jitter"):
        RetryPolicy(jitter=1.5)
    with pytest.raises(ConfigError, match="origin retry time"):
        RetryPolicy(budget=-1)
    origin = open_origin(tmp_path.as_uri())
    with pytest.raises(ConfigError, match="range size"):
        RangedReader(origin, range_size=0)
    with pytest.raises(ConfigError, match="concurrency"):
        RangedReader(origin, max_concurrency=0)
    with pytest.raises(ConfigError, match="origin retry time"):
        RangedReader(origin, retry_time=-5)


def test_under_a_rate_cap_progress_moves_slice_by_slice(tmp_path: Path) -> None:
    """A whole 16 MiB range may take longer than the tracker's stall timeout to pass a
    low cap: it is read in slices, each let through and reported on its own."""
    from seeder.reader import LIMITED_SLICE

    data = random.Random(4).randbytes(3 * LIMITED_SLICE + 100)
    populate(tmp_path / "o", {"w.bin": data})
    allowed: list[int] = []
    reported: list[int] = []

    async def allow(n: int) -> None:
        allowed.append(n)

    async def main() -> bytes:
        async with open_origin((tmp_path / "o").as_uri()) as origin:
            reader = RangedReader(origin, range_size=16 << 20, rate_limit=allow)
            buf = bytearray(len(data))
            await reader.read("w.bin", 0, memoryview(buf), reported.append)
            return bytes(buf)

    assert asyncio.run(main()) == data
    assert allowed == [LIMITED_SLICE] * 3 + [100]
    assert reported == allowed
