"""Sweeps on a real multi-node Ray cluster: `ray start` head and worker processes on loopback, token auth on
every node and driver, `sweep run SPEC --address HOST:PORT` as a user types it, every trial in a real
MLflow server. The cluster itself: tests/ray_cluster.py.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from ray_cluster import BIN, LoopbackCluster, ray_http_status, two_node_cluster

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "search_spaces" / "tests" / "multinode.yaml"
SWEEP_TIMEOUT_S = 240
CUDA_FALLBACK_WARNING = "no CUDA GPU is visible; training on the CPU"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    """A head and one worker node, one CPU each, told apart by a custom resource."""
    with two_node_cluster("fwmn") as c:
        yield c


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
    from compose_stack import compose_mlflow_server

    with compose_mlflow_server(tmp_path_factory.mktemp("auth-mlflow")) as (url, password):
        yield url, {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}


def run_sweep_cli(c: LoopbackCluster, spec: Path, home: Path, tracking_uri: str, name: str,
                  credentials: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`sweep run SPEC --address HOST:PORT` exactly as a user types it, as a driver of that cluster."""
    cmd = [str(BIN / "sweep"), "run", str(spec), "--address", c.address, "--tracking-uri", tracking_uri,
           "--name", name]
    return c.run_client(cmd, SWEEP_TIMEOUT_S, FWSWEEP_HOME=str(home), **(credentials or {}))


def load_records(home: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> list:
    from sweep.export import load_trials

    monkeypatch.setenv("FWSWEEP_HOME", str(home))
    return load_trials(name)


def test_token_auth_guards_the_cluster_and_health_probes_answer(cluster: LoopbackCluster) -> None:
    dashboard = f"http://127.0.0.1:{cluster.dashboard_port}"
    assert ray_http_status(f"{dashboard}/api/version") == 401  # the job port runs code: no token, no entry
    assert ray_http_status(f"{dashboard}/api/version", token="not-the-token") == 403
    assert ray_http_status(f"{dashboard}/api/version", token=cluster.token) == 200
    # The unauthenticated probes docker-compose.yml's health checks use.
    assert ray_http_status(f"{dashboard}/api/gcs_healthz") == 200
    for node in cluster.nodes:
        assert ray_http_status(f"http://127.0.0.1:{node.agent_port}/api/local_raylet_healthz") == 200


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
    roles = cluster.node_roles()
    ran_on = sorted(roles.get(r.metrics["node_id"], "?") for r in records)
    assert ran_on == ["head_node", "worker_node"], (ran_on, roles)

    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.sweep = '{name}' and tags.`fwsweep.role` = 'trial'")
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
        gpu_node_id = next(n for n, role in cluster.node_roles().items() if role == "gpu_node")
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
    warned = [p for p in cluster.worker_logs("worker-*.err")
              if CUDA_FALLBACK_WARNING in p.read_text(errors="replace")]
    assert len(warned) >= 1, "no CPU-fallback warning in the Ray worker logs"



def test_a_head_whose_dashboard_port_another_dashboard_took_starts_on_new_ports(tmp_path_factory) -> None:
    """The fixture's own guard (seen once in a full suite: another test's local Ray took the port between
    free_port() and the head's bind, answered the readiness probe, and every test of the module found no
    cluster): a dashboard that answers without the cluster's token is another process's, so the head is
    restarted on new ports."""
    import tempfile

    from http_stub import answering_200

    cluster = LoopbackCluster(Path(tempfile.mkdtemp(prefix="fwpt", dir="/tmp")))
    with answering_200() as taken:
        cluster.dashboard_port = taken
        try:
            cluster.start_head("--num-cpus=1", "--num-gpus=0")
            assert cluster.dashboard_port != taken
            assert ray_http_status(f"{cluster.dashboard}/api/version") == 401  # ours: token auth on
            assert ray_http_status(f"{cluster.dashboard}/api/version", cluster.token) == 200
        finally:
            cluster.stop()
            shutil.rmtree(cluster.temp_dir, ignore_errors=True)
