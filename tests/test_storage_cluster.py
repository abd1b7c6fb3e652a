"""A sweep on Ray nodes that share no folder with the driver or with each other: its only storage is S3.

Two `ray start` nodes on loopback (token auth on, see test_multinode.py), each with its own HOME,
FWSWEEP_HOME, TMPDIR and Ray temp dir, and the AWS settings an instance role would give; the sweep's state,
trial results and checkpoints live only in moto's S3 server. The driver is killed (SIGKILL, a lost laptop
or a dead head shell) part-way; `sweep resume` from another working folder with another FWSWEEP_HOME
finishes the sweep with no trial lost or repeated, and `show` / `export` / `list` work from a third.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fixtures_s3 import S3Store, s3_store  # noqa: F401  (real S3-compatible server)
from ray_cluster import BIN, LoopbackCluster
from test_multinode import SPEC

from sweep.store import open_sweep

pytestmark = pytest.mark.slow
EPOCHS, TRIALS = 3, 4
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def bare_cluster(s3_store: S3Store) -> Iterator[LoopbackCluster]:  # noqa: F811
    """A head with no CPUs and a worker with two, sharing nothing with the driver. Every report waits 3 s, so
    the second pair of trials runs for 9 s or more: several of Tune's 2-s state uploads fall inside it, and
    the driver can be killed on a consistent snapshot with some trials finished and others not, even on a
    slow or loaded machine (with 0.5 s a CI run once found all four finished at the first consistent one)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="fwsc", dir="/tmp"))  # short: Ray's socket paths have a limit
    c = LoopbackCluster(temp_dir)  # each node its own Ray temp folder (temp_dir/NAME)
    node_env = s3_store.env | {"FWSWEEP_FAULT": "slow=3"}  # the keys an instance role would give
    try:
        # As cluster/aws-gpu.yaml starts it: a head with no CPUs for trials, a worker with its own disk.
        c.start_head("--num-cpus=0", "--num-gpus=0", '--resources={"head_node": 1}',
                     env=node_env | _machine(_own(c, "head")))
        c.add_node("w", "--num-cpus=2", "--num-gpus=0", '--resources={"worker_node": 1}',
                   env=node_env | _machine(_own(c, "w")))
        c.wait_for_nodes()
        yield c
    finally:
        c.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _own(c: LoopbackCluster, node: str) -> Path:
    """A node's own HOME, FWSWEEP_HOME and TMPDIR live here (its Ray temp folder is temp_dir/NODE)."""
    return c.temp_dir / f"{node}-own"


