"""Sweeps on a real multi-node Ray cluster: `ray start` head and worker processes on loopback, token auth on
every node and driver, `sweep run SPEC --address HOST:PORT` as a user types it, every trial in a real
MLflow server.

One machine stands in for several: each node is its own `ray start --block` process group (never `ray stop`,
which would end every Ray process on the machine, other tests' included), with its own ports and a private
--temp-dir; GPUs are logical (`--num-gpus 2` without CUDA), which is all Ray's scheduler looks at.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import http_status

from sweep.tracking import free_port, stop_process_tree

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "search_spaces" / "tests" / "multinode.yaml"
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90
SWEEP_TIMEOUT_S = 240
CUDA_FALLBACK_WARNING = "no CUDA GPU is visible; training on the CPU"

pytestmark = pytest.mark.slow


def _http_status(url: str, token: str | None = None) -> int:
    return http_status(url, {"Authorization": f"Bearer {token}"} if token else None)


@dataclass
class Node:
    proc: subprocess.Popen
    agent_port: int  # the dashboard agent: /api/local_raylet_healthz, what docker-compose.yml probes
    log: Path


@dataclass
class LoopbackCluster:
    """A Ray cluster of `ray start` processes on this machine, with token auth on."""

    temp_dir: Path
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: list[Node] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """What the head, every worker and every driver share: the same RAY_AUTH_MODE and token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}
        path = {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}  # `sweep` on PATH, as in the image
        return env | auth | path | extra

    def start_head(self, *args: str) -> Node:
        node = self._start("head", "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                           f"--dashboard-port={self.dashboard_port}",
                           f"--ray-client-server-port={free_port()}", *args)
        self._wait(lambda: _http_status(f"http://127.0.0.1:{self.dashboard_port}/api/gcs_healthz") == 200,
                   node, "head")
        return node

    def add_node(self, name: str, *args: str) -> Node:
        node = self._start(name, f"--address={self.address}", *args)
        return node

    def wait_for_nodes(self) -> None:
        """Until every node's raylet answers (what docker-compose.yml's worker health check asks)."""
        for node in self.nodes:
            url = f"http://127.0.0.1:{node.agent_port}/api/local_raylet_healthz"
            self._wait(lambda url=url: _http_status(url) == 200, node, node.log.stem)

    def _start(self, name: str, *args: str) -> Node:
        agent_port = free_port()
        log = self.temp_dir / f"{name}.log"
        # Ray swaps a loopback --node-ip-address for the machine's address: all nodes here share one IP.
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
               f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={self.temp_dir}",
               "--disable-usage-stats", *args]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own process group: stopped alone
        node = Node(proc, agent_port, log)
        self.nodes.append(node)
        return node

    def _wait(self, ready, node: Node, what: str) -> None:  # noqa: ANN001
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if node.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray {what} did not start:\n{node.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop_node(self, node: Node) -> None:
        stop_process_tree(node.proc.pid, grace_s=3)
        node.proc.wait(timeout=30)
        self.nodes.remove(node)

    def stop(self) -> None:
        for node in reversed(list(self.nodes)):
            stop_process_tree(node.proc.pid, grace_s=3)
        self.nodes.clear()
        # Ray workers that outlived their raylet: everything still naming this cluster's temp dir.
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(self.temp_dir) in cmdline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(proc.name), signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    """A head and one worker node, one CPU each, told apart by a custom resource."""
    temp_dir = Path(tempfile.mkdtemp(prefix="fwmn", dir="/tmp"))  # short: Ray's socket paths have a limit
    c = LoopbackCluster(temp_dir)
    try:
        c.start_head("--num-cpus=1", "--num-gpus=0", '--resources={"head_node": 1}')
        c.add_node("worker", "--num-cpus=1", "--num-gpus=0", '--resources={"worker_node": 1}')
        c.wait_for_nodes()
        yield c
    finally:
        c.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[str, dict[str, str]]]:
    """(url, client credentials): docker-compose.yml's own MLflow command (basic auth on) when mlflow[auth]
    is installed, else the plain test server."""
    try:
        import flask_wtf  # noqa: F401
    except ImportError:
        yield request.getfixturevalue("mlflow_server"), {}
        return
    from test_cluster_files import compose_mlflow_server

    with compose_mlflow_server(tmp_path_factory.mktemp("auth-mlflow")) as (url, password):
        yield url, {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}


