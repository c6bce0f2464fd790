"""The ``swarm`` command line: parse, wire the parts together, print. Logic lives in the packages."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import logging
import random
import signal
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeVar

import typer

from cli import logs, term
from cli.progress import (
    DEFAULT_PROGRESS_INTERVAL,
    ByteProgress,
    byte_progress,
    progress_as_lines,
)
from cli.term import escape, stderr
from core.errors import ConfigError, SwarmError
from core.manifest import DEFAULT_BLOCK_SIZE, DEFAULT_PIECE_SIZE
from core.units import format_size, parse_size
from seeder.retry import DEFAULT_RETRY_TIME
from swarm.demo_config import DemoConfig
from swarm.fetch import FetchConfig
from swarm.peer import PeerConfig
from swarm.protocol import MAX_BLOCK
from swarm.session import SessionConfig
from tracker.assignment import MAX_ORIGIN_COPIES
from tracker.config import TrackerConfig

try:  # typer >= 0.22 vendors click; older releases use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import (  # type: ignore[assignment]
        ClickException,
        NoArgsIsHelpError,
        UsageError,
    )

if TYPE_CHECKING:
    from core.auth import ClusterKey
    from swarm.fetch import FetchResult

T = TypeVar("T")
log = logging.getLogger("swarm.cli")

ENV_PREFIX: Final = "SWARM"
"""Every option reads ``SWARM_<COMMAND>_<OPTION>`` (click's auto_envvar_prefix), e.g.
``SWARM_FETCH_DEST``; settings shared by commands have one name of their own
(``SWARM_TRACKER``, ``SWARM_CATALOG``, ``SWARM_TOKEN_FILE``, ``SWARM_PROGRESS_INTERVAL``)."""

app = typer.Typer(
    name="swarm",
    help=(
        "Peer-to-peer distribution of large model artifacts: each byte leaves object storage "
        "once per cluster, and nodes trade verified pieces over the cluster network. "
        f"Every option can also be set in the environment as {ENV_PREFIX}_<COMMAND>_<OPTION> "
        "(e.g. SWARM_FETCH_DEST), or by the variable its help names."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"auto_envvar_prefix": ENV_PREFIX},
)


def size_option(value: str | int) -> int:
    """Typer callback: accept ``256MiB``, ``100GB``, ``1TiB`` or a plain byte count."""
    try:
        return int(parse_size(value))  # a plain int, also from a Size default
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc


class Size(int):
    """A size option's default: a byte count that --help shows in IEC units (``256MiB``)."""

    def __str__(self) -> str:
        for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
            if self and self % (1 << shift) == 0:
                return f"{self >> shift}{unit}"
        return int.__repr__(self)


def config_default(name: str, *configs: type[Any]) -> Any:
    """The default of setting ``name`` in the first of ``configs`` (dataclasses) that has it.

    A flag's default is its setting's, stated once in the component's config.
    """
    for config in configs:
        for setting in dataclasses.fields(config):
            if setting.name != name:
                continue
            if setting.default is not dataclasses.MISSING:
                return setting.default
            if setting.default_factory is not dataclasses.MISSING:
                return setting.default_factory()
            raise TypeError(f"{config.__name__}.{name} has no default")
    raise AttributeError(f"no setting {name!r} in {', '.join(c.__name__ for c in configs)}")


def peer_default(name: str) -> Any:
    """The default of a ``swarm fetch --tracker`` setting."""
    return config_default(name, SessionConfig, PeerConfig)


def fetch_default(name: str) -> Any:
    """The default of a ``swarm fetch --direct`` setting (and of the origin settings both share)."""
    return config_default(name, FetchConfig)


def tracker_default(name: str) -> Any:
    """The default of a ``swarm tracker`` setting."""
    return config_default(name, TrackerConfig)


def demo_default(name: str) -> Any:
    """The default of a ``swarm demo`` setting."""
    return config_default(name, DemoConfig)


def rate_flag(flag: str, *, help: str) -> Any:
    """A byte-rate cap: bytes per second as a size (``100MB`` is 100 MB/s); unset: no cap."""
    return typer.Option(flag, parser=size_option, metavar="BYTES/S", help=help)


def size_flag(*flags: str, help: str) -> Any:
    """A size flag: ``256MiB``, ``100GB``, ``1TiB`` or a byte count; give it a :class:`Size` default."""
    return typer.Option(*flags, parser=size_option, metavar="SIZE", help=help)


def unsent_option(value: str | int) -> int:
    """Typer callback of ``--unsent-limit``: a size, or ``off`` (-1: the kernel's default)."""
    if str(value).strip().lower() == "off":
        return -1
    try:
        return size_option(value)
    except typer.BadParameter as exc:
        raise typer.BadParameter(f"{exc}, or off") from None


UnsentLimit = Annotated[
    int,
    typer.Option(
        "--unsent-limit",
        parser=unsent_option,
        metavar="SIZE|off",
        help=(
            "Bytes a peer connection may keep queued in the kernel beyond those on the wire "
            "(TCP_NOTSENT_LOWAT), so blocks leave in the order the upload scheduler chose them. "
            "0: a quarter block (1 MiB for 4 MiB blocks). Raise it if uploads on very fast "
            "links (25 Gbit/s and up) stall between sends; off: the kernel's default."
        ),
    ),
]


ProgressInterval = Annotated[
    float,
    typer.Option(
        "--progress-interval",
        envvar="SWARM_PROGRESS_INTERVAL",
        min=0.1,
        metavar="SECONDS",
        help="Without a terminal (or with JSON logs), log a progress line this often.",
    ),
]
JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout at the end.")
]


