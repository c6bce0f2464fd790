"""Pieces the HTTP-speaking backends share: status classes, Retry-After, Content-Range."""

from __future__ import annotations

import email.utils
import re

from seeder.errors import OriginError, OriginTransientError

# The origin asked us to slow down: the reader counts these as throttled.
THROTTLE_STATUSES = frozenset({429, 503})
# Worth another try after a pause.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# S3 error codes that mean "slow down" or "try again", whatever the status.
S3_THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
)
S3_TRANSIENT_CODES = S3_THROTTLE_CODES | frozenset(
    {"InternalError", "ServiceUnavailable", "RequestTimeout"}
)

# One request's connect and between-bytes timeouts, in seconds.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
# Blocking readers fill the caller's buffer this much at a time, so bytes are counted
# as they arrive and a cancelled read stops touching the buffer soon.
READ_CHUNK = 1024 * 1024


class OriginThrottledError(OriginTransientError):
    """The origin answered 429, 503 or SlowDown: it wants fewer requests."""


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date).

    ``now`` is the current Unix time, used only for the HTTP-date form. Unparseable
    values give ``None``; dates in the past give 0.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - now)
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return min(seconds, 86400.0)


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def parse_content_range(value: str) -> tuple[int, int, int | None] | None:
    """``bytes START-END/TOTAL`` → (start, end inclusive, total or None); None if malformed."""
    m = _CONTENT_RANGE.match(value)
    if m is None:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


def range_header(offset: int, length: int) -> str:
    """The ``Range`` header for ``length`` (> 0) bytes from ``offset``."""
    return f"bytes={offset}-{offset + length - 1}"


def check_range_reply(
    what: str,
    status: int,
    content_range: str | None,
    content_length: int | None,
    offset: int,
    length: int,
) -> None:
    """Refuse a reply to a ranged GET that would not fill exactly the bytes asked for.

    206 is the normal answer. 200 is accepted when its Content-Range names exactly the
    range (``rclone serve s3`` answers that way), or when it carries no Content-Range
    but is the whole object and the whole object is what was asked for.
    """
    if content_range is not None:
        parsed = parse_content_range(content_range)
        if parsed is None:
            raise OriginError(f"{what}: malformed Content-Range {content_range!r}")
        start, end, _total = parsed
        if start != offset or end != offset + length - 1:
            raise OriginError(
                f"{what}: asked for bytes {offset}-{offset + length - 1}, "
                f"server sent {start}-{end} (Content-Range {content_range!r})"
            )
    elif not (status == 200 and offset == 0 and content_length == length):
        raise OriginError(
            f"{what}: server ignored the Range request for bytes {offset}-{offset + length - 1} "
            f"(status {status}, no Content-Range)"
        )
    if content_length is not None and content_length != length:
        raise OriginError(
            f"{what}: asked for {length} bytes, reply declares Content-Length {content_length}"
        )


def transient_for_status(
    what: str, status: int, detail: str, retry_after: float | None
) -> OriginTransientError:
    """The transient error for a retryable status; throttled for 429 and 503."""
    message = f"{what}: {detail} (HTTP {status})"
    if retry_after is not None:
        message += f", Retry-After {retry_after:g} s"
    if status in THROTTLE_STATUSES:
        return OriginThrottledError(message, retry_after=retry_after)
    return OriginTransientError(message, retry_after=retry_after)
