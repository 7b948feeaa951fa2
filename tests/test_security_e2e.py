"""Security with real processes: a charrnn-server over TLS with bearer tokens, driven by the CLI, the batch job
(--resume included) and the load generator; SIGHUP rotation of tokens and certificates; start-up errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from clients.client import CharRnnClient
from clients.errors import UnauthenticatedError
from clients.processes import ServerProcess
from clients.security import ClientSecurity
from tests.helpers import console_script, start_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def secure(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """A TLS server with tokens; the folder holding ca.pem, server.pem/.key, tokens and token (alice's)."""
    folder = tmp_path_factory.mktemp("secure")
    ca = trustme.CA()
    (folder / "ca.pem").write_bytes(ca.cert_pem.bytes())
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    (folder / "server.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    (folder / "server.key").write_bytes(leaf.private_key_pem.bytes())
    (folder / "tokens").write_text("# name token\nalice token-alice-1\nbatch token-batch-1\n")
    (folder / "token").write_text("token-alice-1\n")
    server = start_server(
        model_repository, folder, "--tls-cert", str(folder / "server.pem"), "--tls-key", str(folder / "server.key"),
        "--auth-token-file", str(folder / "tokens"), "--watch-interval-s", "0",
        security=ClientSecurity.from_files(tls_ca=folder / "ca.pem"),
    )
    yield server, folder
    assert server.stop() == 0, server.log()


def run(name: str, *args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([console_script(name), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          check=False, env={k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"})


def test_the_cli_over_tls_with_a_token(secure: tuple[ServerProcess, Path]) -> None:
    server, folder = secure
    tls = ("--target", server.target, "--tls-ca", folder / "ca.pem")
    ok = run("charrnn", *tls, "--token-file", folder / "token", "encode", "--model", "lstm", "--json", "hello")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["results"][0]["word"] == "hello"
    missing = run("charrnn", *tls, "models")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "charrnn: error: UNAUTHENTICATED (UNAUTHENTICATED): missing or invalid bearer token "
        "(send `authorization: Bearer <token>`)"
    ]
    plain = run("charrnn", "--target", server.target, "--timeout", "5", "health")
    assert plain.returncode == 1 and len(plain.stderr.strip().splitlines()) == 1
    assert "likely serves TLS" in plain.stderr
    health = run("charrnn", *tls, "health")  # no token needed
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")
    assert "token-alice-1" not in server.log()


def test_the_batch_job_over_tls_with_resume(secure: tuple[ServerProcess, Path], tmp_path: Path) -> None:
    server, folder = secure
    words = tmp_path / "words.txt"
    words.write_text("".join(f"{'helo'[i % 4]}{'hel'[i % 3]}lo\n" for i in range(3000)))
    output = tmp_path / "out.jsonl"
    common = ("--target", server.target, "--model", "lstm", "--input", words, "--output", output, "--quiet",
              "--tls-ca", folder / "ca.pem", "--chunk-size", "100")
    token = folder / "batch-token"
    token.write_text("token-batch-1")
    full = run("charrnn-batch", *common, "--token-file", token)
    assert full.returncode == 0, full.stderr
    complete = output.read_bytes()
    assert complete.count(b"\n") == 3000
    output.write_bytes(complete[: complete.index(b"\n", len(complete) // 2) + 1])  # as if stopped half-way
    resumed = run("charrnn-batch", *common, "--token-file", token, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "already in the output" in resumed.stderr
    assert output.read_bytes() == complete
    refused = run("charrnn-batch", *common, "--output", tmp_path / "other.jsonl")  # no token: fatal, not retried
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def test_the_load_generator_over_tls_with_a_token(secure: tuple[ServerProcess, Path]) -> None:
    server, folder = secure
    result = run("charrnn-loadgen", "--target", server.target, "--tls-ca", folder / "ca.pem", "--token-file",
                 folder / "token", "--requests", "50", "--concurrency", "4", "--warmup", "0", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["requests"], report["errors"]) == (50, {})


def test_sighup_rotates_tokens_and_the_certificate_without_a_restart(
    model_repository: Path, tmp_path: Path
) -> None:
    ca = trustme.CA()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())

    def issue(authority: trustme.CA) -> None:
        leaf = authority.issue_cert("127.0.0.1")
        (tmp_path / "server.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        (tmp_path / "server.key").write_bytes(leaf.private_key_pem.bytes())

    issue(ca)
    tokens = tmp_path / "tokens"
    tokens.write_text("alice old-token\n")
    server = start_server(
        model_repository, tmp_path, "--tls-cert", str(tmp_path / "server.pem"), "--tls-key",
        str(tmp_path / "server.key"), "--auth-token-file", str(tokens), "--watch-interval-s", "0",
        security=ClientSecurity.from_files(tls_ca=tmp_path / "ca.pem"),
    )
    try:
        old = ClientSecurity.from_files(tls_ca=tmp_path / "ca.pem", environ={"CHARRNN_TOKEN": "old-token"})
        with CharRnnClient(server.target, timeout=10, security=old) as kept:
            before = kept.encode("lstm", ["hello"])[0].hidden
            tokens.write_text("alice new-token\n")
            new_ca = trustme.CA()
            (tmp_path / "new-ca.pem").write_bytes(new_ca.cert_pem.bytes())
            issue(new_ca)
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while "reload done" not in server.log():
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.1)
            with pytest.raises(UnauthenticatedError):
                kept.encode("lstm", ["hello"])  # the open TLS connection still works; the old token does not
        new = ClientSecurity.from_files(tls_ca=tmp_path / "new-ca.pem", environ={"CHARRNN_TOKEN": "new-token"})
        with CharRnnClient(server.target, timeout=10, security=new) as client:
            assert (client.encode("lstm", ["hello"])[0].hidden == before).all()
        assert server.process.poll() is None
        assert "new-token" not in server.log() and "old-token" not in server.log()
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("which", ["--tls-cert", "--auth-token-file"])
def test_a_missing_security_file_is_a_clean_start_up_error(model_repository: Path, tmp_path: Path, which: str) -> None:
    missing = tmp_path / "missing-file"
    args = {"--tls-cert": ["--tls-cert", missing, "--tls-key", missing], "--auth-token-file": [which, missing]}[which]
    result = run("charrnn-server", "--repository", model_repository, "--port", "0", "--metrics-port", "-1",
                 "--device", "cpu", *args, timeout=60)
    assert result.returncode == 1
    assert "cannot start" in result.stderr and str(missing) in result.stderr and "Traceback" not in result.stderr