def notice(markup: str | None, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Tell the operator something whatever the log level: a log record in JSON mode (so
    stderr stays one JSON object per line), else a Rich line (``markup``; None: the
    message as it is)."""
    if logs.current_format() == "json":
        logging.getLogger(logs.NOTICE_LOGGER).log(level, "%s", message, extra=logs.as_extra(fields))
    else:
        if markup is None:
            term.say(message)
        else:
            stderr().print(markup, highlight=False, soft_wrap=True)


NoOrigin = Annotated[
    bool,
    typer.Option(
        "--no-origin",
        envvar="SWARM_NO_ORIGIN",
        help="This node has no object-store credentials: the tracker never assigns it "
        "origin pieces, and the nodes that have them serve it.",
    ),
]

TokenFile = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        envvar="SWARM_TOKEN_FILE",
        help=(
            "File holding the cluster token (a mounted Secret); else the token is read from "
            "SWARM_TOKEN. Without one the cluster is open: for trusted networks only."
        ),
        show_default=False,
    ),
]
TrackerCA = Annotated[
    Path | None,
    typer.Option(
        "--tracker-ca",
        envvar="SWARM_TRACKER_CA",
        help="CA bundle (PEM) that signed an https:// tracker's certificate (default: the system's).",
    ),
]
OriginRetryTime = Annotated[
    float,
    typer.Option(
        "--origin-retry-time",
        envvar="SWARM_ORIGIN_RETRY_TIME",
        min=0,
        help="Seconds a throttled (429/503) or failing origin read is retried, with capped backoff, before giving up.",
    ),
]


def load_key(token_file: Path | None) -> ClusterKey:
    """The cluster token from ``--token-file`` or ``SWARM_TOKEN``; a bad one is a usage error."""
    from core.auth import ClusterKey

    try:
        return ClusterKey.load(token_file)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--token-file / SWARM_TOKEN") from exc


class Terminated(Exception):
    """SIGTERM or SIGINT arrived: the command stops cleanly (a fetch keeps its verified pieces)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


async def _until_signalled(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; SIGTERM or SIGINT cancels it (its ``finally`` blocks run) and raises Terminated.

    An explicit handler matters in a container: as PID 1 a process gets no default
    action for SIGTERM, so without one ``swarm tracker`` would ignore ``docker stop``.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    received: list[int] = []

    def on_signal(signum: int) -> None:
        if not received:
            logging.getLogger("swarm").warning("%s received: stopping", signal.Signals(signum).name)
        received.append(signum)
        task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await task
    except asyncio.CancelledError:
        if received:
            raise Terminated(received[0]) from None
        raise
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def run(coro: Coroutine[Any, Any, T], *, clean_exit_on_signal: bool = False) -> T:
    """Run one command's coroutine; a SwarmError becomes a one-line message and exit code 1.

    SIGTERM/SIGINT stop the command cleanly: exit 0 for a service
    (``clean_exit_on_signal``), else 128 + the signal's number, as shells report it.
    """
    try:
        return asyncio.run(_until_signalled(coro))
    except SwarmError as exc:
        term.error(str(exc))
        raise typer.Exit(2 if isinstance(exc, ConfigError) else 1) from None
    except Terminated as exc:
        if clean_exit_on_signal:
            raise typer.Exit(0) from None
        notice(f"[yellow]stopped by {exc}[/]", f"stopped by {exc}", logging.WARNING)
        raise typer.Exit(128 + exc.signum) from None
    except KeyboardInterrupt:
        term.say("interrupted", "yellow")
        raise typer.Exit(130) from None


def parse_listen(flag: str, value: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT``) from a flag, as a usage error when it is not one."""
    host, sep, port = value.rpartition(":")
    if not sep and default_port is not None and value and not value.isdigit():
        host, port = value, str(default_port)
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise typer.BadParameter(
            f"{flag} must be HOST:PORT with a port from 0 to 65535, got {value!r}"
        )
    return host.strip("[]") or "0.0.0.0", int(port)


def check_advertise(advertise: str) -> None:
    """A usage error unless ``--advertise`` is empty, an IP address or a DNS name."""
    if advertise:
        from swarm.hosts import valid_host

        if not valid_host(advertise):
            raise typer.BadParameter(
                f"--advertise must be an IP address or DNS name, got {advertise!r}"
            )


def emit_json(obj: dict[str, Any]) -> None:
    """The one JSON object a ``--json`` command prints on stdout."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def _version() -> str:
    # Here, not at the top: importlib.metadata is ~10 ms of every command's start-up.
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("swarm")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"swarm {_version()}")
        raise typer.Exit()


SERVICES: Final = frozenset({"tracker", "agent"})
"""Commands that log at INFO by default: an operator must see a service start and listen."""


@app.callback()
def main_options(
    ctx: typer.Context,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            help="More log output on stderr (-vv: debug). The tracker logs at INFO already.",
        ),
    ] = 0,
    log_format: Annotated[
        logs.LogFormat | None,
        typer.Option(
            "--log-format",
            help="Log records on stderr as one JSON object per line, or as text. "
            "Default: text on a terminal, JSON otherwise.",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            allow_from_autoenv=False,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    base = logging.INFO if ctx.invoked_subcommand in SERVICES else logging.WARNING
    logs.configure(log_format, max(logging.DEBUG, base - 10 * verbose))


@app.command()
def publish(
    origin_url: Annotated[
        str,
        typer.Argument(
            help="Where the artifact lives: s3://bucket/prefix, gs://bucket/prefix, http(s)://host/prefix or file:///path."
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="Artifact name, e.g. kimi-k2 or org/model.")],
    catalog: Annotated[
        str | None,
        typer.Option(
            "--catalog",
            envvar="SWARM_CATALOG",
            help="Catalog URL where manifests are kept (any writable origin URL).",
        ),
    ] = None,
    piece_size: Annotated[int, size_flag("--piece-size", help="Piece size.")] = Size(
        DEFAULT_PIECE_SIZE
    ),
    block_size: Annotated[
        int,
        size_flag(
            "--block-size",
            help="Block size: the unit peers check on arrival (and, with cut-through, "
            "relay before the piece is whole); at most the piece size, doubled if the "
            "artifact would have too many blocks.",
        ),
    ] = Size(DEFAULT_BLOCK_SIZE),
    file: Annotated[
        list[str] | None,
        typer.Option(
            "--file",
            help="Publish only these keys (repeatable); required for http(s) origins, which can't list.",
        ),
    ] = None,
    token_file: TokenFile = None,
    origin_retry_time: OriginRetryTime = DEFAULT_RETRY_TIME,
    progress_interval: ProgressInterval = DEFAULT_PROGRESS_INTERVAL,
    json: JsonFlag = False,
) -> None:
    """Hash the artifact at ORIGIN_URL and write its manifest to the catalog; prints NAME@ROOT.

    With a cluster token the catalog entry is signed, and trackers holding the same
    token serve only signed entries.
    """
    from seeder.catalog import catalog_url
    from seeder.publish import publish as do_publish

    key = load_key(token_file)

    async def go() -> None:
        url = catalog_url(catalog)
        logs.bind(artifact=name)
        with byte_progress(f"hashing {name}", None, interval=progress_interval) as bar:

            def on_progress(n: int, total: int) -> None:
                if n == 0:
                    bar.set_total(total)
                bar.advance(n)

            manifest = await do_publish(
                origin_url,
                name,
                url,
                piece_size=piece_size,
                block_size=block_size,
                files=file,
                progress=on_progress,
                key=key,
                retry_time=origin_retry_time,
            )
        if json:
            emit_json(
                {
                    "artifact": manifest.name,
                    "root": manifest.root_hex,
                    "ref": manifest.ref,
                    "model_bytes": manifest.total_size,
                    "files": len(manifest.files),
                    "pieces": manifest.num_pieces,
                    "piece_size": manifest.piece_size,
                    "format": manifest.format,
                    "block_size": manifest.block_size,
                    "catalog": url,
                }
            )
        else:
            text = (
                f"published {manifest.name}: {len(manifest.files)} files, "
                f"{format_size(manifest.total_size)}, {manifest.num_pieces} pieces of "
                f"{format_size(manifest.piece_size)}"
                + (
                    f" in blocks of {format_size(manifest.block_size)}"
                    if manifest.block_size
                    else ""
                )
            )
            notice(None, text, event="published", root=manifest.root_hex, ref=manifest.ref)
            print(manifest.ref)

    run(go())


@app.command()
def fetch(
    ref: Annotated[
        str, typer.Argument(help="NAME or NAME@ROOT (a root prefix of 8+ hex digits is enough).")
    ],
    dest: Annotated[
        Path, typer.Option("--dest", help="Directory to write the artifact's files into.")
    ],
    tracker: Annotated[
        str | None,
        typer.Option(
            "--tracker",
            envvar="SWARM_TRACKER",
            help="Tracker URL, e.g. http://tracker:7070: fetch through the swarm.",
        ),
    ] = None,
    catalog: Annotated[
        str | None,
        typer.Option(
            "--catalog",
            envvar="SWARM_CATALOG",
            help="Catalog URL (for --direct and --fallback-direct).",
        ),
    ] = None,
    direct: Annotated[
        bool,
        typer.Option(
            "--direct", help="Read every piece straight from the origin (no tracker, no peers)."
        ),
    ] = False,
    agent: Annotated[
        str | None,
        typer.Option(
            "--agent",
            envvar="SWARM_AGENT",
            metavar="SOCKET",
            help="The node agent's Unix socket: ask it to make the artifact present in the "
            "node's cache, then link its files into DEST (no linger: the agent serves it).",
        ),
    ] = None,
    linger: Annotated[
        float,
        typer.Option(
            "--linger",
            min=0,
            help="After finishing, keep serving until every peer of the swarm has finished, at most this many seconds.",
        ),
    ] = peer_default("linger"),
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT to accept peer connections on (port 0: any).")
    ] = f"{peer_default('listen_host')}:{peer_default('listen_port')}",
    advertise: Annotated[
        str,
        typer.Option(
            "--advertise",
            envvar="SWARM_ADVERTISE",
            help="Address other peers should dial (default: the address the tracker sees).",
        ),
    ] = peer_default("advertise_host"),
    fallback_direct: Annotated[
        bool,
        typer.Option(
            "--fallback-direct",
            help="If the tracker stays unreachable past --tracker-timeout, read the rest from the origin. Off by default: a hundred silent fallbacks are the storm swarm prevents.",
        ),
    ] = peer_default("fallback_direct"),
    tracker_timeout: Annotated[
        float,
        typer.Option(
            "--tracker-timeout",
            min=1,
            help="Seconds the tracker may stay unreachable before giving up (or falling back).",
        ),
    ] = peer_default("tracker_timeout"),
    block_size: Annotated[
        int,
        size_flag(
            "--block-size",
            help="Block size requested from peers, for manifests of format 1; a format-2 "
            "manifest's own block size is used instead.",
        ),
    ] = Size(peer_default("block_size")),
    requests_per_peer: Annotated[
        int,
        typer.Option(
            "--requests-per-peer",
            min=0,
            max=256,
            help="Block requests in flight per peer connection; 0: 12 MiB of blocks, "
            "6 to 12 of them (12 of 1 MiB blocks, 6 of 4 MiB ones).",
        ),
    ] = peer_default("requests_per_peer"),
    upload_slots: Annotated[
        int,
        typer.Option(
            "--upload-slots",
            min=1,
            max=1024,
            help="Blocks uploaded at once, shared round-robin by all peers.",
        ),
    ] = peer_default("upload_slots"),
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=0,
            max=1024,
            help="Threads that check and write received blocks and verify pieces "
            "(0: the cores this process may use, its CPU affinity capped by its cgroup's "
            "CPU quota).",
        ),
    ] = peer_default("workers"),
    serve_corrupt: Annotated[
        bool,
        typer.Option(
            "--serve-corrupt",
            hidden=True,
            allow_from_autoenv=False,  # fault injection must be asked for on the command line
            help="Fault injection for tests: corrupt every block served.",
        ),
    ] = peer_default("serve_corrupt"),
    origin: Annotated[
        str | None,
        typer.Option(
            "--origin",
            help="Read the data from this origin URL instead of the one in the manifest (a mirror).",
        ),
    ] = peer_default("origin_url"),
    pieces_in_flight: Annotated[
        int, typer.Option("--pieces-in-flight", min=1, max=256, help="Pieces fetched at once.")
    ] = fetch_default("pieces_in_flight"),
    range_size: Annotated[
        int,
        size_flag("--range-size", help="Size of each ranged origin request."),
    ] = Size(fetch_default("range_size")),
    origin_concurrency: Annotated[
        int,
        typer.Option("--origin-concurrency", min=1, max=1024, help="Concurrent origin requests."),
    ] = fetch_default("origin_concurrency"),
    no_fsync: Annotated[
        bool,
        typer.Option(
            "--no-fsync",
            help="Don't flush each piece to disk before recording it (faster, not crash-safe against power loss).",
        ),
    ] = False,
    no_direct_io: Annotated[
        bool,
        typer.Option(
            "--no-direct-io",
            help="Write and serve pieces through the page cache instead of with O_DIRECT (used automatically where O_DIRECT is unsupported).",
        ),
    ] = False,
    no_origin: NoOrigin = False,
    token_file: TokenFile = None,
    tracker_ca: TrackerCA = None,
    origin_retry_time: OriginRetryTime = DEFAULT_RETRY_TIME,
    max_upload_rate: Annotated[
        int | None,
        rate_flag(
            "--max-upload-rate",
            help="Cap on the bytes per second sent to other peers (e.g. 500MB), shared by every connection.",
        ),
    ] = peer_default("max_upload_rate"),
    max_download_rate: Annotated[
        int | None,
        rate_flag(
            "--max-download-rate",
            help="Cap on the bytes per second received from peers and read from the origin together.",
        ),
    ] = peer_default("max_download_rate"),
    zone: Annotated[
        str,
        typer.Option(
            "--zone",
            envvar="SWARM_ZONE",
            help="This node's zone or rack (e.g. the node's topology.kubernetes.io/zone label): peers in the same zone are preferred.",
        ),
    ] = peer_default("zone"),
    zone_patience: Annotated[
        float,
        typer.Option(
            "--zone-patience",
            min=0.1,
            help="Seconds a peer of this zone may leave our requests unanswered before peers of other zones are asked for what it holds.",
        ),
    ] = peer_default("zone_patience"),
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout",
            min=0.1,
            help=(
                "Seconds a peer may leave our block requests unanswered before they are asked "
                "of other peers (it keeps one request until it serves again); a block whose "
                "payload takes longer (plus its size at 1 MiB/s), or an upload the peer does "
                "not take in that time, closes the connection."
            ),
        ),
    ] = peer_default("request_timeout"),
    handshake_timeout: Annotated[
        float,
        typer.Option(
            "--handshake-timeout",
            min=0.1,
            help="Seconds a new connection may take to prove the cluster token before it is closed.",
        ),
    ] = peer_default("handshake_timeout"),
    max_peers: Annotated[
        int,
        typer.Option(
            "--max-peers",
            min=1,
            help="Connections beyond which this peer dials no one new (others may still dial it).",
        ),
    ] = peer_default("max_peers"),
    uploads_per_conn: Annotated[
        int,
        typer.Option(
            "--uploads-per-peer",
            min=1,
            help="Upload slots one connection may hold at once (of --upload-slots).",
        ),
    ] = peer_default("uploads_per_conn"),
    max_pending_conns: Annotated[
        int,
        typer.Option(
            "--max-pending-connections",
            min=1,
            help="Accepted connections that may wait in their handshake at once; more are closed at once.",
        ),
    ] = peer_default("max_pending_conns"),
    keepalive: Annotated[
        float,
        typer.Option(
            "--keepalive",
            min=0.1,
            help="Seconds of our silence on a connection before a keepalive is sent.",
        ),
    ] = peer_default("keepalive"),
    idle_timeout: Annotated[
        float,
        typer.Option(
            "--idle-timeout",
            min=0.1,
            help="Seconds a connection may stay silent before it is closed.",
        ),
    ] = peer_default("idle_timeout"),
    endgame_duplicates: Annotated[
        int,
        typer.Option(
            "--endgame-duplicates",
            min=1,
            help="In endgame, how many peers one missing block may be asked of at once.",
        ),
    ] = peer_default("endgame_duplicates"),
    cut_through: Annotated[
        int,
        typer.Option(
            "--cut-through",
            min=0,
            help=(
                "Relay blocks before their piece is whole (format-2 manifests: each block is "
                "checked on arrival): tell a few neighbours each time this many more blocks "
                "of a piece are held. 0: serve whole verified pieces only."
            ),
        ),
    ] = peer_default("cut_through"),
    max_upload_queue: Annotated[
        int,
        typer.Option(
            "--max-upload-queue",
            min=1,
            help="Requests one peer may have queued with us; more are rejected.",
        ),
    ] = peer_default("max_upload_queue"),
    unsent_limit: UnsentLimit = 0,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            "--metrics-listen",
            envvar="SWARM_METRICS_LISTEN",
            metavar="HOST:PORT",
            help=(
                "Serve Prometheus metrics on http://HOST:PORT/metrics while fetching and lingering "
                "(readable by anyone who can reach it: bind a node-local address)."
            ),
        ),
    ] = None,
    progress_interval: ProgressInterval = DEFAULT_PROGRESS_INTERVAL,
    json: JsonFlag = False,
) -> None:
    """Fetch an artifact into DEST, verified with blake3, resumable, marked complete only when whole.

    Exit code 0 only when every piece is verified and the completion marker is written.
    """
    if agent and not direct:
        ready = run(_fetch_via_agent(ref, dest, agent, progress_interval))
        if json:
            emit_json(ready)
        else:
            text = (
                f"{ready['ref']}: {format_size(ready['bytes'])} ready in {dest} in "
                f"{ready['seconds']:.1f}s ({ready['view']} from the node's cache; this fetch "
                f"moved origin {format_size(ready['origin_bytes'])}, "
                f"peers {format_size(ready['peer_bytes'])})"
            )
            notice(None, text, event="fetched", **ready)
        return
    if direct == bool(tracker):
        raise typer.BadParameter(
            "give exactly one of --tracker URL (swarm), --direct (origin only) or --agent "
            "SOCKET (the node agent)"
        )
    if not 1 <= block_size <= MAX_BLOCK:
        raise typer.BadParameter(
            f"--block-size must be 1 byte to {format_size(MAX_BLOCK)} (the wire's largest"
            f" block), got {format_size(block_size)}"
        )
    key = load_key(token_file)
    metrics_at = parse_listen("--metrics-listen", metrics_listen) if metrics_listen else None
    check_advertise(advertise)
    if tracker:
        host, port = parse_listen("--listen", listen)
        config = PeerConfig(
            listen_host=host,
            listen_port=port,
            advertise_host=advertise,
            block_size=block_size,
            requests_per_peer=requests_per_peer,
            upload_slots=upload_slots,
            linger=linger,
            tracker_timeout=tracker_timeout,
            fallback_direct=fallback_direct,
            catalog=catalog,
            origin_url=origin,
            origin_pieces_in_flight=min(pieces_in_flight, 8),
            range_size=range_size,
            origin_concurrency=origin_concurrency,
            origin_retry_time=origin_retry_time,
            durable=not no_fsync,
            direct_io=not no_direct_io,
            serve_corrupt=serve_corrupt,
            workers=workers,
            max_upload_rate=max_upload_rate or None,
            max_download_rate=max_download_rate or None,
            zone=zone,
            zone_patience=zone_patience,
            request_timeout=request_timeout,
            handshake_timeout=handshake_timeout,
            max_peers=max_peers,
            uploads_per_conn=uploads_per_conn,
            max_pending_conns=max_pending_conns,
            keepalive=keepalive,
            idle_timeout=idle_timeout,
            endgame_duplicates=endgame_duplicates,
            cut_through=cut_through,
            max_upload_queue=max_upload_queue,
            unsent_bytes=unsent_limit,
            seeder=not no_origin,
            key=key,
        )
        result = run(
            _fetch_swarm(
                ref, dest, tracker, catalog, config, tracker_ca, progress_interval, metrics_at
            )
        )
    else:
        direct_config = FetchConfig(
            pieces_in_flight=pieces_in_flight,
            range_size=range_size,
            origin_concurrency=origin_concurrency,
            durable=not no_fsync,
            direct_io=not no_direct_io,
            origin_retry_time=origin_retry_time,
        )
        result = run(
            _fetch_direct(ref, dest, catalog, key, origin, direct_config, progress_interval)
        )
    if json:
        emit_json(result.to_json())
    else:
        text = (
            f"{result.artifact}@{result.root[:12]}: {format_size(result.model_bytes)} verified in "
            f"{dest} in {result.seconds:.1f}s (origin {format_size(result.origin_bytes)}, "
            f"peers {format_size(result.peer_bytes)}, reused {format_size(result.reused_bytes)}"
            + (
                f", uploaded {format_size(result.extra['uploaded_bytes'])})"
                if "uploaded_bytes" in result.extra
                else ")"
            )
        )
        notice(None, text, event="fetched", **result.to_json())


