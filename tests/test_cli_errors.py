"""The command line as a careless operator meets it: bad flags, busy ports, signals.

Each case runs the real ``swarm`` console script. A usage mistake is one ``error:``
line and exit code 2; a runtime failure is one line and exit code 1; SIGTERM stops
a service cleanly (exit 0) and a fetch without losing what it verified (exit 143),
also when the tracker is PID 1 of its own PID namespace, as in a container, where
the kernel drops any signal the process has no handler for.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import typer
from fetch_helpers import cli_env, swarm, swarm_argv
from servers import LOOPBACK, free_port

from cli.main import unsent_option

STOP_WAIT = 10.0


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize(
    "args",
    [
        ("tracker", "--listen", "foo"),
        ("tracker", "--listen", "127.0.0.1:99999"),
        ("fetch", "m", "--dest", "/tmp/x", "--tracker", "http://127.0.0.1:9", "--listen", "x"),
        ("fetch", "m", "--dest", "/tmp/x"),
        ("--no-such-flag",),
        ("--log-format", "xml", "tracker"),
        ("fetch", "m", "--dest", "/tmp/x", "--direct", "--progress-interval", "0"),
        # Over the wire's largest block (swarm.protocol.MAX_BLOCK): refused before
        # anything starts, not when the first connection's decoder is built.
        (
            "fetch",
            "m",
            "--dest",
            "/tmp/x",
            "--tracker",
            "http://127.0.0.1:9",
            "--block-size",
            "32MiB",
        ),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(args: tuple[str, ...]) -> None:
    run = swarm(*args, timeout=30)
    assert run.returncode == 2, run.describe()
    line = run.error_line()
    assert "--help" in line, line


def test_a_busy_tracker_port_is_one_line_and_exit_1(tmp_path: Path) -> None:
    port = free_port()
    with socketserver_on(port):
        run = swarm(
            "tracker", "--listen", f"{LOOPBACK}:{port}", "--catalog", tmp_path.as_uri(), timeout=30
        )
    assert run.returncode == 1, run.describe()
    line = run.error_line()
    assert f"{LOOPBACK}:{port}" in line and "in use" in line, line


class socketserver_on:
    """Hold a TCP port (listening) for the duration of a ``with`` block."""

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((LOOPBACK, port))
        self.sock.listen(1)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def _healthz(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/healthz", timeout=0.5):
            return True
    except OSError as exc:
        # 503 (catalog unreachable) still means it is up and answering.
        return getattr(exc, "code", None) == 503


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def test_sigterm_stops_a_tracker_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        swarm_argv("tracker", "--listen", f"{LOOPBACK}:{port}", "--catalog", tmp_path.as_uri()),
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(lambda: _healthz(port), 20, "the tracker to answer")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=STOP_WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")
    assert b"Traceback" not in err


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) to run the tracker as PID 1 of a new PID namespace",
)
def test_sigterm_stops_a_tracker_that_is_pid_1(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            *swarm_argv(
                "tracker", "--listen", f"{LOOPBACK}:{port}", "--catalog", tmp_path.as_uri()
            ),
        ],
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(lambda: _healthz(port), 20, "the tracker (PID 1) to answer")
        children = _children(proc.pid)
        assert len(children) == 1, children
        status = Path(f"/proc/{children[0]}/status").read_text()
        nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
        assert nspid.split()[-1] == "1", nspid  # it really is PID 1 in its namespace
        os.kill(children[0], signal.SIGTERM)
        _, err = proc.communicate(timeout=STOP_WAIT)
    finally:
        if proc.poll() is None:
            for child in _children(proc.pid):
                os.kill(child, signal.SIGKILL)
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")


def test_an_unknown_name_fails_at_once_naming_the_close_ones(tmp_path: Path) -> None:
    from fetch_helpers import make_model, publish
    from servers import populate

    populate(tmp_path / "origin", make_model(5, {"w.bin": 3000, "config.json": 100}))
    catalog = (tmp_path / "catalog").as_uri()
    publish((tmp_path / "origin").as_uri(), "tiny-llm", catalog, piece_size="1KiB")
    port = free_port()
    tracker = subprocess.Popen(
        swarm_argv("tracker", "--listen", f"{LOOPBACK}:{port}", "--catalog", catalog),
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(lambda: _healthz(port), 20, "the tracker to answer")
        # The fetch would retry an unreachable tracker for --tracker-timeout (60 s);
        # the subprocess is given less than that, so only an answer at once passes.
        run = swarm(
            "fetch",
            "tiny-lm",
            "--tracker",
            f"http://{LOOPBACK}:{port}",
            "--dest",
            str(tmp_path / "dest"),
            "--tracker-timeout",
            "60",
            timeout=40,
        )
    finally:
        tracker.terminate()
        tracker.communicate(timeout=STOP_WAIT)
    line = run.error_line()
    assert run.returncode == 1, run.describe()
    assert "tiny-lm" in line and "tiny-llm" in line and "404" in line, line


def test_the_unsent_limit_option_takes_a_size_or_off() -> None:
    assert unsent_option("off") == -1
    assert unsent_option("1MiB") == 1024 * 1024
    assert unsent_option("0") == 0
    with pytest.raises(typer.BadParameter, match="or off"):
        unsent_option("banana")
