"""A real multi-node Ray cluster on this machine, for the tests that need one (multi-node sweeps, job submit).

Each node is its own `ray start --block` process group (never `ray stop`, which would end every Ray process
on the machine, other tests' included), with its own ports and its own temp folder, as separate machines
have. Sharing one `--temp-dir` between nodes is not a harmless shortcut: each node's runtime-env agent
garbage-collects the job packages (`ray job submit --working-dir`) under `<temp>/session_*/runtime_resources`
that *its* workers no longer use, and so deletes the folder the job driver on the other node runs in
(docs/cluster.md, "ray job submit on one machine"). GPUs are logical (`--num-gpus 2` without CUDA), which is
all Ray's scheduler looks at.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import http_status

from sweep.tracking import free_port, stop_process_tree

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90


def ray_http_status(url: str, token: str | None = None) -> int:
    """Status of GET `url` on a Ray dashboard, with the cluster's bearer token when given."""
    return http_status(url, {"Authorization": f"Bearer {token}"} if token else None)


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    agent_port: int  # the dashboard agent: /api/local_raylet_healthz, what docker-compose.yml probes
    temp_dir: Path  # this node's own Ray temp folder (sessions, logs, runtime_resources)
    log: Path


@dataclass
class LoopbackCluster:
    """A Ray cluster of `ray start` processes on this machine, with token auth on. Everything it starts lives
    under `temp_dir` (one sub-folder per node), which must be short: Ray's socket paths have a limit."""

    temp_dir: Path
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: list[Node] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """What the head, every worker and every driver share: the same RAY_AUTH_MODE and token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}
        path = {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}  # `sweep` on PATH, as in the image
        return env | auth | path | extra

    def start_head(self, *args: str, env: dict[str, str] | None = None, tries: int = 3) -> Node:
        """The head; `env` is added to the node's environment (and so to every job driver it runs). A port
        another process took between free_port() and Ray's bind is retried on new ports. Ready means the
        GCS answers and the Ray client server listens: that one binds its port seconds later, and when the
        port is taken it exits and `ray start` takes the whole head down with it."""
        for attempt in range(tries):
            client_port = free_port()
            node = self._start("head", env or {}, "--head", f"--port={self.gcs_port}",
                               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                               f"--ray-client-server-port={client_port}", *args)
            try:
                self._wait(functools.partial(self._head_ready, client_port), node, "head")
                return node
            except RuntimeError as err:
                if attempt == tries - 1 or not (isinstance(err, PortTaken) or port_clash(str(err))):
                    raise
                self.stop_node(node)
                self.gcs_port, self.dashboard_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def _head_ready(self, client_port: int) -> bool:
        """The head answers. A dashboard that answers /api/version without the cluster's token is not ours
        (seen: another test's local Ray took the port after free_port() chose it, its health probe
        answered for our head, and the tests then found no cluster): a port clash."""
        if ray_http_status(f"{self.dashboard}/api/version") == 200:
            raise PortTaken(f"{self.dashboard} answers without the cluster's token: another process's")
        return ray_http_status(f"{self.dashboard}/api/gcs_healthz") == 200 and listens(client_port)

    def add_node(self, name: str, *args: str, env: dict[str, str] | None = None) -> Node:
        return self._start(name, env or {}, f"--address={self.address}", *args)

    def wait_for_nodes(self) -> None:
        """Until every node's raylet answers (what docker-compose.yml's worker health check asks)."""
        for node in self.nodes:
            url = f"http://127.0.0.1:{node.agent_port}/api/local_raylet_healthz"
            self._wait(lambda url=url: ray_http_status(url) == 200, node, node.name)

    def node_roles(self) -> dict[str, str]:
        """node id -> the custom resource naming the node (head_node, worker_node), per Ray's state API."""
        request = urllib.request.Request(f"{self.dashboard}/api/v0/nodes?detail=true",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            rows = json.load(resp)["data"]["result"]["result"]
        return {row["node_id"]: next((r for r in row["resources_total"] if r.endswith("_node")), "")
                for row in rows if row["state"] == "ALIVE"}

    def worker_logs(self, pattern: str = "worker-*.err") -> list[Path]:
        """Ray's per-process log files of every node (each node keeps its own under its temp folder)."""
        return sorted(self.temp_dir.glob(f"*/session_*/logs/{pattern}"))

    def run_client(self, cmd: list[str], timeout_s: float, cwd: Path = ROOT,
                   **env: str) -> subprocess.CompletedProcess:
        """Run a client of this cluster (`sweep run`, `ray job submit`) from `cwd` (the repository root) with
        the cluster's auth and `env`; its output (stdout and stderr), or a test failure after `timeout_s`."""
        import pytest

        proc = subprocess.Popen(cmd, env=self.env(**env), cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process_tree(proc.pid, grace_s=5)
            out, _ = proc.communicate()
            pytest.fail(f"{' '.join(cmd[:3])} did not finish in {timeout_s} s:\n{out[-4000:]}")
        return subprocess.CompletedProcess(cmd, proc.returncode, out, "")

    def _start(self, name: str, env: dict[str, str], *args: str) -> Node:
        agent_port = free_port()
        temp_dir = self.temp_dir / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        log = self.temp_dir / f"{name}.log"
        # Ray swaps a loopback --node-ip-address for the machine's address: all nodes here share one IP.
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
               f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={temp_dir}",
               "--disable-usage-stats", *args]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=self.env(**env), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own process group: stopped alone
        node = Node(name, proc, agent_port, temp_dir, log)
        self.nodes.append(node)
        return node

    def _wait(self, ready: Callable[[], bool], node: Node, what: str) -> None:
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


def listens(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class PortTaken(RuntimeError):
    """Another process listens on a port the cluster was to use."""


def port_clash(log: str) -> bool:
    """Ray could not bind a port it was given: taken by another process since free_port() chose it."""
    return "Failed to start the grpc server" in log or "Address already in use" in log


@contextlib.contextmanager
def two_node_cluster(prefix: str, node_env: dict[str, str] | None = None) -> Iterator[LoopbackCluster]:
    """A head and one worker node, one CPU each, told apart by a custom resource (head_node, worker_node);
    `node_env` goes into both nodes' environment, as a cluster file sets it on every node.

    Every trial report waits 3 s more (FWSWEEP_FAULT=slow=3, in the nodes' trial processes): the tests prove
    both nodes were used by two trials at once on one CPU each, and a sub-second trial can end before a
    loaded machine has placed the second, which then also runs on the first node."""
    node_env = {"FWSWEEP_FAULT": "slow=3", **(node_env or {})}
    temp_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Ray's socket paths have a limit
    cluster = LoopbackCluster(temp_dir)
    try:
        cluster.start_head("--num-cpus=1", "--num-gpus=0", '--resources={"head_node": 1}', env=node_env)
        cluster.add_node("worker", "--num-cpus=1", "--num-gpus=0", '--resources={"worker_node": 1}',
                         env=node_env)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
