"""Preheating: which node agents should fetch which versions before a rollout.

``swarm warm NAME --min-copies K`` (or ``--all-nodes``) files a request with the
tracker; node agents poll the tracker every few seconds with what they hold (every
version in their cache, and which of those are verified), and the answer to a
poll names the versions that agent should fetch now. The tracker picks agents
that lack the version until enough hold it or are on their way to it: it counts
an agent as on its way from the poll that asked it until that agent's polls show
the version (or ``assign_ttl`` passes, say the agent died), so a version is never
asked of many more agents than wanted. ``--all-nodes`` wants every live agent.
``swarm warm`` returns when ``status`` counts enough verified copies among live
agents.

This is policy only: no I/O, time passed in. Memory is bounded by the number of
live agents (each polled within ``agent_ttl``), the versions each reports (at most
``MAX_HOLDS``) and the requests (at most ``MAX_REQUESTS``, each kept ``request_ttl``
after it was last made).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

MAX_REQUESTS: Final = 1024
MAX_HOLDS: Final = 4096  # versions one agent may report holding
ALL: Final = -1  # copies wanted: every live agent


class WarmError(ValueError):
    """A request or poll the book refuses (malformed, or too many)."""


@dataclass
class _Request:
    ref: str
    copies: int  # ALL for every live agent
    made: float
    asked: dict[str, float] = field(default_factory=dict)  # agent -> when it was asked


@dataclass
class _Agent:
    seen: float
    holds: frozenset[str]
    complete: frozenset[str]


class WarmBook:
    """Warm requests by root, and the agents that poll for them."""

    def __init__(
        self,
        *,
        agent_ttl: float = 30.0,
        assign_ttl: float = 60.0,
        request_ttl: float = 3600.0,
    ) -> None:
        self.agent_ttl = agent_ttl
        self.assign_ttl = assign_ttl
        self.request_ttl = request_ttl
        self._requests: OrderedDict[str, _Request] = OrderedDict()
        self._agents: OrderedDict[str, _Agent] = OrderedDict()  # least recently seen first
        # Live agents by the versions they hold and have verified: a poll costs what
        # it changes, not the number of agents.
        self._holders: dict[str, set[str]] = {}
        self._verified: dict[str, set[str]] = {}

    def request(self, root: str, ref: str, copies: int, now: float) -> None:
        """Want ``copies`` verified copies of ``root`` (``ALL``: on every live agent)."""
        if copies != ALL and copies < 1:
            raise WarmError(f"copies must be at least 1, got {copies}")
        self._expire(now)
        known = self._requests.get(root)
        if known is None:
            if len(self._requests) >= MAX_REQUESTS:
                raise WarmError(f"more than {MAX_REQUESTS} warm requests at once")
            self._requests[root] = _Request(ref, copies, now)
            return
        known.copies = ALL if ALL in (copies, known.copies) else max(copies, known.copies)
        known.made = now
        self._requests.move_to_end(root)

    def poll(self, agent: str, holds: set[str], complete: set[str], now: float) -> list[str]:
        """``agent`` holds ``holds`` (``complete``: verified); the refs it should fetch."""
        if len(holds) > MAX_HOLDS or not complete <= holds:
            raise WarmError("a poll must list at most MAX_HOLDS versions, complete ones among them")
        self._forget(agent)
        info = self._agents[agent] = _Agent(now, frozenset(holds), frozenset(complete))
        for root in info.holds:
            self._holders.setdefault(root, set()).add(agent)
        for root in info.complete:
            self._verified.setdefault(root, set()).add(agent)
        self._expire(now)
        wanted: list[str] = []
        live = len(self._agents)
        for root, req in self._requests.items():
            for gone in [a for a, at in req.asked.items() if now - at >= self.assign_ttl]:
                del req.asked[gone]  # asked and never came: someone else may be asked
            if root in holds:
                req.asked.pop(agent, None)
                continue
            if agent in req.asked:
                continue  # asked already: it has not reported the version yet
            target = live if req.copies == ALL else req.copies
            holding = self._holders.get(root, ())
            on_way = sum(1 for a in req.asked if a not in holding)
            if len(holding) + on_way < target:
                req.asked[agent] = now
                wanted.append(req.ref)
        return wanted

    def _forget(self, agent: str) -> None:
        info = self._agents.pop(agent, None)
        if info is None:
            return
        for index, roots in ((self._holders, info.holds), (self._verified, info.complete)):
            for root in roots:
                agents = index.get(root)
                if agents is not None:
                    agents.discard(agent)
                    if not agents:
                        del index[root]

    def status(self, root: str, now: float) -> dict[str, object] | None:
        """Copies of ``root`` wanted, held, and verified among live agents; None if unknown."""
        self._expire(now)
        req = self._requests.get(root)
        if req is None:
            return None
        live = len(self._agents)
        return {
            "ref": req.ref,
            "wanted": live if req.copies == ALL else req.copies,
            "all_nodes": req.copies == ALL,
            "agents": live,
            "holding": len(self._holders.get(root, ())),
            "verified": len(self._verified.get(root, ())),
        }

    def _expire(self, now: float) -> None:
        while self._agents:
            agent, info = next(iter(self._agents.items()))
            if now - info.seen < self.agent_ttl:
                break
            self._forget(agent)
        while self._requests:
            root, req = next(iter(self._requests.items()))
            if now - req.made < self.request_ttl:
                break
            del self._requests[root]
