"""The wire-independent core: encode(model, words, states) -> per-word results.

word -> indices -> (batcher) one-hot batch -> onnxruntime -> per-word results. The gRPC service, and any
other front (a KServe V2 endpoint, say), only translate to and from these types.

encode_rows() is the hot path: it returns the request's rows of the batch outputs as arrays (no per-word
objects), which the gRPC service serialises in one pass; encode() splits the same result into per-word
WordEncodings for callers that want them.

Versions: the engine serves, per model name, one or more loaded versions (each a ModelRuntime with its own
runner) and a default, the highest of them. A request picks its version once, when it arrives, and holds
it until it is answered, so set_versions() can swap the default in one step (between two requests, on the one
event loop) while requests already queued or running finish on the version they started on; a version taken
out of service is closed once its last request is done. What to load is decided elsewhere
(server/core/repository.py); the engine only holds, swaps and retires.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
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
    VersionNotFoundError,
    shown_word,
)
from server.core.inline import RunPredictor
from server.core.runtime import ModelRuntime, RunOutputs

logger = logging.getLogger(__name__)


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
    keep_versions: int
    """Versions of each model kept loaded (the newest that load); the highest is the default."""
    inline_max_s: float = 0.0
    """Runs predicted to take at most this run on the event loop (server/core/inline.py); 0: never."""


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


class VersionState(StrEnum):
    """Where one version of a model stands."""

    READY = "ready"
    """Loaded, verified and warmed up: it answers."""
    FAILED = "failed"
    """Refused: the files are incomplete, altered or unusable; the error says which."""
    UNLOADING = "unloading"
    """Out of service: finishing its in-flight requests, then closed."""


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """One version of a model as ListModels/GetModel report it."""

    version: int
    state: VersionState
    error: str = ""
    """Why it failed (FAILED), or why a reload of this READY version was refused."""
    default: bool = False


@dataclass(frozen=True, slots=True)
class FailedVersion:
    """A version that could not be loaded; `fingerprint` is its files' state then (repository.fingerprint), so
    that the same broken files are not retried, and logged, on every rescan."""

    version: int
    error: str
    fingerprint: str


@dataclass(slots=True, eq=False)
class ServedVersion:
    """A loaded version, its runner, and how many requests hold it."""

    runtime: ModelRuntime
    runner: Batcher | DirectRunner
    active: int = 0
    retired: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once it is retired and its last request is done."""

    def release(self) -> None:
        """One of its requests is done."""
        self.active -= 1
        if self.retired and self.active == 0:
            self.idle.set()


def load_engine(repository: Path, settings: EngineSettings, observer: RunObserver | None = None) -> Engine:
    """Load and verify the newest settings.keep_versions versions of every model of a repository and return an
    engine over them, not yet started.

    Blocking (reads files, builds onnxruntime sessions): call it off the event loop. Raises ManifestError or
    DeviceUnavailableError naming the model that cannot be served. The server and the benchmark both use this.
    """
    from server.core.repository import load_initial  # the repository layout is its module's business

    versions = load_initial(repository, settings)
    defaults = {name: max(runtimes, key=lambda runtime: runtime.version) for name, runtimes in versions.items()}
    others = [runtime for runtimes in versions.values() for runtime in runtimes if runtime is not defaults[runtime.name]]
    return Engine(
        defaults, settings.limits, settings.batching, settings.run_threads, observer, more_versions=others,
        inline_max_s=settings.inline_max_s,
    )


