"""The cluster token: proving knowledge of a shared secret without sending it.

Every tracker, peer and fetch of one cluster is given the same token
(``--token-file PATH`` or ``SWARM_TOKEN``). Nothing carries the token itself on
the wire: each side proves knowledge of it with an HMAC-SHA256 over fresh,
random material (a challenge the other side chose, or a timestamp and nonce the
receiver checks for freshness), so a captured message proves nothing about any
other exchange.

Keys are derived per purpose (``announce``, ``reply``, ``peer-dial``, ...), so a
MAC made for one kind of message can never be replayed as another, and the parts
a MAC covers are length-prefixed, so no two different part lists hash alike.

Without a token the cluster is *open*: :attr:`ClusterKey.open` is true, MACs are
still computed (with an empty key) so that the message flow is the same, but the
receiving side accepts them without checking. An open cluster is for trusted
networks only; the tracker says so once when it starts.

Pure: no I/O but reading the token file in :meth:`ClusterKey.load`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Final

from core.errors import ConfigError

TOKEN_ENV: Final = "SWARM_TOKEN"
MIN_TOKEN_LENGTH: Final = 16
MAC_SIZE: Final = 32
NONCE_SIZE: Final = 16

_LABEL: Final = b"swarm cluster token v1 "


def new_nonce() -> bytes:
    """Fresh random bytes for a challenge or an announce (from the OS's CSPRNG)."""
    return secrets.token_bytes(NONCE_SIZE)


class ClusterKey:
    """The cluster token, or its absence (an open cluster)."""

    __slots__ = ("_keys", "_token")

    def __init__(self, token: bytes | None) -> None:
        if token is not None and len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"the cluster token must be at least {MIN_TOKEN_LENGTH} bytes long, "
                f"got {len(token)} (make one with: head -c 32 /dev/urandom | base64)"
            )
        self._token = token or b""
        self._keys: dict[bytes, bytes] = {}

    @classmethod
    def load(cls, token_file: str | os.PathLike[str] | None = None) -> ClusterKey:
        """The token from ``token_file`` if given, else from ``SWARM_TOKEN``, else open.

        Surrounding whitespace (a trailing newline in a mounted Secret) is ignored.
        """
        if token_file:
            path = Path(token_file)
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"can't read the token file {path}: {exc.strerror or exc}"
                ) from exc
            token = raw.strip()
            if not token:
                raise ConfigError(f"the token file {path} is empty")
            return cls(token)
        env = os.environ.get(TOKEN_ENV, "").strip()
        return cls(env.encode()) if env else cls(None)

    @property
    def open(self) -> bool:
        """No token: every MAC is accepted (a trusted network only)."""
        return not self._token

    def _key(self, purpose: bytes) -> bytes:
        key = self._keys.get(purpose)
        if key is None:
            key = self._keys[purpose] = hmac.digest(self._token, _LABEL + purpose, hashlib.sha256)
        return key

    def mac(self, purpose: bytes, *parts: bytes) -> bytes:
        """HMAC-SHA256 of ``parts`` (length-prefixed) under the key for ``purpose``."""
        h = hmac.new(self._key(purpose), digestmod=hashlib.sha256)
        for part in parts:
            h.update(len(part).to_bytes(4, "big"))
            h.update(part)
        return h.digest()

    def check(self, mac: bytes, purpose: bytes, *parts: bytes) -> bool:
        """Whether ``mac`` proves the token for ``parts``; always true when open."""
        if self.open:
            return True
        return hmac.compare_digest(mac, self.mac(purpose, *parts))

    def __repr__(self) -> str:  # never show the token
        return "ClusterKey(open)" if self.open else "ClusterKey(<token>)"
