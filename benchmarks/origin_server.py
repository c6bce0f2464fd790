"""Run :class:`seeder.local_s3.LocalS3Server` in the foreground, for use inside a namespace.

``python -m benchmarks.origin_server ROOT --host H --port P`` starts ``rclone serve
s3`` on H:P, prints one line ``ready http://H:P`` on stdout, and stops the server
when it receives SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from seeder.local_s3 import LocalS3Server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.origin_server")
    parser.add_argument("root", type=Path, help="directory whose folders are the buckets")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with LocalS3Server(args.root, host=args.host, port=args.port) as server:
        print(f"ready {server.endpoint}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
