"""One exported model ready to run: manifest checked, artifacts verified, onnxruntime session on the chosen provider."""

from __future__ import annotations

import ctypes
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime

from export.manifest import FLAT_LAYOUT_VERSION, ONNX_FILE, Manifest, ManifestError, VersionFolder, scan_repository
from server.core.alphabet import Alphabet, WordIndices, one_hot_batch

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")


class DeviceUnavailableError(RuntimeError):
    """--device cuda was asked for but onnxruntime cannot run the model on CUDA here."""


@dataclass(frozen=True, slots=True)
class RunOutputs:
    """onnxruntime's outputs for a batch: outputs [batch, max_len, hidden], h_n/c_n [num_layers, batch, hidden]."""

    outputs: npt.NDArray[np.float32]
    h_n: npt.NDArray[np.float32]
    c_n: npt.NDArray[np.float32] | None


def requested_providers(device: str) -> list[str]:
    """Providers to ask onnxruntime for, in order of preference.

    CUDA is asked for only once cuda_unavailable_reason() finds nothing missing: asked for blindly on a machine
    without a GPU, onnxruntime-gpu prints a red "Failed to load library libonnxruntime_providers_cuda.so" error
    and falls back on its own. --device cuda raises DeviceUnavailableError naming what is missing instead.
    """
    if device == "cpu":
        return [CPU]
    if device not in ("auto", "cuda"):
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    reason = cuda_unavailable_reason()
    if reason is not None:
        if device == "cuda":
            raise DeviceUnavailableError(f"--device cuda: {CUDA} cannot run here: {reason}")
        _log_provider_choice_once(f"{CPU} (--device auto; CUDA is not usable here: {reason})")
        return [CPU]
    _log_provider_choice_once(f"{CUDA} first, {CPU} as fallback (--device {device}; CUDA driver, GPU and libraries found)")
    return [CUDA, CPU]


