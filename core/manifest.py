"""The manifest: an artifact's table of contents, and its canonical encoding.

A manifest lists the artifact's files (relative POSIX paths and sizes), the piece
size, and one blake3 digest per piece.

Format 2 (what ``swarm publish`` writes) also has a *block size* and every piece's
*block layer*: the blake3 digests of its blocks (BitTorrent v2's piece layers, on
a flat two-level tree). A piece's digest is then blake3 of its layer, so the root
commits to every block digest, a block received from a peer is checked before it
is written, and a piece whose blocks were all checked needs no second pass.
Format 1 manifests (a digest of each piece's bytes, no layers) still decode and
fetch; their pieces are checked whole. Pieces are numbered globally in file order;
a piece never spans two files, so the last piece of each file may be short and an
empty file has none. The *root* is the blake3 digest of the canonical (uncompressed
msgpack) encoding: it names this exact version, and any change to any byte of any
file changes it.

On disk and in the catalog the canonical encoding is compressed with zstandard.
``Manifest.decode`` treats its input as hostile: it bounds every size before
allocating (the decompressed size by :func:`max_encoded_size` of the compressed
size, see there), keeps nothing of what it rejects, and refuses traversal paths,
duplicates, control characters, absurd depth and inconsistent piece tables with a
:class:`~core.errors.ManifestError` that says what is wrong.
"""

from __future__ import annotations

import bisect
import operator
import re
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

import blake3
import msgpack
import zstandard

from core.digest import DIGEST_SIZE, PieceHasher, layer_digest, piece_digest
from core.errors import ManifestError

FORMATS: Final = (1, 2)
"""The manifest formats this swarm reads; ``Manifest.format`` says which one a manifest is."""
DEFAULT_PIECE_SIZE = 256 * 1024 * 1024
DEFAULT_BLOCK_SIZE: Final = 4 * 1024 * 1024
"""The block a format-2 manifest checks: the peer's request size, so every block
received is checked on arrival."""
MAX_BLOCK_SIZE: Final = 16 * 1024 * 1024
"""The largest block a format-2 manifest may have: the largest block a peer may ask
for on the wire (``swarm.protocol.MAX_BLOCK``), since peers ask for whole blocks."""
MIN_PIECE_SIZE = 1024
MAX_PIECE_SIZE = 4 * 1024**3
MAX_FILES = 1_000_000
MAX_PIECES = 1 << 22
MAX_BLOCKS: Final = 1 << 22  # 16 TiB in 4 MiB blocks: a 128 MiB block layer
MAX_TOTAL_SIZE = 1 << 50  # 1 PiB
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
# Directories a file may sit under. Real artifacts nest a handful of levels; the
# limit keeps every recursive helper a path meets (pathlib's mkdir(parents=True),
# os.walk and shutil.rmtree on Python 3.11) far inside Python's 1000-frame recursion
# limit, so a hostile path ends in this ManifestError, not a RecursionError.
MAX_PATH_DEPTH: Final = 128
MAX_NAME_LENGTH = 200
# Room for MAX_PIECES digests and generous file paths; anything larger is hostile.
MAX_ENCODED_SIZE = max(MAX_PIECES, MAX_BLOCKS) * (DIGEST_SIZE + 8) + 64 * 1024 * 1024
MAX_COMPRESSED_SIZE = MAX_ENCODED_SIZE
# How far a manifest may expand when decompressed: see max_encoded_size.
MAX_EXPANSION: Final = 64
EXPANSION_ALLOWANCE: Final = 1024 * 1024
# encode() uses zstd level 3 (a 2 MiB window); level 19 uses 8 MiB. A frame asking
# for a larger window would make the decompressor allocate it: refused.
MAX_WINDOW_SIZE: Final = 8 * 1024 * 1024
_READ_CHUNK: Final = 1024 * 1024