def run_sweep_cli(c: LoopbackCluster, spec: Path, home: Path, tracking_uri: str, name: str,
                  credentials: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`sweep run SPEC --address HOST:PORT` exactly as a user types it, as a driver of that cluster."""
    cmd = [str(BIN / "sweep"), "run", str(spec), "--address", c.address, "--tracking-uri", tracking_uri,
           "--name", name]
    env = c.env(FWSWEEP_HOME=str(home), **(credentials or {}))
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=SWEEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop_process_tree(proc.pid, grace_s=5)
        out, _ = proc.communicate()
        pytest.fail(f"sweep run did not finish in {SWEEP_TIMEOUT_S} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def node_roles(c: LoopbackCluster) -> dict[str, str]:
    """node id -> the custom resource naming the node (head_node, worker_node...), from Ray's state API."""
    req = urllib.request.Request(f"http://127.0.0.1:{c.dashboard_port}/api/v0/nodes?detail=true",
                                 headers={"Authorization": f"Bearer {c.token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = json.load(resp)
    rows = body["data"]["result"]["result"]
    return {row["node_id"]: next((r for r in row["resources_total"] if r.endswith("_node")), "")
            for row in rows if row["state"] == "ALIVE"}


def load_records(home: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> list:
    from sweep.export import load_trials

    monkeypatch.setenv("FWSWEEP_HOME", str(home))
    return load_trials(name)


def test_token_auth_guards_the_cluster_and_health_probes_answer(cluster: LoopbackCluster) -> None:
    dashboard = f"http://127.0.0.1:{cluster.dashboard_port}"
    assert _http_status(f"{dashboard}/api/version") == 401  # the job port runs code: no token, no entry
    assert _http_status(f"{dashboard}/api/version", token="not-the-token") == 403
    assert _http_status(f"{dashboard}/api/version", token=cluster.token) == 200
    # The unauthenticated probes docker-compose.yml's health checks use.
    assert _http_status(f"{dashboard}/api/gcs_healthz") == 200
    for node in cluster.nodes:
        assert _http_status(f"http://127.0.0.1:{node.agent_port}/api/local_raylet_healthz") == 200


def test_sweep_runs_trials_on_both_nodes_and_tracks_them_all(
    cluster: LoopbackCluster, tracking: tuple[str, dict[str, str]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    url, credentials = tracking  # with basic auth on, the driver logs with MLFLOW_TRACKING_USERNAME/PASSWORD
    name = f"multinode-{secrets.token_hex(3)}"
    result = run_sweep_cli(cluster, SPEC, tmp_path / "home", url, name, credentials)
    assert result.returncode == 0, result.stdout[-4000:]

    records = load_records(tmp_path / "home", name, monkeypatch)
    assert len(records) == 2 and {r.status for r in records} == {"TERMINATED"}, [r.status for r in records]
    # One CPU per node and both trials at once: the scheduler had to use both nodes.
    roles = node_roles(cluster)
    ran_on = sorted(roles.get(r.metrics["node_id"], "?") for r in records)
    assert ran_on == ["head_node", "worker_node"], (ran_on, roles)

    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.sweep = '{name}' and tags.fwsweep_role = 'trial'")
    assert {r.data.tags["trial_id"] for r in runs} == {r.trial_id for r in records}
    for run in runs:
        assert run.info.status == "FINISHED"
        assert "val_accuracy" in run.data.metrics and "test_accuracy" in run.data.metrics


def test_fractional_gpus_pack_four_trials_on_two_logical_gpus(
    cluster: LoopbackCluster, mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = yaml.safe_load(SPEC.read_text())
    spec["resources"] = {"cpu": 1, "gpu": 0.5}  # 0.5 GPU each: two trials per GPU
    spec["budget"] = {"num_samples": 4, "max_concurrent": 4}
    spec["train"] |= {"epochs": 2, "steps_per_epoch": 10}  # long enough for 1-s timestamps to show overlap
    spec_file = tmp_path / "gpu-packing.yaml"
    spec_file.write_text(yaml.safe_dump(spec))

    # The only node with GPUs (logical ones: Ray schedules by count; there is no CUDA here).
    gpu_node = cluster.add_node("gpu", "--num-cpus=4", "--num-gpus=2", '--resources={"gpu_node": 1}')
    try:
        cluster.wait_for_nodes()
        gpu_node_id = next(n for n, role in node_roles(cluster).items() if role == "gpu_node")
        name = f"gpu-packing-{secrets.token_hex(3)}"
        result = run_sweep_cli(cluster, spec_file, tmp_path / "home", mlflow_server, name)
        assert result.returncode == 0, result.stdout[-4000:]
        records = load_records(tmp_path / "home", name, monkeypatch)
    finally:
        cluster.stop_node(gpu_node)

    assert len(records) == 4 and {r.status for r in records} == {"TERMINATED"}, [r.status for r in records]
    assert {r.metrics["node_id"] for r in records} == {gpu_node_id}  # the only node with GPUs
    # Each trial saw the one GPU id Ray assigned it; each of the two GPUs carried two trials.
    gpu_ids = sorted(r.metrics["gpu_ids"] for r in records)
    assert gpu_ids == ["0", "0", "1", "1"], gpu_ids

    # All four ran at once: [end - time_total_s, end] per trial (Tune's timestamps are whole seconds).
    spans = []
    for r in records:
        end = float(r.metrics["timestamp"])
        spans.append((end - float(r.metrics["time_total_s"]), end))
    latest_start = max(s for s, _ in spans)
    earliest_end = min(e for _, e in spans)
    assert latest_start + 1 < earliest_end, f"trials did not all overlap: {spans}"

    # No CUDA: each trial asked for the GPU Ray gave it, warned, and trained on the CPU instead of failing.
    warned = [p for p in cluster.temp_dir.glob("session_*/logs/worker-*.err")
              if CUDA_FALLBACK_WARNING in p.read_text(errors="replace")]
    assert len(warned) >= 1, "no CPU-fallback warning in the Ray worker logs"