class Engine:
    """Owns the loaded model versions and their runners; thread-unsafe, used from one event loop.

    `models` maps each name to its default version's runtime; it is replaced, never mutated, on a swap.
    """

    def __init__(
        self,
        models: Mapping[str, ModelRuntime],
        limits: Limits,
        batching: BatchSettings | None,
        run_threads: int = 1,
        observer: RunObserver | None = None,
        *,
        more_versions: Iterable[ModelRuntime] = (),
        inline_max_s: float = 0.0,
    ) -> None:
        self.limits = limits
        self._inline_max_s = inline_max_s
        self._batching = batching
        self._run_threads = run_threads
        self._observer = observer
        self._started = False
        self._served: dict[str, dict[int, ServedVersion]] = {}
        self._failed: dict[str, dict[int, FailedVersion]] = {}
        self._unloading: dict[str, dict[int, ServedVersion]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        for runtime in [*models.values(), *more_versions]:
            self._served.setdefault(runtime.name, {})[runtime.version] = self._serve(runtime)
        self.models: dict[str, ModelRuntime] = {}
        self._defaults: dict[str, ServedVersion] = {}
        self._publish()

    def _serve(self, runtime: ModelRuntime) -> ServedVersion:
        # Each runner (one per model version) predicts its own runs' times: see server/core/inline.py.
        predictor = RunPredictor(self._inline_max_s) if self._inline_max_s > 0 else None
        if predictor is not None and runtime.warm_up_seconds is not None:
            # The warm-up's one-letter run vouches for small batches from the first request (inline.py).
            predictor.observe(RunPredictor.key(1, 1), runtime.warm_up_seconds, inline=True)
        runner: Batcher | DirectRunner = (
            Batcher(runtime, self._batching, self._observer, max_concurrent_runs=self._run_threads, predictor=predictor)
            if self._batching is not None
            else DirectRunner(runtime, self._observer, max_concurrent_runs=self._run_threads, predictor=predictor)
        )
        if self._started:
            runner.start()
        return ServedVersion(runtime, runner)

    def _publish(self) -> None:
        """Point every model at its highest served version: new dicts, swapped in in one step each."""
        self._defaults = {name: versions[max(versions)] for name, versions in sorted(self._served.items())}
        self.models = {name: served.runtime for name, served in self._defaults.items()}

    def start(self) -> None:
        """Start the runners (call from the serving event loop)."""
        self._started = True
        for versions in self._served.values():
            for served in versions.values():
                served.runner.start()

    async def close(self) -> None:
        """Refuse new work; return once queued and running work is done (retiring versions' included)."""
        for versions in self._served.values():
            for served in versions.values():
                await served.runner.close()
        while self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    def model(self, name: str, version: int | None = None) -> ModelRuntime:
        """The loaded model of that name (its default version, or the one asked for), else ModelNotFoundError
        (VersionNotFoundError for a version of a loaded model that is not loaded)."""
        return self._resolve(name, version).runtime

    def _resolve(self, name: str, version: int | None) -> ServedVersion:
        versions = self._served.get(name)
        if versions is None:
            known = ", ".join(sorted(self._served)) or "none"
            failed = self._failed.get(name)
            why = f" (version {max(failed)} failed to load: {failed[max(failed)].error})" if failed else ""
            raise ModelNotFoundError(f"model {shown_word(name)} is not loaded{why} (models: {known})") from None
        if not version:
            return self._defaults[name]
        served = versions.get(version)
        if served is None:
            failure = self._failed.get(name, {}).get(version)
            why = f": it failed to load: {failure.error}" if failure is not None else ""
            raise VersionNotFoundError(
                f"model {shown_word(name)} has no version {version} loaded{why} "
                f"(loaded versions: {', '.join(map(str, sorted(versions)))})",
                metadata={"model": name, "version": str(version)},
            )
        return served

    def served_versions(self, name: str) -> dict[int, ModelRuntime]:
        """The loaded versions of a model (empty if none), by version."""
        return {version: served.runtime for version, served in self._served.get(name, {}).items()}

    def failed_versions(self, name: str) -> dict[int, FailedVersion]:
        """The versions of a model recorded as failed, by version."""
        return dict(self._failed.get(name, {}))

    def names(self) -> set[str]:
        """Every model name the engine serves or has a failure recorded for."""
        return set(self._served) | set(self._failed)

    def version_statuses(self, name: str) -> list[VersionStatus]:
        """Every version the engine knows of for a model, oldest first."""
        default = self._defaults.get(name)
        failed = self._failed.get(name, {})
        statuses: dict[int, VersionStatus] = {}
        for version in self._unloading.get(name, {}):
            statuses[version] = VersionStatus(version, VersionState.UNLOADING)
        for version, failure in failed.items():
            statuses[version] = VersionStatus(version, VersionState.FAILED, failure.error)
        for version, served in self._served.get(name, {}).items():
            error = failed[version].error if version in failed else ""
            statuses[version] = VersionStatus(version, VersionState.READY, error, served is default)
        return [statuses[version] for version in sorted(statuses)]

    def set_versions(
        self,
        name: str,
        keep: Iterable[int],
        new: Iterable[ModelRuntime],
        failed: Mapping[int, FailedVersion],
    ) -> list[int]:
        """Make `name` serve exactly the kept versions plus the new runtimes (which replace a kept one of the
        same version), in one step; record its failures; retire every other loaded version once its requests
        are done. No versions and no failures removes the model. Returns the versions retired."""
        current = self._served.get(name, {})
        served = {version: current[version] for version in keep if version in current}
        for runtime in new:
            served[runtime.version] = self._serve(runtime)
        retired = [version for version, old in current.items() if served.get(version) is not old]
        if served:
            self._served[name] = served
        else:
            self._served.pop(name, None)
        if failed:
            self._failed[name] = dict(failed)
        else:
            self._failed.pop(name, None)
        self._publish()
        for version in retired:
            self._retire(name, current[version])
        return retired

    def _retire(self, name: str, served: ServedVersion) -> None:
        served.retired = True
        if served.active == 0:
            served.idle.set()
        self._unloading.setdefault(name, {})[served.runtime.version] = served

        async def close() -> None:
            try:
                await served.idle.wait()
                await served.runner.close()
                logger.info("%s version %d unloaded", name, served.runtime.version)
            finally:
                unloading = self._unloading.get(name, {})
                if unloading.get(served.runtime.version) is served:
                    del unloading[served.runtime.version]
                    if not unloading:
                        self._unloading.pop(name, None)

        task = asyncio.ensure_future(close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def retired(self) -> None:
        """Wait until every retired version is closed (its last request answered)."""
        while self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    async def encode(
        self,
        model_name: str,
        words: Sequence[str],
        states: Sequence[InitialState] = (),
        report_invalid: bool = False,
        version: int | None = None,
    ) -> EncodeResult:
        """Encode words, each exactly as if alone. Bad words raise InvalidWordError, or are returned as errors."""
        batch = await self.encode_rows(model_name, words, states, report_invalid, version)
        return EncodeResult(batch.model, batch.word_encodings(), batch.stats)

    async def encode_rows(
        self,
        model_name: str,
        words: Sequence[str],
        states: Sequence[InitialState] = (),
        report_invalid: bool = False,
        version: int | None = None,
    ) -> RequestRows:
        """encode(), with the results left as batch arrays (see RequestRows); same checks, same errors.
        `version` None or 0: the model's default version. The version is chosen here, once, and held until
        the request is answered (see the module doc); RequestRows.model is it."""
        served = self._resolve(model_name, version)
        served.active += 1
        try:
            return await self._encode_rows(served, words, states, report_invalid)
        finally:
            served.release()

    async def _encode_rows(
        self, served: ServedVersion, words: Sequence[str], states: Sequence[InitialState], report_invalid: bool
    ) -> RequestRows:
        model = served.runtime
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
        outputs, stats = await served.runner.submit(letters, h0, c0)
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

