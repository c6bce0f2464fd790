"""AWS Signature Version 4 for S3 GETs and HEADs, and when the environment allows signing here.

A ``swarm fetch`` reads its origin with ranged GETs and nothing else. Through boto3
that costs every process 0.17 CPU-s before its first byte (importing boto3 0.09,
building the client from its service model 0.08; measured with ``time.process_time``
around each step), and a burst starts one process per node at once: on the shaped
testbed's 2-core host, eight of them put the first origin byte 1.9 s after launch.
When the environment names an S3-compatible endpoint and static keys, the same GET
is signed here (HMAC-SHA256, the standard library) and sent with ``http.client``
(``seeder.backends.keepalive``). Anything else (profiles, instance or web-identity roles, AWS
itself with its region redirects) stays with boto3's full credential chain.

Pure: no I/O, the time is an argument.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
"""The payload hash of a request without a body, which every S3 server accepts for a GET."""
DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True, slots=True)
class StaticKeys:
    access_key: str
    secret_key: str
    session_token: str | None = None

    def __repr__(self) -> str:  # never print the secret
        return f"StaticKeys(access_key={self.access_key!r}, secret_key=***)"


@dataclass(frozen=True, slots=True)
class SignedEndpoint:
    """An S3-compatible endpoint addressed path-style, with the keys to sign for it."""

    endpoint: str  # scheme://host[:port][/base], no trailing slash
    region: str
    keys: StaticKeys

    def object_url(self, bucket: str, key: str) -> str:
        """The path-style URL of ``key`` in ``bucket``, percent-encoded as it is signed."""
        return f"{self.endpoint}{canonical_path(bucket, key)}"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _proxied(env: Mapping[str, str], scheme: str, host: str) -> bool:
    """Whether ``HTTP(S)_PROXY`` (and ``NO_PROXY``) send requests to ``host`` via a proxy."""
    names = (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY")
    if not any(env.get(name) for name in names):
        return False
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        entry = entry.split(":")[0] if entry.count(":") == 1 else entry
        if entry == "*" or (
            entry and (host == entry.lstrip(".") or host.endswith("." + entry.lstrip(".")))
        ):
            return False
    return True


def signed_endpoint_from_env(
    env: Mapping[str, str], *, shared_config: bool = False
) -> SignedEndpoint | None:
    """The endpoint to sign for ourselves, or None where boto3 must decide.

    Taken as boto3 (botocore 1.44) takes them: ``AWS_ENDPOINT_URL_S3`` before
    ``AWS_ENDPOINT_URL``, keys from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
    ``AWS_SESSION_TOKEN`` (the first source in its chain), the region from
    ``AWS_DEFAULT_REGION`` (else us-east-1). None, leaving everything to boto3, without
    an endpoint or both keys; with ``SWARM_S3_BOTO3=1`` or
    ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS``; when a shared config file exists
    (``shared_config``: it may set the region, addressing or certificates) or a
    profile is named; with ``AWS_REGION`` unlike ``AWS_DEFAULT_REGION`` or
    ``AWS_SECURITY_TOKEN`` (read differently by botocore versions); and when a proxy
    variable applies to the endpoint. ``AWS_CA_BUNDLE`` is the caller's to honour.
    """
    if _truthy(env.get("SWARM_S3_BOTO3")) or _truthy(
        env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
    ):
        return None
    if shared_config or env.get("AWS_PROFILE") or env.get("AWS_SECURITY_TOKEN"):
        return None
    endpoint = (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or "").strip()
    access_key = env.get("AWS_ACCESS_KEY_ID", "")
    secret_key = env.get("AWS_SECRET_ACCESS_KEY", "")
    if not endpoint or not access_key or not secret_key:
        return None
    parts = urlsplit(endpoint)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None  # boto3 reports a malformed endpoint better than we would
    if parts.query or parts.fragment or parts.username or parts.password:
        return None
    if _proxied(env, scheme, parts.hostname.lower()):
        return None
    region = env.get("AWS_DEFAULT_REGION", "").strip() or DEFAULT_REGION
    if env.get("AWS_REGION", "").strip() not in ("", region):
        return None
    token = env.get("AWS_SESSION_TOKEN") or None
    return SignedEndpoint(endpoint.rstrip("/"), region, StaticKeys(access_key, secret_key, token))


def canonical_path(bucket: str, key: str) -> str:
    """``/bucket/key`` with every byte but RFC 3986's unreserved ones and ``/`` encoded.

    S3 signs the path as sent and does not normalise it, so this one string is both
    what is signed and what goes on the wire.
    """
    return quote(f"/{bucket}/{key}", safe="/~")


def host_header(url: str) -> str:
    """The Host header a client sends for ``url``: the port only when not the default."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = parts.port
    default = 443 if parts.scheme.lower() == "https" else 80
    return host if port is None or port == default else f"{host}:{port}"


class Signer:
    """Signs GETs for one endpoint's keys, region and the ``s3`` service."""

    def __init__(self, endpoint: SignedEndpoint) -> None:
        self.endpoint = endpoint
        self._cached: tuple[str, bytes] = ("", b"")  # (day, key): one object, for threads

    def _signing_key(self, day: str) -> bytes:
        cached_day, key = self._cached
        if cached_day != day:
            secret = ("AWS4" + self.endpoint.keys.secret_key).encode()
            key = hmac.digest(secret, day.encode(), "sha256")
            key = hmac.digest(key, self.endpoint.region.encode(), "sha256")
            key = hmac.digest(key, b"s3", "sha256")
            key = hmac.digest(key, b"aws4_request", "sha256")
            self._cached = (day, key)
        return key

    def headers(self, method: str, url: str, now: dt.datetime) -> dict[str, str]:
        """The headers that sign a bodiless ``method`` (GET, HEAD) of ``url`` at ``now``.

        ``url`` is path-style and already encoded (``SignedEndpoint.object_url``); no
        query string.
        """
        parts = urlsplit(url)
        if parts.query:
            raise ValueError(f"signing a request with a query string is not supported: {url!r}")
        stamp = now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        headers = {
            "host": host_header(url),
            "x-amz-content-sha256": EMPTY_SHA256,
            "x-amz-date": stamp,
        }
        token = self.endpoint.keys.session_token
        if token:
            headers["x-amz-security-token"] = token
        names = sorted(headers)
        canonical = "\n".join(
            [
                method,
                parts.path or "/",
                "",
                *(f"{name}:{headers[name].strip()}" for name in names),
                "",
                ";".join(names),
                EMPTY_SHA256,
            ]
        )
        scope = f"{day}/{self.endpoint.region}/s3/aws4_request"
        to_sign = "\n".join(
            [ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        signature = hmac.new(self._signing_key(day), to_sign.encode(), "sha256").hexdigest()
        headers["authorization"] = (
            f"{ALGORITHM} Credential={self.endpoint.keys.access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )
        return headers
