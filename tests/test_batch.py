"""charrnn-batch end to end against real servers: order, per-word errors, input formats, resume, failover; and,
without a server, its input and output helpers and its retry decisions (made from status details, not text)."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients.batch.failures import Backoff, FatalError, RetryableError, classify
from clients.batch.output import format_chunk, scan_output
from clients.batch.records import Chunk, Record, count_records, infer_format
from clients.batch.targets import split_targets, streams_for
from clients.client import CharRnnClient
from server.core.errors import (
    InvalidWordError,
    ModelNotFoundError,
    ModelsLoadingError,
    OverloadedError,
    Reason,
    RequestTooLargeError,
    ShuttingDownError,
)
from server.grpc.status import rich_status
from tests.helpers import ServerProcess, aio_error, console_script, start_server, transport_error

ALPHABET = "helo"


def random_words(count: int, seed: int = 0) -> list[str]:
    """Words over the built-in models' alphabet, 1..12 letters."""
    rng = random.Random(seed)
    return ["".join(rng.choices(ALPHABET, k=rng.randint(1, 12))) for _ in range(count)]


def write_words(path: Path, words: Sequence[str]) -> Path:
    """A text input: one word per line."""
    path.write_text("".join(f"{word}\n" for word in words))
    return path


def batch_command(*args: object) -> list[str]:
    """The charrnn-batch command line."""
    return [console_script("charrnn-batch"), *map(str, args)]