async def _fetch_via_agent(
    ref: str, dest: Path, socket_path: str, progress_interval: float
) -> dict[str, Any]:
    """Ask the node agent for ``ref``, show its progress, then link the files into ``dest``."""
    from core.manifest import Manifest, parse_ref
    from swarm.agent import ask, link_view
    from swarm.store import manifest_path

    started = asyncio.get_running_loop().time()
    conn = await ask(socket_path, {"op": "fetch", "ref": ref})
    try:
        answer = await conn.answer()
        total = answer.get("total", answer.get("bytes"))
        with byte_progress(ref, total, interval=progress_interval) as bar:
            seen = 0
            while answer.get("event") == "progress":
                done = int(answer.get("done", 0))
                if done > seen:
                    bar.advance(done - seen)
                    seen = done
                answer = await conn.answer()
            if answer.get("event") != "done":
                raise SwarmError(f"the node agent answered {answer!r:.200}")
            if int(answer["bytes"]) > seen:
                bar.advance(int(answer["bytes"]) - seen)
        _, want_root = parse_ref(ref)
        if want_root is not None and not str(answer["root"]).startswith(want_root.lower()):
            raise SwarmError(f"the node agent answered {answer['ref']} when asked for {ref}")
        source = Path(answer["path"])
        raw = await asyncio.to_thread(manifest_path(source, answer["root"]).read_bytes)
        manifest = Manifest.decode(raw)
        # Linked while the connection is open: the agent evicts nothing we are linking.
        view = await asyncio.to_thread(link_view, source, dest, manifest)
    finally:
        conn.close()
    if view == "copied":
        log.warning(
            "%s could not be hard-linked to the node's cache (another file system, or the "
            "files belong to another user): the files were copied",
            dest,
        )
    return {
        "artifact": manifest.name,
        "ref": manifest.ref,
        "root": manifest.root_hex,
        "dest": str(dest),
        "bytes": manifest.total_size,
        "model_bytes": manifest.total_size,
        "verified": True,
        "view": view,
        "cache_path": str(source),
        "origin_bytes": answer["origin_bytes"],
        "peer_bytes": answer["peer_bytes"],
        "seconds": round(asyncio.get_running_loop().time() - started, 3),
    }


