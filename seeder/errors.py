"""Errors from origins (object stores, HTTP servers, local paths).

Library exceptions (botocore, google-api-core, aiohttp, OSError) are translated into
these at the backend edge with ``raise ... from exc``::

    core.errors.OriginError
    ├── OriginTransientError     429/5xx/SlowDown/reset/timeout: retry with backoff
    ├── RetryBudgetExceeded      transient failures went on past the retry budget
    ├── OriginNotFoundError      404 / no such bucket, key or path: fail fast
    ├── OriginPermissionError    401/403 / bad credentials: fail fast
    └── OriginUnsupportedError   the backend can't do this (e.g. list over HTTP)
"""

from __future__ import annotations

from core.errors import OriginError


class OriginTransientError(OriginError):
    """A failure worth retrying; ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RetryBudgetExceeded(OriginError):
    """Transient failures went on past the retry budget."""


class OriginNotFoundError(OriginError):
    """The object, bucket or path does not exist."""


class OriginPermissionError(OriginError):
    """Access was denied or the credentials are wrong."""


class OriginUnsupportedError(OriginError):
    """The backend can't perform this operation."""


__all__ = [
    "OriginError",
    "OriginNotFoundError",
    "OriginPermissionError",
    "OriginTransientError",
    "OriginUnsupportedError",
    "RetryBudgetExceeded",
]
