"""What a ``swarm`` process loads before it runs a command: not the parts a fetch never uses.

Every ``swarm`` command starts by importing ``cli.main``; a fetch served by peers
needs the peer, the tracker client and the store, not the tracker's HTTP server,
the demo, the simulator's engine or an object-store SDK. Measured with
``python -X importtime -c 'import cli.main'``: 318 ms before these were kept out,
254 ms after (median of 3 on the 2-core VM); 242 -> 152 ms once the tracker client
spoke HTTP itself instead of through aiohttp (``swarm/http.py``). typer 0.28 and
later import pydantic as a command line is parsed (pyproject pins below it).

A fetch without a terminal (an init container, an agent, a benchmark's node) loads
neither Rich, nor yarl, nor the simulator's command line (``cli.term``): eight
processes importing the command line at once took 0.99 s before, 0.75 s after, and
0.60 s with the collector paused while they import (``cli.entry``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import S3Bucket
from servers import populate

NOT_AT_START = (
    "tracker.service",
    "aiohttp",
    "pydantic",
    "swarm.demo",
    "seeder.local_s3",
    "simulations.engine",
    "simulations.strategies",
    "simulations.network",
    "boto3",
    "botocore",
    "google.cloud.storage",
    "matplotlib",
)


def test_the_command_line_loads_no_server_demo_simulator_or_sdk_to_start() -> None:
    code = (
        "import json, sys\n"
        "import cli.main\n"
        f"print(json.dumps([m for m in {NOT_AT_START!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == []


def test_the_tracker_and_simulate_commands_still_load_what_they_need() -> None:
    code = (
        "import json, sys\n"
        "import cli.main\n"
        "from tracker.service import Tracker\n"
        "from simulations.runner import run_strategy\n"
        "print(json.dumps(['tracker.service' in sys.modules, 'simulations.engine' in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == [True, True]


NOT_FOR_A_FETCH = ("aiohttp", "pydantic", "rich", "yarl", "simulations.cli", "simulations.scenario")


# What decides whether Rich sees a terminal and draws in color (TERM=dumb: no escapes).
_TERMINAL_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "TERM", "COLORTERM")


def _fetch_loads(tmp_path: Path, env: dict[str, str]) -> tuple[object, list[str], str]:
    # Parsed, run and failed (there is no such catalog): everything a fetch imports
    # on its way is in sys.modules by then. stderr is a pipe, not a terminal.
    code = (
        "import json, sys\n"
        f"sys.argv = ['swarm', 'fetch', 'm', '--catalog', {(tmp_path / 'none').as_uri()!r},"
        f" '--dest', {str(tmp_path / 'dest')!r}, '--direct']\n"
        "from cli.entry import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        f"print(json.dumps([code, [m for m in {NOT_FOR_A_FETCH!r} if m in sys.modules]]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={k: v for k, v in os.environ.items() if k not in _TERMINAL_ENV} | env,
    )
    exit_code, loaded = json.loads(done.stdout.splitlines()[-1])
    return exit_code, loaded, done.stderr


def test_a_whole_fetch_command_loads_no_server_framework_rich_or_simulator(tmp_path: Path) -> None:
    exit_code, loaded, stderr = _fetch_loads(tmp_path, {})
    assert exit_code not in (0, None), stderr
    assert loaded == [], stderr
    # Its error is still one JSON log line and a one-line message, as before.
    assert "error:" in stderr and "none" in stderr, stderr


def test_a_forced_terminal_still_gets_rich(tmp_path: Path) -> None:
    # FORCE_COLOR makes Rich treat a pipe as a terminal: then Rich draws, as it decides.
    exit_code, loaded, stderr = _fetch_loads(
        tmp_path, {"FORCE_COLOR": "1", "TERM": "xterm-256color"}
    )
    assert exit_code not in (0, None), stderr
    assert "rich" in loaded, stderr
    assert "\x1b[" in stderr, stderr  # drawn with escape sequences


def test_simulate_and_help_still_register_the_simulator() -> None:
    for argv in (
        ["--help"],
        ["-v", "simulate", "--help"],
        ["--log-format", "json", "simulate", "--help"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "cli", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert done.returncode == 0, done.stderr
        assert "simulate" in done.stdout, (argv, done.stdout)


def test_reading_an_s3_origin_at_a_named_endpoint_loads_no_sdk(s3_bucket: S3Bucket) -> None:
    # Ranged reads, HEAD and whole GETs are signed in-process (seeder.backends.sigv4):
    # boto3 alone cost a fetch 0.17 CPU-s before its first origin byte.
    populate(s3_bucket.path, {"a.bin": bytes(range(256)) * 4})
    code = (
        "import asyncio, json, sys\n"
        "from seeder.backends.s3 import S3Origin\n"
        "async def main():\n"
        f"    async with S3Origin({s3_bucket.url!r}) as origin:\n"
        "        buf = bytearray(10)\n"
        "        await origin.read_into('a.bin', 250, memoryview(buf))\n"
        "        size = (await origin.stat('a.bin')).size\n"
        "        whole = await origin.get_bytes('a.bin')\n"
        "        return [list(buf), size, len(whole), origin.signs_requests]\n"
        "got = asyncio.run(main())\n"
        "print(json.dumps([got, [m for m in ('boto3', 'botocore') if m in sys.modules]]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, **s3_bucket.env},
    )
    got, loaded = json.loads(done.stdout.splitlines()[-1])
    assert got == [[250, 251, 252, 253, 254, 255, 0, 1, 2, 3], 1024, 1024, True]
    assert loaded == []


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["fetch", "m"], "fetch"),
        (["-v", "-v", "fetch"], "fetch"),
        (["--log-format", "json", "tracker"], "tracker"),
        (["--log-format=text", "agent"], "agent"),
        (["--log-format", "fetch", "verify"], "verify"),  # a value, even one named like a command
        (["--", "fetch"], "fetch"),
        (["--help", "fetch"], None),  # the whole app's help, every command in it
        (["--version"], None),
        ([], None),
    ],
)
def test_the_command_word_is_found_past_global_options(
    argv: list[str], command: str | None
) -> None:
    from cli.main import _command_in

    assert _command_in(argv) == command


def test_help_before_a_command_still_lists_every_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cli", "--help", "fetch"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    for command in ("publish", "fetch", "tracker", "agent", "simulate"):
        assert f" {command} " in done.stdout, done.stdout


def test_an_error_with_stderr_closed_does_not_land_on_stdout(tmp_path: Path) -> None:
    # stdout carries --json and publish's ref for scripts; with 2>&- Python has no
    # sys.stderr, and the error line must not move to stdout.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "fetch",
            "m",
            "--direct",
            "--dest",
            str(tmp_path / "d"),
            "--catalog",
            (tmp_path / "none").as_uri(),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        timeout=60,
        close_fds=True,
        preexec_fn=lambda: os.close(2),
    )
    assert done.returncode == 1
    assert done.stdout == ""