async def _fetch_direct(
    ref: str,
    dest: Path,
    catalog: str | None,
    key: ClusterKey,
    origin: str | None,
    config: FetchConfig,
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
) -> FetchResult:
    """Every missing piece of ``ref`` straight from the origin (no tracker, no peers)."""
    from seeder.catalog import Catalog, catalog_url
    from seeder.origin import open_origin
    from swarm.fetch import fetch_direct

    async with Catalog(catalog_url(catalog), key) as cat:
        manifest = await cat.get(ref)
        catalog_retries = cat.origin.counters.retries
    logs.bind(artifact=manifest.name, root=manifest.root_hex)
    src = open_origin(origin) if origin else None
    try:
        with byte_progress(manifest.name, manifest.total_size, interval=progress_interval) as bar:
            result = await fetch_direct(
                manifest, dest, origin=src, config=config, progress=bar.advance
            )
    finally:
        if src is not None:
            await src.close()
    result.origin_retries += catalog_retries  # the catalog is read from the origin too
    return result


async def _fetch_swarm(
    ref: str,
    dest: Path,
    tracker_url: str,
    catalog: str | None,
    config: PeerConfig,
    ca_file: Path | None,
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
    metrics_at: tuple[str, int] | None = None,
) -> FetchResult:
    """``ref`` through the swarm: the manifest from the tracker, the pieces from peers and
    seeders; with ``metrics_at``, Prometheus metrics served there until it returns."""
    from core.errors import TrackerError, UnknownArtifactError
    from seeder.catalog import Catalog
    from seeder.retry import Backoff, tracker_retry
    from swarm.announce import TrackerAuthError, TrackerClient
    from swarm.peer import SwarmPeer

    client = TrackerClient(tracker_url, key=config.key, ca_file=str(ca_file) if ca_file else None)
    try:
        manifest = None
        loop = asyncio.get_running_loop()
        backoff = Backoff(tracker_retry(config.tracker_timeout))
        rng = random.Random()
        while manifest is None:
            try:
                manifest = await client.manifest(ref)
            except (UnknownArtifactError, TrackerAuthError):
                raise  # the tracker answered: asking again would not help
            except TrackerError as exc:
                now = loop.time()
                delay = backoff.fail(now, rng)
                if not backoff.allows(now, delay):
                    if config.fallback_direct and catalog:
                        log.warning("tracker unreachable (%s); falling back to the origin", exc)
                        async with Catalog(catalog, config.key) as cat:
                            manifest = await cat.get(ref)
                        break
                    raise
                log.warning("tracker not answering (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
        logs.bind(artifact=manifest.name, root=manifest.root_hex)
        # The peer exists before its progress does, so that every progress line has its id.
        bars: list[ByteProgress] = []
        peer = SwarmPeer(
            manifest, dest, client, config=config, progress=lambda n: bars[0].advance(n)
        )
        logs.bind(peer_id=peer.peer_id.hex())
        metrics = None
        if metrics_at is not None:
            from swarm.metrics import peer_registry, serve_metrics

            metrics = await serve_metrics(*metrics_at, peer_registry(peer))
        try:
            with byte_progress(
                manifest.name,
                manifest.total_size,
                interval=progress_interval,
                sources=lambda: (peer.origin.counters.bytes_read, peer.session.stats.peer_bytes),
            ) as bar:
                bars.append(bar)
                return await peer.run()
        finally:
            if metrics is not None:
                await metrics.close()
    finally:
        await client.close()


@app.command()
def verify(
    dest: Annotated[
        Path,
        typer.Argument(help="A destination filled by swarm fetch (it holds its manifest)."),
    ],
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, max=1024, help="Hashing threads (default: every core)."),
    ] = None,
    root: Annotated[
        str | None,
        typer.Option(
            "--root",
            help="Which version to check when DEST held several (a root prefix is enough).",
        ),
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Fetch just the bad pieces again, through --tracker or from the origin via --catalog.",
        ),
    ] = False,
    tracker: Annotated[
        str | None,
        typer.Option("--tracker", envvar="SWARM_TRACKER", help="Tracker URL, for --repair."),
    ] = None,
    catalog: Annotated[
        str | None,
        typer.Option(
            "--catalog",
            envvar="SWARM_CATALOG",
            help="Catalog URL, for --repair straight from the origin.",
        ),
    ] = None,
    token_file: TokenFile = None,
    tracker_ca: TrackerCA = None,
    progress_interval: ProgressInterval = DEFAULT_PROGRESS_INTERVAL,
    json: JsonFlag = False,
) -> None:
    """Hash every piece in DEST again against its manifest; exit 1 if any is bad.

    Bad pieces are listed by file and byte range, stop counting as verified, and the
    completion marker is removed, so the next fetch into DEST (or --repair) fetches
    exactly those pieces.
    """
    from swarm.verify import verify_dir

    if repair and not (tracker or catalog):
        raise typer.BadParameter("--repair needs --tracker URL or --catalog URL")
    key = load_key(token_file)

    async def go() -> None:
        # With --json a bar would only be noise; lines without a terminal are still wanted,
        # or a long verify leaves kubectl logs blank.
        with byte_progress(
            f"verifying {dest}",
            None,
            enabled=not json or progress_as_lines(),
            interval=progress_interval,
        ) as bar:
            stop = threading.Event()  # the hashing threads can't be cancelled, only told
            try:
                report = await asyncio.to_thread(
                    verify_dir, dest, workers=workers, root=root, progress=bar.advance, stop=stop
                )
            except asyncio.CancelledError:
                stop.set()
                raise
        out = report.to_json()
        if not report.ok:
            for bad in report.bad_files:
                text = f"bad file {bad.to_json()}"
                notice(f"[red]bad file[/] {escape(str(bad.to_json()))}", text, logging.ERROR)
            for piece in report.bad_pieces:
                where = f"{piece.path} bytes {piece.offset}-{piece.offset + piece.length - 1}"
                notice(
                    f"[red]bad piece {piece.index}[/]: {escape(where)} ({piece.reason})",
                    f"bad piece {piece.index}: {where} ({piece.reason})",
                    logging.ERROR,
                    piece=piece.index,
                    path=piece.path,
                    offset=piece.offset,
                    length=piece.length,
                    reason=piece.reason,
                )
        repaired = report.ok
        if repair and not report.ok:
            ref = f"{report.artifact}@{report.root}"
            if tracker:
                peer_config = PeerConfig(linger=0.0, catalog=catalog, key=key)
                result = await _fetch_swarm(
                    ref, dest, tracker, catalog, peer_config, tracker_ca, progress_interval
                )
            else:
                result = await _fetch_direct(
                    ref, dest, catalog, key, None, FetchConfig(), progress_interval
                )
            out["repair"] = result.to_json()
            repaired = result.verified
        if json:
            emit_json(out)
        else:
            text = (
                f"{report.artifact}@{report.root[:12]}: {report.pieces - len(report.bad_pieces)} of "
                f"{report.pieces} pieces good in {dest} ({format_size(report.bytes)} hashed in "
                f"{report.seconds:.1f}s with {report.workers} workers)"
                + ("" if report.ok else f"; {len(report.bad_pieces)} bad")
                + (" — repaired" if repair and not report.ok and repaired else "")
            )
            notice(None, text, event="verified", artifact=report.artifact, root=report.root)
        if not repaired:
            raise SwarmError(
                f"{len(report.bad_pieces)} pieces of {dest} are bad"
                + ("" if repair else " (fetch again, or run with --repair)")
            )

    run(go())


