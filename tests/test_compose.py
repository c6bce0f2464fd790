"""docker-compose.yml: no Docker engine runs here, so check its structure and its commands."""

from __future__ import annotations

import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_services_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"s3", "publish", "tracker", "peer"} <= set(services)
    for name, service in services.items():
        if name == "s3":  # the demo's object store: an image of its own, not swarm's
            assert "build" not in service and service["image"].startswith("rclone/")
            continue
        assert service.get("build") == ".", f"{name} must build the project's Dockerfile"
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
    assert (
        services["peer"]["depends_on"]["publish"]["condition"] == "service_completed_successfully"
    )
    assert services["peer"]["deploy"]["replicas"] >= 2
    assert (ROOT / "Dockerfile").read_text().count("ENTRYPOINT") == 1


def _swarm_commands(compose: dict[str, Any]) -> list[list[str]]:
    out: list[list[str]] = []
    for service in compose["services"].values():
        if service.get("build") != ".":
            continue  # another image: not a swarm command
        entry = service.get("entrypoint")
        command = service.get("command", [])
        if entry is None:  # the image's entrypoint: swarm
            out.append([str(c) for c in command])
        elif entry == ["sh", "-c"]:
            for part in " ".join(command).split("&&"):
                words = shlex.split(part)
                if words and words[0] == "swarm":
                    out.append(words[1:])
    return out


def test_every_swarm_command_exists(compose: dict[str, Any]) -> None:
    commands = _swarm_commands(compose)
    assert {c[0] for c in commands} >= {"tracker", "fetch", "publish"}
    runner = CliRunner()
    for words in commands:
        # --help after the subcommand: typer validates the subcommand and prints its options.
        result = runner.invoke(app, [words[0], "--help"])
        assert result.exit_code == 0, f"swarm {words[0]} does not exist: {result.output}"
        for flag in (w for w in words[1:] if w.startswith("--")):
            assert flag in result.output, f"swarm {words[0]} has no option {flag}"


def test_the_file_follows_the_compose_specification() -> None:
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_holds_every_package_and_no_demo_server() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        name = pattern.rstrip("*")
        assert f"COPY {name} ./{name}" in dockerfile, f"the image lacks the {name} package"
    # The S3 server is the demo's: an extra, not a dependency every node installs.
    assert not any("rclone" in dep for dep in pyproject["project"]["dependencies"])
    assert any("rclone" in dep for dep in pyproject["project"]["optional-dependencies"]["demo"])
    assert "USER 10001" in dockerfile and "STOPSIGNAL SIGTERM" in dockerfile


def test_each_peer_writes_into_a_volume_and_stops_on_sigterm(compose: dict[str, Any]) -> None:
    peer = compose["services"]["peer"]
    dest = peer["command"][peer["command"].index("--dest") + 1]
    assert any(dest.startswith(str(v).split(":")[-1]) for v in peer["volumes"])
    assert peer["stop_signal"] == "SIGTERM"
    assert "mkdir -p /models && chown 10001:10001 /models" in (ROOT / "Dockerfile").read_text()