_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# C0 and C1 controls, DEL, and the Unicode line separators and bidirectional
# overrides that make a path display as something it is not.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def max_encoded_size(compressed_size: int) -> int:
    """The most a manifest of ``compressed_size`` bytes may decompress to.

    The canonical encoding is a small header, the file table and the piece digests.
    The digests are blake3 output, incompressible: they expand by a factor of 1. The
    file table (paths, sizes, piece counts) is text and small integers; measured, a
    table of 20,000 shards with their digests compresses 2.4 fold and one of 200,000
    empty files with numbered names (no digests at all) 38 fold. A table too small to
    matter (20,000 empty files: 0.9 MiB, 74 fold) fits in the constant allowance,
    which also covers the header (name, origin) of a tiny manifest. So a
    legitimate manifest stays under ``MAX_EXPANSION`` x compressed + 1 MiB, while a
    zstd bomb (runs of zeros expand ~30,000 fold) is cut off at that size: a 6 KiB
    object may cost 1.4 MiB, not 200 MiB. ``Manifest.encode`` refuses to write what
    this would refuse to read, so publishing and reading agree.
    """
    return min(MAX_ENCODED_SIZE, MAX_EXPANSION * compressed_size + EXPANSION_ALLOWANCE)


def block_size_for(
    sizes: Sequence[int], piece_size: int, preferred: int = DEFAULT_BLOCK_SIZE
) -> int:
    """The block size a format-2 manifest of files of ``sizes`` gets; 0: format 1.

    ``preferred`` (:data:`DEFAULT_BLOCK_SIZE` unless the publisher chose one; at
    most the piece size), doubled while the artifact would have more than
    :data:`MAX_BLOCKS` blocks, up to :data:`MAX_BLOCK_SIZE`. An artifact that
    would still have too many (over 64 TiB) gets format 1. A ``preferred`` size
    that no manifest may carry raises :class:`ManifestError`.
    """
    _check_block_size(min(preferred, piece_size), piece_size)

    def blocks(block: int) -> int:
        total = 0
        for size in sizes:
            full, tail = divmod(size, piece_size)
            total += full * pieces_in(piece_size, block) + pieces_in(tail, block)
        return total

    block = min(preferred, piece_size)
    while blocks(block) > MAX_BLOCKS:
        if block >= min(piece_size, MAX_BLOCK_SIZE):
            return 0
        block = min(block * 2, piece_size, MAX_BLOCK_SIZE)
    return block


