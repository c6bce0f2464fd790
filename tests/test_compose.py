"""docker-compose.yml: no Docker engine runs here, so check its structure and its commands."""

from __future__ import annotations

import shlex
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
