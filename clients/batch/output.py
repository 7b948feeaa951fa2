"""charrnn-batch's output: one JSONL line per input record, and what an existing output holds (--resume).

format_chunk() writes a chunk's lines without numpy (the floats of a repeated field are already Python
floats, exactly as ndarray.tolist() gives them) and keeps only the reason of a per-word error, not the server's
"word N" prefix, whose N depends on the chunking: a resumed or re-chunked job writes the same bytes.
scan_output() counts the complete lines of an output a kill left behind and truncates a partial last one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.batch.failures import FatalError
from clients.batch.records import Chunk
from proto.charrnn.v1 import charrnn_pb2 as pb

_ERROR_KEY = b'"error":'  # cannot occur inside a JSON string (there every quote is escaped)
_ENCODER = json.JSONEncoder(separators=(",", ":"))  # ASCII output: any word, even a lone surrogate, is valid JSON


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
            lines.append(encode(result_json(index, result, hidden_size, response.version)))
        position += 1
    lines.append("")
    return "\n".join(lines).encode("ascii"), failed


def result_json(index: int, result: pb.WordResult, hidden_size: int, version: int = 0) -> dict[str, Any]:
    """One encoded word's output line: Encoding.to_json's fields (the model version that encoded it, the
    arrays), built without numpy (3x faster)."""
    # A repeated float field yields each float32 widened to a Python float, exactly as ndarray.tolist() does.
    # An array the job's --fields left out arrives empty and is left out of the line.
    outputs, hidden, cell = list(result.outputs), list(result.hidden), list(result.cell)
    if (outputs and len(outputs) != result.length * hidden_size) or len(hidden) % max(hidden_size, 1):
        raise FatalError(f"the server's arrays for word {index} {result.word!r} do not match hidden_size {hidden_size}")
    item: dict[str, Any] = {"index": index, "word": result.word, "version": version}
    if outputs:
        item["outputs"] = [outputs[row : row + hidden_size] for row in range(0, len(outputs), hidden_size)]
    if hidden:
        item["hidden"] = [hidden[row : row + hidden_size] for row in range(0, len(hidden), hidden_size)]
    if cell:
        item["cell"] = [cell[row : row + hidden_size] for row in range(0, len(cell), hidden_size)]
    return item
