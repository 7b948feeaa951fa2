"""charrnn-batch: encode a word list far larger than memory, over one or more servers, results in input order.

    charrnn-batch --target HOST:PORT [--target ...] --model NAME --input FILE|- --output FILE|- [--resume]

The input (a file, or `-` for stdin) is read as a stream: `text` (one word per line), `jsonl` (one object per
line, the word in --field) or `csv` (a header row, the word in --column). It is cut into chunks of --chunk-size
words, and each chunk is one message on an EncodeStream RPC. Several streams run at once (--streams per target,
every target its own channel; a target resolving to several addresses is spread by gRPC's round_robin policy),
all pulling chunks from one shared queue, so a faster server simply takes more. At most --max-in-flight chunks
exist at any time between being read and being written, which bounds memory whatever the input size.

The output is JSONL, one line per input record, in input order:

    {"index":0,"word":"hello","outputs":[[...],...],"hidden":[[...],...],"cell":[[...],...]}   (cell: LSTM only)
    {"index":1,"word":"hex","error":"word 1 'hex': character 'x' at position 2 is not in the model's alphabet 'helo'"}

A chunk is written, and the file flushed, only when every chunk before it has been; a kill therefore leaves
complete lines plus at most one partial line, and --resume truncates that line, skips as many input records as
the output has lines, and appends.

A broken stream or UNAVAILABLE (a server restarting or killed) is retried with exponential backoff; only the
chunks not yet answered are sent again, to whichever stream takes them first. A chunk unanswered after
--retry-seconds of failures ends the job.

Exit status: 0 every word encoded; 3 some words could not be encoded (their lines hold "error"); 1 a fatal
error (bad arguments to the server, unreadable input, servers down for longer than --retry-seconds); 2 a
usage error; 130/143 interrupted by SIGINT/SIGTERM (the output is valid for --resume).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import os
import random
import signal
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any, NamedTuple

import grpc
from tqdm import tqdm

from clients.client import build_request, channel_options
from proto.charrnn.v1 import charrnn_pb2 as pb
from proto.charrnn.v1 import charrnn_pb2_grpc as pb_grpc

PROG = "charrnn-batch"

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_WORDS_FAILED = 3
EXIT_INTERRUPTED = 128  # plus the signal number: 130 for SIGINT, 143 for SIGTERM

FORMATS = ("text", "jsonl", "csv")

STREAM_DEPTH = 4
"""Chunks one stream may have unanswered; the server works on up to 4 messages of a stream at once."""
STREAM_RECYCLE_CHUNKS = 64
"""A stream is closed and reopened after this many chunks, so round_robin rebalances over (restarted) replicas."""
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
RESOLVER_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"})
"""gRPC target schemes; such a target is one channel even if it names several addresses, comma-separated."""


def batch_channel_options() -> list[tuple[str, Any]]:
    """clients.client's options (round_robin service config) without gRPC's own retries, reconnecting quickly."""
    # gRPC's transparent retries would hold a chunk for seconds on a dead server; the job retries it elsewhere.
    options = [(key, value) for key, value in channel_options() if key != "grpc.enable_retries"]
    return options + [
        ("grpc.enable_retries", 0),
        # Reconnect quickly once a restarted server listens again (gRPC's default backoff grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


# INTERNAL/UNKNOWN details that mean the connection broke (e.g. the server was killed), not a server-side error.
_BROKEN_STREAM_SIGNS = ("Internal error from Core", "RST_STREAM", "Stream removed", "Socket closed", "Connection reset")

_ERROR_KEY = b'"error":'  # cannot occur inside a JSON string (there every quote is escaped)
_ENCODER = json.JSONEncoder(separators=(",", ":"))  # ASCII output: any word, even a lone surrogate, is valid JSON


class FatalError(Exception):
    """The job cannot go on; the message says why."""


class _Retryable(Exception):
    """A stream failed in a way worth retrying (server down or restarting, stream broken, no answer)."""


class Record(NamedTuple):
    """One input record: the word to encode, or (word None, or unsendable) the reason it cannot be sent."""

    word: str | None
    error: str = ""


@dataclass(slots=True)
class Chunk:
    """Consecutive input records, sent as one stream message (only those without an input error)."""

    seq: int
    start: int
    records: list[Record]
    words: list[str]
    response: pb.EncodeResponse | None = None
    sent_at: float = 0.0
    failing_since: float | None = None

    @property
    def span(self) -> str:
        """The chunk's record indices, for messages."""
        return f"records {self.start}..{self.start + len(self.records) - 1}"


