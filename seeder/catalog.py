"""The catalog: where manifests live, next to the data in the object store.

Layout under the catalog URL (any origin backend that can write)::

    <name>/<root>.manifest     one object per published version, never overwritten
    <name>/<root>.mac          with a cluster token: the token's MAC over name and root
    <name>/latest              the root (hex) of the newest version

A version (and its MAC) is written before ``latest`` points at it, and old versions
stay, so a fetch of ``NAME@ROOT`` already under way keeps working after a new publish.

With a cluster token, ``get`` serves only versions whose ``.mac`` proves the token,
and checks it before reading the manifest: whoever can write to the bucket but does
not hold the token can't get a manifest of theirs (a decompression bomb included)
decoded, let alone served. ``latest`` is not signed: it only chooses among versions,
each of which must be signed. Every object is read with a size cap known before any
of it is read, so a huge object in the catalog costs nothing.
"""

from __future__ import annotations

import os
import re
from typing import Final

from core.auth import ClusterKey
from core.errors import CatalogError, ConfigError, ManifestError
from core.manifest import MAX_COMPRESSED_SIZE, Manifest, parse_ref
from seeder.errors import OriginNotFoundError, OriginUnsupportedError
from seeder.origin import Origin, open_origin
from seeder.reader import RangedReader

CATALOG_ENV = "SWARM_CATALOG"
# MAC purpose: a catalog signature can't be replayed as any other message's MAC.
CATALOG_PURPOSE: Final = b"catalog"
# ``latest`` and ``.mac`` objects hold 64 hex digits and maybe a newline.
MAX_SMALL_OBJECT: Final = 1024
_ROOT = re.compile(r"[0-9a-f]{64}")


def catalog_url(explicit: str | None) -> str:
    """The catalog URL from ``--catalog`` or ``SWARM_CATALOG``."""
    url = explicit or os.environ.get(CATALOG_ENV)
    if not url:
        raise ConfigError(f"no catalog given: pass --catalog URL or set {CATALOG_ENV}")
    return url


def entry_mac(key: ClusterKey, name: str, root_hex: str) -> bytes:
    """The MAC that signs catalog entry ``name@root_hex`` with the cluster token."""
    return key.mac(CATALOG_PURPOSE, name.encode(), bytes.fromhex(root_hex))


class Catalog:
    """Names to manifests, in an object store.

    ``key`` is the cluster token (None or an open key: entries are neither signed nor
    checked). ``max_manifest_size`` caps the compressed manifest objects read.
    """

    def __init__(
        self,
        url: str,
        key: ClusterKey | None = None,
        *,
        max_manifest_size: int = MAX_COMPRESSED_SIZE,
        retry_time: float = 60.0,
    ) -> None:
        self.url = url
        self.key = key if key is not None else ClusterKey(None)
        self.max_manifest_size = max_manifest_size
        self._origin: Origin = open_origin(url)
        # Throttling and 5xx are retried as for data, within a shorter budget: a
        # catalog read stands between a whole burst and its first byte.
        self._reader = RangedReader(self._origin, retry_time=retry_time)

    @property
    def origin(self) -> Origin:
        """The origin the catalog lives in (its counters say what was read)."""
        return self._origin

    async def close(self) -> None:
        await self._origin.close()

    async def __aenter__(self) -> Catalog:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def put(self, manifest: Manifest) -> str:
        """Store ``manifest`` and make it the latest version of its name; return its ref."""
        name, root = manifest.name, manifest.root_hex
        try:
            await self._origin.put_bytes(f"{name}/{root}.manifest", manifest.encode())
            if not self.key.open:
                mac = entry_mac(self.key, name, root).hex()
                await self._origin.put_bytes(f"{name}/{root}.mac", mac.encode())
            await self._origin.put_bytes(f"{name}/latest", root.encode())
        except OriginUnsupportedError as exc:
            raise CatalogError(f"catalog {self.url} is read-only: {exc}") from exc
        return manifest.ref

    async def resolve(self, ref: str) -> str:
        """The full hex root that ``NAME``, ``NAME@ROOT`` or ``NAME@PREFIX`` names."""
        name, root = parse_ref(ref)
        if root is None:
            try:
                data = await self._read(f"{name}/latest", MAX_SMALL_OBJECT)
            except OriginNotFoundError as exc:
                raise CatalogError(
                    f"{name!r} is not in catalog {self.url} (was it published?)"
                ) from exc
            latest = data.decode("ascii", "replace").strip()
            if not _ROOT.fullmatch(latest):
                raise CatalogError(
                    f"catalog {self.url} entry {name}/latest does not hold a manifest root "
                    f"(64 hex digits): {latest[:80]!r}"
                )
            return latest
        if len(root) == 64:
            return root
        sub = open_origin(self.url.rstrip("/") + "/" + name)
        try:
            roots = [
                o.key.removesuffix(".manifest")
                for o in await sub.list()
                if o.key.endswith(".manifest")
            ]
        except OriginUnsupportedError as exc:
            raise CatalogError(
                f"catalog {self.url} can't list versions: give the full 64-digit root"
            ) from exc
        finally:
            await sub.close()
        matches = [r for r in roots if r.startswith(root)]
        if len(matches) != 1:
            what = "no version" if not matches else f"{len(matches)} versions"
            raise CatalogError(f"{what} of {name!r} in catalog {self.url} start with {root}")
        return matches[0]

    async def get(self, ref: str) -> Manifest:
        """The manifest that ``ref`` names, checked against its root (and the token)."""
        name, _ = parse_ref(ref)
        root = await self.resolve(ref)
        if not self.key.open:
            await self._check_signature(name, root)
        try:
            data = await self._read(f"{name}/{root}.manifest", self.max_manifest_size)
        except OriginNotFoundError as exc:
            raise CatalogError(f"version {root} of {name!r} is not in catalog {self.url}") from exc
        try:
            manifest = Manifest.decode(data)
        except ManifestError as exc:
            raise CatalogError(f"catalog entry {name}@{root} is damaged: {exc}") from exc
        finally:
            del data  # a kept error's traceback must not hold the object's bytes
        if manifest.root_hex != root or manifest.name != name:
            raise CatalogError(
                f"catalog entry {name}@{root} holds a different manifest ({manifest.ref})"
            )
        return manifest

    async def _check_signature(self, name: str, root: str) -> None:
        unsigned = CatalogError(
            f"catalog entry {name}@{root} is not signed with this cluster's token "
            "(publish it with --token-file or SWARM_TOKEN)"
        )
        try:
            text = (await self._read(f"{name}/{root}.mac", MAX_SMALL_OBJECT)).decode(
                "ascii", "replace"
            )
        except OriginNotFoundError as exc:
            raise unsigned from exc
        try:
            mac = bytes.fromhex(text.strip())
        except ValueError:
            raise unsigned from None
        if not self.key.check(mac, CATALOG_PURPOSE, name.encode(), bytes.fromhex(root)):
            raise unsigned

    async def _read(self, key: str, limit: int) -> bytearray:
        """A whole catalog object, refused by its size, before any of it is read."""
        info = await self._origin.stat(key)
        if info.size > limit:
            raise CatalogError(
                f"catalog {self.url} object {key} is {info.size} bytes, "
                f"more than the {limit} allowed: not read"
            )
        if info.size == 0:
            return bytearray()
        # A ranged read of the size seen: an object replaced by a larger one since
        # the stat still costs no more than ``limit``.
        buf = bytearray(info.size)
        await self._reader.read(key, 0, memoryview(buf))
        return buf