def run_batch(*args: object, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run charrnn-batch to completion; stdout and stderr captured as text."""
    process = subprocess.run(
        batch_command(*args), input=stdin, capture_output=True, timeout=timeout, check=False
    )
    return subprocess.CompletedProcess(
        process.args, process.returncode, process.stdout.decode(errors="replace"), process.stderr.decode(errors="replace")
    )


def read_output(path: Path) -> list[dict[str, Any]]:
    """The output's JSON lines."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def reference(target: str, model: str, words: Sequence[str]) -> list[dict[str, Any]]:
    """What the client library says for the same words: {"index", **Encoding.to_json()} per word."""
    with CharRnnClient(target) as client:
        encodings = [
            encoding
            for start in range(0, len(words), 1000)
            for encoding in client.encode(model, words[start : start + 1000], report_invalid=True)
        ]
    return [{"index": index, **encoding.to_json()} for index, encoding in enumerate(encodings)]


def wait_for_output(path: Path, size: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until the output holds at least this many bytes, asserting the job is still running then."""
    deadline = time.monotonic() + timeout
    while not path.exists() or path.stat().st_size < size:
        assert process.poll() is None, f"charrnn-batch ended early: {process.returncode}"
        assert time.monotonic() < deadline, "the output did not grow"
        time.sleep(0.01)
    assert process.poll() is None, "charrnn-batch finished before it could be interrupted"


def encode_stream_requests(server: ServerProcess, code: str = "[A-Z_]+") -> float:
    """EncodeStream messages the server has answered (with a status code matching `code`), from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = re.compile(
        rf'^charrnn_requests_total\{{(?=[^}}]*method="EncodeStream")(?=[^}}]*code="{code}")[^}}]*\}} (\S+)$',
        re.MULTILINE,
    )
    return sum(float(value) for value in pattern.findall(text))


@pytest.fixture(scope="module")
def second_server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A second server over the same repository, for multi-server jobs."""
    running = start_server(model_repository, tmp_path_factory.mktemp("second"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def big_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60,000 words: long enough to kill a job mid-run."""
    return write_words(tmp_path_factory.mktemp("big") / "words.txt", random_words(60_000, seed=7))


@pytest.fixture(scope="module")
def big_clean_output(big_input: Path, server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The output of an uninterrupted job over big_input (lstm, 100-word chunks)."""
    output = tmp_path_factory.mktemp("clean") / "out.jsonl"
    result = run_batch("--target", server.target, "--model", "lstm", "--input", big_input, "--output", output,
                       "--chunk-size", 100, "--log-interval", 0.2)
    assert result.returncode == 0, result.stderr
    assert re.search(r"words, [\d,]+ words/s, 0 failed, ETA \d+ s", result.stderr), result.stderr  # log lines
    assert "done: 60,000 words, 60,000 encoded, 0 failed" in result.stderr
    return output.read_bytes()


# ------------------------------------------------------------------------------------------------ order and values


@pytest.mark.e2e
@pytest.mark.parametrize("model", ["lstm", "rnn_multi_layers"])
def test_order_and_numbers_match_the_client_library(server: ServerProcess, tmp_path: Path, model: str) -> None:
    words = random_words(3000, seed=1)
    output = tmp_path / "out.jsonl"
    result = run_batch("--target", server.target, "--model", model, "--input", write_words(tmp_path / "w.txt", words),
                       "--output", output, "--chunk-size", 7, "--max-in-flight", 5)
    assert result.returncode == 0, result.stderr
    assert "done: 3,000 words, 3,000 encoded, 0 failed" in result.stderr
    lines = read_output(output)
    assert lines == reference(server.target, model, words)  # exact floats, same order
    assert all(("cell" in line) == (model == "lstm") for line in lines)


@pytest.mark.e2e
def test_bad_words_get_error_lines_and_the_rest_succeed(server: ServerProcess, tmp_path: Path) -> None:
    words = random_words(40, seed=2)
    bad = {5: "hex", 6: "", 30: "h" * 300, 39: "HELLO"}
    for index, word in bad.items():
        words[index] = word
    output = tmp_path / "out.jsonl"
    result = run_batch("--target", server.target, "--model", "lstm", "--input", write_words(tmp_path / "w.txt", words),
                       "--output", output, "--chunk-size", 4)
    assert result.returncode == 3, result.stderr
    assert "40 words, 36 encoded, 4 failed" in result.stderr
    lines = read_output(output)
    assert [line["index"] for line in lines] == list(range(40))
    assert [line["word"] for line in lines] == words
    assert {index for index, line in enumerate(lines) if "error" in line} == set(bad)
    assert lines[5]["error"] == "character 'x' at position 2 is not in the model's alphabet 'helo'"
    assert lines[6]["error"] == "the word is empty"
    assert "300 characters, more than the limit" in lines[30]["error"]
    assert "'H' at position 0" in lines[39]["error"]
    assert set(lines[5]) == {"index", "word", "error"}
    expected = reference(server.target, "lstm", words)
    assert [line for line in lines if "error" not in line] == [line for line in expected if "error" not in line]


# ---------------------------------------------------------------------------------------------------- input formats


@pytest.mark.e2e
def test_jsonl_and_csv_inputs(server: ServerProcess, tmp_path: Path) -> None:
    words = random_words(50, seed=3)
    expected = reference(server.target, "rnn", words)

    jsonl = tmp_path / "words.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "w": word}) + "\n" + ("\n" if i == 10 else "")
                             for i, word in enumerate(words)) + '{"w": 5}\nnot json\n{"x": "hello"}\n')
    out_jsonl = tmp_path / "jsonl.out"
    result = run_batch("--target", server.target, "--model", "rnn", "--input", jsonl, "--output", out_jsonl,
                       "--field", "w", "--chunk-size", 8)
    assert result.returncode == 3, result.stderr
    lines = read_output(out_jsonl)
    assert lines[:50] == expected  # the blank line is skipped, not a record
    assert [(line["index"], line["word"]) for line in lines[50:]] == [(50, None), (51, None), (52, None)]
    assert "the 'w' field is not a string" in lines[50]["error"]
    assert "not valid JSON" in lines[51]["error"] and "input line 53" in lines[51]["error"]
    assert "no 'w' field" in lines[52]["error"]

    table = tmp_path / "words.csv"
    table.write_text("id,token,note\r\n" + "".join(f'{i},{word},"a, ""quoted"" note"\r\n' for i, word in enumerate(words))
                     + "50\r\n")
    out_csv = tmp_path / "csv.out"
    result = run_batch("--target", server.target, "--model", "rnn", "--input", table, "--output", out_csv,
                       "--column", "token", "--chunk-size", 8)
    assert result.returncode == 3, result.stderr
    lines = read_output(out_csv)
    assert lines[:50] == expected
    assert lines[50] == {"index": 50, "word": None, "error": "input line 52: the row has no 'token' column"}

    result = run_batch("--target", server.target, "--model", "rnn", "--input", table, "--output", out_csv)
    assert result.returncode == 1 and "has no column 'word'" in result.stderr


@pytest.mark.e2e
def test_stdin_input_and_stdout_output(server: ServerProcess) -> None:
    words = random_words(700, seed=4)
    data = "".join(f"{word}\r\n" for word in words).encode()  # CRLF line ends too
    result = run_batch("--target", server.target, "--model", "lstm", "--input", "-", "--output", "-",
                       "--chunk-size", 64, stdin=data)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == reference(server.target, "lstm", words)


# ----------------------------------------------------------------------------------------------------- two servers


@pytest.mark.e2e
def test_order_across_two_servers(server: ServerProcess, second_server: ServerProcess, tmp_path: Path) -> None:
    words = random_words(4000, seed=5)
    source = write_words(tmp_path / "w.txt", words)
    expected = reference(server.target, "lstm", words)
    for targets in (
        [f"{server.target},{second_server.target}"],  # two channels
        [f"ipv4:{server.target},{second_server.target}"],  # one channel, round_robin over both addresses
    ):
        before = [encode_stream_requests(s) for s in (server, second_server)]
        output = tmp_path / "out.jsonl"
        result = run_batch(*[arg for target in targets for arg in ("--target", target)], "--model", "lstm",
                           "--input", source, "--output", output, "--chunk-size", 10, "--max-in-flight", 16)
        assert result.returncode == 0, result.stderr
        assert read_output(output) == expected, targets
        after = [encode_stream_requests(s) for s in (server, second_server)]
        assert all(a > b for a, b in zip(after, before, strict=True)), (targets, before, after)  # both did work


@pytest.mark.e2e
def test_a_server_killed_mid_job_leaves_its_chunks_to_the_other(
    server: ServerProcess, model_repository: Path, big_input: Path, big_clean_output: bytes, tmp_path: Path
) -> None:
    victim = start_server(model_repository, tmp_path)
    output = tmp_path / "out.jsonl"
    job = subprocess.Popen(
        batch_command("--target", victim.target, "--target", server.target, "--model", "lstm", "--input", big_input,
                      "--output", output, "--chunk-size", 100, "--retry-seconds", 30),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        wait_for_output(output, 500_000, job)  # ~1,000 of 60,000 lines
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)
        _, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
        victim.process.kill()
    assert job.returncode == 0, stderr.decode()
    assert f"{victim.target} stream" in stderr.decode() and "re-sending" in stderr.decode()
    assert output.read_bytes() == big_clean_output


@pytest.mark.e2e
def test_a_restarted_server_finishes_the_job(
    model_repository: Path, big_input: Path, big_clean_output: bytes, tmp_path: Path
) -> None:
    first = start_server(model_repository, tmp_path)
    output = tmp_path / "out.jsonl"
    job = subprocess.Popen(
        batch_command("--target", first.target, "--model", "lstm", "--input", big_input, "--output", output,
                      "--chunk-size", 100, "--retry-seconds", 60),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    second: ServerProcess | None = None
    try:
        wait_for_output(output, 500_000, job)  # ~1,000 of 60,000 lines
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        time.sleep(0.5)
        assert job.poll() is None
        second = start_server(model_repository, tmp_path, "--port", str(first.port))
        _, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
        if second is not None:
            second.stop()
    assert job.returncode == 0, stderr.decode()
    assert "answering again" in stderr.decode()
    assert output.read_bytes() == big_clean_output


# ---------------------------------------------------------------------------------------------------------- resume


@pytest.mark.e2e
def test_resume_after_kill_gives_the_clean_output(
    server: ServerProcess, big_input: Path, big_clean_output: bytes, tmp_path: Path
) -> None:
    output = tmp_path / "out.jsonl"
    args = ("--target", server.target, "--model", "lstm", "--input", big_input, "--output", output)
    job = subprocess.Popen(batch_command(*args, "--chunk-size", 100), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_for_output(output, 500_000, job)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(10)
    partial = output.read_bytes()
    kept = partial.count(b"\n")
    assert 500 <= kept < 60_000
    with output.open("ab") as handle:  # as if the kill had cut a line short
        handle.write(b'{"index":%d,"word":"hel' % kept)

    result = run_batch(*args, "--resume", "--chunk-size", 333)  # a different chunking must not matter
    assert result.returncode == 0, result.stderr
    assert f"after {kept:,} already in the output" in result.stderr
    assert output.read_bytes() == big_clean_output

    result = run_batch(*args, "--resume")  # complete: nothing to redo
    assert result.returncode == 0, result.stderr
    assert "done: 60,000 words" in result.stderr and "0 in this run" in result.stderr
    assert output.read_bytes() == big_clean_output


@pytest.mark.e2e
def test_sigint_and_sigterm_stop_at_a_chunk_boundary(
    server: ServerProcess, big_input: Path, big_clean_output: bytes, tmp_path: Path
) -> None:
    output = tmp_path / "out.jsonl"
    args = ("--target", server.target, "--model", "lstm", "--input", big_input, "--output", output,
            "--chunk-size", 100)
    for number, (sig, status) in enumerate([(signal.SIGINT, 130), (signal.SIGTERM, 143)]):
        job = subprocess.Popen(batch_command(*args, *(["--resume"] if number else [])),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_output(output, 500_000 * (number + 1), job)
            job.send_signal(sig)
            _, stderr = job.communicate(timeout=30)
        finally:
            job.kill()
        assert job.returncode == status, stderr.decode()
        assert "interrupted:" in stderr.decode() and "continue with --resume" in stderr.decode()
        data = output.read_bytes()
        assert data.endswith(b"\n") and data.count(b"\n") % 100 == 0  # whole chunks only
        assert big_clean_output.startswith(data)
    result = run_batch(*args, "--resume")
    assert result.returncode == 0, result.stderr
    assert output.read_bytes() == big_clean_output


@pytest.mark.e2e
def test_resume_refuses_a_different_input(server: ServerProcess, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    first = write_words(tmp_path / "a.txt", ["hello", "hell", "ole"])
    result = run_batch("--target", server.target, "--model", "rnn", "--input", first, "--output", output)
    assert result.returncode == 0, result.stderr
    other = write_words(tmp_path / "b.txt", ["hello", "hell", "leo", "eel"])
    result = run_batch("--target", server.target, "--model", "rnn", "--input", other, "--output", output, "--resume")
    assert result.returncode == 1
    assert "is for word 'ole' but input record 2 is 'leo'" in result.stderr
    assert len(read_output(output)) == 3


# --------------------------------------------------------------------------------------------------------- retries


@pytest.mark.e2e
def test_a_full_server_queue_is_retried_until_every_word_is_exact(
    server: ServerProcess, model_repository: Path, tmp_path: Path
) -> None:
    # A queue of one word: while a run is going, every other stream message is refused with QUEUE_FULL.
    busy = start_server(model_repository, tmp_path, "--max-queue-words", "1")
    words = random_words(3000, seed=11)
    output = tmp_path / "out.jsonl"
    try:
        result = run_batch("--target", busy.target, "--model", "lstm", "--input", write_words(tmp_path / "w.txt", words),
                           "--output", output, "--chunk-size", 25, "--streams", 4, "--retry-seconds", 60)
        refused = encode_stream_requests(busy, "RESOURCE_EXHAUSTED")
    finally:
        assert busy.stop() == 0, busy.log()
    assert result.returncode == 0, result.stderr
    assert refused > 0, "the server's queue never filled: the test provoked nothing"
    assert "RESOURCE_EXHAUSTED" in result.stderr and "re-sending" in result.stderr
    assert read_output(output) == reference(server.target, "lstm", words)


# ---------------------------------------------------------------------------------------------------- fatal errors


@pytest.mark.e2e
def test_fatal_errors_exit_1(server: ServerProcess, tmp_path: Path) -> None:
    source = write_words(tmp_path / "w.txt", ["hello"] * 10)
    output = tmp_path / "out.jsonl"
    result = run_batch("--target", server.target, "--model", "nope", "--input", source, "--output", output)
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr, result.stderr

    result = run_batch("--target", "127.0.0.1:1", "--model", "rnn", "--input", source, "--output", output,
                       "--retry-seconds", 1)
    assert result.returncode == 1 and "gave up on records 0..9 after retrying for 1 s" in result.stderr, result.stderr

    result = run_batch("--target", server.target, "--model", "rnn", "--input", tmp_path / "missing.txt",
                       "--output", output)
    assert result.returncode == 1 and "missing.txt" in result.stderr

    many = write_words(tmp_path / "many.txt", ["hello"] * 4100)  # more than the server's --max-words (4096)
    result = run_batch("--target", server.target, "--model", "rnn", "--input", many, "--output", output,
                       "--chunk-size", 5000)
    assert result.returncode == 1 and "RESOURCE_EXHAUSTED" in result.stderr and "lower --chunk-size" in result.stderr

    result = run_batch("--target", server.target, "--model", "rnn", "--input", "-", "--output", "-", "--resume")
    assert result.returncode == 2 and "--resume needs an output file" in result.stderr


# ----------------------------------------------------------------------------------------------------- no server


@pytest.mark.unit
def test_helpers(tmp_path: Path) -> None:
    assert split_targets(["a:1,b:2", " c:3 "]) == ["a:1", "b:2", "c:3"]
    assert split_targets(["ipv4:127.0.0.1:1,127.0.0.1:2", "dns:///svc:50051"]) == [
        "ipv4:127.0.0.1:1,127.0.0.1:2", "dns:///svc:50051"]
    assert [streams_for(t, 0) for t in ("a:1", "ipv4:x:1,x:2,x:3", "dns:///svc:1")] == [2, 6, 4]
    assert streams_for("a:1", 3) == 3
    assert [infer_format(p) for p in ("w.txt", "w.JSONL", "w.ndjson", "w.csv", "words")] == [
        "text", "jsonl", "jsonl", "csv", "text"]

    source = tmp_path / "w.csv"
    source.write_bytes(b"word\nhe\nlo")  # no final newline
    with source.open("rb") as handle:
        assert count_records(handle, "csv") == 2

    output = tmp_path / "out.jsonl"
    output.write_bytes(b'{"index":0,"word":"he","error":"x"}\n{"index":1,"word":"lo","outputs":[]}\n{"index":2,"wo')
    point = scan_output(output)
    assert (point.lines, point.failed, point.last_word) == (2, 1, "lo")
    assert output.read_bytes().endswith(b'"outputs":[]}\n')

    chunk = Chunk(0, 7, [Record(None, "bad input"), Record("\ud800", "lone surrogate")], [])
    data, failed = format_chunk(chunk)
    assert failed == 2
    assert [json.loads(line) for line in data.decode("ascii").splitlines()] == [
        {"index": 7, "word": None, "error": "bad input"}, {"index": 8, "word": "\ud800", "error": "lone surrogate"}]


def rpc_error(error: BaseException) -> grpc.aio.AioRpcError:
    """The error a client sees when the server answers `error`: code, message and the google.rpc.Status trailer."""
    return aio_error(rich_status(error))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("error", "delay"),
    [
        (OverloadedError("model 'lstm' is overloaded: 9 words queued (limit 1); retry later"), 0.05),
        (OverloadedError("queue full"), 0.05),  # the reason decides, whatever the text says
        (ShuttingDownError("the server is shutting down"), 0.1),  # draining: UNAVAILABLE + SHUTTING_DOWN
        (ModelsLoadingError("the server is still loading its models; retry shortly"), 0.5),
    ],
)
def test_queue_full_draining_and_loading_are_retried_after_the_servers_delay(error: Exception, delay: float) -> None:
    problem = classify(rpc_error(error), "127.0.0.1:1")
    assert isinstance(problem, RetryableError), problem
    assert problem.retry_after_s == pytest.approx(delay)
    assert str(problem).startswith(f"127.0.0.1:1: {rich_status(error).code.name}: ")


@pytest.mark.unit
@pytest.mark.parametrize(
    "error",
    [
        rpc_error(RequestTooLargeError("4100 words in one request; the limit is 4096 (--max-words)")),
        # The old text match ("overloaded" in the message) would have retried this one for ever.
        rpc_error(RequestTooLargeError("overloaded: 4100 words; the limit is 4096", Reason.TOO_MANY_WORDS)),
        # gRPC's own message-size limit: no server details at all.
        transport_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (70000000 vs. 67108864)"),
    ],
)
def test_too_many_words_and_message_size_limits_are_fatal_with_a_hint(error: grpc.aio.AioRpcError) -> None:
    problem = classify(error, "127.0.0.1:1")
    assert isinstance(problem, FatalError), problem
    assert "RESOURCE_EXHAUSTED" in str(problem) and str(problem).endswith(" (lower --chunk-size?)")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("error", "retried"),
    [
        # A killed server or a reset stream: no details of ours, whatever gRPC's message says.
        (transport_error(grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)"), True),
        (transport_error(grpc.StatusCode.INTERNAL, "Internal error from Core"), True),
        (transport_error(grpc.StatusCode.UNKNOWN, "Stream removed"), True),
        (transport_error(grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2"), True),
        (transport_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), True),
        # What the server chose to answer: retrying cannot help.
        (rpc_error(RuntimeError("a bug")), False),  # INTERNAL with the server's ErrorInfo
        (rpc_error(ModelNotFoundError("model 'nope' is not loaded")), False),
        (rpc_error(InvalidWordError(0, "hex", "character 'x' is not in the alphabet", Reason.WORD_NOT_IN_ALPHABET)),
         False),
    ],
)
def test_broken_streams_are_retried_and_server_answers_are_not(error: grpc.aio.AioRpcError, retried: bool) -> None:
    problem = classify(error, "127.0.0.1:1")
    assert isinstance(problem, RetryableError if retried else FatalError), problem
    assert "lower --chunk-size" not in str(problem)


@pytest.mark.unit
def test_backoff_doubles_to_its_cap_and_honours_the_servers_delay() -> None:
    backoff = Backoff(cap=0.4)
    delays = [backoff.next() for _ in range(5)]
    assert all(low / 2 <= delay <= low for delay, low in zip(delays, [0.1, 0.2, 0.4, 0.4, 0.4], strict=True))
    assert backoff.next(2.5) == 2.5  # RetryInfo is a floor
    backoff.reset()
    assert backoff.next() <= 0.1
