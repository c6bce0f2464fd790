"""The ``swarm`` command line: parse, wire the parts together, print. Logic lives in the packages."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.logging import RichHandler
from rich.markup import escape

from cli.progress import byte_progress, stderr
from swarm.errors import ConfigError, SwarmError
from swarm.manifest import DEFAULT_PIECE_SIZE
from swarm.units import format_size, parse_size

try:  # typer >= 0.22 vendors click; older releases use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import (  # type: ignore[assignment]
        ClickException,
        NoArgsIsHelpError,
        UsageError,
    )

if TYPE_CHECKING:
    from swarm.auth import ClusterKey
    from swarm.fetch import FetchConfig, FetchResult
    from swarm.peer import PeerConfig

T = TypeVar("T")

app = typer.Typer(
    name="swarm",
    help=(
        "Peer-to-peer distribution of large model artifacts: each byte leaves object storage "
        "once per cluster, and nodes trade verified pieces over the cluster network."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def size_option(value: str) -> int:
    """Typer callback: accept ``256MiB``, ``100GB``, ``1TiB`` or a plain byte count."""
    try:
        return parse_size(value)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc


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
    from swarm.auth import ClusterKey

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
        stderr.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2 if isinstance(exc, ConfigError) else 1) from None
    except Terminated as exc:
        if clean_exit_on_signal:
            raise typer.Exit(0) from None
        stderr.print(f"[yellow]stopped by {exc}[/]")
        raise typer.Exit(128 + exc.signum) from None
    except KeyboardInterrupt:
        stderr.print("[yellow]interrupted[/]")
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


def emit_json(obj: dict[str, Any]) -> None:
    """The one JSON object a ``--json`` command prints on stdout."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