@app.command("tracker")
def tracker_command(
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT for HTTP and UDP announces.")
    ] = f"{tracker_default('host')}:{tracker_default('port')}",
    catalog: Annotated[
        str | None,
        typer.Option(
            "--catalog", envvar="SWARM_CATALOG", help="Catalog URL where manifests are read from."
        ),
    ] = None,
    announce_interval: Annotated[
        float,
        typer.Option("--announce-interval", min=0.1, help="Seconds between a peer's announces."),
    ] = tracker_default("announce_interval"),
    peer_ttl: Annotated[
        float,
        typer.Option(
            "--peer-ttl",
            min=0.5,
            help="A peer silent this long has left; its origin pieces are reassigned.",
        ),
    ] = tracker_default("peer_ttl"),
    stall_timeout: Annotated[
        float,
        typer.Option(
            "--stall-timeout",
            min=0.5,
            help="An origin pull whose progress stands still this long is reassigned.",
        ),
    ] = tracker_default("stall_timeout"),
    per_peer_origin_pieces: Annotated[
        int,
        typer.Option(
            "--per-peer-origin-pieces", min=1, help="Origin pieces one peer pulls at once."
        ),
    ] = tracker_default("per_peer_limit"),
    origin_budget: Annotated[
        int | None,
        typer.Option(
            "--origin-budget",
            min=1,
            help="A fixed count of origin pieces the whole cluster pulls at once (default: per-peer limit x peers, at most --origin-max-pulls, halved on throttling (429/503/SlowDown, Retry-After) and grown back while the origin's throughput grows).",
        ),
    ] = tracker_default("origin_budget"),
    origin_max_pulls: Annotated[
        int,
        typer.Option(
            "--origin-max-pulls",
            min=1,
            help="Most origin pieces the cluster pulls at once when the budget adapts (pieces in flight share the origin's egress and help nobody until whole).",
        ),
    ] = tracker_default("origin_max_pulls"),
    adaptive_origin: Annotated[
        bool,
        typer.Option(
            "--adaptive-origin/--fixed-origin",
            help="Adapt the origin budget to throttling and throughput (see tracker/origin_budget.py), or keep it at the default.",
        ),
    ] = tracker_default("adaptive_origin"),
    origin_copies: Annotated[
        float,
        typer.Option(
            "--origin-copies",
            min=1.0,
            max=MAX_ORIGIN_COPIES,
            help=(
                "Origin bytes the cluster may read, in copies of the artifact (1: every byte "
                "once). Above 1, for a cheap in-cluster origin: the origin also serves copies "
                "of the rarest pieces to peers that lack them, only while it would otherwise "
                "idle (every piece handed out, a pull slot free), up to this many copies."
            ),
        ),
    ] = tracker_default("origin_copies"),
    manifest_ttl: Annotated[
        float,
        typer.Option(
            "--manifest-ttl",
            min=0.0,
            help="Seconds a name's latest version is cached (a burst by name reads the catalog once; a republish is served within this time).",
        ),
    ] = tracker_default("manifest_ttl"),
    bar_reporters: Annotated[
        int,
        typer.Option(
            "--bar-reporters",
            min=2,
            help="Distinct peers that must report a peer for corrupt data before the tracker bars it from the swarm.",
        ),
    ] = tracker_default("bar_reporters"),
    origin_rate_limit: Annotated[
        int | None,
        rate_flag(
            "--origin-rate-limit",
            help="Cap on the cluster's origin reads of one artifact, in bytes per second (e.g. 2GB), split equally among the peers pulling.",
        ),
    ] = tracker_default("origin_rate"),
    token_file: TokenFile = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            "--tls-cert",
            envvar="SWARM_TLS_CERT",
            help="PEM certificate chain: serve HTTPS (with --tls-key); announces then go over HTTPS only.",
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option("--tls-key", envvar="SWARM_TLS_KEY", help="PEM private key of --tls-cert."),
    ] = None,
) -> None:
    """Run the per-cluster tracker: manifests, swarm registry, seeder assignment (HTTP + UDP)."""
    from seeder.catalog import catalog_url
    from tracker.service import Tracker

    host, port = parse_listen("--listen", listen)
    key = load_key(token_file)

    async def go() -> None:
        config = TrackerConfig(
            host=host,
            port=port,
            catalog=catalog_url(catalog),
            announce_interval=announce_interval,
            peer_ttl=peer_ttl,
            stall_timeout=stall_timeout,
            per_peer_limit=per_peer_origin_pieces,
            origin_budget=origin_budget,
            origin_max_pulls=origin_max_pulls,
            adaptive_origin=adaptive_origin,
            origin_copies=origin_copies,
            manifest_ttl=manifest_ttl,
            bar_reporters=bar_reporters,
            origin_rate=origin_rate_limit or None,
            key=key,
            tls_cert=str(tls_cert) if tls_cert else None,
            tls_key=str(tls_key) if tls_key else None,
        )
        tracker = Tracker(config)
        try:
            await tracker.start()
        except OSError as exc:
            await tracker.close()
            raise SwarmError(
                f"can't listen on {host}:{port}: {exc.strerror or exc} "
                "(is another tracker running there? pick another --listen)"
            ) from exc
        # The service logs its address and transport; the operator also needs to see which
        # catalog it serves and whether it demands the cluster token.
        logging.getLogger("swarm.tracker").info(
            "tracker serving catalog %s, %s, %s",
            config.catalog,
            "open (no cluster token)" if key.open else "cluster token required",
            "TLS" if tls_cert else "no TLS",
            extra={
                "listen": f"{host}:{port}",
                "catalog": config.catalog,
                "auth": "open" if key.open else "token",
                "tls": bool(tls_cert),
            },
        )
        try:
            await asyncio.Event().wait()
        finally:
            await tracker.close()

    run(go(), clean_exit_on_signal=True)


