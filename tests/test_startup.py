"""What a ``swarm`` process loads before it runs a command: not the parts a fetch never uses.

Every ``swarm`` command starts by importing ``cli.main``; a fetch served by peers
needs the peer, the tracker client and the store, not the tracker's HTTP server,
the demo, the simulator's engine or an object-store SDK. Measured with
``python -X importtime -c 'import cli.main'``: 318 ms before these were kept out,
254 ms after (median of 3 on the 2-core VM).
"""

from __future__ import annotations

import json
import subprocess
import sys

NOT_AT_START = (
    "tracker.service",
    "aiohttp.web",
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
