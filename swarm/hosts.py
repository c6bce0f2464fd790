"""Host names and addresses that come from other nodes.

A peer's advertised host travels from its announce, through the tracker, into
every other peer's dialer, logs and the status page; each of them must be able to
trust it to be an address and nothing more.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

_DNS_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def valid_host(host: str) -> bool:
    """Whether ``host`` is an IP address or a DNS name a peer can be dialed at.

    Anything else, from a stranger's announce, must never reach a peer: a name the
    resolver chokes on (a 64-character label, ``a..b``) raised out of the dialer, and
    control or bidi characters would forge log lines and status-page addresses.
    """
    if not isinstance(host, str) or not 0 < len(host) <= 253 or not host.isascii():
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return all(_DNS_LABEL.fullmatch(label) for label in host.removesuffix(".").split("."))
