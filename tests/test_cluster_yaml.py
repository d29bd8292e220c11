"""Offline checks of the Ray cluster files (every ``ray_cluster*.yaml`` at the repository root).

`ray up` has no dry run. What it does with a cluster file (``ray.autoscaler._private.commands.
_bootstrap_config`` in Ray 2.60) is four steps, and these tests run exactly the offline ones:

1. ``prepare_config`` (run here): merges the file with the provider's ``defaults.yaml`` (a shallow
   merge: a top-level key the file omits is taken whole from the defaults), merges the common setup
   commands into the head/worker lists and fills per-type worker bounds. For ``provider: local`` it
   first turns ``head_ip``/``worker_ips`` into one implicit node type. Pure Python, no network.
2. ``fillout_available_node_types_resources`` (NOT run): for AWS it calls EC2
   DescribeInstanceTypes to detect CPU/GPU/memory of node types that leave ``resources`` out. That
   needs AWS credentials and the network. The offline path is to leave nothing to detect: the AWS
   file states every node type's resources in full (CPU, GPU, the accelerator_type label Ray would
   add, custom resources), which ``test_aws_node_types_state_resources_in_full`` checks; the
   detection step then has nothing to change.
3. ``validate_config`` (run here): the JSON schema ``ray-schema.json`` (no unknown keys at the top
   level or inside a node type, integer resources) plus Ray's cross-field checks (the head type is a
   node type, the per-type minimums fit the global maximum). Pure Python.
4. ``provider.bootstrap_config`` (NOT run): for AWS it looks up or creates IAM profiles, key pairs,
   subnets and security groups, all AWS API calls.

Beyond Ray's own checks, the tests pin the properties the files promise in their comments: nothing
is silently inherited from Ray's defaults, every ``ray start`` runs with token auth, the dashboard
and MLflow listen on 127.0.0.1, the Tune driver resource exists only on the head, every package is
pinned consistently with pyproject.toml, and the MLflow start command, run for real here (with an
S3 server from moto on 127.0.0.1 standing in for AWS), serves runs and artifacts on both its
addresses and survives the restart that a second `ray up` performs.
"""
from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.autoscaler._private.providers import _get_default_config
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER_FILES = sorted(REPO.glob("ray_cluster*.yaml"))
AWS_FILE = REPO / "ray_cluster.yaml"
ONPREM_FILE = REPO / "ray_cluster_onprem.yaml"
TUNE_DRIVER_RESOURCE = "train_driver"
MLFLOW_PORT = 5000  # the port the files give the MLflow server
PRIVATE_IP_STAND_IN = "127.0.0.2"  # a second loopback address plays the head's private address
SERVER_START_TIMEOUT_S = 300  # the start command gives up after 90 s per server, two servers


