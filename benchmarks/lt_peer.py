"""One libtorrent session, for the side-by-side runs on the shaped testbed.

``python -m benchmarks.lt_peer seed TORRENT --save-path DIR --listen HOST:PORT``
seeds the artifact already in DIR (``seed_mode``: no re-hash at start), prints
``ready`` on stdout once it is listening, and serves until SIGTERM.

``python -m benchmarks.lt_peer leech TORRENT --save-path DIR --listen HOST:PORT
--peer HOST:PORT ... --done-file F`` downloads into DIR from the listed peers
(libtorrent checks every piece's SHA-1 before keeping it), writes F (JSON with
its own ``seconds``) the moment the download is complete, keeps serving until
SIGTERM or ``--linger`` seconds, then prints one JSON object on stdout.

Settings for a LAN of namespaces: DHT, LSD, UPnP and NAT-PMP off, several
connections per IP allowed, TCP only (no uTP), reconnect after 1 s instead of 60 s.
Every other setting is libtorrent's default.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import libtorrent as lt


def make_torrent(artifact_dir: Path, piece_size: int) -> bytes:
    """A v1 .torrent of every file under ``artifact_dir`` (its name is the torrent's name)."""
    fs = lt.file_storage()
    lt.add_files(fs, str(artifact_dir))
    ct = lt.create_torrent(fs, piece_size, flags=lt.create_torrent.v1_only)
    ct.set_creator("swarm benchmarks")
    lt.set_piece_hashes(ct, str(artifact_dir.parent))
    return bytes(lt.bencode(ct.generate()))


def lan_settings(listen: str) -> lt.settings_pack:
    return {
        "listen_interfaces": listen,
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "allow_multiple_connections_per_ip": True,
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        "min_reconnect_time": 1,
        "alert_mask": 0,
    }


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lt_peer")
    parser.add_argument("role", choices=["seed", "leech"])
    parser.add_argument("torrent", type=Path)
    parser.add_argument("--save-path", type=Path, required=True)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--peer", action="append", default=[], help="HOST:PORT to connect to")
    parser.add_argument("--done-file", type=Path, help="leech: written when complete")
    parser.add_argument("--linger", type=float, default=300.0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)

    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    started = time.monotonic()
    session = lt.session(lan_settings(args.listen))
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(str(args.torrent))
    params.save_path = str(args.save_path)
    if args.role == "seed":
        params.flags |= lt.torrent_flags.seed_mode
    handle = session.add_torrent(params)
    for peer in args.peer:
        handle.connect_peer(_split(peer))

    finished_at: float | None = None
    if args.role == "seed":
        print("ready", flush=True)
    deadline = started + args.timeout
    while not stop and time.monotonic() < deadline:
        status = handle.status()
        if finished_at is None and args.role == "leech" and status.is_seeding:
            finished_at = time.monotonic()
            if args.done_file is not None:
                tmp = args.done_file.with_suffix(".tmp")
                tmp.write_text(json.dumps({"seconds": finished_at - started}))
                os.replace(tmp, args.done_file)
            deadline = min(deadline, finished_at + args.linger)
        time.sleep(0.02)

    status = handle.status()
    out = {
        "role": args.role,
        "seconds": (finished_at or time.monotonic()) - started,
        "verified": bool(status.is_seeding),
        "payload_download": int(status.total_payload_download),
        "payload_upload": int(status.total_payload_upload),
        "failed_bytes": int(status.total_failed_bytes),
        "redundant_bytes": int(status.total_redundant_bytes),
    }
    session.pause()
    del session
    print(json.dumps(out, sort_keys=True), flush=True)
    return 0 if args.role == "seed" or finished_at is not None else 1


if __name__ == "__main__":
    sys.exit(main())
