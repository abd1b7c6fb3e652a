"""Can the cluster run one trial at all? Checked once Ray is connected, before Tune or MLflow write anything.

Tune queues a trial whose resources no node has and waits for them forever (a sweep folder and an MLflow
parent run already made). A trial runs on one node, so it must fit on one node that is there, or on a node
type the cluster's autoscaler may add: the `available_node_types` of the cluster launcher's config on the
head node (~/ray_bootstrap_config.yaml, as Tune itself looks for). Autoscalers configured elsewhere
(KubeRay) are not visible from here: FWSWEEP_SKIP_CAPACITY_CHECK=1 skips the check for them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sweep.config import SweepSpec
from sweep.errors import Problem, UserError
from sweep.safe_yaml import read_yaml_file

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
SKIP_ENV = "FWSWEEP_SKIP_CAPACITY_CHECK"


def _fits(ask: dict[str, float], has: dict[str, Any]) -> bool:
    return all(float(has.get(key, 0) or 0) >= need for key, need in ask.items() if need > 0)


def _autoscaler_node_types() -> list[dict[str, Any]]:
    """Resources of each node type the cluster launcher's autoscaler may start (none if not launched so)."""
    path = BOOTSTRAP_CONFIG.expanduser()
    if not path.is_file():
        return []
    try:
        config = read_yaml_file(path)
    except UserError:
        return []
    types = config.get("available_node_types") if isinstance(config, dict) else None
    if not isinstance(types, dict):
        return []
    return [t["resources"] for t in types.values()
            if isinstance(t, dict) and isinstance(t.get("resources"), dict) and t.get("max_workers", 1) != 0]


def _describe(res: dict[str, Any]) -> str:
    return f"{float(res.get('CPU', 0) or 0):g} CPU, {float(res.get('GPU', 0) or 0):g} GPU"


def check_resources(spec: SweepSpec, nodes: list[dict[str, Any]] | None = None) -> None:
    """A UserError (with the numbers) when no node, present or addable, can hold one trial.

    `nodes`: the alive nodes' resource totals; default: asked from the connected Ray (`ray.nodes()`).
    """
    if os.environ.get(SKIP_ENV) == "1":
        return
    ask = {"CPU": float(spec.resources.cpu), "GPU": float(spec.resources.gpu)}
    if nodes is None:
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    addable = _autoscaler_node_types()
    if any(_fits(ask, node) for node in [*nodes, *addable]):
        return
    largest_cpu = max((float(n.get("CPU", 0) or 0) for n in [*nodes, *addable]), default=0.0)
    largest_gpu = max((float(n.get("GPU", 0) or 0) for n in [*nodes, *addable]), default=0.0)
    where = f"{len(nodes)} node(s)" + (f" and {len(addable)} autoscaler node type(s)" if addable else "")
    fixes = []
    if ask["CPU"] > largest_cpu:
        fixes.append(f"lower resources.cpu to at most {largest_cpu:g}")
    if ask["GPU"] > largest_gpu:
        fixes.append("set resources.gpu: 0 (train on CPUs)" if largest_gpu == 0
                     else f"lower resources.gpu to at most {largest_gpu:g}")
    raise UserError(Problem(
        "resources",
        f"a trial asks for {_describe(ask)} but no node of this Ray cluster has that much ({where}; the "
        f"largest has {largest_cpu:g} CPU, {largest_gpu:g} GPU), so no trial could ever start",
        " or ".join(fixes) + ", or run on a cluster with bigger nodes (--address)"
        + f"; if an autoscaler adds such nodes, set {SKIP_ENV}=1",
    ))