@functools.cache
def _log_provider_choice_once(text: str) -> None:
    logger.info("onnxruntime provider: %s", text)


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """Why onnxruntime's CUDA provider cannot run in this process (None: nothing missing), found without
    asking onnxruntime: the build, the NVIDIA driver and a GPU, then the provider library with every CUDA/cuDNN
    library it links (dlopen names the first one missing)."""
    available = onnxruntime.get_available_providers()
    if CUDA not in available:
        return f"this onnxruntime build has no {CUDA} (available: {', '.join(available)}); install onnxruntime-gpu"
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 not found)"
    status = driver.cuInit(0)
    if status != 0:
        return f"the NVIDIA driver found no usable GPU (cuInit returned CUDA error {status})"
    count = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "no CUDA device"
    provider_library = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    try:
        _preload_cuda_wheels()
        ctypes.CDLL(str(provider_library), mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        return f"the CUDA provider's libraries do not load ({error}); CUDA 13 and cuDNN 9 are needed"
    return None


def _preload_cuda_wheels() -> None:
    """CUDA/cuDNN from the nvidia-* wheels, where installed (onnxruntime-gpu[cuda,cudnn]); system ones otherwise."""
    preload = getattr(onnxruntime, "preload_dlls", None)
    if preload is None:
        return
    try:
        import nvidia  # noqa: F401  (the namespace of the nvidia-* wheels)
    except ImportError:
        return
    preload()


RunDone = Callable[["RunOutputs | None", "BaseException | None"], None]
"""Receives a started run's outputs, or its error, on an onnxruntime thread."""


class ModelRuntime:
    """A loaded model: its manifest, alphabet and onnxruntime session; run() and start_run() are thread-safe.

    run_threads: onnxruntime threads that run the batches start_run() hands over (the session's intra-op
    pool, which run_async runs on; onnxruntime counts the calling thread in intra_op_num_threads, hence the
    + 1). They do not spin while waiting for work: on a small machine a spinning pool takes the CPU the
    event loop needs (2 cores, 1-word requests at concurrency 64: 1,610 requests/s spinning, 3,137 not).
    """

    def __init__(
        self,
        folder: Path,
        device: str = "auto",
        run_threads: int = 1,
        *,
        name: str | None = None,
        version: int = FLAT_LAYOUT_VERSION,
    ) -> None:
        """Load the model in `folder`; `name` is the model folder's name (default: `folder`'s own, as in the
        flat layout) and `version` the version it is served as."""
        expected_name = folder.name if name is None else name
        manifest = Manifest.read(folder)
        if manifest.name != expected_name:
            raise ManifestError(f"{folder}: manifest names the model {manifest.name!r}, the folder is {expected_name!r}")
        manifest.verify_artifacts(folder)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, run_threads) + 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # onnxruntime's own warnings; the provider actually used is logged below
        providers = requested_providers(device)
        self.session = onnxruntime.InferenceSession(str(folder / ONNX_FILE), options, providers=providers)
        # onnxruntime falls back to CPU silently when CUDA cannot start: only get_providers() tells the truth.
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != CUDA:
            raise DeviceUnavailableError(
                f"{manifest.name}: --device cuda, but onnxruntime could not start {CUDA} "
                f"(session runs on {', '.join(self.session.get_providers())}); check the CUDA/cuDNN libraries and the GPU"
            )
        if device == "auto" and CUDA in providers and self.provider != CUDA:
            logger.warning("%s: CUDA provider could not start; falling back to %s", manifest.name, self.provider)
        expected = [spec.name for spec in manifest.onnx_inputs]
        actual = [node.name for node in self.session.get_inputs()]
        if actual != expected:
            raise ManifestError(f"{folder}: ONNX inputs {actual} differ from the manifest's {expected}")
        letters = self.session.get_inputs()[0].shape[-1]
        if isinstance(letters, int) and letters != manifest.input_size:
            raise ManifestError(
                f"{folder}: the ONNX graph takes {letters} letters per character, but the manifest's alphabet "
                f"{manifest.alphabet!r} has {manifest.input_size}"
            )
        # Named outputs and one RunOptions reused by every run: with None for either, session.run lists the
        # outputs and builds default options on each call, about 10 µs of a 1-word LSTM run's 100.
        self._output_names = [node.name for node in self.session.get_outputs()]
        self._run_options = onnxruntime.RunOptions()
        self.manifest = manifest
        self.version = version
        """The version this runtime serves (the folder's number; 1 for the flat layout)."""
        self.alphabet = Alphabet(manifest.alphabet)
        self.folder = folder
        self.fingerprint = ""
        """The version folder's files when they were loaded (server.core.repository.fingerprint; "" if unknown)."""
        self.warm_up_seconds: float | None = None
        """How long a warm one-letter run took in warm_up() (None until then): the inline predictor's first figure."""

    @property
    def name(self) -> str:
        """The model's name, as clients address it."""
        return self.manifest.name

    def warm_up(self) -> None:
        """Two runs of a one-letter word on this thread: a model that loads but cannot run fails here, before it
        serves (and onnxruntime's first-run allocations happen before the first request). The second run, warm,
        is timed: warm_up_seconds."""
        letters = self.alphabet.indices([self.manifest.alphabet[0]])
        h0 = self.zero_state(1)
        c0 = np.zeros_like(h0) if self.manifest.has_cell_state else None
        outputs = self.run(letters, h0, c0)
        if outputs.outputs.shape[0] != 1 or outputs.h_n.shape != h0.shape:
            raise ManifestError(
                f"{self.folder}: a warm-up run returned outputs {outputs.outputs.shape} and h_n {outputs.h_n.shape}; "
                f"expected 1 word and {h0.shape}"
            )
        started = time.perf_counter()
        self.run(letters, h0, c0)
        self.warm_up_seconds = time.perf_counter() - started

    def zero_state(self, words: int) -> npt.NDArray[np.float32]:
        """A fresh state [num_layers, words, hidden] (what PyTorch uses when no state is given)."""
        return np.zeros((self.manifest.num_layers, words, self.manifest.hidden_size), dtype=np.float32)

    def run(
        self,
        letters: WordIndices,
        h0: npt.NDArray[np.float32],
        c0: npt.NDArray[np.float32] | None,
    ) -> RunOutputs:
        """One onnxruntime run over a batch of letters words, each exactly as if run alone, on this thread."""
        return _outputs(self.session.run(self._output_names, self._feed(letters, h0, c0), self._run_options))

    def start_run(
        self,
        letters: WordIndices,
        h0: npt.NDArray[np.float32],
        c0: npt.NDArray[np.float32] | None,
        done: RunDone,
    ) -> None:
        """Start run() on one of onnxruntime's own threads (session.run_async) and return at once; `done`
        gets the outputs or the error on that thread, exactly once. Errors in the inputs may raise here instead."""
        feed = self._feed(letters, h0, c0)

        def finished(results: list[npt.NDArray[np.float32]], _user_data: object, error: str) -> None:
            # Nothing may escape: onnxruntime calls this on its own thread, where a Python exception aborts
            # the process.
            try:
                if error:
                    raise RuntimeError(f"onnxruntime run failed: {error}")
                outputs = _outputs(results)
            except BaseException as failure:  # noqa: BLE001 - handed to the caller, see above
                done(None, failure)
            else:
                done(outputs, None)

        # The feed goes in as user_data too: the binding holds that until the callback, so the arrays
        # onnxruntime reads (it does not copy them) outlive the run whatever else the binding keeps.
        self.session.run_async(self._output_names, feed, finished, feed, self._run_options)

    def _feed(
        self, letters: WordIndices, h0: npt.NDArray[np.float32], c0: npt.NDArray[np.float32] | None
    ) -> dict[str, npt.NDArray[np.generic]]:
        feed: dict[str, npt.NDArray[np.generic]] = {
            "x": one_hot_batch(letters, self.manifest.input_size),
            "lengths": letters.lengths,
            "h0": h0,
        }
        if self.manifest.has_cell_state:
            feed["c0"] = c0 if c0 is not None else np.zeros_like(h0)
        return feed


def _outputs(results: list[npt.NDArray[np.float32]]) -> RunOutputs:
    return RunOutputs(results[0], results[1], results[2] if len(results) > 2 else None)


def load_version(source: VersionFolder, device: str = "auto", run_threads: int = 1) -> ModelRuntime:
    """Load one version of a model folder and warm it up (blocking: call it off the event loop)."""
    model = ModelRuntime(source.path, device, run_threads, name=source.name, version=source.version)
    model.warm_up()
    return model


def load_repository(repository: Path, device: str = "auto", run_threads: int = 1) -> dict[str, ModelRuntime]:
    """Load the highest version of every model of a repository, or raise naming the first one that is missing,
    altered or unusable."""
    scanned = scan_repository(repository)
    if not scanned:
        raise ManifestError(
            f"{repository}: no models (expected <name>/<version>/manifest.json folders); run charrnn-export first"
        )
    models: dict[str, ModelRuntime] = {}
    for name, versions in scanned.items():
        model = load_version(versions[-1], device, run_threads)
        models[name] = model
        if device == "auto" and model.provider != CUDA:
            device = "cpu"  # CUDA could not start for this model: do not retry (and log) it for every other one
    return models