# ----------------------------------------------------------------------------------------------------------- input


def infer_format(path: str) -> str:
    """The input format implied by a file name: .jsonl/.ndjson -> jsonl, .csv -> csv, anything else text."""
    suffix = Path(path).suffix.lower()
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}.get(suffix, "text")


def read_records(binary: IO[bytes], fmt: str, field_name: str = "word", column: str = "word") -> Iterator[Record]:
    """Input records one at a time (never the whole input in memory); undecodable bytes become U+FFFD."""
    if fmt == "text":
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="replace", newline="\n")
        for line in text:
            if line.endswith("\n"):
                line = line[:-1]
            yield Record(line[:-1] if line.endswith("\r") else line)
    elif fmt == "jsonl":
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="replace", newline="\n")
        for number, line in enumerate(text, 1):
            if line.strip():
                yield _json_record(line, number, field_name)
    elif fmt == "csv":
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="replace", newline="")
        rows = csv.reader(text)
        header = next(rows, None)
        if header is None:
            return
        if column not in header:
            raise FatalError(f"the CSV header {header!r} has no column {column!r} (see --column)")
        position = header.index(column)
        for row in rows:
            if not row:
                continue  # a blank line, as csv.DictReader skips them
            if position >= len(row):
                yield Record(None, f"input line {rows.line_num}: the row has no {column!r} column")
            else:
                yield Record(row[position])
    else:
        raise ValueError(f"unknown input format {fmt!r}")


def _json_record(line: str, number: int, field_name: str) -> Record:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        return Record(None, f"input line {number}: not valid JSON: {error}")
    if not isinstance(item, dict):
        return Record(None, f"input line {number}: not a JSON object")
    if field_name not in item:
        return Record(None, f"input line {number}: no {field_name!r} field")
    word = item[field_name]
    if not isinstance(word, str):
        return Record(None, f"input line {number}: the {field_name!r} field is not a string")
    try:
        word.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        return Record(word, f"input line {number}: the word is not valid Unicode (lone surrogate)")
    return Record(word)


def count_records(binary: IO[bytes], fmt: str) -> int | None:
    """Roughly how many records a regular file holds (its lines, less the CSV header); None for pipes."""
    try:
        fd = binary.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        offset = os.lseek(fd, 0, os.SEEK_CUR)
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    lines, last = 0, b"\n"
    while block := os.pread(fd, 1 << 20, offset):
        lines += block.count(b"\n")
        offset += len(block)
        last = block[-1:]
    if last != b"\n":
        lines += 1
    return max(lines - 1, 0) if fmt == "csv" else lines


