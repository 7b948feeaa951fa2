"""charrnn-batch's input: records read one at a time from text, JSONL or CSV, and cut into chunks on a thread.

The input is never held whole: read_records() yields one Record at a time, and the Producer thread turns them
into Chunks only as fast as the writer frees the window (--max-in-flight), which bounds memory whatever the
input size. A record that cannot be sent (bad JSON, no such column, a lone surrogate) keeps the reason, and its
output line says it, in its place.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, NamedTuple

from clients.batch.failures import FatalError
from proto.charrnn.v1 import charrnn_pb2 as pb

FORMATS = ("text", "jsonl", "csv")


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


class Producer(threading.Thread):
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
