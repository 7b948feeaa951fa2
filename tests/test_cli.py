"""The charrnn command line, run as users run it (the installed console script, a subprocess) against a real server.

Tests that need no server (usage errors, dead ports, formatting) are marked unit; the others e2e.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from clients.cli import EXIT_BAD_REQUEST, EXIT_FAILURE, error_line, exit_code, read_words
from clients.client import CharRnnClient
from clients.errors import CharRnnError, ErrorDetails
from tests.helpers import LARGE_ALPHABET, LARGE_MODEL, ServerProcess, console_script, free_port

e2e = pytest.mark.e2e
unit = pytest.mark.unit

CLI_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[CharRnnClient]:
    """The client library, to compare the CLI's numbers with."""
    with CharRnnClient(server.target) as connected:
        yield connected


def charrnn(
    *args: str, target: str | None, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `charrnn [--target TARGET] ARGS...` and capture its output."""
    command = [console_script("charrnn"), *(["--target", target] if target is not None else []), *args]
    return subprocess.run(
        command, input=stdin if stdin is not None else "", capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
        env={**os.environ, **(env or {})},
    )


def dead_target() -> str:
    """host:port where nothing listens."""
    return f"127.0.0.1:{free_port()}"


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    """Errors are one line for the user, not a Python traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


# ---- encode ----------------------------------------------------------------------------------------------------


@e2e
def test_encode_table(server: ServerProcess, client: CharRnnClient) -> None:
    result = charrnn("encode", "--model", "lstm", "hello", "leo", target=server.target)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert "lstm: 'hello', length 5" in out and "lstm: 'leo', length 3" in out
    assert out.count("outputs (per character)") == 2
    assert out.count("hidden (final, per layer)") == 2 and out.count("cell (final, per layer)") == 2
    hello, leo = out.split("\n\n")
    for block, encoding in zip((hello, leo), client.encode("lstm", ["hello", "leo"]), strict=True):
        lines = block.splitlines()
        # One line per character, then one per layer for hidden and for cell, each with its values at 6 decimals.
        for position, (char, row) in enumerate(zip(encoding.word, encoding.outputs, strict=True)):
            line = next(line for line in lines if line.strip().startswith(f"{position} {char!r}"))
            assert line.split()[2:] == [f"{value:+.6f}" for value in row]
        layer_lines = [line for line in lines if line.strip().startswith("layer ")]
        assert len(layer_lines) == 2 * len(encoding.hidden)
        expected = [*encoding.hidden, *(encoding.cell if encoding.cell is not None else [])]
        for line, row in zip(layer_lines, expected, strict=True):
            assert line.split()[2:] == [f"{value:+.6f}" for value in row]


@e2e
def test_encode_table_without_cell_for_rnn(server: ServerProcess) -> None:
    result = charrnn("encode", "--model", "rnn_multi_layers", "hel", target=server.target)
    assert result.returncode == 0, result.stderr
    assert "rnn_multi_layers: 'hel', length 3" in result.stdout
    assert "cell" not in result.stdout
    assert [line.split()[:2] for line in result.stdout.splitlines() if "layer " in line] == [
        ["layer", "0"], ["layer", "1"], ["layer", "2"],
    ]


@e2e
@pytest.mark.parametrize("model", ["rnn", "lstm", LARGE_MODEL])
def test_encode_json_equals_the_client_library(server: ServerProcess, client: CharRnnClient, model: str) -> None:
    words = ["hello", "h", "oleh"] if model != LARGE_MODEL else ["Hello-World", "z", LARGE_ALPHABET]
    result = charrnn("encode", "--model", model, "--json", *words, target=server.target)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert set(printed) == {"model", "results"} and printed["model"] == model
    expected = [encoding.to_json() for encoding in client.encode(model, words)]
    assert [record["word"] for record in printed["results"]] == words
    for got, want in zip(printed["results"], expected, strict=True):
        keys = {"word", "version", "outputs", "hidden"} | (set() if model == "rnn" else {"cell"})
        assert set(got) == set(want) == keys
        for key in set(want) - {"word"}:
            np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=0, atol=1e-6, err_msg=key)
            assert np.asarray(got[key]).shape == np.asarray(want[key]).shape


@e2e
def test_encode_a_pinned_version(server: ServerProcess) -> None:
    pinned = charrnn("encode", "--model", "lstm", "--version", "1", "--json", "hello", target=server.target)
    assert pinned.returncode == 0, pinned.stderr
    assert [record["version"] for record in json.loads(pinned.stdout)["results"]] == [1]
    missing = charrnn("encode", "--model", "lstm", "--version", "9", "hello", target=server.target)
    assert missing.returncode == 2
    assert missing.stderr.startswith("charrnn: error: NOT_FOUND (VERSION_NOT_FOUND): "), missing.stderr
    assert_no_traceback(missing)


