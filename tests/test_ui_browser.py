"""The MLflow UI as a person sees it: the link fwsweep prints for a sweep, opened in headless Chromium.

A real MLflow server holds a small sweep's runs (a parent, four trials, and a trial of another sweep in
the same experiment); `sweep.tracking.sweep_link` builds the link that `run`, `resume`, `show` and `ui`
print; Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium) renders it, and the test
reads the page: the runs table in Model-training mode, only this sweep's trials, best first, with the
metric and the searched parameters as columns.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from sweep.config import SweepSpec
from sweep.tracking import searched_params, sweep_link

ROOT = Path(__file__).resolve().parents[1]
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_BROWSER = None if CHROMIUM and CHROMEDRIVER.exists() else (
    "no headless browser: install Debian's `chromium` and `chromium-driver` (`make test` does so when run "
    "as root)")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.skipif(NO_BROWSER is not None, reason=NO_BROWSER or "")]

VALUES = {"t0": 0.61, "t1": 0.97, "t2": 0.83, "t3": 0.45}  # final val_accuracy per trial: t1 is best


def _spec() -> SweepSpec:
    data = yaml.safe_load((ROOT / "search_spaces/tests/faults_tiny.yaml").read_text())
    data["name"] = "ui-browser"
    data["space"]["common"]["hidden_size"] = {"choice": [8, 16, 32]}
    return SweepSpec.model_validate(data)


def _log_sweep(url: str, spec: SweepSpec) -> dict[str, str]:
    """A parent run and one child per trial, tagged as fwsweep tags them; run names by trial id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(url)
    experiment = client.create_experiment(spec.experiment)
    parent = client.create_run(experiment, run_name=spec.name, tags={"sweep": spec.name})
    names = {}
    for trial, (sweep, value) in {**{t: (spec.name, v) for t, v in VALUES.items()},
                                  "x9": ("another-sweep", 0.99)}.items():
        run = client.create_run(experiment, run_name=f"lstm-{trial}", tags={
            "sweep": sweep, "trial_id": trial, "mlflow.parentRunId": parent.info.run_id})
        metrics = [Metric(spec.metric.name, value * epoch / 3, 0, epoch) for epoch in (1, 2, 3)]
        params = [Param("model.name", "lstm"), Param("train.lr", str(0.001 + 0.002 * len(names))),
                  Param("model.hidden_size", "16"), *(Param(f"train.fixed{i}", "1") for i in range(30))]
        client.log_batch(run.info.run_id, metrics=metrics, params=params)
        client.set_terminated(run.info.run_id)
        names[trial] = f"lstm-{trial}"
    client.set_terminated(parent.info.run_id)
    return names


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1600,900"):
        options.add_argument(arg)
    # Chromium keeps its singleton socket in an org.chromium.Chromium.* folder under TMPDIR and leaves it
    # behind: a folder of our own, removed afterwards. Short, under /tmp: a socket's path must fit in 108
    # bytes, and pytest's tmp_path under xdist does not leave room (Chromium then fails to start)
    scratch = tempfile.mkdtemp(prefix="fw-chromium-")
    options.add_argument(f"--user-data-dir={scratch}/profile")
    service = Service(str(CHROMEDRIVER), env=os.environ | {"TMPDIR": scratch})
    try:
        driver = webdriver.Chrome(service=service, options=options)
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_printed_link_opens_the_runs_table_best_trial_first(mlflow_server: str, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    spec = _spec()
    names = _log_sweep(mlflow_server, spec)
    link = sweep_link(mlflow_server, spec)
    assert link and "/runs?" in link and "workflowType=machine_learning" in link

    browser.get(link)
    metric_col = f"metrics.`{spec.metric.name}`"
    first = f".ag-row[row-index='0'] [col-id='{metric_col}']"
    WebDriverWait(browser, 90).until(lambda d: d.find_elements(By.CSS_SELECTOR, first))

    headers = [h.get_attribute("col-id") for h in browser.find_elements(By.CSS_SELECTOR, ".ag-header-cell")]
    assert metric_col in headers, headers
    for param in searched_params(spec):  # train.lr and model.hidden_size are searched
        assert f"params.`{param}`" in headers, (param, headers)
    assert "params.`train.fixed0`" not in headers  # constants stay out of the way

    def column(col_id: str) -> list[str]:
        cells = browser.find_elements(By.CSS_SELECTOR, f".ag-row [col-id='{col_id}']")
        rows = {int(c.find_element(By.XPATH, "./ancestor::div[@row-index]").get_attribute("row-index")):
                c.text for c in cells}
        return [rows[i] for i in sorted(rows)]

    run_names = [text.splitlines()[-1] for text in column("attributes.`Run Name`")]
    values = [float(v) for v in column(metric_col)]
    assert run_names == [names[t] for t in sorted(VALUES, key=VALUES.get, reverse=True)], run_names
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(VALUES["t1"])
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "Runs" in page and "Model training" in page
    assert "Token usage" not in page and "Detect Issues" not in page  # not the GenAI overview
