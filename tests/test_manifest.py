"""Manifest codec: round trips, and hostile input always rejected with ManifestError."""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections.abc import Iterator

import blake3
import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import ManifestError
from core.manifest import (
    MAX_PATH_DEPTH,
    MAX_PIECES,
    MIN_PIECE_SIZE,
    Manifest,
    max_encoded_size,
    parse_ref,
    validate_path,
)

KIB = 1024
MIB = 1024 * KIB

path_part = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc", "Cf", "Zl", "Zp"), blacklist_characters="/\\"
    ),
    min_size=1,
    max_size=12,
).filter(lambda p: p not in (".", "..") and not p.startswith(".swarm"))
paths = st.lists(path_part, min_size=1, max_size=3).map("/".join)


def make(files: list[tuple[str, int]], piece_size: int = KIB) -> Manifest:
    layout = Manifest.layout(files, piece_size)
    digests = [bytes([i % 256]) * 32 for i in range(len(layout))]
    return Manifest.build(
        name="org/model-1", origin="s3://b/p", piece_size=piece_size, files=files, digests=digests
    )


def test_layout_pieces_never_span_files() -> None:
    m = make([("a.bin", 2500), ("empty", 0), ("dir/b.bin", 1024), ("c", 1)])
    assert m.num_pieces == 3 + 0 + 1 + 1
    assert m.piece_lengths == [1024, 1024, 452, 1024, 1]
    assert m.total_size == 2500 + 1024 + 1
    assert m.piece(2).path == "a.bin" and m.piece(2).offset == 2048
    assert m.piece(3).path == "dir/b.bin" and m.piece(3).offset == 0
    assert m.piece(4).file_index == 3
    assert "a.bin bytes 2048-2499" in m.describe_piece(2)
    with pytest.raises(IndexError):
        m.piece(5)


def test_root_names_the_exact_version() -> None:
    a = make([("a", 3000)])
    b = Manifest.decode(a.encode())
    assert b == a and b.root == a.root and len(a.root_hex) == 64
    digests = list(a.digests)
    digests[1] = b"\xff" * 32
    changed = Manifest.build(
        name=a.name, origin=a.origin, piece_size=a.piece_size, files=[("a", 3000)], digests=digests
    )
    assert changed.root != a.root


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(paths, st.integers(min_value=0, max_value=10 * KIB), min_size=1, max_size=6),
    st.sampled_from([KIB, 3 * KIB, 4 * KIB]),
)
def test_round_trip(files: dict[str, int], piece_size: int) -> None:
    names = sorted(files)
    # A file may not also be a directory of another one; drop such pairs.
    keep = [p for p in names if not any(q != p and q.startswith(p + "/") for q in names)]
    m = make([(p, files[p]) for p in keep], piece_size)
    back = Manifest.decode(m.encode())
    assert back == m and back.root == m.root
    assert sum(back.piece_lengths) == back.total_size


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a/./b",
        "a//b",
        "a/",
        "",
        "a\x00b",
        "a\nb",
        "a\\b",
        ".swarm/state",
        "x\x7f",
        "x\x85y",  # C1 next line
        "x\x9b31m",  # C1 CSI: a terminal escape
        "weights\u202e.txt",  # right-to-left override: displays as something else
        "a\u2028b",  # line separator
        "/".join(["d"] * (MAX_PATH_DEPTH + 1)),
        "/".join(["d"] * 2000),
    ],
)
def test_hostile_paths_rejected(path: str) -> None:
    with pytest.raises(ManifestError):
        validate_path(path)
    with pytest.raises(ManifestError):
        make([(path, 10)])


def _raw(obj: object) -> bytes:
    return zstandard.ZstdCompressor().compress(msgpack.packb(obj, use_bin_type=True))


