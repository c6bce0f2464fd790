"""deploy/kubernetes: valid against the Kubernetes API schemas (offline, with
kubernetes-validate), every swarm command line in them one that ``swarm`` accepts,
and the pieces agreeing with each other (the socket, the shared mount, the Service,
the Secrets) so that applying them as the README says works.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")  # the oldest and newest versions we claim


def _docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _find(kind: str, name: str) -> dict[str, Any]:
    for doc in _docs():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in {DEPLOY}")


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _swarm_containers() -> list[dict[str, Any]]:
    return [
        c
        for doc in _docs()
        if doc["kind"] in ("Deployment", "DaemonSet")
        for c in _containers(doc)
        if "/swarm:" in c["image"]
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "kubernetes-validate"),
            "--strict",
            "--kubernetes-version",
            version,
            *map(str, sorted(DEPLOY.glob("*.yaml"))),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(_docs())


def test_every_swarm_command_line_is_one_swarm_accepts() -> None:
    runner = CliRunner()
    containers = _swarm_containers()
    assert {c["args"][0] for c in containers} == {"tracker", "agent", "fetch"}
    for container in containers:
        # $(VAR) is expanded by the kubelet from the container's env.
        args = [re.sub(r"\$\((\w+)\)", "10.0.0.7", a) for a in container["args"]]
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0, f"{container['name']}: swarm {args}: {result.output}"
        for var in re.findall(r"\$\((\w+)\)", " ".join(container["args"])):
            assert var in {e["name"] for e in container.get("env", [])}, var


def _arg(container: dict[str, Any], flag: str) -> str:
    for arg in container["args"]:
        if arg.startswith(f"{flag}="):
            return str(arg.split("=", 1)[1])
    raise AssertionError(f"{container['name']} has no {flag}")


def test_the_pieces_agree_with_each_other() -> None:
    agent_set = _find("DaemonSet", "swarm-agent")
    agent = _containers(agent_set)[0]
    inference = _find("Deployment", "example-inference")
    init, server = _containers(inference)
    service = _find("Service", "swarm-tracker")

    # The init container reaches the agent's socket, through the same host directory
    # mounted at the same path: the agent's cache paths mean the same thing in both,
    # and a hard link between cache and view stays inside one mount.
    socket = _arg(agent, "--socket")
    assert {e["name"]: e.get("value") for e in init["env"]}["SWARM_AGENT"] == socket

    def host_mount(doc: dict[str, Any], container: dict[str, Any], path: str) -> str:
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        for mount in container["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "hostPath" in volume and path.startswith(mount["mountPath"]):
                return f"{volume['hostPath']['path']}|{mount['mountPath']}"
        raise AssertionError(f"{container['name']}: {path} is on no hostPath mount")

    same = host_mount(agent_set, agent, socket)
    assert host_mount(agent_set, agent, _arg(agent, "--cache")) == same
    assert host_mount(agent_set, agent, _arg(agent, "--views")) == same
    assert host_mount(inference, init, socket) == same
    dest = _arg(init, "--dest")
    assert host_mount(inference, init, dest) == same
    assert dest.startswith(_arg(agent, "--views") + "/$(POD_UID)/")
    # The server reads exactly the pod's view, read-only.
    (models,) = server["volumeMounts"]
    assert models["readOnly"] is True
    mount_path = same.split("|")[1]
    assert "/" + models["subPathExpr"] == dest.removeprefix(mount_path)

    # The agent finds the tracker's Service, on TCP and UDP.
    tracker_url = _arg(agent, "--tracker")
    assert tracker_url.startswith(f"http://{service['metadata']['name']}.swarm.svc:7070")
    assert {(p["port"], p["protocol"]) for p in service["spec"]["ports"]} == {
        (7070, "TCP"),
        (7070, "UDP"),
    }

    # Every Secret named exists, and every container asks for resources.
    secrets = {d["metadata"]["name"] for d in _docs() if d["kind"] == "Secret"}
    text = "\n".join(p.read_text() for p in DEPLOY.glob("*.yaml"))
    for name in re.findall(r"secretName: ([\w-]+)|secretRef: \{name: ([\w-]+)", text):
        assert (name[0] or name[1]) in secrets
    for doc in _docs():
        if doc["kind"] in ("Deployment", "DaemonSet"):
            for container in _containers(doc):
                assert container["resources"]["requests"], container["name"]
    assert _find("PodDisruptionBudget", "swarm-agent")["spec"]["maxUnavailable"]
