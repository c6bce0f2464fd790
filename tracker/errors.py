"""Errors raised by the tracker.

::

    SwarmError                    (core.errors)
    └── TrackerError              the tracker could not be reached or refused a request
        ├── BadAnnounceError      an announce carried an invalid field (which one is in
        │                         the message); the tracker answers 400 and keeps going
        └── UnauthenticatedError  an announce or request did not prove the cluster token,
                                  was stale or replayed, or spoke for another host's peer
                                  id; answered 401 over HTTP and not at all over UDP
"""

from __future__ import annotations

from core.errors import TrackerError

__all__ = ["BadAnnounceError", "TrackerError", "UnauthenticatedError"]


class BadAnnounceError(TrackerError):
    """An announce was malformed: bad peer id, address, bitfield, piece or byte count."""


class UnauthenticatedError(TrackerError):
    """An announce or request was refused by the tracker's authentication; ``kind`` says why."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind
