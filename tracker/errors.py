"""Errors raised by the tracker.

::

    SwarmError                    (swarm.errors)
    └── TrackerError              the tracker could not be reached or refused a request
        └── BadAnnounceError      an announce carried an invalid field (which one is in
                                  the message); the tracker answers 400 and keeps going
"""

from __future__ import annotations

from swarm.errors import TrackerError

__all__ = ["BadAnnounceError", "TrackerError"]


class BadAnnounceError(TrackerError):
    """An announce was malformed: bad peer id, address, bitfield, piece or byte count."""
