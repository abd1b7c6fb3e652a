"""Find, adopt and close a sweep's MLflow runs by their tags.

A sweep's runs carry `sweep=<name>` and `fwsweep.role` (`sweep` for the one parent run, `trial` for a child
run, which also carries `trial_id`). Runs written by fwsweep < 0.3 used the tag `fwsweep_role`; both are
read, only `fwsweep.role` is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

ROLE_TAG = "fwsweep.role"
LEGACY_ROLE_TAG = "fwsweep_role"
SWEEP_TAG = "sweep"
TRIAL_TAG = "trial_id"
PARENT_ROLE, TRIAL_ROLE = "sweep", "trial"
NOTE_TAG = "mlflow.note.content"  # MLflow's description of an experiment or a run
PARENT_RUN_TAG = "mlflow.parentRunId"


def role(run: Any) -> str | None:
    tags = run.data.tags
    return tags.get(ROLE_TAG) or tags.get(LEGACY_ROLE_TAG)


def quote(value: str) -> str:
    """A value inside a single-quoted MLflow search filter."""
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


def search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Any]:
    """Every active run matching the filter, oldest first (search_runs pages at 1000)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  page_token=token, order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def experiment_id(client: MlflowClient, name: str, description: str | None = None) -> str:
    """The experiment's id, created (or restored from the trash) when needed."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name)
        except MlflowException:  # created meanwhile by another driver
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            exp_id = found.experiment_id
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp_id)
    if description and (exp is None or not exp.tags.get(NOTE_TAG)):
        client.set_experiment_tag(exp_id, NOTE_TAG, description)
    return exp_id


@dataclass
class SweepRuns:
    """A sweep's runs as MLflow holds them: parents (oldest first) and trial runs by trial id."""

    parents: list[Any] = field(default_factory=list)
    trials: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def parent(self) -> Any | None:
        return self.parents[0] if self.parents else None


def sweep_runs(client: MlflowClient, exp_id: str, sweep: str) -> SweepRuns:
    out = SweepRuns()
    for run in search_all(client, exp_id, f"tags.{SWEEP_TAG} = '{quote(sweep)}'"):
        kind = role(run)
        if kind == PARENT_ROLE:
            out.parents.append(run)
        elif kind == TRIAL_ROLE and run.data.tags.get(TRIAL_TAG):
            out.trials.setdefault(run.data.tags[TRIAL_TAG], []).append(run)
    return out


def find_parent(client: MlflowClient, exp_id: str, sweep: str) -> Any | None:
    """The sweep's parent run (the oldest, if an older fwsweep made several)."""
    runs = search_all(client, exp_id, f"tags.{SWEEP_TAG} = '{quote(sweep)}'")
    return next((r for r in runs if role(r) == PARENT_ROLE), None)


def run_url(tracking_uri: str, exp_id: str | None, run_id: str | None) -> str | None:
    """Link to a run in the MLflow UI (HTTP servers only), in Model-training mode (tracking.run_link)."""
    from sweep.tracking import run_link

    if not (exp_id and run_id and tracking_uri.startswith("http")):
        return None
    return run_link(tracking_uri, exp_id, run_id)