def validate_name(name: str) -> str:
    """An artifact name: slash-separated parts of letters, digits, ``.``, ``_``, ``-``."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
        raise ManifestError(f"artifact name must be 1 to {MAX_NAME_LENGTH} characters: {name!r}")
    for part in name.split("/"):
        if not _NAME_PART.match(part):
            raise ManifestError(
                f"bad artifact name {name!r}: each '/'-separated part must start with a letter "
                "or digit and contain only letters, digits, '.', '_' and '-'"
            )
    return name


def validate_path(path: str) -> str:
    """A file path inside the artifact: relative, POSIX, no traversal, no control characters."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"file path must be a non-empty string: {path!r}")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise ManifestError(f"file path longer than {MAX_PATH_BYTES} bytes: {path[:80]!r}...")
    if _CONTROL.search(path):
        raise ManifestError(f"file path contains NUL or control characters: {path!r}")
    if path.startswith("/"):
        raise ManifestError(f"file path must be relative, not absolute: {path!r}")
    if "\\" in path:
        raise ManifestError(f"file path must use '/' separators, not '\\': {path!r}")
    parts = path.split("/")
    if len(parts) > MAX_PATH_DEPTH:
        raise ManifestError(
            f"file path is {len(parts)} components deep, more than {MAX_PATH_DEPTH}: "
            f"{path[:80]!r}..."
        )
    for part in parts:
        if part in ("", ".", ".."):
            raise ManifestError(f"file path has an empty, '.' or '..' component: {path!r}")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            raise ManifestError(
                f"file path component longer than {MAX_COMPONENT_BYTES} bytes: {path!r}"
            )
    if parts[0].startswith(".swarm"):
        raise ManifestError(
            f"file path must not start with '.swarm' (reserved for swarm's state): {path!r}"
        )
    try:
        path.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ManifestError(f"file path is not valid UTF-8: {path!r}") from exc
    return path


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of the artifact and the run of pieces that covers it."""

    path: str
    size: int
    first_piece: int
    piece_count: int


@dataclass(frozen=True, slots=True)
class Piece:
    """One piece: a byte range of one file."""

    index: int
    file_index: int
    path: str
    offset: int
    length: int


def pieces_in(size: int, piece_size: int) -> int:
    """How many pieces cover a file of ``size`` bytes (an empty file has none)."""
    return -(-size // piece_size)


@dataclass(frozen=True)
class Manifest:
    """An artifact version: files, piece size, a digest per piece, and the origin they came from.

    ``block_size`` 0 is format 1. Otherwise ``layers[i]`` is piece ``i``'s block
    layer and ``digests[i]`` is blake3 of it (``build`` derives the digests).
    """

    name: str
    origin: str
    piece_size: int
    files: tuple[FileEntry, ...]
    digests: tuple[bytes, ...]
    block_size: int = 0
    layers: tuple[bytes, ...] = ()
    _nonempty_files: list[int] = field(init=False, repr=False, compare=False)
    _first_pieces: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.block_size and not self.digests and self.layers:
            object.__setattr__(self, "digests", tuple(layer_digest(x) for x in self.layers))
        nonempty = [i for i, f in enumerate(self.files) if f.piece_count]
        object.__setattr__(self, "_nonempty_files", nonempty)
        object.__setattr__(self, "_first_pieces", [self.files[i].first_piece for i in nonempty])

    @classmethod
    def build(
        cls,
        *,
        name: str,
        origin: str,
        piece_size: int,
        files: Sequence[tuple[str, int]],
        digests: Sequence[bytes] = (),
        block_size: int = 0,
        layers: Sequence[bytes] = (),
    ) -> Manifest:
        """Lay out ``files`` (path, size) in pieces and attach their digests, validating all.

        Format 1: ``digests``, one per piece. Format 2: ``block_size`` and ``layers``
        (see :func:`core.digest.block_layer`), one per piece; the digests follow.
        """
        _check_piece_size(piece_size)
        validate_name(name)
        entries: list[FileEntry] = []
        next_piece = 0
        for path, size in files:
            count = pieces_in(size, piece_size)
            entries.append(FileEntry(path, size, next_piece, count))
            next_piece += count
        if block_size and digests:
            raise ManifestError("a format-2 manifest's digests follow from its layers")
        manifest = cls(
            name, origin, piece_size, tuple(entries), tuple(digests), block_size, tuple(layers)
        )
        manifest._validate(derived=bool(block_size))
        return manifest

    @staticmethod
    def layout(files: Sequence[tuple[str, int]], piece_size: int) -> list[tuple[str, int, int]]:
        """The pieces (path, offset, length) that cover ``files``, in global order."""
        _check_piece_size(piece_size)
        out: list[tuple[str, int, int]] = []
        for path, size in files:
            out.extend(
                (path, offset, min(piece_size, size - offset))
                for offset in range(0, size, piece_size)
            )
        return out

    # --- derived views -------------------------------------------------------------

    @property
    def num_pieces(self) -> int:
        return len(self.digests)

    @cached_property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def piece(self, index: int) -> Piece:
        """The byte range that piece ``index`` covers."""
        if not 0 <= index < self.num_pieces:
            raise IndexError(f"piece {index} out of range 0..{self.num_pieces - 1}")
        file_index = self._nonempty_files[bisect.bisect_right(self._first_pieces, index) - 1]
        entry = self.files[file_index]
        offset = (index - entry.first_piece) * self.piece_size
        return Piece(
            index, file_index, entry.path, offset, min(self.piece_size, entry.size - offset)
        )

    @cached_property
    def piece_lengths(self) -> list[int]:
        """Length of every piece in global order (what the picker and the tracker need)."""
        lengths: list[int] = []
        for f in self.files:
            if f.piece_count:
                lengths.extend([self.piece_size] * (f.piece_count - 1))
                lengths.append(f.size - (f.piece_count - 1) * self.piece_size)
        return lengths

    @property
    def format(self) -> int:
        """1: a digest of each piece's bytes; 2: block layers (see the module's doc)."""
        return 2 if self.block_size else 1

    def hasher(self, max_threads: int = blake3.blake3.AUTO) -> PieceHasher:
        """Hashes a piece streamed in order; its ``digest()`` is what ``digests`` holds."""
        return PieceHasher(self.block_size, max_threads)

    def piece_digest(self, data: memoryview | bytes | bytearray) -> bytes:
        """The digest of a whole piece in memory, as ``digests`` holds it."""
        return piece_digest(data, self.block_size)

    def block_digest(self, index: int, offset: int, length: int) -> bytes | None:
        """The digest a received block must have, or None when it can't be checked alone.

        Only a format-2 manifest's blocks can, and only a byte range that is exactly
        one of its blocks (``block_size`` aligned, the last one of a piece short).
        """
        if not 0 <= index < self.num_pieces:
            raise IndexError(f"piece {index} out of range 0..{self.num_pieces - 1}")
        if not self.block_size or offset < 0 or offset % self.block_size:
            return None
        length_of_piece = self.piece_lengths[index]
        if length != min(self.block_size, length_of_piece - offset):
            return None
        start = offset // self.block_size * DIGEST_SIZE
        return self.layers[index][start : start + DIGEST_SIZE]

    def blocks_in(self, index: int) -> int:
        """How many blocks a format-2 piece has (0 in format 1)."""
        return pieces_in(self.piece_lengths[index], self.block_size) if self.block_size else 0

    def describe_piece(self, index: int) -> str:
        """'piece 3 (model-00001.safetensors bytes 3145728-4194303)' for error messages."""
        p = self.piece(index)
        return f"piece {index} ({p.path} bytes {p.offset}-{p.offset + p.length - 1})"

    # --- encoding ------------------------------------------------------------------

    def canonical(self) -> bytes:
        """The canonical msgpack encoding that the root digest covers."""
        return _canonical(self)

    @cached_property
    def root(self) -> bytes:
        return blake3.blake3(self.canonical()).digest()

    @property
    def root_hex(self) -> str:
        return self.root.hex()

    @property
    def ref(self) -> str:
        """``NAME@ROOT``: this exact version."""
        return f"{self.name}@{self.root_hex}"

    def encode(self) -> bytes:
        """Canonical encoding compressed with zstandard: what the catalog stores.

        Refuses (ManifestError) a manifest that ``decode`` would refuse as too
        expansive: one whose file table is almost all repetition (see
        :func:`max_encoded_size`).
        """
        raw = self.canonical()
        data = zstandard.ZstdCompressor(level=3).compress(raw)
        if len(raw) > max_encoded_size(len(data)):
            raise ManifestError(
                f"manifest of {self.name!r} compresses {len(raw)} bytes to {len(data)}, more "
                f"than {MAX_EXPANSION} fold; its file table is too repetitive to be told from "
                "a decompression bomb (shorter or fewer paths would do)"
            )
        return data

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Manifest:
        """Decode and validate untrusted bytes; every failure is a ManifestError.

        Memory is bounded by construction: the decompressed size may not pass
        ``max_encoded_size(len(data))``; a frame that declares more is refused on its
        header, and one that does not declare its size is read a chunk at a time and
        cut off at the bound. Nothing of a rejected manifest outlives the error.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ManifestError(f"manifest must be bytes, not {type(data).__name__}")
        if len(data) > MAX_COMPRESSED_SIZE:
            raise ManifestError(
                f"manifest is {len(data)} bytes, more than the {MAX_COMPRESSED_SIZE} allowed"
            )
        raw = _decompress_bounded(data, max_encoded_size(len(data)))
        try:
            return cls.from_canonical(raw)
        except ManifestError as exc:
            # The traceback's frames hold the decoded bytes and the partly built
            # manifest: drop them, so a kept error keeps nothing of the input.
            traceback.clear_frames(exc.__traceback__)
            del raw
            raise

    @classmethod
    def from_canonical(cls, raw: bytes) -> Manifest:
        try:
            obj = msgpack.unpackb(
                raw,
                raw=False,
                strict_map_key=True,
                max_bin_len=max(MAX_PIECES, MAX_BLOCKS) * DIGEST_SIZE,
                max_str_len=MAX_PATH_BYTES * 2,
                max_array_len=max(MAX_FILES, 8),
                max_map_len=16,
                max_ext_len=0,
            )
        except msgpack.ExtraData:
            # ExtraData holds the trailing bytes: not chained, so they are not kept.
            raise ManifestError("manifest has trailing data after its msgpack object") from None
        except (ValueError, msgpack.UnpackException, TypeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"manifest is not valid msgpack: {exc}") from exc
        manifest = _from_obj(obj)
        if manifest.canonical() != raw:
            raise ManifestError("manifest encoding is not canonical (re-encoding differs)")
        return manifest

    # --- validation ----------------------------------------------------------------

    def _validate(self, derived: bool = False) -> None:
        validate_name(self.name)
        if (
            not isinstance(self.origin, str)
            or len(self.origin) > MAX_PATH_BYTES
            or _CONTROL.search(self.origin)
        ):
            raise ManifestError(f"bad origin URL in manifest: {self.origin!r}")
        _check_piece_size(self.piece_size)
        if len(self.files) > MAX_FILES:
            raise ManifestError(f"manifest lists {len(self.files)} files, more than {MAX_FILES}")
        seen: set[str] = set()
        total = 0
        next_piece = 0
        for entry in self.files:
            validate_path(entry.path)
            if entry.path in seen:
                raise ManifestError(f"file path appears twice: {entry.path!r}")
            seen.add(entry.path)
            if not isinstance(entry.size, int) or entry.size < 0:
                raise ManifestError(f"file {entry.path!r} has an invalid size {entry.size!r}")
            total += entry.size
            if total > MAX_TOTAL_SIZE:
                raise ManifestError(f"artifact larger than {MAX_TOTAL_SIZE} bytes")
            if entry.piece_count != pieces_in(entry.size, self.piece_size):
                raise ManifestError(
                    f"file {entry.path!r} of {entry.size} bytes needs "
                    f"{pieces_in(entry.size, self.piece_size)} pieces of {self.piece_size}, "
                    f"manifest says {entry.piece_count}"
                )
            if entry.first_piece != next_piece:
                raise ManifestError(
                    f"piece table of {entry.path!r} does not follow the previous file"
                )
            next_piece += entry.piece_count
        # A file may not also be a directory of another file ("a" and "a/b").
        for path in seen:
            parts = path.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in seen:
                    raise ManifestError(
                        f"file path {path!r} lies inside file {'/'.join(parts[:i])!r}"
                    )
        if next_piece > MAX_PIECES:
            raise ManifestError(f"manifest has {next_piece} pieces, more than {MAX_PIECES}")
        if len(self.digests) != next_piece:
            raise ManifestError(
                f"manifest has {len(self.digests)} piece digests for {next_piece} pieces"
            )
        for i, digest in enumerate(self.digests):
            if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
                raise ManifestError(f"digest of piece {i} is not {DIGEST_SIZE} bytes")
        if not self.block_size:
            if self.layers:
                raise ManifestError("a format-1 manifest has no block layers")
            return
        _check_block_size(self.block_size, self.piece_size)
        if len(self.layers) != next_piece:
            raise ManifestError(
                f"manifest has {len(self.layers)} block layers for {next_piece} pieces"
            )
        blocks = 0
        for i, layer in enumerate(self.layers):
            count = self.blocks_in(i)
            blocks += count
            if not isinstance(layer, bytes) or len(layer) != count * DIGEST_SIZE:
                raise ManifestError(f"block layer of piece {i} is not {count} digests")
        if not derived and any(map(operator.ne, map(layer_digest, self.layers), self.digests)):
            raise ManifestError("a piece's digest does not match its block layer")
        if blocks > MAX_BLOCKS:
            raise ManifestError(f"manifest has {blocks} blocks, more than {MAX_BLOCKS}")


