"""Errors raised by the swarm core.

Every error the project raises on purpose derives from :class:`SwarmError`, so the
CLI can print its message and exit non-zero instead of a traceback::

    SwarmError
    ├── ConfigError            a flag, size or environment value is unusable
    ├── ManifestError          a manifest is malformed, hostile or inconsistent
    ├── CatalogError           a name or version is not in the catalog
    ├── StoreError             the destination can't be written
    │   └── DiskFullError      ... because the disk is full
    ├── VerificationError      a piece's blake3 digest does not match the manifest
    ├── ProtocolError          the peer wire protocol was violated
    │   ├── LocalProtocolError   ... by us (a bug: we tried to send something invalid)
    │   └── RemoteProtocolError  ... by the remote peer (drop that peer, never the process)
    ├── OriginError            see ``seeder.errors``
    └── TrackerError           see ``tracker.errors``
        └── UnknownArtifactError   the tracker does not know that name or version (404)
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base of every error swarm raises on purpose; its message is for the operator."""


class ConfigError(SwarmError):
    """A flag, size or environment value is unusable."""


class ManifestError(SwarmError):
    """A manifest is malformed, hostile or inconsistent."""


class CatalogError(SwarmError):
    """A name or version is not in the catalog, or the catalog can't be read."""


class StoreError(SwarmError):
    """The destination directory can't be written or read back."""


class DiskFullError(StoreError):
    """The destination's file system has no room left."""


class VerificationError(SwarmError):
    """A piece's blake3 digest does not match the manifest."""

    def __init__(self, message: str, *, piece: int) -> None:
        super().__init__(message)
        self.piece = piece


class ProtocolError(SwarmError):
    """The peer wire protocol was violated."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The remote peer sent something the protocol does not allow: drop that peer."""


class OriginError(SwarmError):
    """Reading from or writing to the origin failed (subclasses in ``seeder.errors``)."""


class TrackerError(SwarmError):
    """The tracker could not be reached or refused a request."""


class UnknownArtifactError(TrackerError):
    """The tracker answered that the catalog has no such name or version: retrying won't help."""