@app.callback()
def main_options(
    verbose: Annotated[
        int,
        typer.Option("--verbose", "-v", count=True, help="More log output on stderr (-vv: debug)."),
    ] = 0,
) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=stderr, show_path=False, rich_tracebacks=False)],
    )


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
    piece_size: Annotated[
        int,
        typer.Option(
            "--piece-size", parser=size_option, help="Piece size, e.g. 256MiB.", metavar="SIZE"
        ),
    ] = DEFAULT_PIECE_SIZE,
    files: Annotated[
        list[str] | None,
        typer.Option(
            "--file",
            help="Publish only these keys (repeatable); required for http(s) origins, which can't list.",
        ),
    ] = None,
    token_file: TokenFile = None,
    origin_retry_time: OriginRetryTime = 600.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout at the end.")
    ] = False,
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
        with byte_progress(f"hashing {name}", None) as bar:

            def on_progress(n: int, total: int) -> None:
                if n == 0:
                    bar.set_total(total)
                bar.advance(n)

            manifest = await do_publish(
                origin_url,
                name,
                url,
                piece_size=piece_size,
                files=files,
                progress=on_progress,
                key=key,
                retry_time=origin_retry_time,
            )
        if as_json:
            emit_json(
                {
                    "artifact": manifest.name,
                    "root": manifest.root_hex,
                    "ref": manifest.ref,
                    "model_bytes": manifest.total_size,
                    "files": len(manifest.files),
                    "pieces": manifest.num_pieces,
                    "piece_size": manifest.piece_size,
                    "catalog": url,
                }
            )
        else:
            stderr.print(
                f"published {manifest.name}: {len(manifest.files)} files, {format_size(manifest.total_size)}, "
                f"{manifest.num_pieces} pieces of {format_size(manifest.piece_size)}"
            )
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
    linger: Annotated[
        float,
        typer.Option(
            "--linger",
            min=0,
            help="After finishing, keep serving until every peer of the swarm has finished, at most this many seconds.",
        ),
    ] = 300.0,
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT to accept peer connections on (port 0: any).")
    ] = "0.0.0.0:0",
    advertise: Annotated[
        str,
        typer.Option(
            "--advertise",
            envvar="SWARM_ADVERTISE",
            help="Address other peers should dial (default: the address the tracker sees).",
        ),
    ] = "",
    fallback_direct: Annotated[
        bool,
        typer.Option(
            "--fallback-direct",
            help="If the tracker stays unreachable past --tracker-timeout, read the rest from the origin. Off by default: a hundred silent fallbacks are the storm swarm prevents.",
        ),
    ] = False,
    tracker_timeout: Annotated[
        float,
        typer.Option(
            "--tracker-timeout",
            min=1,
            help="Seconds the tracker may stay unreachable before giving up (or falling back).",
        ),
    ] = 120.0,
    block_size: Annotated[
        int,
        typer.Option(
            "--block-size",
            parser=size_option,
            metavar="SIZE",
            help="Block size requested from peers.",
        ),
    ] = 4 * 1024 * 1024,
    requests_per_peer: Annotated[
        int,
        typer.Option(
            "--requests-per-peer",
            min=1,
            max=256,
            help="Block requests in flight per peer connection.",
        ),
    ] = 6,
    upload_slots: Annotated[
        int,
        typer.Option(
            "--upload-slots",
            min=1,
            max=1024,
            help="Blocks uploaded at once, shared round-robin by all peers.",
        ),
    ] = 16,
    serve_corrupt: Annotated[
        bool,
        typer.Option(
            "--serve-corrupt",
            hidden=True,
            help="Fault injection for tests: corrupt every block served.",
        ),
    ] = False,
    origin: Annotated[
        str | None,
        typer.Option(
            "--origin",
            help="Read the data from this origin URL instead of the one in the manifest (a mirror).",
        ),
    ] = None,
    pieces_in_flight: Annotated[
        int, typer.Option("--pieces-in-flight", min=1, max=256, help="Pieces fetched at once.")
    ] = 4,
    range_size: Annotated[
        int,
        typer.Option(
            "--range-size",
            parser=size_option,
            metavar="SIZE",
            help="Size of each ranged origin request.",
        ),
    ] = 16 * 1024 * 1024,
    origin_concurrency: Annotated[
        int,
        typer.Option("--origin-concurrency", min=1, max=1024, help="Concurrent origin requests."),
    ] = 16,
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
    token_file: TokenFile = None,
    tracker_ca: Annotated[
        Path | None,
        typer.Option(
            "--tracker-ca",
            envvar="SWARM_TRACKER_CA",
            help="CA bundle (PEM) that signed an https:// tracker's certificate (default: the system's).",
        ),
    ] = None,
    origin_retry_time: OriginRetryTime = 600.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON summary object on stdout at the end.")
    ] = False,
) -> None:
    """Fetch an artifact into DEST, verified with blake3, resumable, marked complete only when whole.

    Exit code 0 only when every piece is verified and the completion marker is written.
    """
    from swarm.fetch import FetchConfig

    if direct == bool(tracker):
        raise typer.BadParameter(
            "give exactly one of --tracker URL (swarm) or --direct (origin only)"
        )
    key = load_key(token_file)
    if tracker:
        host, port = parse_listen("--listen", listen)
        from swarm.peer import PeerConfig

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
            key=key,
        )
        result = run(_fetch_swarm(ref, dest, tracker, catalog, config, tracker_ca))
    else:
        direct_config = FetchConfig(
            pieces_in_flight=pieces_in_flight,
            range_size=range_size,
            origin_concurrency=origin_concurrency,
            durable=not no_fsync,
            direct_io=not no_direct_io,
            origin_retry_time=origin_retry_time,
        )
        result = run(_fetch_direct(ref, dest, catalog, key, origin, direct_config))
    if as_json:
        emit_json(result.to_json())
    else:
        stderr.print(
            f"{result.artifact}@{result.root[:12]}: {format_size(result.model_bytes)} verified in "
            f"{dest} in {result.seconds:.1f}s (origin {format_size(result.origin_bytes)}, "
            f"peers {format_size(result.peer_bytes)}, reused {format_size(result.reused_bytes)}"
            + (
                f", uploaded {format_size(result.extra['uploaded_bytes'])})"
                if "uploaded_bytes" in result.extra
                else ")"
            )
        )


