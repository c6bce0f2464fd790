"""Errors raised by the benchmarks::

SwarmError                 see ``core.errors``
└── BenchmarkError         a benchmark run failed: a process exited non-zero, timed out,
    │                      or reported an unverified result
    └── TestbedUnavailableError
                           this machine can't build the shaped testbed (not root, no
                           ``ip``/``tc``, no network namespaces): the scenarios are skipped
"""

from __future__ import annotations

from core.errors import SwarmError


class BenchmarkError(SwarmError):
    """A benchmark run failed; the message says which system, node and step."""


class TestbedUnavailableError(BenchmarkError):
    """The shaped testbed can't be built here; the message says what is missing."""

    __test__ = False  # not a pytest test class, despite the name