def _decompress_bounded(data: bytes | bytearray | memoryview, limit: int) -> bytes:
    """The zstd frame ``data`` decompressed, refused once it would pass ``limit`` bytes."""
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise ManifestError(f"manifest is not valid zstandard data: {exc}") from exc
    declared = params.content_size
    if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > limit:
        raise ManifestError(
            f"manifest of {len(data)} compressed bytes declares {declared} bytes of content, "
            f"more than the {limit} such a manifest may hold (a decompression bomb?)"
        )
    if params.window_size > MAX_WINDOW_SIZE:
        raise ManifestError(
            f"manifest's zstandard frame asks for a {params.window_size}-byte window, "
            f"more than the {MAX_WINDOW_SIZE} allowed"
        )
    # One read when the frame declares its size (encode() always does), else chunks.
    chunk = declared + 1 if declared != zstandard.CONTENTSIZE_UNKNOWN else _READ_CHUNK
    chunks: list[bytes] = []
    total = 0
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE)
    try:
        with dctx.stream_reader(data) as reader:
            while True:
                out = reader.read(min(chunk, limit + 1 - total))
                if not out:
                    break
                total += len(out)
                if total > limit:
                    chunks.clear()  # not kept alive by the traceback
                    raise ManifestError(
                        f"manifest of {len(data)} compressed bytes decompresses to more than "
                        f"the {limit} bytes such a manifest may hold (a decompression bomb?)"
                    )
                chunks.append(out)
    except zstandard.ZstdError as exc:
        raise ManifestError(f"manifest is not valid zstandard data: {exc}") from exc
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _check_piece_size(piece_size: int) -> None:
    if not isinstance(piece_size, int) or not MIN_PIECE_SIZE <= piece_size <= MAX_PIECE_SIZE:
        raise ManifestError(
            f"piece size must be between {MIN_PIECE_SIZE} and {MAX_PIECE_SIZE} bytes, got {piece_size!r}"
        )


