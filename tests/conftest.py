"""Shared pytest fixtures: real servers on loopback (see ``tests/servers.py``).

Server processes are session-scoped (started once, on first use); each test gets a
fresh bucket and its own environment through ``monkeypatch``:

``s3_server`` (session)
    An ``S3Server`` (``rclone serve s3``): ``.endpoint``, ``.env()``, ``.bucket_dir(name)``,
    ``.url(bucket, prefix)``. Pass ``.env()`` to subprocesses (``swarm`` CLI runs).
``s3_bucket``
    A new empty bucket on ``s3_server`` with the AWS_* environment set for this test:
    ``.name``, ``.path`` (files written there are objects at once), ``.url``, ``.env``.
``gcs_server`` (session)
    A ``GCSServer`` (``gcp-storage-emulator``): ``.endpoint``, ``.env()``,
    ``.create_bucket``, ``.upload``, ``.upload_dir``, ``.url``.
``gcs_bucket``
    A new bucket on ``gcs_server`` with STORAGE_EMULATOR_HOST set for this test:
    ``.name``, ``.url``, ``.env``.
``http_files_server``
    Factory: ``http_files_server(directory)`` starts an ``HTTPFileServer`` (aiohttp
    FileResponse, Range and HEAD) for that directory; ``.url(prefix)``. Stopped after
    the test.
``seeded_origin`` (parametrized: file, s3, s3-boto3, gcs, http)
    ``ARTIFACT`` (a few files, an empty one, odd sizes) under ``ARTIFACT_PREFIX`` on
    each backend in turn (S3 twice: reads signed by ``seeder.backends.sigv4``, and with
    ``SWARM_S3_BOTO3=1`` all through boto3): ``.kind``, ``.url`` (the origin URL), ``.listable``, ``.writable``.
``faulty_http_server``
    Factory: ``faulty_http_server(directory=... | upstream=..., plan=FaultPlan(...))``
    starts a ``FaultyHTTPServer`` that serves files (or proxies to ``upstream``, e.g.
    ``s3_server.endpoint``) and injects 503/429/500 or cut-short bodies every
    ``plan.every``-th eligible request; ``.requests``, ``.faults``. Stopped after the test.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import FaultPlan, FaultyHTTPServer, GCSServer, HTTPFileServer, S3Server, populate

_bucket_numbers = itertools.count(1)


def _bucket_name(request: pytest.FixtureRequest) -> str:
    """A unique, valid bucket name derived from the test's name."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")
    return f"t{next(_bucket_numbers)}-{stem}"[:63].rstrip("-")


@dataclass(frozen=True)
class S3Bucket:
    name: str
    path: Path
    url: str
    env: dict[str, str]


@dataclass(frozen=True)
class GCSBucket:
    name: str
    url: str
    env: dict[str, str]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("s3") / "root") as server:
        yield server


@pytest.fixture
def s3_bucket(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> S3Bucket:
    name = _bucket_name(request)
    path = s3_server.bucket_dir(name)
    env = s3_server.env()
    for var in S3Server.UNSET_ENV:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    return S3Bucket(name, path, s3_server.url(name), env)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCSServer]:
    with GCSServer(tmp_path_factory.mktemp("gcs") / "data") as server:
        yield server


@pytest.fixture
def gcs_bucket(
    gcs_server: GCSServer, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> GCSBucket:
    name = _bucket_name(request)
    gcs_server.create_bucket(name)
    env = gcs_server.env()
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    return GCSBucket(name, gcs_server.url(name), env)


@pytest.fixture
def http_files_server() -> Iterator[Callable[[Path], HTTPFileServer]]:
    started: list[HTTPFileServer] = []

    def start(directory: Path) -> HTTPFileServer:
        server = HTTPFileServer(directory)
        server.start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture
def faulty_http_server() -> Iterator[Callable[..., FaultyHTTPServer]]:
    started: list[FaultyHTTPServer] = []

    def start(
        *,
        directory: Path | None = None,
        upstream: str | None = None,
        plan: FaultPlan | None = None,
    ) -> FaultyHTTPServer:
        server = FaultyHTTPServer(directory=directory, upstream=upstream, plan=plan)
        server.start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()


def _artifact() -> dict[str, bytes]:
    rng = random.Random(20240601)
    return {
        "config.json": b'{"layers": 2}\n',
        "empty.txt": b"",
        "weights/shard-0.bin": rng.randbytes(1_000_003),
        "weights/shard-1.bin": rng.randbytes(65_537),
    }


ARTIFACT = _artifact()
ARTIFACT_PREFIX = "models/tiny-v1"
BACKENDS = ("file", "s3", "s3-boto3", "gcs", "http")


@dataclass(frozen=True)
class SeededOrigin:
    kind: str
    url: str
    listable: bool
    writable: bool


@pytest.fixture(params=BACKENDS)
def seeded_origin(request: pytest.FixtureRequest, tmp_path: Path) -> SeededOrigin:
    """ARTIFACT under ARTIFACT_PREFIX on one backend (plus a sibling prefix that isn't ours)."""
    kind: str = request.param
    prefix = ARTIFACT_PREFIX
    if kind == "file":
        populate(tmp_path / prefix, ARTIFACT)
        return SeededOrigin(kind, (tmp_path / prefix).as_uri(), True, True)
    if kind in ("s3", "s3-boto3"):  # reads signed here, or everything through boto3
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        if kind == "s3-boto3":
            request.getfixturevalue("monkeypatch").setenv("SWARM_S3_BOTO3", "1")
        populate(bucket.path / prefix, ARTIFACT)
        populate(bucket.path / "models/other", {"not-ours.bin": b"x"})
        return SeededOrigin(kind, f"{bucket.url}/{prefix}", True, True)
    if kind == "gcs":
        gbucket: GCSBucket = request.getfixturevalue("gcs_bucket")
        server: GCSServer = request.getfixturevalue("gcs_server")
        for key, data in ARTIFACT.items():
            server.upload(gbucket.name, f"{prefix}/{key}", data)
        server.upload(gbucket.name, "models/other/not-ours.bin", b"x")
        return SeededOrigin(kind, f"{gbucket.url}/{prefix}", True, True)
    start: Callable[[Path], HTTPFileServer] = request.getfixturevalue("http_files_server")
    populate(tmp_path / prefix, ARTIFACT)
    return SeededOrigin(kind, start(tmp_path).url(prefix), False, False)
