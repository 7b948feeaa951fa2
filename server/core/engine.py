"""The wire-independent core: encode(model, words, states) -> per-word results.

word -> indices -> (batcher) one-hot batch -> onnxruntime -> per-word results. The gRPC service, and any
other front (a KServe V2 endpoint, say), only translate to and from these types.

encode_rows() is the hot path: it returns the request's rows of the batch outputs as arrays (no per-word
objects), which the gRPC service serialises in one pass; encode() splits the same result into per-word
WordEncodings for callers that want them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from server.core.alphabet import WordIndices
from server.core.batcher import Batcher, BatchSettings, DirectRunner, RunObserver, RunStats
from server.core.errors import (
    InvalidRequestError,
    InvalidWordError,
    ModelNotFoundError,
    Reason,
    RequestTooLargeError,
    shown_word,
)
from server.core.runtime import ModelRuntime, RunOutputs, load_repository


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may ask for (the defaults are ServerConfig's, which builds these)."""

    max_words: int
    """Words per request (and per stream message)."""
    max_word_length: int
    """Characters per word."""


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Everything an engine is built from besides the repository (ServerConfig.engine_settings() makes one)."""

    device: str
    """auto (CUDA provider first, CPU fallback), cuda or cpu."""
    run_threads: int
    """onnxruntime threads running each model's batches; also its runs in flight."""
    limits: Limits
    """What one request may ask for."""
    batching: BatchSettings | None
    """Dynamic batching settings, or None to run each request alone."""


@dataclass(frozen=True, slots=True)
class InitialState:
    """A word's starting state: hidden [num_layers, hidden_size], cell likewise (LSTM only)."""

    hidden: npt.NDArray[np.float32]
    cell: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True, slots=True)
class WordEncoding:
    """One word's results: outputs [length, hidden], hidden [num_layers, hidden], cell [num_layers, hidden] (LSTM)."""

    word: str
    outputs: npt.NDArray[np.float32]
    hidden: npt.NDArray[np.float32]
    cell: npt.NDArray[np.float32] | None


@dataclass(frozen=True, slots=True)
class EncodeResult:
    """Per-word results in request order; a word that could not be letters holds its error instead."""

    model: ModelRuntime
    words: list[WordEncoding | InvalidWordError]
    stats: RunStats | None


@dataclass(frozen=True, slots=True)
class RequestRows:
    """A request's results as arrays: row r of `outputs` is the r-th good word (in request order).

    `problems` is None when every word was good, else one entry per request word (None for a good word).
    `outputs` is None when no word was good (every word reported invalid).
    """

    model: ModelRuntime
    words: Sequence[str]
    problems: list[InvalidWordError | None] | None
    lengths: npt.NDArray[np.int32]
    outputs: RunOutputs | None
    stats: RunStats | None

    def word_encodings(self) -> list[WordEncoding | InvalidWordError]:
        """Per-word results in request order (views into the batch arrays)."""
        good: list[WordEncoding] = []
        if self.outputs is not None:
            outputs, h_n, c_n = self.outputs.outputs, self.outputs.h_n, self.outputs.c_n
            good_words = self.words if self.problems is None else [
                word for word, problem in zip(self.words, self.problems, strict=True) if problem is None
            ]
            good = [
                WordEncoding(word, outputs[row, :length], h_n[:, row], None if c_n is None else c_n[:, row])
                for row, (word, length) in enumerate(zip(good_words, self.lengths.tolist(), strict=True))
            ]
        if self.problems is None:
            return list(good)
        encodings = iter(good)
        return [problem if problem is not None else next(encodings) for problem in self.problems]


def load_engine(repository: Path, settings: EngineSettings, observer: RunObserver | None = None) -> Engine:
    """Load and verify every model of a repository and return an engine over them, not yet started.

    Blocking (reads files, builds onnxruntime sessions): call it off the event loop. Raises ManifestError or
    DeviceUnavailableError naming the model that cannot be served. The server and the benchmark both use this.
    """
    models = load_repository(repository, settings.device, settings.run_threads)
    return Engine(models, settings.limits, settings.batching, settings.run_threads, observer)