HeldRef = Annotated[str, typer.Argument(help="NAME or NAME@ROOT held by this node.")]

AgentSocket = Annotated[
    str,
    typer.Option(
        "--socket",
        envvar="SWARM_AGENT",
        metavar="PATH",
        help="The node agent's Unix socket (a hostPath shared with the node's pods).",
    ),
]


@app.command("agent")
def agent_command(
    cache: Annotated[
        Path,
        typer.Option(
            "--cache",
            envvar="SWARM_CACHE",
            help="The node's cache directory (a hostPath): every version the agent holds.",
        ),
    ],
    tracker: Annotated[str, typer.Option("--tracker", envvar="SWARM_TRACKER", help="Tracker URL.")],
    socket_path: AgentSocket,
    capacity: Annotated[
        int | None,
        size_flag(
            "--capacity",
            help="Most bytes the cache may hold; least recently used versions that are neither "
            "pinned nor in use by a pod are removed past it (default: no limit).",
        ),
    ] = None,
    views: Annotated[
        Path | None,
        typer.Option(
            "--views",
            help="Where pods' views of versions live (VIEWS/<pod uid>/...): each is removed "
            "once its pod is gone from the node (see --kubelet-pods), ending its lease.",
        ),
    ] = None,
    kubelet_pods: Annotated[
        Path,
        typer.Option(
            "--kubelet-pods",
            help="The kubelet's pod directories: a pod whose uid is not there is gone.",
        ),
    ] = Path("/var/lib/kubelet/pods"),
    listen: Annotated[
        str,
        typer.Option(
            "--listen", help="HOST to accept peer connections on (each version gets a port)."
        ),
    ] = peer_default("listen_host"),
    advertise: Annotated[
        str,
        typer.Option(
            "--advertise",
            help="Address other peers should dial (default: the address the tracker sees).",
        ),
    ] = peer_default("advertise_host"),
    workers: Annotated[
        int,
        typer.Option("--workers", min=0, max=1024, help="As for swarm fetch (0: every core)."),
    ] = peer_default("workers"),
    origin: Annotated[
        str | None,
        typer.Option("--origin", help="Read the data from this origin URL (a mirror)."),
    ] = peer_default("origin_url"),
    zone: Annotated[
        str, typer.Option("--zone", envvar="SWARM_ZONE", help="This node's zone or rack.")
    ] = peer_default("zone"),
    max_upload_rate: Annotated[
        int | None, rate_flag("--max-upload-rate", help="Cap on bytes per second sent to peers.")
    ] = None,
    max_download_rate: Annotated[
        int | None,
        rate_flag("--max-download-rate", help="Cap on bytes per second from peers and origin."),
    ] = None,
    no_fsync: Annotated[
        bool, typer.Option("--no-fsync", help="Don't flush pieces to disk (tests, benchmarks).")
    ] = False,
    no_origin: NoOrigin = False,
    poll_interval: Annotated[
        float,
        typer.Option(
            "--poll-interval",
            min=0.1,
            help="Seconds between polls of the tracker for versions to preheat (swarm warm).",
        ),
    ] = 5.0,
    unsent_limit: UnsentLimit = 0,
    token_file: TokenFile = None,
    tracker_ca: TrackerCA = None,
) -> None:
    """Run the node agent: keep the node's cache in the swarm and fetch for the node's pods.

    Every verified version in the cache is served for as long as the cache holds it (a
    late replica reads nothing from the origin), and is served again after a restart.
    Pods ask it through SOCKET: swarm fetch NAME --dest DIR with SWARM_AGENT=SOCKET.
    """
    from swarm.agent import Agent
    from swarm.announce import TrackerClient

    check_advertise(advertise)
    key = load_key(token_file)
    config = PeerConfig(
        listen_host=listen.strip("[]") or "0.0.0.0",
        listen_port=0,
        advertise_host=advertise,
        workers=workers,
        origin_url=origin,
        zone=zone,
        max_upload_rate=max_upload_rate or None,
        max_download_rate=max_download_rate or None,
        durable=not no_fsync,
        seeder=not no_origin,
        unsent_bytes=unsent_limit,
        key=key,
    )

    async def go() -> None:
        client = TrackerClient(tracker, key=key, ca_file=str(tracker_ca) if tracker_ca else None)
        agent = Agent(cache, client, config=config, capacity=capacity)
        background: list[asyncio.Task[None]] = []
        try:
            await agent.restore()
            server = await agent.serve_socket(Path(socket_path))
            background.append(asyncio.create_task(agent.poll(poll_interval)))
            if views is not None:
                views.mkdir(parents=True, exist_ok=True)
                background.append(asyncio.create_task(_collect_views(agent, views, kubelet_pods)))
            log.info(
                "agent serving cache %s (%d versions) on %s",
                cache,
                len(agent.versions),
                socket_path,
                extra={"cache": str(cache), "socket": socket_path, "tracker": tracker},
            )
            try:
                await asyncio.Event().wait()
            finally:
                server.close()
                await server.wait_closed()
                with contextlib.suppress(OSError):
                    Path(socket_path).unlink()  # clients see "no agent", not "refused"
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            try:
                await agent.close()
            finally:
                await client.close()

    run(go(), clean_exit_on_signal=True)