class _Producer(threading.Thread):
    """Reads the input into chunks on its own thread, never more than the window allows ahead of the writer."""

    def __init__(
        self,
        records: Iterator[Record],
        chunk_size: int,
        window: threading.Semaphore,
        deliver: Callable[[Chunk | BaseException | int], object],
        skip: int,
        expect_last: Record | None,
    ) -> None:
        super().__init__(name="charrnn-batch-reader", daemon=True)
        self.records = records
        self.chunk_size = chunk_size
        self.window = window
        self.deliver = deliver
        self.skip = skip
        self.expect_last = expect_last
        self.stopped = False

    def stop(self) -> None:
        """Ask the thread to end at its next chunk boundary."""
        self.stopped = True
        self.window.release()

    def run(self) -> None:
        """Skip what the output already holds, then deliver chunks, then their count (or the exception that ended it)."""
        try:
            self._skip()
            seq, start = 0, self.skip
            while True:
                self.window.acquire()
                if self.stopped:
                    return
                records = list(islice(self.records, self.chunk_size))
                if not records:
                    self.deliver(seq)
                    return
                words = [record.word for record in records if not record.error and record.word is not None]
                self.deliver(Chunk(seq, start, records, words))
                seq += 1
                start += len(records)
        except BaseException as error:  # noqa: BLE001 - handed to the event loop, which reports it
            try:
                self.deliver(error)
            except RuntimeError:  # the event loop is gone: the job already ended
                pass

    def _skip(self) -> None:
        if not self.skip:
            return
        last: Record | None = None
        skipped = 0
        for last in islice(self.records, self.skip):
            skipped += 1
        if skipped < self.skip:
            raise FatalError(
                f"--resume: the output already has {self.skip} lines but the input has only {skipped} records"
            )
        assert last is not None and self.expect_last is not None
        if last.word != self.expect_last.word:
            raise FatalError(
                f"--resume: output line {self.skip} is for word {self.expect_last.word!r} but input record "
                f"{self.skip - 1} is {last.word!r}; is this the input the output was made from?"
            )


# ---------------------------------------------------------------------------------------------------------- output


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """What an existing output file already holds: complete lines (records done), of which failed."""

    lines: int
    failed: int
    last_word: str | None