@e2e
def test_encode_words_from_stdin(server: ServerProcess, client: CharRnnClient) -> None:
    result = charrnn("encode", "--model", "rnn", "--json", target=server.target, stdin="hel\nlo\nhello\n")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert [record["word"] for record in printed["results"]] == ["hel", "lo", "hello"]  # the final newline is no word
    expected = [encoding.to_json() for encoding in client.encode("rnn", ["hel", "lo", "hello"])]
    for got, want in zip(printed["results"], expected, strict=True):
        np.testing.assert_allclose(got["outputs"], want["outputs"], rtol=0, atol=1e-6)
    without_final_newline = charrnn("encode", "--model", "rnn", "--json", target=server.target, stdin="hel\nlo")
    assert [record["word"] for record in json.loads(without_final_newline.stdout)["results"]] == ["hel", "lo"]


@e2e
def test_empty_line_on_stdin_is_an_empty_word(server: ServerProcess) -> None:
    result = charrnn("encode", "--model", "rnn", target=server.target, stdin="hel\n\nlo\n")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == "charrnn: error: INVALID_ARGUMENT (WORD_EMPTY): word 1 '': the word is empty"


@e2e
def test_empty_stdin_is_no_words(server: ServerProcess) -> None:
    result = charrnn("encode", "--model", "rnn", target=server.target, stdin="")
    assert result.returncode == 2
    assert result.stderr.strip() == "charrnn: error: INVALID_ARGUMENT (NO_WORDS): the request has no words"


@unit
def test_read_words() -> None:
    assert read_words(io.StringIO("")) == []
    assert read_words(io.StringIO("\n")) == [""]
    assert read_words(io.StringIO("he\nlo\n")) == ["he", "lo"]
    assert read_words(io.StringIO("he\nlo")) == ["he", "lo"]
    assert read_words(io.StringIO("he\n\nlo\n\n")) == ["he", "", "lo", ""]
    assert read_words(io.StringIO("he\r\nlo\r\n")) == ["he", "lo"]
    assert read_words(io.StringIO(" he \n")) == [" he "]  # spaces are characters, kept for the server to judge


@e2e
def test_bad_character_names_the_word_and_character(server: ServerProcess) -> None:
    result = charrnn("encode", "--model", "lstm", "hello", "hexo", target=server.target)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        "charrnn: error: INVALID_ARGUMENT (WORD_NOT_IN_ALPHABET): "
        "word 1 'hexo': character 'x' at position 2 is not in the model's alphabet 'helo'"
    )
    assert_no_traceback(result)


@e2e
def test_unknown_model(server: ServerProcess) -> None:
    result = charrnn("encode", "--model", "no_such_model", "hello", target=server.target)
    assert result.returncode == 2
    assert result.stderr.startswith("charrnn: error: NOT_FOUND (MODEL_NOT_FOUND): model 'no_such_model' is not loaded")
    assert result.stdout == ""
    assert_no_traceback(result)


@e2e
def test_too_many_words_exits_1(server: ServerProcess) -> None:
    result = charrnn("encode", "--model", "rnn", target=server.target, stdin="h\n" * 4097)
    assert result.returncode == 1
    assert result.stderr.startswith("charrnn: error: RESOURCE_EXHAUSTED (TOO_MANY_WORDS): ")
    assert "4097" in result.stderr


@e2e
def test_timeout_flag_applies(server: ServerProcess) -> None:
    # About 0.2 s of server work against a 10 ms timeout.
    result = charrnn("--timeout", "0.01", "encode", "--model", "lstm", target=server.target,
                     stdin=("hello" * 51 + "h\n") * 500)
    assert result.returncode == 1
    assert result.stderr.startswith("charrnn: error: DEADLINE_EXCEEDED: ")  # the client's deadline: no reason
    assert_no_traceback(result)


@unit
def test_error_line_and_exit_code() -> None:
    bad_word = CharRnnError(
        grpc.StatusCode.INVALID_ARGUMENT, "word 0 'hex': character 'x' at position 2 is not in the model's alphabet",
        ErrorDetails("WORD_NOT_IN_ALPHABET", {"word_index": "0", "position": "2"}),
    )
    assert error_line(bad_word) == (
        "charrnn: error: INVALID_ARGUMENT (WORD_NOT_IN_ALPHABET): "
        "word 0 'hex': character 'x' at position 2 is not in the model's alphabet"
    )
    assert exit_code(bad_word) == EXIT_BAD_REQUEST
    unreachable = CharRnnError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    assert error_line(unreachable) == "charrnn: error: UNAVAILABLE: connection refused"
    assert exit_code(unreachable) == EXIT_FAILURE
    queue_full = CharRnnError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", ErrorDetails("QUEUE_FULL"))
    assert exit_code(queue_full) == EXIT_FAILURE
    assert exit_code(CharRnnError(grpc.StatusCode.NOT_FOUND, "unknown service")) == EXIT_BAD_REQUEST