async def _collect_views(agent: Any, views: Path, kubelet_pods: Path) -> None:
    """Every 30 s: remove the views of pods that are gone, then evict what that freed."""
    from swarm.views import collect

    while True:
        await asyncio.sleep(30)
        if await asyncio.to_thread(collect, views, kubelet_pods):
            await agent.evict()


async def _agent_request(socket_path: str, request: dict[str, Any]) -> dict[str, Any]:
    from swarm.agent import ask

    conn = await ask(socket_path, request)
    try:
        return await conn.answer()
    finally:
        conn.close()


@app.command()
def warm(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@ROOT to preheat.")],
    tracker: Annotated[str, typer.Option("--tracker", envvar="SWARM_TRACKER", help="Tracker URL.")],
    min_copies: Annotated[
        int | None,
        typer.Option(
            "--min-copies", min=1, help="Verified copies wanted, each on a node agent of its own."
        ),
    ] = None,
    all_nodes: Annotated[
        bool, typer.Option("--all-nodes", help="A verified copy on every live node agent.")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds to wait before giving up.")
    ] = 3600.0,
    token_file: TokenFile = None,
    tracker_ca: TrackerCA = None,
    json: JsonFlag = False,
) -> None:
    """Preheat node agents before a rollout; returns once enough hold a verified copy.

    The tracker asks agents that lack the version to fetch it (through the swarm: one
    origin copy) until --min-copies of them, or all of them, hold it verified.
    """
    if (min_copies is None) == (not all_nodes):
        raise typer.BadParameter("give exactly one of --min-copies K or --all-nodes")
    key = load_key(token_file)
    copies = -1 if all_nodes else int(min_copies or 0)

    async def go() -> dict[str, Any]:
        from swarm.announce import TrackerClient

        client = TrackerClient(tracker, key=key, ca_file=str(tracker_ca) if tracker_ca else None)
        loop = asyncio.get_running_loop()
        try:
            status = await client.warm(ref, copies)
            root = status["root"]
            deadline = loop.time() + timeout
            last = None
            while True:
                shown = (status.get("verified"), status.get("holding"), status.get("wanted"))
                if shown != last:
                    last = shown
                    log.warning(
                        "%s: %s of %s copies verified (%s agents holding or fetching it, "
                        "%s agents live)",
                        ref,
                        status.get("verified"),
                        status.get("wanted"),
                        status.get("holding"),
                        status.get("agents"),
                    )
                wanted = int(status.get("wanted") or 0)
                if wanted > 0 and int(status.get("verified") or 0) >= wanted:
                    return {"ref": ref, **status}
                if loop.time() > deadline:
                    raise SwarmError(
                        f"{ref}: {status.get('verified')} of {wanted} copies verified after "
                        f"{timeout:g} s ({status.get('agents')} node agents live)"
                    )
                await asyncio.sleep(1.0)
                status = {"root": root, **await client.warm_status(root)}
        finally:
            await client.close()

    result = run(go())
    if json:
        emit_json(result)
    else:
        typer.echo(f"{result['ref']}: {result['verified']} verified copies on node agents")


