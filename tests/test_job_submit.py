"""`ray job submit --working-dir . -- sweep run SPEC`, the documented way to launch a sweep on a cluster, run
for real against a two-node Ray cluster on loopback (tests/ray_cluster.py), with token auth and a real
MLflow server.

It once crashed in the job driver ("Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so"): both
nodes shared one Ray temp folder, so when the worker node's runtime-env agent released the job's package,
it deleted the folder the driver on the head ran in, and libtorch cannot load in a process whose working
directory is gone. Each node now has its own temp folder, as separate machines do (docs/cluster.md).
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_cluster import BIN, LoopbackCluster, two_node_cluster

SPEC = "search_spaces/tests/multinode.yaml"  # relative: the driver reads it from the shipped working dir
JOB_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FWSWEEP_STORAGE of every node, as the cluster files set it on all nodes (a bucket or shared folder)."""
    return tmp_path_factory.mktemp("job-storage")


@pytest.fixture(scope="module")
def cluster(storage: Path) -> Iterator[LoopbackCluster]:
    env = {"FWSWEEP_STORAGE": str(storage), "FWSWEEP_HOME": str(storage.parent / "job-home")}
    with two_node_cluster("fwjs", node_env=env) as c:
        yield c


def submit(c: LoopbackCluster, job_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
    """`ray job submit` as the docs write it, from the repository root, waiting for the job's end."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", c.dashboard, "--working-dir", ".",
           "--submission-id", job_id, "--", *entrypoint]
    return c.run_client(cmd, JOB_TIMEOUT_S)


def test_ray_job_submit_runs_a_sweep_across_both_nodes(
    cluster: LoopbackCluster, storage: Path, mlflow_server: str
) -> None:
    from mlflow import MlflowClient

    from sweep.export import load_trials

    name = f"job-{secrets.token_hex(3)}"
    job_id = f"fwsweep-{name}"
    result = submit(cluster, job_id, "sweep", "run", SPEC, "--name", name, "--tracking-uri", mlflow_server)
    assert result.returncode == 0, result.stdout[-6000:]
    assert f"Job '{job_id}' succeeded" in result.stdout, result.stdout[-3000:]

    # The sweep's state went where the nodes' FWSWEEP_STORAGE points, not into the job's throw-away package.
    records = load_trials(name, str(storage))
    assert len(records) == 2 and {r.status for r in records} == {"TERMINATED"}, [r.status for r in records]
    roles = cluster.node_roles()
    assert sorted(roles.get(r.metrics["node_id"], "?") for r in records) == ["head_node", "worker_node"]

    # The worker node set up (and released) the same job package the driver ran in: what used to delete
    # the driver's working directory when both nodes shared one temp folder.
    worker = next(n for n in cluster.nodes if n.name == "worker")
    agent_log = "\n".join(p.read_text(errors="replace")
                          for p in worker.temp_dir.glob("session_*/logs/runtime_env_agent*.log"))
    assert "working_dir" in agent_log and "_ray_pkg_" in agent_log

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    trials = f"tags.sweep = '{name}' and tags.`fwsweep.role` = 'trial'"
    runs = client.search_runs([experiment.experiment_id], trials)
    assert {r.data.tags["trial_id"] for r in runs} == {r.trial_id for r in records}
    assert {r.info.status for r in runs} == {"FINISHED"}
