"""The charrnn-batch command: parse and check the arguments, wire the reader, the lanes and the writer
together, and turn what happened into a summary line and an exit status.

Exit status: 0 every word encoded; 3 some words could not be encoded (their lines hold "error"); 1 a fatal
error; 2 a usage error; 128 + the signal number (130, 143) when interrupted by SIGINT/SIGTERM, which leaves an
output that --resume continues.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from clients.batch.failures import FatalError
from clients.batch.job import Job, Lane
from clients.batch.output import ResumePoint, scan_output
from clients.batch.progress import PROG, Progress
from clients.batch.records import FORMATS, Producer, Record, count_records, infer_format, read_records
from clients.batch.targets import batch_channel_options, split_targets, streams_for
from clients.client import parse_fields
from clients.security import ClientSecurity, ClientSecurityError, add_arguments

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_WORDS_FAILED = 3
EXIT_INTERRUPTED = 128  # plus the signal number: 130 for SIGINT, 143 for SIGTERM


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
    add("--fields", type=_fields, default=None, metavar="LIST",
        help="arrays each output line carries, comma-separated: outputs, hidden, cell (default: all)")
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
    add_arguments(parser)
    return parser


def _fields(text: str) -> tuple[str, ...]:
    try:
        return parse_fields(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
    try:
        args.security = ClientSecurity.from_args(args)
    except ClientSecurityError as error:
        parser.error(str(error))

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
        job = Job(args.model, args.retry_seconds, sink, progress, window, args.fields)
        loop = asyncio.get_running_loop()
        producer = Producer(
            read_records(source, fmt, args.field, args.column), args.chunk_size, window,
            lambda item: loop.call_soon_threadsafe(job.on_input, item),
            resume.lines, Record(resume.last_word) if resume.lines else None,
        )
        options = batch_channel_options()
        channels = [args.security.aio_channel(target, options) for target in targets]
        lanes = [
            Lane(job, target, channel, args.timeout, f"{target} stream {number + 1}")
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