@app.command("ls")
def ls_command(socket_path: AgentSocket, json: JsonFlag = False) -> None:
    """List what this node's agent holds: versions, sizes, pinned, in use."""
    answer = run(_agent_request(socket_path, {"op": "ls"}))
    if json:
        emit_json(answer)
        return
    for v in answer["versions"]:
        flags = ", ".join(
            f
            for f, on in (
                ("complete", v["complete"]),
                ("pinned", v["pinned"]),
                ("in use", v["in_use"]),
            )
            if on
        )
        typer.echo(f"{v['ref'][: len(v['name']) + 13]}  {format_size(v['bytes'])}  {flags}")
    typer.echo(f"cache: {format_size(answer['used'])} used")


@app.command("pin")
def pin_command(ref: HeldRef, socket_path: AgentSocket) -> None:
    """Keep a version in this node's cache whatever its capacity says."""
    _pin(socket_path, "pin", ref)


@app.command("unpin")
def unpin_command(ref: HeldRef, socket_path: AgentSocket) -> None:
    """Let a version be evicted again once it is unused and the cache is over capacity."""
    _pin(socket_path, "unpin", ref)


def _pin(socket_path: str, op: str, ref: str) -> None:
    answer = run(_agent_request(socket_path, {"op": op, "ref": ref}))
    typer.echo(f"{op}ned {answer['ref']}")


@app.command()
def demo(
    peers: Annotated[
        int, typer.Option("--peers", min=1, max=64, help="Peer processes to start.")
    ] = demo_default("peers"),
    size: Annotated[int, size_flag("--size", help="Synthetic model size.")] = Size(
        demo_default("size")
    ),
    piece_size: Annotated[int, size_flag("--piece-size", help="Piece size.")] = Size(
        demo_default("piece_size")
    ),
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir",
            help="Keep everything (data, copies, logs) here instead of a temporary directory.",
        ),
    ] = None,
    json: JsonFlag = False,
) -> None:
    """Run a whole swarm on this machine: S3 server, publish, tracker, N peers, verify, summary."""
    from swarm.demo import run_demo

    async def go() -> dict[str, Any]:
        config = DemoConfig(
            peers=peers, size=size, piece_size=piece_size, workdir=workdir, keep=workdir is not None
        )
        return await run_demo(config, stderr())

    summary = run(go())
    if json:
        emit_json(summary)
    else:
        ratio = summary["origin_bytes"] / summary["model_bytes"]
        stderr().print(
            f"\n[bold]{'verified' if summary['verified'] else 'NOT VERIFIED'}[/]: {peers} peers got "
            f"{format_size(summary['model_bytes'])} each in {summary['seconds']:.1f}s; "
            f"origin bytes = {ratio:.3f} x model; {format_size(summary['peer_bytes'])} exchanged peer to peer; "
            f"aggregate {summary['aggregate_mb_per_s']:.0f} MB/s"
        )
    if not summary["verified"]:
        raise typer.Exit(1)


def _command_in(argv: list[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option or the value of
    ``--log-format`` (the one option before a command that takes a value). None when
    ``--help`` or ``--version`` comes first: the whole app answers those."""
    words = iter(argv)
    for word in words:
        if word in ("--help", "--version"):
            return None
        if word == "--log-format":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _command_name(info: typer.models.CommandInfo) -> str:
    if info.name:
        return info.name
    return typer.main.get_command_name(info.callback.__name__) if info.callback else ""


def _app_for(argv: list[str]) -> typer.Typer:
    """The app that runs ``argv``: for a command of this module, ``app`` with that one
    command; for anything else (``--help``, ``simulate``, a word that deserves the
    whole list), ``app`` with the commands whose packages a trimmed install may lack.

    typer builds every command it holds (its parameters, from their annotations)
    before it parses a word: a fetch spent 15 ms of its 33 ms of CPU between the
    imports and its peer engine on the nine commands it doesn't run, and the
    simulator's command line costs 9 ms more to import.
    """
    command = _command_in(argv)
    own = [info for info in app.registered_commands if _command_name(info) == command]
    if own:
        alone = copy.copy(app)
        alone.registered_commands = own
        return alone
    try:
        from simulations.cli import register
    except ImportError:
        return app
    register(app)
    return app


def main() -> None:
    """Entry point: usage errors are one line and exit 2, as runtime errors are one line and exit 1."""
    command = _app_for(sys.argv[1:])
    try:
        code = command(standalone_mode=False)
    except NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        sys.exit(2)
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "swarm"
        term.error(f"{exc.format_message()} (see '{where} --help')")
        sys.exit(2)
    except ClickException as exc:
        term.error(exc.format_message())
        sys.exit(exc.exit_code)
    except typer.Abort:
        term.say("interrupted", "yellow")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
