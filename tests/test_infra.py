"""infra/: the cluster, Kubernetes, MLflow and Docker configs agree with the code and each other."""

import copy
import re
import shlex
from importlib.metadata import version
from pathlib import Path

import pytest
import ray
import yaml

from genflow._telemetry import TELEMETRY_OFF
from genflow.cli import build_parser
from genflow.config import load_params

INFRA = Path(__file__).resolve().parents[1] / "infra"
YAML_FILES = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))


def load(relative: str) -> list:
    return [doc for doc in yaml.safe_load_all((INFRA / relative).read_text()) if doc is not None]


def by_kind(relative: str, kind: str) -> dict:
    (doc,) = [doc for doc in load(relative) if doc.get("kind") == kind]
    return doc


def pod_containers(spec: dict) -> list[dict]:
    return spec["template"]["spec"]["containers"]


def ray_containers() -> list[dict]:
    cluster = by_kind("k8s/raycluster.yaml", "RayCluster")["spec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [container for group in groups for container in pod_containers(group)]


def env_of(container: dict) -> dict:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def assert_genflow_command(argv: list[str]) -> None:
    """argv (after `genflow`) parses with the real CLI (argparse exits on a bad one), its -S keys
    are params keys, and the same holds for the subcommand that a `submit` carries."""
    args = build_parser().parse_args(argv)
    if getattr(args, "set", None):
        load_params(INFRA / "no-params.yaml", args.set)  # embedded defaults + the -S overrides
    if argv[0] == "submit":
        assert_genflow_command(argv[argv.index("--") + 1:])


def dockerfile_env() -> dict:
    text = re.sub(r"\\\n", " ", (INFRA / "docker/Dockerfile").read_text())
    pairs = [word for line in text.splitlines() if line.startswith("ENV ") for word in shlex.split(line)[1:]]
    return dict(pair.split("=", 1) for pair in pairs)


def commented_commands(relative: str) -> list[list[str]]:
    """The `genflow ...` commands in a file's header comments, backslash continuations joined."""
    lines = [line[1:] for line in (INFRA / relative).read_text().splitlines() if line.startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    # Commands are indented in the comment; prose is not.
    return [shlex.split(line)[1:] for line in joined.splitlines() if re.match(r"\s{2,}genflow ", line)]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path):
    assert list(yaml.safe_load_all(path.read_text()))


def test_images_run_the_ray_that_submits():
    ray_version = ray.__version__
    dockerfile = (INFRA / "docker/Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_version)}-py\d+-gpu$", dockerfile, re.M)
    assert by_kind("k8s/raycluster.yaml", "RayCluster")["spec"]["rayVersion"] == ray_version
    images = {load("ray/cluster.yaml")[0]["docker"]["image"]} | {c["image"] for c in ray_containers()}
    assert len(images) == 1, f"the Ray cluster configs use different images: {images}"
    assert images.pop().endswith(f"-ray{ray_version}")


@pytest.mark.parametrize("name,value", TELEMETRY_OFF.items())
def test_telemetry_is_off_everywhere(name, value):
    assert dockerfile_env()[name] == value
    assert f"--env {name}={value}" in load("ray/cluster.yaml")[0]["docker"]["run_options"]
    for container in ray_containers():
        assert env_of(container).get(name) == value, (container["name"], name)


def test_mlflow_servers_send_no_telemetry():
    compose = load("mlflow/docker-compose.yml")[0]["services"]["mlflow"]
    assert compose["environment"]["MLFLOW_DISABLE_TELEMETRY"] == "true"
    (server,) = pod_containers(by_kind("k8s/mlflow.yaml", "Deployment")["spec"])
    assert env_of(server)["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_ray_up_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("ray/cluster.yaml")[0]
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on unknown or mistyped keys
    gpu_workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert gpu_workers and all(t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in gpu_workers)
    assert any("--disable-usage-stats" in command for command in config["head_start_ray_commands"])


def test_shared_volume_is_mounted_where_the_commands_point():
    config = load("ray/cluster.yaml")[0]
    assert "--volume /mnt/genflow:/mnt/genflow" in config["docker"]["run_options"]
    claim = by_kind("k8s/storage.yaml", "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    cluster = by_kind("k8s/raycluster.yaml", "RayCluster")["spec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        for container in pod_containers(group):
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/mnt/genflow")
            assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_ray_pods_reach_the_mlflow_service():
    service = by_kind("k8s/mlflow.yaml", "Service")
    expected = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    for container in ray_containers():
        assert env_of(container)["MLFLOW_TRACKING_URI"] == expected


def test_rayjob_runs_a_genflow_command_on_the_raycluster():
    job = by_kind("k8s/rayjob.yaml", "RayJob")["spec"]
    program, *argv = shlex.split(job["entrypoint"])
    assert program == "genflow"
    assert_genflow_command(argv)
    assert argv[:2] == ["train", "vae"] and "--gpu" in argv
    assert job["clusterSelector"]["ray.io/cluster"] == by_kind("k8s/raycluster.yaml", "RayCluster")["metadata"]["name"]


@pytest.mark.parametrize("relative", ["ray/cluster.yaml", "k8s/raycluster.yaml"])
def test_commands_in_the_headers_are_valid(relative):
    commands = commented_commands(relative)
    assert any(argv[0] == "submit" for argv in commands), relative
    for argv in commands:
        assert_genflow_command(argv)


def test_mlflow_server_uses_postgres_and_proxied_s3_artifacts():
    services = load("mlflow/docker-compose.yml")[0]["services"]
    command = services["mlflow"]["command"]
    assert "--backend-store-uri postgresql:///mlflow" in command  # host and login: libpq's PG* variables
    assert services["mlflow"]["environment"]["PGHOST"] == "postgres"
    assert "--artifacts-destination s3://" in command and "--serve-artifacts" in command
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # One server version everywhere, of the major version the clients run.
    (pinned,) = re.findall(r'"mlflow(?:\[auth\])?==([\d.]+)"', (INFRA / "mlflow/Dockerfile").read_text())
    (server,) = pod_containers(by_kind("k8s/mlflow.yaml", "Deployment")["spec"])
    assert services["mlflow"]["image"].endswith(f":{pinned}") and server["image"].endswith(f":{pinned}")
    assert pinned.split(".")[0] == version("mlflow").split(".")[0]


def test_docker_context_keeps_what_the_image_copies():
    allowed = {line[1:].rstrip("/") for line in (INFRA / "docker/Dockerfile.dockerignore").read_text().splitlines() if line.startswith("!")}
    copied = set()
    for line in (INFRA / "docker/Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(arg.rstrip("/") for arg in line.split()[1:-1] if not arg.startswith("--"))
    assert copied and copied <= allowed, copied - allowed


INFRA_FILES = sorted(path for path in INFRA.rglob("*") if path.is_file())
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY\b")


def test_the_mlflow_server_requires_a_login():
    """Basic auth on in both deployments (issue 13: anyone reaching :5000 could move aliases)."""
    import configparser

    compose = load("mlflow/docker-compose.yml")[0]["services"]["mlflow"]
    assert compose["command"].startswith("mlflow server --app-name basic-auth")
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", compose["environment"][name]), name  # required, no default
    (server,) = pod_containers(by_kind("k8s/mlflow.yaml", "Deployment")["spec"])
    assert "--app-name=basic-auth" in server["args"] and {"secretRef": {"name": "mlflow-stores"}} in server["envFrom"]
    dockerfile = (INFRA / "mlflow/Dockerfile").read_text()
    assert '"mlflow[auth]==' in dockerfile  # Flask-WTF: the auth app refuses to start without it
    assert "COPY basic_auth.ini /etc/mlflow/basic_auth.ini" in dockerfile
    assert "MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini" in dockerfile
    config = configparser.ConfigParser()
    config.read(INFRA / "mlflow/basic_auth.ini")
    auth = config["mlflow"]
    assert "admin_password" not in auth and auth["authorization_function"].endswith(":authenticate_request_basic_auth")
    assert auth["database_uri"] == "postgresql:///mlflow_auth"  # its login from libpq's PG* variables
    assert "CREATE DATABASE mlflow_auth" in (INFRA / "mlflow/initdb/auth-db.sql").read_text()


@pytest.mark.parametrize("path", INFRA_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_no_secret_in_a_uri_or_a_committed_default(path):
    text = path.read_text()
    assert not re.search(r"\w+://[^/\s:@]+:[^/\s@]+@", text), "a login in a URI: give it through the environment"
    for name, default in re.findall(r"\$\{(\w+):-([^}]*)\}", text):
        assert not SECRET_NAME.search(name), f"${{{name}}} defaults to {default!r}: require it with ${{{name}:?...}}"
    for name, value in re.findall(r"^\s*-?\s*\{?name: (\w+), value: \"?([^\"}]*)", text, re.M):
        assert not SECRET_NAME.search(name), f"{name}={value!r} in a committed file: take it from a Secret"


def test_ray_clusters_use_token_authentication():
    cluster = by_kind("k8s/raycluster.yaml", "RayCluster")
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": "genflow-ray-token"}
    job = by_kind("k8s/rayjob.yaml", "RayJob")["spec"]
    assert job["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]  # that cluster's token
    config = load("ray/cluster.yaml")[0]
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"] == {"~/.genflow/cluster.env": "~/.genflow/cluster.env"}
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("set -a && . ~/.genflow/cluster.env && set +a && ") for c in starts)
    assert "RAY_AUTH_TOKEN" not in yaml.safe_dump(config)  # the token itself only in the secrets file


def test_ray_workers_log_in_to_mlflow_from_a_secret():
    for container in ray_containers():
        login = {item["name"]: item for item in container["env"] if item["name"].startswith("MLFLOW_TRACKING_")}
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert login[name]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-login", "key": name}, container["name"]
    comments = (INFRA / "ray/cluster.yaml").read_text()
    assert "#   MLFLOW_TRACKING_USERNAME=" in comments and "#   MLFLOW_TRACKING_PASSWORD=" in comments


def test_ray_up_pins_a_gpu_machine_image_named_with_its_region():
    text = (INFRA / "ray/cluster.yaml").read_text()
    config = load("ray/cluster.yaml")[0]
    images = {t["node_config"].get("ImageId") for t in config["available_node_types"].values()}
    assert len(images) == 1 and re.fullmatch(r"ami-[0-9a-f]{17}", images.pop() or "")
    comment = re.search(r"((?:\s*#.*\n)+)\s*ImageId: ami-", text).group(1)  # the comment above the first id
    assert "Deep Learning" in comment and "Nvidia Driver GPU AMI" in comment and config["provider"]["region"] in comment
