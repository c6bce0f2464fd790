"""The tracker's status page: ``GET /`` and the JSON it polls, ``GET /status.json``.

The page (``tracker/static/``: one HTML file, one script, one style sheet, nothing
from any other host, since a cluster often has no internet) shows every swarm:
its artifact name and root, peers and finished peers, pieces present, piece
availability as a strip of cells, origin bytes ÷ F, and rates it computes itself
from successive polls. It polls ``status.json`` every two seconds.

Why these paths are open when the cluster has a token: a browser can't sign a
request with the cluster token, so ``/v1/swarms`` is out of its reach. Operators
reach the tracker's HTTP port through their own ingress and its authentication,
as they do ``/healthz`` and ``/metrics``. What is shown is names, roots, counts
and peer addresses; never a manifest (file names, digests, origin URL), and
nothing that lets a reader join a swarm.

The JSON is bounded whatever the cluster's size: at most ``max_swarms`` swarms
(those with peers first), ``max_peers`` peers per swarm (the least advanced
first: the ones an operator looks for), and ``max_cells`` availability cells per
swarm (each cell the lowest availability of the pieces it covers, so a missing
piece is never averaged away). One snapshot is built at most every
``min_interval`` seconds, however many pages poll.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

from aiohttp import web

from core.manifest import Manifest
from tracker.registry import SwarmRegistry

__all__ = ["OPEN_PATHS", "StatusLimits", "StatusPage", "availability_cells", "swarm_snapshot"]

STATUS_JSON: Final = "/status.json"
_ASSETS: Final = {
    "status.js": "text/javascript",
    "status.css": "text/css",
}
OPEN_PATHS: Final = frozenset({"/", STATUS_JSON, *(f"/static/{name}" for name in _ASSETS)})
"""Paths readable without the cluster token (see the module docstring)."""

_SECURITY_HEADERS: Final = {
    # Everything comes from the tracker itself: no inline script, no other host.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class StatusLimits:
    """Bounds of one ``status.json`` answer."""

    max_swarms: int = 32
    max_peers: int = 50
    max_cells: int = 2048
    min_interval: float = 1.0
    """Seconds one snapshot is reused for: many open pages cost one build."""

    def __post_init__(self) -> None:
        if self.max_swarms < 1 or self.max_peers < 0 or self.max_cells < 1:
            raise ValueError(f"status page limits must be positive, got {self}")


def availability_cells(avail: list[int], max_cells: int) -> list[int]:
    """``avail`` (live holders per piece) in at most ``max_cells`` cells.

    Cell ``i`` covers pieces ``[i*P//C, (i+1)*P//C)`` and holds their lowest
    availability, so one missing piece shows as a missing cell.
    """
    pieces = len(avail)
    cells = min(pieces, max_cells)
    if cells == pieces:
        return list(avail)
    return [min(avail[i * pieces // cells : (i + 1) * pieces // cells]) for i in range(cells)]


def swarm_snapshot(
    manifest: Manifest, registry: SwarmRegistry, now: float, limits: StatusLimits
) -> dict[str, Any]:
    """One swarm as the page shows it; ``now`` is the registry's (monotonic) clock."""
    lengths = manifest.piece_lengths
    avail = [registry.availability(piece) for piece in range(registry.num_pieces)]
    status = registry.status()
    origin = status["origin"]
    stats = registry.assignment.stats
    size = manifest.total_size
    peers = sorted(status["peer_list"], key=lambda p: (p["finished"], p["have"], p["peer_id"]))
    return {
        "root": manifest.root_hex,
        "name": manifest.name,
        "size": size,
        "piece_size": manifest.piece_size,
        "pieces": registry.num_pieces,
        "present_pieces": status["present_pieces"],
        "peers": status["peers"],
        "finished_peers": status["finished_peers"],
        "complete": status["swarm_complete"],
        # Bytes verified at live peers, summed: its growth is what the swarm receives.
        "held_bytes": sum(a * n for a, n in zip(avail, lengths, strict=True)),
        "barred": len(status["barred"]),
        "origin": {
            "bytes": stats.pulled_bytes,
            "ratio": stats.pulled_bytes / size if size else 0.0,
            "pieces": sum(stats.pulled.values()),
            "in_flight": origin["in_flight"],
            "unassigned": origin["unassigned"],
            "budget": origin["budget"],
            "reassigned": origin["reassigned"],
        },
        "availability": {
            "cells": availability_cells(avail, limits.max_cells),
            "min": status["availability"]["min"],
            "max": status["availability"]["max"],
            "missing": status["availability"]["missing"],
        },
        "peer_list": [
            {
                "peer_id": p["peer_id"],
                "host": p["host"],
                "port": p["port"],
                "have": p["have"],
                "finished": p["finished"],
                "seen_seconds_ago": round(max(0.0, now - p["last_seen"]), 1),
                "pulling": len(p["assigned"]),
                "pulled": p["pulled"],
            }
            for p in peers[: limits.max_peers]
        ],
    }


class StatusPage:
    """Serves the page, its assets and ``status.json`` from a view of the tracker.

    ``swarms`` yields each swarm's manifest and registry; ``summary`` gives a few
    tracker-wide figures (announces, open or not). ``clock`` is the registries'
    monotonic clock.
    """

    def __init__(
        self,
        swarms: Callable[[], Iterable[tuple[Manifest, SwarmRegistry]]],
        summary: Callable[[], Mapping[str, Any]],
        *,
        limits: StatusLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._swarms = swarms
        self._summary = summary
        self.limits = limits or StatusLimits()
        self._clock = clock
        self._started = clock()
        self._cached: tuple[float, bytes] | None = None
        static = resources.files("tracker") / "static"
        self._index = (static / "index.html").read_bytes()
        self._assets = {name: (static / name).read_bytes() for name in _ASSETS}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.index)
        app.router.add_get(STATUS_JSON, self.data)
        app.router.add_get("/static/{name}", self.asset)

    def snapshot(self) -> dict[str, Any]:
        """What ``status.json`` answers now (see the module docstring for its bounds)."""
        now = self._clock()
        everything = list(self._swarms())
        # Swarms with peers first, busiest first; then by name, so the order is stable.
        everything.sort(key=lambda s: (-s[1].num_peers, s[0].name, s[0].root_hex))
        shown = everything[: self.limits.max_swarms]
        return {
            "uptime_seconds": round(now - self._started, 3),
            **self._summary(),
            "swarms_total": len(everything),
            "limits": {
                "max_swarms": self.limits.max_swarms,
                "max_peers": self.limits.max_peers,
                "max_cells": self.limits.max_cells,
            },
            "swarms": [swarm_snapshot(m, r, now, self.limits) for m, r in shown],
        }

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._index, content_type="text/html", charset="utf-8", headers=_SECURITY_HEADERS
        )

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = self._assets.get(name)
        if body is None:
            raise web.HTTPNotFound(text=f"no asset {name!r}\n")
        return web.Response(
            body=body, content_type=_ASSETS[name], charset="utf-8", headers=_SECURITY_HEADERS
        )

    async def data(self, request: web.Request) -> web.Response:
        now = self._clock()
        if self._cached is None or now - self._cached[0] >= self.limits.min_interval:
            body = json.dumps(self.snapshot(), separators=(",", ":")).encode()
            self._cached = (now, body)
        return web.Response(
            body=self._cached[1],
            content_type="application/json",
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )
