"""The catalog: where manifests live, next to the data in the object store.

Layout under the catalog URL (any origin backend that can write)::

    <name>/<root>.manifest     one object per published version, never overwritten
    <name>/latest              the root (hex) of the newest version

A version is written before ``latest`` points at it, and old versions stay, so a
fetch of ``NAME@ROOT`` already under way keeps working after a new publish.
"""

from __future__ import annotations

import os

from seeder.errors import OriginNotFoundError, OriginUnsupportedError
from seeder.origin import Origin, open_origin
from swarm.errors import CatalogError, ConfigError, ManifestError
from swarm.manifest import Manifest, parse_ref

CATALOG_ENV = "SWARM_CATALOG"


def catalog_url(explicit: str | None) -> str:
    """The catalog URL from ``--catalog`` or ``SWARM_CATALOG``."""
    url = explicit or os.environ.get(CATALOG_ENV)
    if not url:
        raise ConfigError(f"no catalog given: pass --catalog URL or set {CATALOG_ENV}")
    return url


class Catalog:
    """Names to manifests, in an object store."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._origin: Origin = open_origin(url)

    async def close(self) -> None:
        await self._origin.close()

    async def __aenter__(self) -> Catalog:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def put(self, manifest: Manifest) -> str:
        """Store ``manifest`` and make it the latest version of its name; return its ref."""
        try:
            await self._origin.put_bytes(
                f"{manifest.name}/{manifest.root_hex}.manifest", manifest.encode()
            )
            await self._origin.put_bytes(f"{manifest.name}/latest", manifest.root_hex.encode())
        except OriginUnsupportedError as exc:
            raise CatalogError(f"catalog {self.url} is read-only: {exc}") from exc
        return manifest.ref

    async def resolve(self, ref: str) -> str:
        """The full hex root that ``NAME``, ``NAME@ROOT`` or ``NAME@PREFIX`` names."""
        name, root = parse_ref(ref)
        if root is None:
            try:
                latest = (await self._origin.get_bytes(f"{name}/latest")).decode().strip()
            except OriginNotFoundError as exc:
                raise CatalogError(
                    f"{name!r} is not in catalog {self.url} (was it published?)"
                ) from exc
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
        """The manifest that ``ref`` names, checked against its root."""
        name, _ = parse_ref(ref)
        root = await self.resolve(ref)
        try:
            data = await self._origin.get_bytes(f"{name}/{root}.manifest")
        except OriginNotFoundError as exc:
            raise CatalogError(f"version {root} of {name!r} is not in catalog {self.url}") from exc
        try:
            manifest = Manifest.decode(data)
        except ManifestError as exc:
            raise CatalogError(f"catalog entry {name}@{root} is damaged: {exc}") from exc
        if manifest.root_hex != root or manifest.name != name:
            raise CatalogError(
                f"catalog entry {name}@{root} holds a different manifest ({manifest.ref})"
            )
        return manifest