def load(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def ray_accepts(config: dict[str, Any]) -> dict[str, Any]:
    """The offline part of `ray up`: Ray's prepare step, then Ray's validation."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def commands(config: dict[str, Any], *sections: str) -> list[str]:
    return [cmd for section in sections for cmd in config.get(section, [])]


ALL_COMMAND_SECTIONS = ("initialization_commands", "setup_commands", "head_setup_commands",
                        "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")


def ray_start_commands(config: dict[str, Any]) -> list[str]:
    return [c for c in commands(config, "head_start_ray_commands", "worker_start_ray_commands")
            if "ray start" in c]


def mlflow_start_command(config: dict[str, Any]) -> str:
    found = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(found) == 1, f"expected one MLflow start command among head_start_ray_commands, got {found}"
    return found[0]


def pinned_requirements(config: dict[str, Any]) -> dict[str, Requirement]:
    """The requirements of the setup command that pip-installs the environment, by canonical name."""
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    assert len(installs) == 1, f"expected one pip install among setup_commands, got {installs}"
    tokens = shlex.split(installs[0])
    args = tokens[tokens.index("install") + 1:]
    takes_value = {"--find-links", "-f", "--index-url", "-i", "--extra-index-url", "-c", "-r"}
    reqs: dict[str, Requirement] = {}
    skip = False
    for tok in args:
        if skip:
            skip = False
        elif tok in takes_value:
            skip = True
        elif not tok.startswith("-"):
            req = Requirement(tok)
            reqs[canonicalize_name(req.name)] = req
    return reqs


def pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


# ----------------------------------------------------------------------------------------------
# Ray's own checks on every cluster file
# ----------------------------------------------------------------------------------------------


def test_both_cluster_files_are_found():
    assert {p.name for p in CLUSTER_FILES} >= {"ray_cluster.yaml", "ray_cluster_onprem.yaml"}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_ray_prepares_and_validates_cluster_file(path):
    prepared = ray_accepts(load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]
    for name, node_type in prepared["available_node_types"].items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_nothing_is_inherited_from_ray_defaults(path):
    """Ray's defaults install a nightly Ray wheel and bind the dashboard to 0.0.0.0; prepare_config
    takes any top-level key the file omits from them whole, so the files must state every one."""
    config = load(path)
    defaults = _get_default_config(config["provider"])
    missing = sorted(set(defaults) - set(config))
    assert not missing, f"{path.name} leaves {missing} to Ray's defaults.yaml"


# ----------------------------------------------------------------------------------------------
# Ray rejects broken files: the check above can fail
# ----------------------------------------------------------------------------------------------


def _unknown_top_level_key(c):
    c["min_worker"] = 1


def _unknown_node_type_key(c):
    c["available_node_types"]["gpu8.a100"]["max_worker"] = 4


def _fractional_gpu(c):
    c["available_node_types"]["gpu1.l40s"]["resources"]["GPU"] = 0.5


def _node_type_without_node_config(c):
    del c["available_node_types"]["gpu8.h100"]["node_config"]


def _head_type_not_defined(c):
    c["head_node_type"] = "head.gpu"


def _minimums_exceed_global_maximum(c):
    c["available_node_types"]["gpu1.l40s"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("break_it, error, message", [
    (_unknown_top_level_key, jsonschema.ValidationError, "min_worker"),
    (_unknown_node_type_key, jsonschema.ValidationError, "max_worker"),
    (_fractional_gpu, jsonschema.ValidationError, "0.5"),
    (_node_type_without_node_config, jsonschema.ValidationError, "node_config"),
    (_head_type_not_defined, ValueError, "head_node_type"),
    (_minimums_exceed_global_maximum, ValueError, "max_workers"),
], ids=lambda v: getattr(v, "__name__", None))
def test_ray_rejects_broken_aws_file(break_it, error, message):
    config = load(AWS_FILE)
    break_it(config)
    with pytest.raises(error, match=re.escape(message)):
        ray_accepts(config)


def test_ray_rejects_onprem_file_without_worker_ips():
    config = load(ONPREM_FILE)
    del config["provider"]["worker_ips"]
    with pytest.raises(click.ClickException, match="worker_ips"):
        ray_accepts(config)


def test_ray_rejects_node_types_in_onprem_file():
    config = load(ONPREM_FILE)
    config["available_node_types"] = copy.deepcopy(load(AWS_FILE)["available_node_types"])
    with pytest.raises(click.ClickException, match="available_node_types"):
        ray_accepts(config)


# ----------------------------------------------------------------------------------------------
# Properties the files promise
# ----------------------------------------------------------------------------------------------


def test_aws_node_types_state_resources_in_full():
    """The resources EC2 detection would fill in (step 2 of the module docstring) are all stated; the
    train_driver resource is on the CPU head only; GPU types carry their accelerator_type label and
    every worker type has an instance profile for S3."""
    config = load(AWS_FILE)
    head = config["head_node_type"]
    for name, node_type in config["available_node_types"].items():
        resources = node_type["resources"]
        assert resources.get("CPU", 0) > 0, f"{name}: CPU count not stated"
        labels = [k for k in resources if k.startswith("accelerator_type:")]
        if resources.get("GPU", 0) > 0:
            assert labels and all(resources[k] == 1 for k in labels), f"{name}: GPU model label missing"
        else:
            assert not labels, f"{name}: accelerator_type label on a node without GPUs"
        if name == head:
            assert resources.get("GPU", 0) == 0, "the head must be a CPU node"
            assert resources.get(TUNE_DRIVER_RESOURCE, 0) > 0, "the head must offer the Tune driver resource"
        else:
            assert TUNE_DRIVER_RESOURCE not in resources, f"{name}: Tune drivers belong on the head"
            assert node_type["node_config"].get("IamInstanceProfile"), f"{name}: no S3 credentials"
    gpu_counts = sorted(t["resources"].get("GPU", 0) for t in config["available_node_types"].values())
    assert 8 in gpu_counts and 1 in gpu_counts, f"expected 8-GPU and 1-GPU worker types, got {gpu_counts}"


def test_onprem_head_offers_tune_driver_resource_and_no_gpus():
    start = " ".join(c for c in load(ONPREM_FILE)["head_start_ray_commands"] if "ray start" in c)
    match = re.search(r"--resources='([^']*)'", start)
    assert match, "the on-prem head must declare custom resources with --resources"
    assert json.loads(match.group(1)).get(TUNE_DRIVER_RESOURCE, 0) > 0
    assert "--num-gpus=0" in start


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_token_auth_on_every_node(path):
    """Ray 2.60 enforces tokens when RAY_AUTH_MODE=token and reads the token from ~/.ray/auth_token."""
    config = load(path)
    starts = ray_start_commands(config)
    assert len(starts) == 2, f"expected a head and a worker `ray start`, got {starts}"
    for cmd in starts:
        before_start = cmd[:cmd.index("ray start")]
        assert re.search(r"export [^;]*RAY_AUTH_MODE=token", before_start), cmd
    mounts = config["file_mounts"]
    token_targets = [remote for remote, local in mounts.items() if local == "~/.ray/auth_token"]
    assert token_targets and all(t.endswith(".ray/auth_token") for t in token_targets), mounts
    assert any("RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in config["initialization_commands"])


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_node_gets_the_ray_train_settings_of_a_local_cluster(path):
    """The environment `cscctrl` gives a local cluster (pipeline.ray_init.init_ray) is exported before
    every `ray start`, so the same controller poll interval and print behaviour hold on a cluster."""
    from pipeline.ray_init import RAY_TRAIN_POLL_S

    for cmd in ray_start_commands(load(path)):
        exports = dict(re.findall(r"\b(RAY_TRAIN_[A-Z_]+)=(\S+?);?(?=\s)", cmd[:cmd.index("ray start")]))
        assert float(exports.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "nan")) == RAY_TRAIN_POLL_S, cmd
        assert exports.get("RAY_TRAIN_ENABLE_PRINT_PATCH") == "0", cmd


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_nothing_listens_on_all_interfaces(path):
    config = load(path)
    every_command = " ".join(commands(config, *ALL_COMMAND_SECTIONS))
    assert "0.0.0.0" not in every_command
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)
    assert "--dashboard-host=127.0.0.1" in head_start
    mlflow = mlflow_start_command(config)
    assert "--host 127.0.0.1 --port 5000" in mlflow and mlflow.count("mlflow server") == 1, \
        "MLflow must listen on 127.0.0.1 only"
    assert "--allowed-hosts \"localhost:*,127.0.0.1:*\"" in mlflow
    # the cluster address is served by the token gate alone, with the Ray cluster token
    assert re.search(r"python -m pipeline\.mlflow_gate --listen \$HEAD_IP:5000 --upstream http://127\.0\.0\.1:5000\s+"
                     r"--token-file \$HOME/\.ray/auth_token", mlflow), mlflow


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_mlflow_client_sends_the_cluster_token(path):
    """Workers export the gate's address with the token; job drivers on the head read both from
    ~/.cscctrl/env. The token is read from the file at start, never written into a cluster file."""
    config = load(path)
    worker = next(c for c in config["worker_start_ray_commands"] if "ray start" in c)
    assert "MLFLOW_TRACKING_TOKEN=$(cat ~/.ray/auth_token)" in worker
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker
    mlflow = mlflow_start_command(config)
    assert "'export MLFLOW_TRACKING_TOKEN=$(cat $HOME/.ray/auth_token)'" in mlflow and "~/.cscctrl/env" in mlflow


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_package_is_pinned_and_agrees_with_pyproject(path):
    project = pyproject()["project"]
    pins = pinned_requirements(load(path))
    loose = [str(r) for r in pins.values()
             if len(r.specifier) != 1 or next(iter(r.specifier)).operator != "=="]
    assert not loose, f"{path.name}: unpinned requirements {loose}"
    version = {name: next(iter(r.specifier)).version for name, r in pins.items()}
    assert version.get("cscctrl") == project["version"], "the project wheel pin must match pyproject"
    for dep in map(Requirement, project["dependencies"]):
        name = canonicalize_name(dep.name)
        assert name in pins, f"{path.name} does not install {dep.name}, a dependency in pyproject.toml"
        assert dep.specifier.contains(version[name], prereleases=True), \
            f"{path.name} pins {name}=={version[name]}, outside pyproject's {dep.specifier}"
        assert dep.extras <= pins[name].extras, f"{name}: extras {dep.extras} missing from the pin"
    # `ray up`/`ray job submit` need the same Ray on this machine as on the cluster.
    assert version["ray"] == ray.__version__


def test_aws_and_onprem_start_mlflow_the_same_way():
    """Only the artifact store differs (S3 / the shared filesystem), so running the AWS command for
    real below covers the on-prem one too."""
    aws, onprem = (mlflow_start_command(load(p)) for p in (AWS_FILE, ONPREM_FILE))
    destination = re.compile(r"--artifacts-destination \S+")
    assert destination.search(onprem).group(0).startswith("--artifacts-destination /")
    assert destination.sub("DEST", aws) == destination.sub("DEST", onprem)


def test_aws_and_onprem_install_the_same_environment():
    aws, onprem = (pinned_requirements(load(p)) for p in (AWS_FILE, ONPREM_FILE))
    assert {k: str(v) for k, v in aws.items()} == {k: str(v) for k, v in onprem.items()}


# ----------------------------------------------------------------------------------------------
# The MLflow start command, run for real
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, host: str | None = None, token: str | None = None) -> int:
    headers = {"Host": host} if host else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _port_open(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((ip, port)) == 0


class HeadSimulation:
    """Runs a cluster file's head commands with bash on this machine: HOME is a temporary
    directory, the MLflow port a free one, and the head's private address 127.0.0.2."""

    def __init__(self, config: dict[str, Any], home: Path, replacements: dict[str, str], env: dict[str, str]):
        self.config = config
        self.home = home
        (home / ".ray").mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(32)  # the cluster token `ray up` copies to ~/.ray/auth_token
        (home / ".ray" / "auth_token").write_text(self.token + "\n")
        self.port = _free_port()
        self.replacements = {**replacements, str(MLFLOW_PORT): str(self.port)}
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, **env, "HOME": str(home), "CSCCTRL_HEAD_IP": PRIVATE_IP_STAND_IN,
                    "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                    "MLFLOW_DISABLE_TELEMETRY": "true"}

    def render(self, cmd: str) -> str:
        for old, new in self.replacements.items():
            cmd = re.sub(rf"(?<![\w.]){re.escape(old)}(?![\w])", new, cmd)
        return cmd

    def run(self, cmd: str) -> subprocess.CompletedProcess:
        rendered = self.render(cmd)
        result = subprocess.run(["bash", "-c", rendered], env=self.env, capture_output=True, text=True,
                                timeout=SERVER_START_TIMEOUT_S)
        assert result.returncode == 0, f"{rendered}\nexit {result.returncode}\n{result.stdout}{result.stderr}"
        return result

    def head_setup(self) -> None:
        for cmd in self.config["head_setup_commands"]:
            self.run(cmd)

    def start_mlflow(self) -> None:
        self.run(mlflow_start_command(self.config))

    def server_groups(self) -> dict[str, int]:
        """Address -> process-group id of each MLflow server, from the pid files the command writes."""
        return {f.stem: int(f.read_text()) for f in (self.home / "mlflow").glob("*.pid")}

    def stop(self) -> None:
        """Kill what the start command left running: each server's whole process group."""
        for group in self.server_groups().values():
            try:
                os.killpg(group, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 30
            while _live_members(group) and time.time() < deadline:
                time.sleep(0.2)


def _live_members(group: int) -> list[int]:
    """Processes of a process group that are not zombies (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgid = fields[0], int(fields[2])
        if pgid == group and state != "Z":
            members.append(int(stat.parent.name))
    return members


def _log_run_with_artifact(uri: str, tmp: Path) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment("cluster-yaml-check")
    run = client.create_run(experiment, run_name="probe")
    client.log_metric(run.info.run_id, "encoder/delta_r_z", 1.25, step=3)
    note = tmp / "note.txt"
    note.write_text("artifact through the proxy\n")
    client.log_artifact(run.info.run_id, str(note))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _check_running_server(head: HeadSimulation) -> None:
    for ip in ("127.0.0.1", PRIVATE_IP_STAND_IN):
        assert _get(f"http://{ip}:{head.port}/health") == 200, f"MLflow does not answer on {ip}"
    # --allowed-hosts: the file's addresses pass, another Host header is refused (DNS rebinding).
    api = f"http://127.0.0.1:{head.port}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(api) == 200
    assert _get(api, host="localhost:8080") == 200  # a tunnel to another local port
    assert _get(api, host="attacker.example:80") == 403
    # The cluster address: the token gate. No token or another token: 401; the cluster token: through.
    private = f"http://{PRIVATE_IP_STAND_IN}:{head.port}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(private) == 401
    assert _get(private, token="not-the-cluster-token") == 401
    assert _get(private, token=head.token) == 200
    # Not on all interfaces: this machine's own network address gets no answer.
    own_ip = ray.util.get_node_ip_address()
    if not own_ip.startswith("127."):
        assert not _port_open(own_ip, head.port), f"MLflow answers on {own_ip}"
    env_file = (head.home / ".cscctrl" / "env").read_text()
    assert f"MLFLOW_TRACKING_URI=http://{PRIVATE_IP_STAND_IN}:{head.port}" in env_file


@pytest.fixture
def bash_tools():
    for tool in ("bash", "curl", "setsid"):
        if shutil.which(tool) is None:
            pytest.skip(f"the cluster commands need {tool}, which this machine lacks")


@pytest.fixture
def s3_server():
    """A real S3 API server (moto) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.mark.slow
def test_aws_mlflow_server_serves_both_addresses_proxies_to_s3_and_survives_restart(
        tmp_path, bash_tools, s3_server, monkeypatch):
    import boto3

    config = load(AWS_FILE)
    bucket = re.search(r"s3://([^/\s]+)/", mlflow_start_command(config)).group(1)
    artifacts_prefix = re.search(r"--artifacts-destination s3://[^/\s]+/(\S+)", mlflow_start_command(config)).group(1)
    s3_env = {"AWS_ENDPOINT_URL": s3_server, "MLFLOW_S3_ENDPOINT_URL": s3_server,
              "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=bucket)
    home = tmp_path / "home"
    home.mkdir()
    head = HeadSimulation(config, home, {}, s3_env)
    try:
        head.head_setup()  # nothing in the bucket yet: no database appears
        assert not (home / "mlflow" / "mlflow.db").exists()
        head.start_mlflow()
        _check_running_server(head)
        # A training rank on a GPU node logs through the token gate; the artifact lands in S3.
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", head.token)
        run_id = _log_run_with_artifact(f"http://{PRIVATE_IP_STAND_IN}:{head.port}", tmp_path)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert any(k.startswith(artifacts_prefix) and k.endswith(f"{run_id}/artifacts/note.txt") for k in keys), keys

        # A second `ray up` runs the command again: the old servers stop, the new ones keep the runs.
        first = head.server_groups()
        assert set(first) == {"127.0.0.1", PRIVATE_IP_STAND_IN}
        head.start_mlflow()
        assert not any(_live_members(g) for g in first.values())
        assert set(head.server_groups().values()).isdisjoint(first.values())
        _check_running_server(head)
        from mlflow import MlflowClient
        assert MlflowClient(f"http://127.0.0.1:{head.port}").get_run(run_id).data.metrics == {"encoder/delta_r_z": 1.25}

        # A fresh head restores the database saved in S3 (docs/cluster.md's backup step).
        saved = (home / "mlflow" / "mlflow.db").read_bytes()
        restore_key = re.search(rf"{re.escape(bucket)}/(\S+?mlflow\.db)", " ".join(config["head_setup_commands"])).group(1)
        s3.put_object(Bucket=bucket, Key=restore_key, Body=saved)
        fresh_home = tmp_path / "fresh-home"
        fresh_home.mkdir()
        HeadSimulation(config, fresh_home, {}, s3_env).head_setup()
        assert (fresh_home / "mlflow" / "mlflow.db").read_bytes() == saved
    finally:
        head.stop()
    assert not _port_open("127.0.0.1", head.port)
