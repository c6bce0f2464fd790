"""A shaped multi-host testbed built from Linux network namespaces on one machine.

Layout (addresses only inside 10.77.0.0/24, which exists only in the namespaces
this module creates)::

                      bridge namespace  <tag>-br  (br0, 10.77.0.254: tracker)
            ┌───────────────┬───────────┴──┬──────────────┐
      port po (htb: ↓)  port p1 (htb: ↓d)  port p2 ...   port pN
            │               │              │              │
      <tag>-origin      <tag>-n1       <tag>-n2   ...  <tag>-nN
      eth0 10.77.0.1    eth0 10.77.0.11 eth0 10.77.0.12   eth0 10.77.0.(10+N)
      (tbf: ↑u_s)       (tbf: ↑u)       (tbf: ↑u)         (tbf: ↑u)

A namespace's upload is shaped with ``tbf`` on its own ``eth0``; its download with
``htb`` on its bridge-side port. This kernel has no netem, so links have no added
delay or loss. Byte counters come from each interface (``ip -s -j link show``).

With ``Shape.zones`` (a zone name per node), each node's port splits its download
class in two under one parent that holds the rate: frames from nodes of another
zone (a ``u32`` match on the source address) go to class ``1:20``, the rest to
``1:10``. The rate limit is the parent's, so the link is shaped as without zones;
the class counters tell the bytes each node received across zones
(:meth:`Testbed.cross_zone_rx_bytes`). ``Shape.cross_zone_down_bps`` caps class
``1:20``: each node's share of an oversubscribed uplink between the zones (a
node-by-node approximation of one shared uplink). This kernel has no tc actions, ``flower``
or iptables, so classes are the counters to hand.

:class:`Testbed` is a context manager: it builds everything on entry and tears
everything down on exit, also when the run inside fails or is interrupted. It
remembers every process it started and, before deleting the namespaces, ends any
process still living in them (they can only have been started by this testbed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from benchmarks.errors import BenchmarkError, TestbedUnavailableError

log = logging.getLogger("benchmarks.testbed")

SUBNET_PREFIX = "10.77.0"
PREFIX_LEN = 24
ORIGIN_ADDR = f"{SUBNET_PREFIX}.1"
BRIDGE_ADDR = f"{SUBNET_PREFIX}.254"
MAX_NODES = 200  # node i is 10.77.0.(10+i); .254 is the bridge
DEV = "eth0"

StdStream = int | IO[Any] | None


def node_addr(index: int) -> str:
    """The address of node ``index`` (1-based)."""
    if not 1 <= index <= MAX_NODES:
        raise ValueError(f"node index {index} out of range 1..{MAX_NODES}")
    return f"{SUBNET_PREFIX}.{10 + index}"


@dataclass(frozen=True)
class Shape:
    """Link rates of one testbed, in bits per second (``None``: not shaped)."""

    nodes: int
    node_up_bps: int
    node_down_bps: int
    origin_up_bps: int
    origin_down_bps: int | None = None
    mtu: int = 1500
    zones: tuple[str, ...] = ()  # the zone of each node, in node order; () for none
    # With zones: the most a node receives from other zones (its share of an
    # oversubscribed uplink); None: as fast as its link.
    cross_zone_down_bps: int | None = None
    # Per node, in node order, (up, down) rates that replace node_up_bps and
    # node_down_bps for that node; () for a fleet whose links are all alike.
    node_links: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"nodes must be 1..{MAX_NODES}, got {self.nodes}")
        if self.zones and len(self.zones) != self.nodes:
            raise ValueError(f"zones names {len(self.zones)} nodes, the shape has {self.nodes}")
        if self.cross_zone_down_bps is not None and not (
            self.zones and 0 < self.cross_zone_down_bps <= self.node_down_bps
        ):
            raise ValueError("cross_zone_down_bps needs zones and must be in (0, node_down_bps]")
        for name in ("node_up_bps", "node_down_bps", "origin_up_bps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.origin_down_bps is not None and self.origin_down_bps <= 0:
            raise ValueError("origin_down_bps must be positive or None")
        if self.node_links and len(self.node_links) != self.nodes:
            raise ValueError(f"node_links names {len(self.node_links)} nodes, not {self.nodes}")
        if any(min(link) <= 0 for link in self.node_links):
            raise ValueError("node_links rates must be positive")

    def up_bps(self, index: int) -> int:
        """Node ``index``'s (1-based) upload rate."""
        return self.node_links[index - 1][0] if self.node_links else self.node_up_bps

    def down_bps(self, index: int) -> int:
        """Node ``index``'s (1-based) download rate."""
        return self.node_links[index - 1][1] if self.node_links else self.node_down_bps


@dataclass(frozen=True)
class LinkCounters:
    """Bytes through one interface, as the kernel counts them (frames, headers included)."""

    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int