def scan_output(path: Path) -> ResumePoint:
    """Count the complete lines of an output file and truncate a trailing partial line (left by a kill)."""
    lines = failed = kept = 0
    last = b""
    with path.open("rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break
            lines += 1
            kept += len(line)
            last = line
            if _ERROR_KEY in line:
                failed += 1
    if path.stat().st_size != kept:
        os.truncate(path, kept)
    if not lines:
        return ResumePoint(0, 0, None)
    try:
        item = json.loads(last)
        index, word = item["index"], item["word"]
    except (ValueError, KeyError, TypeError) as error:
        raise FatalError(f"--resume: the last line of {path} is not a charrnn-batch result: {error}") from None
    if index != lines - 1:
        raise FatalError(
            f"--resume: the last line of {path} has index {index} but is line {lines}; not a charrnn-batch output?"
        )
    return ResumePoint(lines, failed, word)


def format_chunk(chunk: Chunk) -> tuple[bytes, int]:
    """The chunk's JSONL lines and how many of them are errors."""
    response = chunk.response
    results = iter(response.results if response is not None else ())
    hidden_size = response.hidden_size if response is not None else 0
    encode = _ENCODER.encode
    lines: list[str] = []
    failed = 0
    position = 0  # of the word in the request
    for index, record in enumerate(chunk.records, chunk.start):
        if record.error:
            lines.append(encode({"index": index, "word": record.word, "error": record.error}))
            failed += 1
            continue
        result = next(results)
        if result.error:
            # The server names the word by its place in the request ("word 3 'hex': ..."), which depends on the
            # chunking; keep only the reason, so that a resumed or re-chunked job writes the same lines.
            error = result.error.removeprefix(f"word {position} {result.word!r}: ")
            lines.append(encode({"index": index, "word": result.word, "error": error}))
            failed += 1
        else:
            lines.append(encode(result_json(index, result, hidden_size)))
        position += 1
    lines.append("")
    return "\n".join(lines).encode("ascii"), failed


def result_json(index: int, result: pb.WordResult, hidden_size: int) -> dict[str, Any]:
    """One encoded word's output line: the arrays of Encoding.to_json, built without numpy (3x faster)."""
    # A repeated float field yields each float32 widened to a Python float, exactly as ndarray.tolist() does.
    outputs, hidden, cell = list(result.outputs), list(result.hidden), list(result.cell)
    if len(outputs) != result.length * hidden_size or len(hidden) % max(hidden_size, 1):
        raise FatalError(f"the server's arrays for word {index} {result.word!r} do not match hidden_size {hidden_size}")
    item: dict[str, Any] = {
        "index": index,
        "word": result.word,
        "outputs": [outputs[row : row + hidden_size] for row in range(0, len(outputs), hidden_size)],
        "hidden": [hidden[row : row + hidden_size] for row in range(0, len(hidden), hidden_size)],
    }
    if cell:
        item["cell"] = [cell[row : row + hidden_size] for row in range(0, len(cell), hidden_size)]
    return item


# -------------------------------------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar on a terminal, plain periodic lines otherwise, or nothing (--quiet); always the summary."""

    def __init__(self, total: int | None, done: int, failed: int, mode: str, interval: float) -> None:
        self.total = total
        self.initial = done
        self.done = done
        self.failed = failed
        self.mode = mode
        self.interval = interval
        self.started = time.monotonic()
        self.bar: tqdm[Any] | None = None
        if mode == "bar":
            self.bar = tqdm(
                total=total, initial=done, unit="word", unit_scale=True, dynamic_ncols=True, file=sys.stderr,
                smoothing=0.1, desc=PROG,
            )

    @property
    def rate(self) -> float:
        """Words per second in this run."""
        elapsed = time.monotonic() - self.started
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    def advance(self, words: int, failed: int) -> None:
        """Count a written chunk."""
        self.done += words
        self.failed += failed
        if self.bar is not None:
            self.bar.update(words)
            if failed:
                self.bar.set_postfix(failed=self.failed, refresh=False)

    def note(self, message: str) -> None:
        """A warning line that does not garble the bar."""
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.write(f"{PROG}: {message}", file=sys.stderr)
        else:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    def line(self) -> str:
        """One status line: words done (of total), rate, failures, ETA."""
        of = f"/{self.total:,} ({100.0 * self.done / self.total:.1f}%)" if self.total else ""
        text = f"{self.done:,}{of} words, {self.rate:,.0f} words/s, {self.failed:,} failed"
        if self.total and self.rate > 0 and self.total > self.done:
            text += f", ETA {(self.total - self.done) / self.rate:,.0f} s"
        return text

    async def tick(self) -> None:
        """Print a status line every interval (when stderr is not a terminal)."""
        while True:
            await asyncio.sleep(self.interval)
            print(f"{PROG}: {self.line()}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Remove the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------------------------------- job


class _Backoff:
    """Exponential backoff with jitter: 0.1 s, 0.2 s, ... up to a cap."""

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.delay = BACKOFF_INITIAL_S

    def next(self) -> float:
        """The next delay, in seconds."""
        delay = min(self.delay, self.cap)
        self.delay = min(self.delay * 2, self.cap)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        """Start again from the shortest delay."""
        self.delay = BACKOFF_INITIAL_S


class _Job:
    """Shared state: chunks waiting to be sent, answered chunks waiting to be written, the in-order writer."""

    def __init__(self, model: str, retry_seconds: float, output: IO[bytes], progress: Progress,
                 window: threading.Semaphore) -> None:
        self.model = model
        self.retry_seconds = retry_seconds
        self.output = output
        self.progress = progress
        self.window = window
        self.ready: asyncio.PriorityQueue[tuple[int, Chunk]] = asyncio.PriorityQueue()
        self.answered: dict[int, Chunk] = {}
        self.total_chunks: int | None = None
        self.input_error: BaseException | None = None
        self.changed = asyncio.Event()
        self.failing: dict[int, Chunk] = {}
        self.last_error = ""

    def on_input(self, item: Chunk | BaseException | int) -> None:
        """A chunk read by the producer (an int: end of input, after that many chunks; an exception: reading failed)."""
        if isinstance(item, Chunk):
            if item.words:
                self.ready.put_nowait((item.seq, item))
            else:
                self.answered[item.seq] = item  # nothing to send: every record is an input error
        elif isinstance(item, int):
            self.total_chunks = item
        else:
            self.input_error = item
        self.changed.set()

    async def take(self) -> Chunk:
        """The next chunk to send (retried chunks first: they are the oldest)."""
        return (await self.ready.get())[1]

    def answer(self, chunk: Chunk, response: pb.EncodeResponse, target: str) -> None:
        """Check and store a chunk's response for the writer."""
        results = response.results
        if len(results) != len(chunk.words) or any(r.word != w for r, w in zip(results, chunk.words, strict=True)):
            raise FatalError(
                f"{target}: the answer to {chunk.span} does not match its words ({len(results)} results for "
                f"{len(chunk.words)} words)"
            )
        chunk.response = response
        chunk.failing_since = None
        self.failing.pop(chunk.seq, None)
        self.answered[chunk.seq] = chunk
        self.changed.set()

    def requeue(self, chunks: Sequence[Chunk], error: Exception) -> None:
        """Put unanswered chunks back for any stream to take; give up on one failing for --retry-seconds."""
        now = time.monotonic()
        self.last_error = str(error)
        for chunk in chunks:
            if chunk.failing_since is None:
                chunk.failing_since = now
                self.failing[chunk.seq] = chunk
            chunk.response = None
            self.ready.put_nowait((chunk.seq, chunk))
        self.check_failing()

    def check_failing(self) -> None:
        """Give up (FatalError) if some chunk has been failing for longer than --retry-seconds."""
        if not self.failing:
            return
        oldest = min(self.failing.values(), key=lambda chunk: (chunk.failing_since or 0.0, chunk.seq))
        if time.monotonic() - (oldest.failing_since or 0.0) > self.retry_seconds:
            raise FatalError(
                f"gave up on {oldest.span} after retrying for {self.retry_seconds:g} s (--retry-seconds); "
                f"last error: {self.last_error}"
            )

    async def write_all(self) -> None:
        """Write answered chunks in input order, flushing at each chunk boundary, until the input ends."""
        next_seq = 0
        while True:
            if self.input_error is not None:
                error = self.input_error
                if isinstance(error, FatalError):
                    raise error
                raise FatalError(f"reading the input failed: {type(error).__name__}: {error}") from error
            chunk = self.answered.pop(next_seq, None)
            if chunk is None:
                if self.total_chunks is not None and next_seq >= self.total_chunks:
                    return
                self.check_failing()  # also when every stream is busy probing its server
                self.changed.clear()
                try:  # not asyncio.wait_for, which in Python 3.11 can swallow a cancellation
                    async with asyncio.timeout(1.0):
                        await self.changed.wait()
                except TimeoutError:
                    pass
                continue
            data, failed = format_chunk(chunk)
            self.output.write(data)
            self.output.flush()
            self.window.release()
            self.progress.advance(len(chunk.records), failed)
            next_seq += 1


class _Lane:
    """One EncodeStream at a time over one channel; reopened after failures (with backoff) or recycling."""

    def __init__(self, job: _Job, target: str, channel: grpc.aio.Channel, timeout: float, name: str) -> None:
        self.job = job
        self.target = target
        self.channel = channel
        self.stub = pb_grpc.CharRnnStub(channel)
        self.timeout = timeout
        self.name = name
        self.pending: deque[Chunk] = deque()
        self.backoff = _Backoff(min(BACKOFF_MAX_S, max(job.retry_seconds, BACKOFF_INITIAL_S)))
        self.failing_since: float | None = None

    async def run(self) -> None:
        """Take chunks and stream them until cancelled; a fatal error ends the task (and the job)."""
        while True:
            self.pending.append(await self.job.take())
            try:
                await self._session()
            except _Retryable as error:
                chunks = list(self.pending)
                self.pending.clear()
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    reason = str(error).removeprefix(f"{self.target}: ")
                    self.job.progress.note(f"{self.name}: {reason}; re-sending {len(chunks)} unanswered chunk(s)")
                self.job.requeue(chunks, error)
                await self._recover()

    async def _recover(self) -> None:
        """Back off, then probe the server (GetModel) until it answers: a dead or hung server takes no chunks."""
        request = pb.GetModelRequest(name=self.job.model)
        while True:
            await asyncio.sleep(self.backoff.next())
            try:
                await self.stub.GetModel(request, timeout=min(self.timeout, BACKOFF_MAX_S))
                return
            except grpc.aio.AioRpcError as error:
                problem = _classify(error, self.target)
                if isinstance(problem, FatalError):
                    raise problem from None

    def _answered(self) -> None:
        if self.failing_since is not None:
            self.job.progress.note(f"{self.name}: answering again after {time.monotonic() - self.failing_since:.1f} s")
            self.failing_since = None
        self.backoff.reset()

    async def _session(self) -> None:
        call = self.stub.EncodeStream()
        credit = asyncio.Semaphore(STREAM_DEPTH - len(self.pending))
        expired = False
        send_error: BaseException | None = None

        async def send() -> None:
            nonlocal send_error
            chunk = self.pending[0]
            sent = 0
            try:
                while True:
                    chunk.sent_at = time.monotonic()
                    await call.write(build_request(self.job.model, chunk.words, report_invalid=True))
                    sent += 1
                    if sent >= STREAM_RECYCLE_CHUNKS:
                        break
                    await credit.acquire()
                    chunk = await self.job.take()
                    self.pending.append(chunk)
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the call has ended ("RPC already finished"); the reader gets its status
            except Exception as error:  # noqa: BLE001 - e.g. a request that cannot be serialised: stop the reader
                send_error = error
                call.cancel()

        async def watch() -> None:
            nonlocal expired
            while True:
                await asyncio.sleep(min(1.0, self.timeout / 4))
                if self.pending and time.monotonic() - self.pending[0].sent_at > self.timeout:
                    expired = True
                    call.cancel()
                    return

        sender = asyncio.ensure_future(send())
        watchdog = asyncio.ensure_future(watch())
        try:
            while True:
                try:
                    response = await call.read()
                except grpc.aio.AioRpcError as error:
                    if send_error is not None:
                        raise FatalError(f"{self.target}: sending a chunk failed: {send_error!r}") from send_error
                    if expired:
                        raise _Retryable(f"{self.target}: no answer in {self.timeout:g} s (--timeout)") from None
                    raise _classify(error, self.target) from None
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if send_error is not None and task is not None and not task.cancelling():
                        raise FatalError(f"{self.target}: sending a chunk failed: {send_error!r}") from send_error
                    if expired and task is not None and not task.cancelling():
                        raise _Retryable(f"{self.target}: no answer in {self.timeout:g} s (--timeout)") from None
                    raise
                if response is grpc.aio.EOF:
                    break
                if not self.pending:
                    raise FatalError(f"{self.target}: more responses than requests on one stream")
                self.job.answer(self.pending.popleft(), response, self.target)
                credit.release()
                self._answered()
            if self.pending:
                raise _Retryable(f"{self.target}: the stream ended with {len(self.pending)} chunk(s) unanswered")
            await sender
        finally:
            for task in (sender, watchdog):
                task.cancel()
            call.cancel()
            await asyncio.gather(sender, watchdog, return_exceptions=True)


def _classify(error: grpc.aio.AioRpcError, target: str) -> Exception:
    code, details = error.code(), error.details() or ""
    message = f"{target}: {code.name}: {details}"
    retryable = code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    retryable |= code == grpc.StatusCode.RESOURCE_EXHAUSTED and "overloaded" in details
    retryable |= code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and any(
        sign in details for sign in _BROKEN_STREAM_SIGNS
    )
    if retryable:
        return _Retryable(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        message += " (lower --chunk-size?)"
    return FatalError(message)


# ------------------------------------------------------------------------------------------------------- targets


def split_targets(values: Sequence[str]) -> list[str]:
    """Each --target value is one channel if it has a resolver scheme (dns:, ipv4:, ...), else comma-split."""
    targets: list[str] = []
    for value in values:
        value = value.strip()
        if value.split(":", 1)[0] in RESOLVER_SCHEMES:
            targets.append(value)
        else:
            targets.extend(part.strip() for part in value.split(",") if part.strip())
    return targets


def streams_for(target: str, streams: int) -> int:
    """Streams to open on a target: --streams, or (0) two per address it names, four for a name to resolve."""
    if streams > 0:
        return streams
    scheme, _, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return 2 * max(1, len([part for part in rest.split(",") if part]))
    if scheme in RESOLVER_SCHEMES:
        return 4
    return 2


# ------------------------------------------------------------------------------------------------------------ main


@dataclass(slots=True)
class _Outcome:
    """What the job did, for the summary and the exit status."""

    total: int = 0
    failed: int = 0
    resumed: int = 0
    elapsed: float = 0.0
    error: str = ""
    interrupted: int = 0


def build_parser() -> argparse.ArgumentParser:
    """The charrnn-batch command line."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Encode a large word list with a charrnn model over EncodeStream; JSONL results in input order.",
        epilog="Exit status: 0 all words encoded, 3 some words failed (see their \"error\" lines), 1 fatal error, "
        "2 usage error, 130/143 interrupted (continue with --resume).",
    )
    add = parser.add_argument
    add("--target", action="append", required=True,
        help="server(s): host:port, repeated or comma-separated (one channel each), or one gRPC target such as "
        "ipv4:127.0.0.1:1,127.0.0.1:2 or dns:///host:port (round_robin over its addresses)")
    add("--model", required=True, help="model name")
    add("--input", required=True, help="input file, or - for stdin")
    add("--output", required=True, help="output JSONL file, or - for stdout")
    add("--format", choices=FORMATS, default=None,
        help="input format (default: from the extension, .jsonl/.ndjson or .csv, else text)")
    add("--field", default="word", help="jsonl: the field holding the word (default %(default)s)")
    add("--column", default="word", help="csv: the column holding the word (default %(default)s)")
    add("--chunk-size", type=int, default=512, help="words per stream message (default %(default)s)")
    add("--max-in-flight", type=int, default=16,
        help="chunks between being read and being written: sent, retrying, or waiting for earlier ones; bounds "
        "memory (default %(default)s)")
    add("--streams", type=int, default=0,
        help="EncodeStream calls per target; 0: two per address, four for a dns:/resolver target")
    add("--retry-seconds", type=float, default=60.0,
        help="how long a chunk may keep failing (UNAVAILABLE, broken stream, no answer) before the job gives up "
        "(default %(default)s)")
    add("--timeout", type=float, default=60.0,
        help="seconds a sent chunk may wait for its answer before it is sent again (default %(default)s)")
    add("--resume", action="store_true", help="continue from what --output already holds")
    add("--log-interval", type=float, default=10.0,
        help="seconds between progress lines when stderr is not a terminal (default %(default)s)")
    add("--quiet", action="store_true", help="no progress bar or lines; only the summary and errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run charrnn-batch; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("chunk_size", "max_in_flight"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.streams < 0 or args.retry_seconds < 0 or args.timeout <= 0 or args.log_interval <= 0:
        parser.error("--streams and --retry-seconds cannot be negative; --timeout and --log-interval must be positive")
    if args.resume and args.output == "-":
        parser.error("--resume needs an output file, not stdout")
    targets = split_targets(args.target)
    if not targets:
        parser.error("--target names no server")
    fmt = args.format or ("text" if args.input == "-" else infer_format(args.input))

    outcome = _Outcome()
    started = time.monotonic()
    try:
        asyncio.run(_run(args, targets, fmt, outcome))
    except KeyboardInterrupt:
        outcome.interrupted = signal.SIGINT
    except FatalError as error:
        outcome.error = str(error)
    except OSError as error:
        outcome.error = f"{error.strerror or error}: {error.filename}" if error.filename else str(error)
    outcome.elapsed = time.monotonic() - started
    return _report(outcome, args.output)


def _report(outcome: _Outcome, output: str) -> int:
    done_now = outcome.total - outcome.resumed
    rate = done_now / outcome.elapsed if outcome.elapsed > 0 else 0.0
    counts = f"{outcome.total:,} words, {outcome.total - outcome.failed:,} encoded, {outcome.failed:,} failed"
    timing = f"{done_now:,} in this run in {outcome.elapsed:.1f} s ({rate:,.0f} words/s)"
    if outcome.resumed:
        timing += f", after {outcome.resumed:,} already in the output"
    if outcome.error:
        print(f"{PROG}: error: {outcome.error}", file=sys.stderr)
        print(f"{PROG}: stopped: {counts} so far; {timing}; continue with --resume", file=sys.stderr)
        return EXIT_FATAL
    if outcome.interrupted:
        print(f"{PROG}: interrupted: {counts} so far; {timing}; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED + int(outcome.interrupted)
    where = "" if output == "-" else f"; output {output}"
    status = EXIT_WORDS_FAILED if outcome.failed else EXIT_OK
    note = f" (exit status {status}: see the \"error\" lines)" if outcome.failed else ""
    print(f"{PROG}: done: {counts}{note}; {timing}{where}", file=sys.stderr)
    return status


async def _run(args: argparse.Namespace, targets: list[str], fmt: str, outcome: _Outcome) -> None:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        main_task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        handles_sigterm = True
    except (RuntimeError, ValueError, NotImplementedError):  # not the main thread
        handles_sigterm = False
    try:
        await _run_job(args, targets, fmt, outcome)
    except asyncio.CancelledError:
        if not terminated:
            raise
        outcome.interrupted = signal.SIGTERM
    finally:
        if handles_sigterm:
            loop.remove_signal_handler(signal.SIGTERM)


async def _run_job(args: argparse.Namespace, targets: list[str], fmt: str, outcome: _Outcome) -> None:
    output_path = Path(args.output)
    resume = scan_output(output_path) if args.resume and output_path.exists() else ResumePoint(0, 0, None)
    outcome.total = outcome.resumed = resume.lines
    outcome.failed = resume.failed
    with contextlib.ExitStack() as stack:
        source: IO[bytes] = sys.stdin.buffer if args.input == "-" else stack.enter_context(open(args.input, "rb"))
        if args.output == "-":
            sink: IO[bytes] = sys.stdout.buffer
        else:
            sink = stack.enter_context(output_path.open("ab" if args.resume else "wb"))
        mode = "off" if args.quiet else ("bar" if sys.stderr.isatty() else "log")
        progress = Progress(count_records(source, fmt), resume.lines, resume.failed, mode, args.log_interval)
        stack.callback(progress.close)
        window = threading.Semaphore(args.max_in_flight)
        job = _Job(args.model, args.retry_seconds, sink, progress, window)
        loop = asyncio.get_running_loop()
        producer = _Producer(
            read_records(source, fmt, args.field, args.column), args.chunk_size, window,
            lambda item: loop.call_soon_threadsafe(job.on_input, item),
            resume.lines, Record(resume.last_word) if resume.lines else None,
        )
        options = batch_channel_options()
        channels = [grpc.aio.insecure_channel(target, options=options) for target in targets]
        lanes = [
            _Lane(job, target, channel, args.timeout, f"{target} stream {number + 1}")
            for target, channel in zip(targets, channels, strict=True)
            for number in range(streams_for(target, args.streams))
        ]
        tasks = [asyncio.ensure_future(lane.run()) for lane in lanes]
        if mode == "log":
            tasks.append(asyncio.ensure_future(progress.tick()))
        writer = asyncio.ensure_future(job.write_all())
        producer.start()
        try:
            done, _ = await asyncio.wait([writer, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # the writer finished, or a lane hit a fatal error
        finally:
            for task in (writer, *tasks):
                task.cancel()
            await asyncio.gather(writer, *tasks, return_exceptions=True)
            producer.stop()
            sink.flush()
            outcome.total = progress.done
            outcome.failed = progress.failed
            for channel in channels:
                await channel.close()


if __name__ == "__main__":
    sys.exit(main())