async def _fetch_direct(
    ref: str,
    dest: Path,
    catalog: str | None,
    key: ClusterKey,
    origin: str | None,
    config: FetchConfig,
) -> FetchResult:
    """Every missing piece of ``ref`` straight from the origin (no tracker, no peers)."""
    from seeder.catalog import Catalog, catalog_url
    from seeder.origin import open_origin
    from swarm.fetch import fetch_direct

    async with Catalog(catalog_url(catalog), key) as cat:
        manifest = await cat.get(ref)
        catalog_retries = cat.origin.counters.retries
    src = open_origin(origin) if origin else None
    try:
        with byte_progress(f"{manifest.name}", manifest.total_size) as bar:
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
) -> FetchResult:
    """``ref`` through the swarm: the manifest from the tracker, the pieces from peers and seeders."""
    from seeder.catalog import Catalog
    from swarm.announce import TrackerAuthError, TrackerClient
    from swarm.errors import TrackerError, UnknownArtifactError
    from swarm.peer import SwarmPeer

    client = TrackerClient(tracker_url, key=config.key, ca_file=str(ca_file) if ca_file else None)
    try:
        manifest = None
        deadline = asyncio.get_running_loop().time() + config.tracker_timeout
        backoff = 0.5
        while manifest is None:
            try:
                manifest = await client.manifest(ref)
            except (UnknownArtifactError, TrackerAuthError):
                raise  # the tracker answered: asking again would not help
            except TrackerError as exc:
                if asyncio.get_running_loop().time() > deadline:
                    if config.fallback_direct and catalog:
                        stderr.print(
                            f"[yellow]tracker unreachable ({exc}); falling back to the origin[/]"
                        )
                        async with Catalog(catalog, config.key) as cat:
                            manifest = await cat.get(ref)
                        break
                    raise
                stderr.print(
                    f"[yellow]tracker not answering ({exc}); retrying in {backoff:.1f}s[/]"
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        with byte_progress(manifest.name, manifest.total_size, enabled=True) as bar:
            peer = SwarmPeer(manifest, dest, client, config=config, progress=bar.advance)
            return await peer.run()
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
    tracker_ca: Annotated[
        Path | None,
        typer.Option(
            "--tracker-ca", envvar="SWARM_TRACKER_CA", help="CA bundle of an https:// tracker."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout at the end.")
    ] = False,
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
        with byte_progress(f"verifying {dest}", None, enabled=not as_json) as bar:
            report = await asyncio.to_thread(
                verify_dir, dest, workers=workers, root=root, progress=bar.advance
            )
        out = report.to_json()
        if not report.ok:
            for bad in report.bad_files:
                stderr.print(f"[red]bad file[/] {escape(str(bad.to_json()))}", highlight=False)
            for piece in report.bad_pieces:
                stderr.print(
                    f"[red]bad piece {piece.index}[/]: {escape(piece.path)} bytes "
                    f"{piece.offset}-{piece.offset + piece.length - 1} ({piece.reason})",
                    highlight=False,
                )
        repaired = report.ok
        if repair and not report.ok:
            ref = f"{report.artifact}@{report.root}"
            if tracker:
                from swarm.peer import PeerConfig

                peer_config = PeerConfig(linger=0.0, catalog=catalog, key=key)
                result = await _fetch_swarm(ref, dest, tracker, catalog, peer_config, tracker_ca)
            else:
                from swarm.fetch import FetchConfig

                result = await _fetch_direct(ref, dest, catalog, key, None, FetchConfig())
            out["repair"] = result.to_json()
            repaired = result.verified
        if as_json:
            emit_json(out)
        else:
            stderr.print(
                f"{report.artifact}@{report.root[:12]}: {report.pieces - len(report.bad_pieces)} of "
                f"{report.pieces} pieces good in {dest} ({format_size(report.bytes)} hashed in "
                f"{report.seconds:.1f}s with {report.workers} workers)"
                + ("" if report.ok else f"; {len(report.bad_pieces)} bad")
                + (" — repaired" if repair and not report.ok and repaired else "")
            )
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
    ] = "0.0.0.0:7070",
    catalog: Annotated[
        str | None,
        typer.Option(
            "--catalog", envvar="SWARM_CATALOG", help="Catalog URL where manifests are read from."
        ),
    ] = None,
    announce_interval: Annotated[
        float,
        typer.Option("--announce-interval", min=0.1, help="Seconds between a peer's announces."),
    ] = 2.0,
    peer_ttl: Annotated[
        float,
        typer.Option(
            "--peer-ttl",
            min=0.5,
            help="A peer silent this long has left; its origin pieces are reassigned.",
        ),
    ] = 10.0,
    stall_timeout: Annotated[
        float,
        typer.Option(
            "--stall-timeout",
            min=0.5,
            help="An origin pull whose progress stands still this long is reassigned.",
        ),
    ] = 30.0,
    per_peer_limit: Annotated[
        int,
        typer.Option(
            "--per-peer-origin-pieces", min=1, help="Origin pieces one peer pulls at once."
        ),
    ] = 2,
    origin_budget: Annotated[
        int | None,
        typer.Option(
            "--origin-budget",
            min=1,
            help="Origin pieces the whole cluster pulls at once (default: per-peer limit x peers, at most 256: pieces in flight share the origin and help nobody until whole).",
        ),
    ] = None,
    manifest_ttl: Annotated[
        float,
        typer.Option(
            "--manifest-ttl",
            min=0.0,
            help="Seconds a name's latest version is cached (a burst by name reads the catalog once; a republish is served within this time).",
        ),
    ] = 5.0,
    bar_reporters: Annotated[
        int,
        typer.Option(
            "--bar-reporters",
            min=2,
            help="Distinct peers that must report a peer for corrupt data before the tracker bars it from the swarm.",
        ),
    ] = 2,
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
    from tracker.service import Tracker, TrackerConfig

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
            per_peer_limit=per_peer_limit,
            origin_budget=origin_budget,
            manifest_ttl=manifest_ttl,
            bar_reporters=bar_reporters,
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
        try:
            await asyncio.Event().wait()
        finally:
            await tracker.close()

    run(go(), clean_exit_on_signal=True)


@app.command()
def demo(
    peers: Annotated[
        int, typer.Option("--peers", min=1, max=64, help="Peer processes to start.")
    ] = 6,
    size: Annotated[
        int,
        typer.Option("--size", parser=size_option, metavar="SIZE", help="Synthetic model size."),
    ] = 256 * 1024 * 1024,
    piece_size: Annotated[
        int, typer.Option("--piece-size", parser=size_option, metavar="SIZE", help="Piece size.")
    ] = 16 * 1024 * 1024,
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir",
            help="Keep everything (data, copies, logs) here instead of a temporary directory.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON summary object on stdout at the end.")
    ] = False,
) -> None:
    """Run a whole swarm on this machine: S3 server, publish, tracker, N peers, verify, summary."""
    from swarm.demo import DemoConfig, run_demo

    async def go() -> dict[str, Any]:
        config = DemoConfig(
            peers=peers, size=size, piece_size=piece_size, workdir=workdir, keep=workdir is not None
        )
        return await run_demo(config, stderr)

    summary = run(go())
    if as_json:
        emit_json(summary)
    else:
        ratio = summary["origin_bytes"] / summary["model_bytes"]
        stderr.print(
            f"\n[bold]{'verified' if summary['verified'] else 'NOT VERIFIED'}[/]: {peers} peers got "
            f"{format_size(summary['model_bytes'])} each in {summary['seconds']:.1f}s; "
            f"origin bytes = {ratio:.3f} x model; {format_size(summary['peer_bytes'])} exchanged peer to peer; "
            f"aggregate {summary['aggregate_mb_per_s']:.0f} MB/s"
        )
    if not summary["verified"]:
        raise typer.Exit(1)


def _register_optional() -> None:
    """Commands whose packages may be absent from a trimmed install."""
    try:
        from simulations.cli import register
    except ImportError:
        return
    register(app)


_register_optional()


def main() -> None:
    """Entry point: usage errors are one line and exit 2, as runtime errors are one line and exit 1."""
    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        sys.exit(2)
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "swarm"
        stderr.print(
            f"[bold red]error:[/] {escape(exc.format_message())} (see '{where} --help')",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    except ClickException as exc:
        stderr.print(f"[bold red]error:[/] {escape(exc.format_message())}", highlight=False)
        sys.exit(exc.exit_code)
    except typer.Abort:
        stderr.print("[yellow]interrupted[/]")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