def require_root() -> None:
    """Raise :class:`TestbedUnavailableError` unless this process can build namespaces."""
    if os.geteuid() != 0:
        raise TestbedUnavailableError(
            "the shaped testbed needs root (it creates network namespaces, veth pairs, "
            "a bridge and tc qdiscs); run `make bench` as root to include the scenarios"
        )
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise TestbedUnavailableError(
                f"the shaped testbed needs `{tool}` (iproute2) on PATH; install iproute2"
            )


def _rate(bps: int) -> str:
    return f"{bps}bit"


def _cmd(
    argv: Sequence[str],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env} if env else None
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False, env=full_env
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(
            f"testbed command timed out after {timeout:.0f} s: {' '.join(argv)}"
        ) from exc
    if check and proc.returncode != 0:
        raise BenchmarkError(
            f"testbed command failed ({proc.returncode}): {' '.join(argv)}: {proc.stderr.strip()}"
        )
    return proc


class Testbed:
    """Namespaces for an origin and ``shape.nodes`` nodes on one shaped bridge."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, shape: Shape, *, tag: str | None = None) -> None:
        self.shape = shape
        self.tag = tag or f"sb{os.getpid()}"
        self.bridge_ns = f"{self.tag}-br"
        self.origin_ns = f"{self.tag}-origin"
        self.node_ns = [f"{self.tag}-n{i}" for i in range(1, shape.nodes + 1)]
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    # --- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> Testbed:
        require_root()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def namespaces(self) -> list[str]:
        return [self.bridge_ns, self.origin_ns, *self.node_ns]

    def _add_ns(self, name: str) -> None:
        existing = _cmd(["ip", "netns", "list"]).stdout.split()
        if name in existing:
            raise BenchmarkError(
                f"network namespace {name} already exists: a testbed with tag {self.tag!r} is "
                f"running or was left behind (remove it with `ip netns del {name}`)"
            )
        _cmd(["ip", "netns", "add", name])
        self._created.append(name)
        _cmd(["ip", "-n", name, "link", "set", "lo", "up"])

    def _build(self) -> None:
        s = self.shape
        self._add_ns(self.bridge_ns)
        br = self.bridge_ns
        _cmd(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        _cmd(["ip", "-n", br, "link", "set", "br0", "mtu", str(s.mtu)])
        _cmd(["ip", "-n", br, "addr", "add", f"{BRIDGE_ADDR}/{PREFIX_LEN}", "dev", "br0"])
        _cmd(["ip", "-n", br, "link", "set", "br0", "up"])
        self._add_host(self.origin_ns, "po", ORIGIN_ADDR, s.origin_up_bps, s.origin_down_bps)
        for i, ns in enumerate(self.node_ns, start=1):
            self._add_host(ns, f"p{i}", node_addr(i), s.up_bps(i), s.down_bps(i))
            if s.zones:
                self._split_cross_zone(i)

    def _add_host(
        self, ns: str, port: str, addr: str, up_bps: int | None, down_bps: int | None
    ) -> None:
        br = self.bridge_ns
        self._add_ns(ns)
        _cmd(
            ["ip", "-n", ns, "link", "add", DEV, "type", "veth", "peer", "name", port, "netns", br]
        )
        for where, dev in ((ns, DEV), (br, port)):
            _cmd(["ip", "-n", where, "link", "set", dev, "mtu", str(self.shape.mtu)])
        _cmd(["ip", "-n", br, "link", "set", port, "master", "br0"])
        _cmd(["ip", "-n", br, "link", "set", port, "up"])
        _cmd(["ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", DEV])
        _cmd(["ip", "-n", ns, "link", "set", DEV, "up"])
        if up_bps is not None:
            # tbf on the namespace's own egress: its upload rate.
            _cmd(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    DEV,
                    "root",
                    "tbf",
                    "rate",
                    _rate(up_bps),
                    "burst",
                    "1mb",
                    "latency",
                    "50ms",
                ]
            )
        if down_bps is not None:
            # htb on the bridge-side port: what the bridge sends into the namespace.
            _cmd(
                [
                    "ip",
                    "netns",
                    "exec",
                    br,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    port,
                    "root",
                    "handle",
                    "1:",
                    "htb",
                    "default",
                    "10",
                ]
            )
            _cmd(
                [
                    "ip",
                    "netns",
                    "exec",
                    br,
                    "tc",
                    "class",
                    "add",
                    "dev",
                    port,
                    "parent",
                    "1:",
                    "classid",
                    "1:10",
                    "htb",
                    "rate",
                    _rate(down_bps),
                    "ceil",
                    _rate(down_bps),
                ]
            )

    def _split_cross_zone(self, index: int) -> None:
        """Give node ``index``'s port a class of its own for frames from other zones."""
        s = self.shape
        port = f"p{index}"
        down = s.down_bps(index)
        cross = s.cross_zone_down_bps

        def tc(args: str) -> None:
            _cmd(["ip", "netns", "exec", self.bridge_ns, "tc", *args.split()])

        tc(f"class del dev {port} classid 1:10")
        tc(f"class add dev {port} parent 1: classid 1:1 htb rate {down}bit ceil {down}bit")
        if cross is None:
            # Each child is guaranteed half and may borrow up to the whole link.
            local_rate, cross_rate, cross_ceil = down // 2, down // 2, down
        else:
            local_rate, cross_rate, cross_ceil = down - cross, cross, cross
        tc(
            f"class add dev {port} parent 1:1 classid 1:10 htb rate {max(1, local_rate)}bit "
            f"ceil {down}bit"
        )
        tc(
            f"class add dev {port} parent 1:1 classid 1:20 htb rate {cross_rate}bit "
            f"ceil {cross_ceil}bit"
        )
        own = s.zones[index - 1]
        for other, zone in enumerate(s.zones, start=1):
            if zone != own:
                src = f"{node_addr(other)}/32"
                tc(
                    f"filter add dev {port} parent 1: protocol ip prio 1 u32 match ip src {src} flowid 1:20"
                )

    def cross_zone_rx_bytes(self, index: int) -> int:
        """Bytes (frames) node ``index`` has received from nodes of other zones so far."""
        if not self.shape.zones:
            raise BenchmarkError("this testbed has no zones")
        # This iproute2's tc has no JSON output for classes: read the text form,
        # "class htb 1:20 parent 1:1 ..." followed by " Sent <bytes> bytes <pkts> pkt ...".
        port = f"p{index}"
        argv = ["ip", "netns", "exec", self.bridge_ns, "tc", "-s", "class", "show", "dev", port]
        out = _cmd(argv).stdout
        words = out.split()
        for i, word in enumerate(words[:-4]):
            if word == "htb" and words[i + 1] == "1:20":
                sent = words.index("Sent", i)
                try:
                    return int(words[sent + 1])
                except (ValueError, IndexError) as exc:
                    raise BenchmarkError(f"unexpected `tc -s class show` output: {out!r}") from exc
        raise BenchmarkError(f"no cross-zone class on port p{index}")

    def close(self) -> None:
        """Stop every process and delete every namespace this testbed made. Idempotent."""
        for proc in self._procs:
            _stop(proc)
        self._procs.clear()
        for ns in reversed(self._created):
            self._kill_namespace_pids(ns)
        for ns in reversed(self._created):
            deleted = _cmd(["ip", "netns", "del", ns], check=False)
            if deleted.returncode != 0:
                log.error("could not delete namespace %s: %s", ns, deleted.stderr.strip())
        self._created.clear()

    def _kill_namespace_pids(self, ns: str) -> None:
        # Anything still inside one of our namespaces was started by this testbed
        # (directly or as a child, e.g. rclone under the origin wrapper).
        for attempt in range(2):
            pids = [int(p) for p in _cmd(["ip", "netns", "pids", ns], check=False).stdout.split()]
            if not pids:
                return
            sig = signal.SIGTERM if attempt == 0 else signal.SIGKILL
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if not _cmd(["ip", "netns", "pids", ns], check=False).stdout.split():
                    return
                time.sleep(0.05)

    # --- running things inside -------------------------------------------------------

    def popen(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: StdStream = subprocess.DEVNULL,
        stderr: StdStream = subprocess.DEVNULL,
        stdin: StdStream = subprocess.DEVNULL,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside namespace ``ns``; the testbed stops it on teardown."""
        if ns not in self._created:
            raise BenchmarkError(f"namespace {ns} is not part of testbed {self.tag}")
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        # `ip netns exec` execs the command, so the Popen's pid is the command's own.
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            env=full_env,
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            cwd=cwd,
        )
        self._procs.append(proc)
        return proc

    def run(self, ns: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> str:
        """Run a short command inside ``ns`` to completion and return its stdout."""
        if ns not in self._created:
            raise BenchmarkError(f"namespace {ns} is not part of testbed {self.tag}")
        return _cmd(["ip", "netns", "exec", ns, *argv], env=env).stdout

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop ``proc`` now (if still running) and stop tracking it."""
        _stop(proc)
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def counters(self, ns: str, dev: str = DEV) -> LinkCounters:
        """The kernel's byte and packet counters of ``dev`` inside ``ns``."""
        out = _cmd(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev]).stdout
        try:
            stats = json.loads(out)[0]["stats64"]
            return LinkCounters(
                tx_bytes=int(stats["tx"]["bytes"]),
                rx_bytes=int(stats["rx"]["bytes"]),
                tx_packets=int(stats["tx"]["packets"]),
                rx_packets=int(stats["rx"]["packets"]),
            )
        except (ValueError, LookupError, TypeError) as exc:
            raise BenchmarkError(f"unexpected `ip -s -j link show` output for {ns}/{dev}") from exc


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
