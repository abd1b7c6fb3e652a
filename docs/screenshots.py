"""Render the MLflow UI views that docs/tracking.md shows, from a real (tiny) sweep, into docs/images/.

Usage: .venv/bin/python docs/screenshots.py [--keep]
(3-10 minutes; needs Debian's `chromium` and `chromium-driver`, and selenium from the test extras)

Runs `sweep run` on a shortened search_spaces/quickstart.yaml (6 trials, at most 3 epochs) in a temporary
FWSWEEP_HOME (its own local MLflow server), then opens, in headless Chromium (MLflow's assistant panel
closed, as a person would):
- runs-table.png: the link `sweep run` prints (the sweep's trials, best first, metric + searched params);
- trial-metrics.png: the best trial's "Model metrics" tab;
- parent-run.png: the sweep's parent run.
The server is stopped at the end; `--keep` leaves the temporary folder for a look.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"
SWEEP = Path(sys.executable).with_name("sweep")
CHROMEDRIVER = "/usr/bin/chromedriver"
SETTLE_S = 12  # the UI fetches runs and draws charts after the page loads


def browser():  # noqa: ANN201  (selenium's WebDriver)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or not Path(CHROMEDRIVER).exists():
        sys.exit("no chromium/chromedriver: apt-get install chromium chromium-driver")
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--hide-scrollbars", "--window-size=1500,950"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def screenshot(driver, url: str, png: Path) -> Path:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    driver.get(url)
    time.sleep(SETTLE_S)
    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():  # MLflow's assistant panel takes a quarter of the page
            button.click()
            time.sleep(2)
            break
    driver.save_screenshot(str(png))
    print(f"wrote {png.relative_to(ROOT)}")
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary FWSWEEP_HOME")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="fwsweep-shots-"))
    env = os.environ | {"FWSWEEP_HOME": str(home), "COLUMNS": "120"}
    env.pop("MLFLOW_TRACKING_URI", None)
    os.environ.update(FWSWEEP_HOME=str(home))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    spec_file = ROOT / "search_spaces/quickstart.yaml"
    sets = ["name=ui-demo", "budget.num_samples=6", "budget.max_epochs=3"]
    try:
        subprocess.run([str(SWEEP), "run", str(spec_file), *(a for s in sets for a in ("--set", s))],
                       env=env, check=True, timeout=1200)
        subprocess.run([str(SWEEP), "ui", "--detach"], env=env, check=True, timeout=300)
        render()
    finally:
        subprocess.run([str(SWEEP), "ui", "--stop"], env=env, timeout=120)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)


def render() -> None:
    from sweep import tracking
    from sweep.store import open_sweep

    spec = open_sweep("ui-demo").load_spec()
    url = tracking.read_state()["url"]
    link = tracking.sweep_link(url, spec)
    OUT.mkdir(parents=True, exist_ok=True)
    driver = browser()
    try:
        shoot(driver, url, link, spec)
    finally:
        driver.quit()


def shoot(driver, url: str, link: str, spec) -> None:  # noqa: ANN001
    import mlflow

    from sweep import tracking

    screenshot(driver, link, OUT / "runs-table.png")
    client = mlflow.MlflowClient(url)
    experiment = client.get_experiment_by_name(spec.experiment).experiment_id
    order = "ASC" if spec.metric.mode == "min" else "DESC"
    best = client.search_runs([experiment], "tags.`mlflow.parentRunId` IS NOT NULL",
                              order_by=[f"metrics.`{spec.metric.name}` {order}"], max_results=1)[0]
    screenshot(driver, tracking.run_link(url, experiment, best.info.run_id, "model-metrics"),
               OUT / "trial-metrics.png")
    screenshot(driver, tracking.run_link(url, experiment, best.data.tags["mlflow.parentRunId"]),
               OUT / "parent-run.png")


if __name__ == "__main__":
    main()
