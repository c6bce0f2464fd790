"""Manifest codec: round trips, and hostile input always rejected with ManifestError."""

from __future__ import annotations

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.errors import ManifestError
from swarm.manifest import Manifest, parse_ref, validate_path

KIB = 1024

path_part = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
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