# ---- models and health -----------------------------------------------------------------------------------------


@e2e
def test_models_table(server: ServerProcess) -> None:
    result = charrnn("models", target=server.target)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "INPUT", "HIDDEN", "LAYERS", "ALPHABET", "PROVIDER"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows == {
        LARGE_MODEL: [LARGE_MODEL, "lstm", "57", "64", "2", LARGE_ALPHABET, "CPUExecutionProvider"],
        "lstm": ["lstm", "lstm", "4", "2", "3", "helo", "CPUExecutionProvider"],
        "rnn": ["rnn", "rnn", "4", "2", "1", "helo", "CPUExecutionProvider"],
        "rnn_multi_layers": ["rnn_multi_layers", "rnn", "4", "2", "3", "helo", "CPUExecutionProvider"],
    }


@e2e
def test_models_json(server: ServerProcess, client: CharRnnClient) -> None:
    result = charrnn("models", "--json", target=server.target)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)["models"]
    assert [model["name"] for model in printed] == [model.name for model in client.models()]
    rnn = next(model for model in printed if model["name"] == "rnn")
    assert rnn["kind"] == "rnn" and rnn["nonlinearity"] == "tanh" and rnn["alphabet"] == "helo"
    assert (rnn["input_size"], rnn["hidden_size"], rnn["num_layers"]) == (4, 2, 1)
    assert rnn["execution_provider"] == "CPUExecutionProvider" and rnn["max_word_length"] == 256
    assert set(rnn["artifact_sha256"]) == {"model.onnx", "model.pt"}
    assert next(model for model in printed if model["name"] == "lstm")["nonlinearity"] is None


@e2e
def test_health_serving(server: ServerProcess) -> None:
    result = charrnn("health", target=server.target)
    assert (result.returncode, result.stdout, result.stderr) == (0, "SERVING\n", "")
    service = charrnn("health", "--service", "charrnn.v1.CharRnn", target=server.target)
    assert (service.returncode, service.stdout) == (0, "SERVING\n")


@e2e
def test_health_of_unknown_service_exits_nonzero(server: ServerProcess) -> None:
    result = charrnn("health", "--service", "no.such.Service", target=server.target)
    assert result.returncode == 2  # the health service answers NOT_FOUND
    assert result.stderr.startswith("charrnn: error: NOT_FOUND: ")  # gRPC's health service sends no reason


@e2e
def test_target_from_environment(server: ServerProcess) -> None:
    result = charrnn("health", target=None, env={"CHARRNN_TARGET": server.target})
    assert (result.returncode, result.stdout) == (0, "SERVING\n"), result.stderr
    overridden = charrnn("--timeout", "2", "health", target=dead_target(), env={"CHARRNN_TARGET": server.target})
    assert overridden.returncode == 1  # --target wins over the environment


@unit
def test_health_of_a_dead_port_fails_quickly() -> None:
    started = time.monotonic()
    result = charrnn("--timeout", "2", "health", target=dead_target())
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(
        ("charrnn: error: UNAVAILABLE: ", "charrnn: error: DEADLINE_EXCEEDED: ")
    ), result.stderr
    assert_no_traceback(result)
    assert elapsed < 15, elapsed  # interpreter start-up plus at most the 2 s timeout


@unit
def test_encode_against_a_dead_port() -> None:
    result = charrnn("--timeout", "2", "encode", "--model", "rnn", "hello", target=dead_target())
    assert result.returncode == 1
    assert result.stderr.startswith("charrnn: error: ")
    assert_no_traceback(result)


@unit
def test_usage_errors() -> None:
    missing_model = charrnn("encode", "hello", target="127.0.0.1:1")
    assert missing_model.returncode == 2 and "--model" in missing_model.stderr
    no_command = charrnn(target="127.0.0.1:1")
    assert no_command.returncode == 2 and "COMMAND" in no_command.stderr
    bad_timeout = charrnn("--timeout", "0", "health", target="127.0.0.1:1")
    assert bad_timeout.returncode == 2 and "positive" in bad_timeout.stderr
    helped = charrnn("--help", target=None)
    assert helped.returncode == 0 and "encode" in helped.stdout and "exit status" in helped.stdout