def _machine(root: Path) -> dict[str, str]:
    """A driver's own machine: working folder, HOME, FWSWEEP_HOME and TMPDIR, none shared with a node."""
    for sub in ("home", "fw", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return {"HOME": str(root / "home"), "FWSWEEP_HOME": str(root / "fw"), "TMPDIR": str(root / "tmp")}


def _sweep(c: LoopbackCluster, s3: S3Store, machine: Path, *args: str) -> subprocess.Popen:
    env = c.env(**s3.env, **_machine(machine), PYTHONUNBUFFERED="1")
    return subprocess.Popen([str(BIN / "sweep"), *args], env=env, cwd=machine, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _epochs(records: list) -> dict[str, list[int]]:
    return {r.trial_id: [int(row["epoch"]) for row in r.history] for r in records}


def test_sweep_in_s3_survives_its_driver_and_resumes_from_another_machine(
    bare_cluster: LoopbackCluster, s3_store: S3Store, mlflow_server: str, tmp_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch
) -> None:
    c, s3 = bare_cluster, s3_store
    for key, value in s3.env.items():  # the test reads the store as a third machine would
        monkeypatch.setenv(key, value)
    name = f"s3-{secrets.token_hex(3)}"
    storage = s3.uri("sweeps")
    spec = yaml.safe_load(SPEC.read_text())
    spec["budget"] = {"num_samples": TRIALS, "max_concurrent": 2}
    spec["train"] |= {"epochs": EPOCHS, "keep_checkpoints": 2}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    store = open_sweep(name, storage)
    common = ["--address", c.address, "--tracking-uri", mlflow_server, "--storage", storage]

    # 1. Machine A starts the sweep, and dies once some trials have finished and others have not.
    proc = _sweep(c, s3, tmp_path / "a", "run", str(spec_file), "--name", name, *common)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert proc.poll() is None, f"the sweep ended before it was killed:\n{proc.stdout.read()[-4000:]}"
            assert time.monotonic() < deadline, "no trial finished in time"
            saved = store.load_trials() if store.can_restore() else []
            # Kill on a consistent snapshot: every trial folder in the bucket is in the saved state. (Tune
            # uploads its driver files one by one; a kill amid an upload can leave the searcher's count
            # ahead of the saved trials, and Tune then never starts the missing one: see docs/sweeps.md.)
            folders = {k.split("/")[2] for k in s3.keys(f"sweeps/{name}/trial_")}
            consistent = folders == {f"trial_{r.trial_id}" for r in saved}
            if consistent and any(r.status == "TERMINATED" for r in saved):
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    known = store.load_trials()  # what the experiment state saved before the kill holds
    before = {r.trial_id: r for r in known if r.status == "TERMINATED"}
    assert 1 <= len(before) < TRIALS, [r.status for r in known]
    raw_before = {t: store.read_text(f"trial_{t}/result.json") for t in before}

    # 2. Machine B (another folder, another FWSWEEP_HOME, nothing copied) resumes it from the URI alone.
    resumed = c.run_client([str(BIN / "sweep"), "resume", name, *common], TIMEOUT_S, cwd=tmp_path / "b",
                           **s3.env, **_machine(tmp_path / "b"))
    out = resumed.stdout
    assert resumed.returncode == 0, out[-4000:]
    assert storage in out
    records = store.load_trials()
    assert len(records) == TRIALS and {r.status for r in records} == {"TERMINATED"}, \
        [(r.trial_id, r.status) for r in records]
    assert {r.trial_id for r in known} <= {r.trial_id for r in records}  # no saved trial lost
    # Every trial's history runs epoch 1..N once (a trial cut off by the kill went on from its last
    # checkpoint; an epoch it re-ran after that replaces the lost one).
    epochs = _epochs(records)
    assert all(e == list(range(1, EPOCHS + 1)) for e in epochs.values()), epochs
    for trial_id, old in before.items():  # finished before the kill: kept as they were, not re-run
        assert store.read_text(f"trial_{trial_id}/result.json") == raw_before[trial_id]
        assert next(r for r in records if r.trial_id == trial_id).metrics == old.metrics
    roles = c.node_roles()
    assert {roles.get(r.metrics["node_id"]) for r in records} == {"worker_node"}  # the head has no CPUs
    keys = s3.keys(f"sweeps/{name}/")
    assert any("/checkpoint_" in k for k in keys), "no checkpoint reached the store"
    assert {f"sweeps/{name}/trial_{r.trial_id}/result.json" for r in records} <= set(keys)

    # 3. Machine C reads it: list, show, export (a local copy for `sweep train` and the store's exports/).
    for args in (["list"], ["show", name], ["export", name, "--top-k", "2"]):
        proc = subprocess.run([str(BIN / "sweep"), *args, "--storage", storage], cwd=tmp_path / "c",
                              env=c.env(**s3.env, **_machine(tmp_path / "c")), capture_output=True,
                              text=True, timeout=TIMEOUT_S)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if args[0] == "show":
            assert f"{TRIALS}/{TRIALS}" in proc.stdout and "finished" in proc.stdout
            assert f"{storage}/{name}" in proc.stdout and "exports:" in proc.stdout  # resume exported
        if args[0] == "list":
            assert name in proc.stdout
    assert (tmp_path / "c" / "fw" / "exports" / name / "best.yaml").is_file()
    assert {f"sweeps/{name}/exports/{f}" for f in ("best.yaml", "top1.yaml", "top2.yaml", "index.json")} \
        <= set(s3.keys(f"sweeps/{name}/exports/"))

    # Nothing of the sweep landed on a node's or a driver's disk.
    homes = [_own(c, n) / "fw" for n in ("head", "w")] + [tmp_path / m / "fw" for m in "abc"]
    assert not [h for h in homes if (h / "sweeps").exists()], "a sweep folder was written to a local disk"