GOOD = [1, "m", "s3://b", KIB, [["a", 2000, 2]], b"\x00" * 64]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o.__setitem__(0, 2),  # unknown version
        lambda o: o.__setitem__(3, 1),  # piece size too small
        lambda o: o.__setitem__(4, [["a", 2000, 3]]),  # wrong piece count
        lambda o: o.__setitem__(4, [["a", 2000, 2], ["a", 0, 0]]),  # duplicate
        lambda o: o.__setitem__(4, [["a", -1, 0]]),  # negative size
        lambda o: o.__setitem__(4, [["../a", 2000, 2]]),  # traversal
        lambda o: o.__setitem__(4, [["/etc/a", 2000, 2]]),  # absolute
        lambda o: o.__setitem__(4, [["a/b", 1024, 1], ["a", 976, 1]]),  # file inside, reversed
        lambda o: o.__setitem__(4, [["a\x1b[2J", 2000, 2]]),  # control characters
        lambda o: o.__setitem__(4, [["/".join(["d"] * 2000), 2000, 2]]),  # 2,000 levels deep
        lambda o: o.__setitem__(4, [["a", 1024, 1], ["a/b", 976, 1]]),  # file inside a file
        lambda o: o.__setitem__(5, b"\x00" * 63),  # digests not a multiple of 32
        lambda o: o.__setitem__(5, b"\x00" * 96),  # too many digests
        lambda o: o.__setitem__(1, "bad name!"),
        lambda o: o.__setitem__(4, [["a", 2**60, 2**50]]),  # absurd size
        lambda o: o.__setitem__(4, "nope"),
        lambda o: o.append(1),
    ],
)
def test_inconsistent_manifests_rejected(mutate: object) -> None:
    obj = [list(x) if isinstance(x, list) else x for x in GOOD]
    assert Manifest.decode(_raw(obj)).num_pieces == 2  # the unmutated one is fine
    mutate(obj)  # type: ignore[operator]
    with pytest.raises(ManifestError):
        Manifest.decode(_raw(obj))


def test_truncated_and_oversized_rejected() -> None:
    data = make([("a", 5000), ("b", 7)]).encode()
    for cut in range(len(data)):
        with pytest.raises(ManifestError):
            Manifest.decode(data[:cut])
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * (300 * 1024 * 1024))
    with pytest.raises(ManifestError):
        Manifest.decode(bomb)


def _zeros(total: int) -> Iterator[bytes]:
    chunk = bytes(MIB)
    for start in range(0, total, MIB):
        yield chunk[: min(MIB, total - start)]


def _frame(chunks: Iterator[bytes], declared: int | None, **params: int) -> bytes:
    """One zstd frame of ``chunks``; its content size declared only when given."""
    cctx = (
        zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(**params))
        if params
        else zstandard.ZstdCompressor(level=3)
    )
    cobj = cctx.compressobj(size=-1 if declared is None else declared)
    out = [cobj.compress(chunk) for chunk in chunks]
    out.append(cobj.flush())
    return b"".join(out)


def _digest_table_bomb() -> bytes:
    """A valid manifest of MAX_PIECES pieces with all-zero digests: 128 MiB in a few KiB."""
    table = MAX_PIECES * 32
    files = [["w", MAX_PIECES * MIN_PIECE_SIZE, MAX_PIECES]]
    head = msgpack.packb([1, "m", "s3://b", MIN_PIECE_SIZE, files, b""], use_bin_type=True)
    head = head[:-1] + b"\xc6" + table.to_bytes(4, "big")  # the empty bin, now 128 MiB

    def chunks() -> Iterator[bytes]:
        yield head
        yield from _zeros(table)

    return _frame(chunks(), len(head) + table)


BOMBS = {
    "declared": lambda: _frame(_zeros(200 * MIB), 200 * MIB),
    "undeclared": lambda: _frame(_zeros(200 * MIB), None),
    "declared, cut short": lambda: _frame(_zeros(200 * MIB), 200 * MIB)[:64],
    "digest table": _digest_table_bomb,
    "huge window": lambda: _frame(_zeros(4 * MIB), None, window_log=27),
}


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_zstd_bombs_are_refused_without_allocating_their_size(kind: str) -> None:
    bomb = BOMBS[kind]()
    assert len(bomb) < 64 * KIB
    gc.collect()
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError, match=r"bomb|window|zstandard") as info:
            Manifest.decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The bound for a 64 KiB input is 5 MiB; the bombs hold 4 to 200 MiB.
    assert peak < max_encoded_size(len(bomb)) + MIB, f"peak {peak} bytes"
    assert "ZstdError" not in type(info.value).__name__


def test_a_rejected_manifest_is_not_kept_by_its_error() -> None:
    """Decoded bytes of a refused manifest die with the decode, even if the error is kept."""
    rng = random.Random(3)
    pieces = 60_000  # ~2 MiB of incompressible digests: within the expansion bound
    digests = rng.randbytes(pieces * 32)
    obj = [1, "m", "s3://b", KIB, [["a", pieces * KIB, pieces + 1]], digests]  # wrong count
    data = zstandard.ZstdCompressor().compress(msgpack.packb(obj, use_bin_type=True))
    del digests, obj
    gc.collect()
    tracemalloc.start()
    try:
        try:
            Manifest.decode(data)
        except ManifestError as exc:
            kept = exc
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "needs" in str(kept)
    assert peak > 2 * MIB  # the decode really did build the table
    assert current < 256 * KIB, f"{current} bytes still held after the error"