class Engine:
    """Owns the loaded models and their runners; thread-unsafe, used from one event loop."""

    def __init__(
        self,
        models: dict[str, ModelRuntime],
        limits: Limits,
        batching: BatchSettings | None,
        run_threads: int = 1,
        observer: RunObserver | None = None,
    ) -> None:
        self.models = models
        self.limits = limits
        self._runners: dict[str, Batcher | DirectRunner] = {
            name: Batcher(model, batching, observer, max_concurrent_runs=run_threads)
            if batching is not None
            else DirectRunner(model, observer, max_concurrent_runs=run_threads)
            for name, model in models.items()
        }

    def start(self) -> None:
        """Start the runners (call from the serving event loop)."""
        for runner in self._runners.values():
            runner.start()

    async def close(self) -> None:
        """Refuse new work; return once queued and running work is done."""
        for runner in self._runners.values():
            await runner.close()

    def model(self, name: str) -> ModelRuntime:
        """The loaded model of that name, or ModelNotFoundError."""
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFoundError(f"model {shown_word(name)} is not loaded (models: {known})") from None

    async def encode(
        self,
        model_name: str,
        words: Sequence[str],
        states: Sequence[InitialState] = (),
        report_invalid: bool = False,
    ) -> EncodeResult:
        """Encode words, each exactly as if alone. Bad words raise InvalidWordError, or are returned as errors."""
        batch = await self.encode_rows(model_name, words, states, report_invalid)
        return EncodeResult(batch.model, batch.word_encodings(), batch.stats)

    async def encode_rows(
        self,
        model_name: str,
        words: Sequence[str],
        states: Sequence[InitialState] = (),
        report_invalid: bool = False,
    ) -> RequestRows:
        """encode(), with the results left as batch arrays (see RequestRows); same checks, same errors."""
        model = self.model(model_name)
        if not words:
            raise InvalidRequestError("the request has no words", Reason.NO_WORDS)
        if len(words) > self.limits.max_words:
            raise RequestTooLargeError(
                f"the request has {len(words)} words, more than the limit of {self.limits.max_words}"
            )
        if states and len(states) != len(words):
            raise InvalidRequestError(
                f"initial_states has {len(states)} entries for {len(words)} words: give none or one per word",
                Reason.INVALID_STATE,
            )
        checked = model.alphabet.check(words, self.limits.max_word_length)
        problems: list[InvalidWordError | None] | None = None
        if checked.count(None) == len(checked):  # every word is good (the common case)
            good: Sequence[int] = range(len(words))
            good_words: Sequence[str] = words
        else:
            problems = checked
            good = [index for index, problem in enumerate(problems) if problem is None]
            if not report_invalid:
                raise next(problem for problem in problems if problem is not None)
            good_words = [words[index] for index in good]
        h0, c0 = self._initial_state(model, words, states, good)
        if not good:
            return RequestRows(model, words, problems, np.zeros(0, dtype=np.int32), None, None)
        letters: WordIndices = model.alphabet.indices(good_words)
        outputs, stats = await self._runners[model.name].submit(letters, h0, c0)
        return RequestRows(model, words, problems, letters.lengths, outputs, stats)

    @staticmethod
    def _initial_state(
        model: ModelRuntime, words: Sequence[str], states: Sequence[InitialState], good: Sequence[int]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
        lstm = model.manifest.has_cell_state
        if not states:
            h0 = model.zero_state(len(good))
            return h0, (np.zeros_like(h0) if lstm else None)
        shape = (model.manifest.num_layers, model.manifest.hidden_size)
        hidden = np.empty((len(good), *shape), dtype=np.float32)
        cell = np.zeros((len(good), *shape), dtype=np.float32) if lstm else None
        for row, index in enumerate(good):
            state = states[index]
            hidden[row] = _state_array(state.hidden, shape, index, words[index], "hidden")
            if state.cell is not None and state.cell.size:
                if cell is None:
                    raise InvalidRequestError(
                        f"word {index} {shown_word(words[index])}: initial cell state given, but {model.name!r} "
                        f"is a {model.manifest.kind}, which has no cell state",
                        Reason.INVALID_STATE, {"word_index": str(index)},
                    )
                cell[row] = _state_array(state.cell, shape, index, words[index], "cell")
        return np.ascontiguousarray(hidden.transpose(1, 0, 2)), (
            None if cell is None else np.ascontiguousarray(cell.transpose(1, 0, 2))
        )


def _state_array(
    values: npt.NDArray[np.float32], shape: tuple[int, int], index: int, word: str, what: str
) -> npt.NDArray[np.float32]:
    expected = shape[0] * shape[1]
    if values.size != expected:
        raise InvalidRequestError(
            f"word {index} {shown_word(word)}: initial {what} state has {values.size} values; expected "
            f"num_layers x hidden_size = {shape[0]} x {shape[1]} = {expected}",
            Reason.INVALID_STATE, {"word_index": str(index)},
        )
    if not np.all(np.isfinite(values)):
        raise InvalidRequestError(
            f"word {index} {shown_word(word)}: initial {what} state holds NaN or infinity",
            Reason.INVALID_STATE, {"word_index": str(index)},
        )
    return values.reshape(shape)