def _check_block_size(block_size: int, piece_size: int) -> None:
    if type(block_size) is not int or not MIN_PIECE_SIZE <= block_size <= min(
        piece_size, MAX_BLOCK_SIZE
    ):
        raise ManifestError(
            f"block size must be between {MIN_PIECE_SIZE} bytes and the piece size "
            f"{piece_size} (at most {MAX_BLOCK_SIZE}), got {block_size!r}"
        )


def _canonical(m: Manifest) -> bytes:
    files = [[f.path, f.size, f.piece_count] for f in m.files]
    obj: list[Any]
    if m.block_size:
        obj = [m.format, m.name, m.origin, m.piece_size, files, m.block_size, b"".join(m.layers)]
    else:
        obj = [m.format, m.name, m.origin, m.piece_size, files, b"".join(m.digests)]
    return msgpack.packb(obj, use_bin_type=True)


def _from_obj(obj: object) -> Manifest:
    if not isinstance(obj, list) or not obj:
        raise ManifestError("manifest must be a list that starts with its format version")
    version = obj[0]
    if type(version) is not int or version not in FORMATS:
        raise ManifestError(
            f"unsupported manifest format version {version!r:.40} "
            f"(this swarm reads {', '.join(map(str, FORMATS))})"
        )
    fields = 6 if version == 1 else 7
    if len(obj) != fields:
        raise ManifestError(
            f"a format-{version} manifest must be a list of {fields} fields: version, name, "
            "origin, piece size, files, "
            + ("digests" if version == 1 else "block size, block layers")
        )
    block_size = 0
    if version == 1:
        _, name, origin, piece_size, files, digests = obj
    else:
        _, name, origin, piece_size, files, block_size, digests = obj
    if not isinstance(name, str):
        raise ManifestError("manifest name must be a string")
    if not isinstance(origin, str):
        raise ManifestError("manifest origin must be a string")
    if type(piece_size) is not int:
        raise ManifestError("manifest piece size must be an integer")
    _check_piece_size(piece_size)
    if not isinstance(files, list):
        raise ManifestError("manifest files must be a list")
    if not isinstance(digests, bytes) or len(digests) % DIGEST_SIZE:
        raise ManifestError(f"manifest digests must be bytes, a multiple of {DIGEST_SIZE} long")
    if version == 2:
        _check_block_size(block_size, piece_size)
    entries: list[FileEntry] = []
    next_piece = 0
    for item in files:
        if not isinstance(item, list) or len(item) != 3:
            raise ManifestError("each file must be [path, size, piece count]")
        path, size, count = item
        if not isinstance(path, str) or type(size) is not int or type(count) is not int:
            raise ManifestError(f"file entry has wrong types: {item!r:.200}")
        if size < 0 or count < 0:
            raise ManifestError(f"file {path!r:.200} has a negative size or piece count")
        entries.append(FileEntry(path, size, next_piece, count))
        next_piece += count
        if next_piece > MAX_PIECES:
            raise ManifestError(f"manifest has more than {MAX_PIECES} pieces")
    if version == 1:
        table = tuple(digests[i : i + DIGEST_SIZE] for i in range(0, len(digests), DIGEST_SIZE))
        manifest = Manifest(name, origin, piece_size, tuple(entries), table)
    else:
        layers: list[bytes] = []
        at = 0
        for entry in entries:
            for k in range(entry.piece_count):
                length = min(piece_size, entry.size - k * piece_size)
                if length <= 0:
                    raise ManifestError(f"file {entry.path!r:.200} has more pieces than its size")
                end = at + -(-length // block_size) * DIGEST_SIZE
                if end > len(digests):
                    raise ManifestError("manifest has fewer block digests than its pieces need")
                layers.append(digests[at:end])
                at = end
        if at != len(digests):
            raise ManifestError("manifest has more block digests than its pieces need")
        manifest = Manifest(name, origin, piece_size, tuple(entries), (), block_size, tuple(layers))
    manifest._validate(derived=version == 2)
    return manifest


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``NAME[@ROOT]`` into the name and the optional hex root."""
    name, sep, root = ref.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    root = root.lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", root):
        raise ManifestError(f"version in {ref!r} must be 8 to 64 hex digits of the manifest root")
    return name, root