def test_decompressed_size_bound() -> None:
    assert max_encoded_size(0) == MIB
    assert max_encoded_size(6 * KIB) == 64 * 6 * KIB + MIB
    assert max_encoded_size(10**12) == max_encoded_size(10**13)  # capped at MAX_ENCODED_SIZE


@settings(max_examples=25, deadline=None)
@given(
    st.integers(min_value=1, max_value=3000),
    st.integers(min_value=0, max_value=4),
    st.sampled_from(["model-{:05d}.safetensors", "d/{:07d}", "layers/{}/w.bin"]),
)
def test_realistic_manifests_fit_the_expansion_bound(
    files: int, pieces_per_file: int, pattern: str
) -> None:
    """Whatever the file count and names, a manifest with real (random) digests decodes."""
    m = make([(pattern.format(i), pieces_per_file * KIB) for i in range(files)])
    rng = random.Random(files)
    real = Manifest.build(
        name=m.name,
        origin=m.origin,
        piece_size=KIB,
        files=[(f.path, f.size) for f in m.files],
        digests=[rng.randbytes(32) for _ in range(m.num_pieces)],
    )
    assert Manifest.decode(real.encode()) == real


def test_twenty_thousand_files_round_trip() -> None:
    rng = random.Random(20_000)
    files = [(f"shards/model-{i:05d}-of-20000.safetensors", 1 + i % 3000) for i in range(20_000)]
    layout = Manifest.layout(files, KIB)
    m = Manifest.build(
        name="org/many-files",
        origin="s3://b/p",
        piece_size=KIB,
        files=files,
        digests=[rng.randbytes(32) for _ in layout],
    )
    back = Manifest.decode(m.encode())
    assert back == m and back.root == m.root
    assert len(back.files) == 20_000 and back.num_pieces == len(layout)
    last = back.piece(back.num_pieces - 1)
    assert last.path == files[-1][0] and last.offset + last.length == files[-1][1]


def test_depth_limit_is_inclusive_and_decode_says_why() -> None:
    deepest = "/".join(["d"] * MAX_PATH_DEPTH)
    assert validate_path(deepest) == deepest
    m = make([(deepest, 10)])
    assert Manifest.decode(m.encode()) == m
    obj = [1, "m", "s3://b", KIB, [["/".join(["d"] * 2000), 10, 1]], b"\x00" * 32]
    with pytest.raises(ManifestError, match="2000 components deep, more than 128"):
        Manifest.decode(_raw(obj))


def test_encode_refuses_what_decode_would_refuse() -> None:
    """A table of near-identical long paths compresses past the bound: refused at publish."""
    prefix = "/".join(["p" * 200] * 19)
    files = [(f"{prefix}/{i:06d}", 0) for i in range(1000)]
    m = Manifest.build(name="m", origin="s3://b", piece_size=KIB, files=files, digests=[])
    with pytest.raises(ManifestError, match="too repetitive"):
        m.encode()
    raw = zstandard.ZstdCompressor(level=3).compress(m.canonical())
    with pytest.raises(ManifestError, match="bomb"):
        Manifest.decode(raw)


def test_trailing_data_and_extra_frames_rejected() -> None:
    data = make([("a", 3000)]).encode()
    for tail in (b"\x00", b"garbage", data):
        with pytest.raises(ManifestError):
            Manifest.decode(data + tail)
    packed = msgpack.packb(GOOD, use_bin_type=True) + b"\x00"
    with pytest.raises(ManifestError, match="trailing data"):
        Manifest.decode(zstandard.ZstdCompressor().compress(packed))


def test_root_covers_the_canonical_bytes_only() -> None:
    m = make([("a", 3000)])
    assert m.root == blake3.blake3(m.canonical()).digest()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_rejected(data: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.decode(data)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.text(max_size=8)
        | st.binary(max_size=70),
        lambda inner: (
            st.lists(inner, max_size=7) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
        ),
        max_leaves=20,
    )
)
def test_random_structures_rejected_or_valid(obj: object) -> None:
    try:
        m = Manifest.decode(_raw(obj))
    except ManifestError:
        return
    assert Manifest.decode(m.encode()) == m


def test_parse_ref() -> None:
    assert parse_ref("org/m") == ("org/m", None)
    assert parse_ref("m@ABCDEF0123") == ("m", "abcdef0123")
    for bad in ("m@xyz", "m@abc", "", "../m", "m@" + "0" * 65):
        with pytest.raises(ManifestError):
            parse_ref(bad)
