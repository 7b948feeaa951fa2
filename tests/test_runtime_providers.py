"""requested_providers(): CUDA is asked for only where it can run, and a missing piece is named, not printed red."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from server.core import runtime
from server.core.runtime import CPU, CUDA, DeviceUnavailableError, requested_providers

pytestmark = pytest.mark.unit


@pytest.fixture
def cuda_reason(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    runtime._log_provider_choice_once.cache_clear()
    yield monkeypatch
    runtime._log_provider_choice_once.cache_clear()


def test_cpu_never_probes_cuda(cuda_reason: pytest.MonkeyPatch) -> None:
    cuda_reason.setattr(runtime, "cuda_unavailable_reason", lambda: pytest.fail("probed CUDA for --device cpu"))
    assert requested_providers("cpu") == [CPU]


def test_auto_without_cuda_asks_for_cpu_only_and_says_why_once(
    cuda_reason: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cuda_reason.setattr(runtime, "cuda_unavailable_reason", lambda: "no NVIDIA driver (libcuda.so.1 not found)")
    with caplog.at_level(logging.INFO, logger="server.core.runtime"):
        assert requested_providers("auto") == [CPU]
        assert requested_providers("auto") == [CPU]  # a second model: no second line
    lines = [r.getMessage() for r in caplog.records if r.name == "server.core.runtime"]
    assert lines == [
        "onnxruntime provider: CPUExecutionProvider (--device auto; CUDA is not usable here: "
        "no NVIDIA driver (libcuda.so.1 not found))"
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records), "a plain line, not a warning or an error"


def test_auto_with_cuda_asks_for_cuda_then_cpu(cuda_reason: pytest.MonkeyPatch) -> None:
    cuda_reason.setattr(runtime, "cuda_unavailable_reason", lambda: None)
    assert requested_providers("auto") == [CUDA, CPU]
    assert requested_providers("cuda") == [CUDA, CPU]


def test_cuda_without_cuda_fails_naming_what_is_missing(cuda_reason: pytest.MonkeyPatch) -> None:
    reason = "the CUDA provider's libraries do not load (libcublasLt.so.13: cannot open shared object file)"
    cuda_reason.setattr(runtime, "cuda_unavailable_reason", lambda: reason)
    with pytest.raises(DeviceUnavailableError) as refused:
        requested_providers("cuda")
    assert str(refused.value) == f"--device cuda: {CUDA} cannot run here: {reason}"


def test_unknown_device_is_refused() -> None:
    with pytest.raises(ValueError, match="device must be one of"):
        requested_providers("tpu")


def test_the_real_probe_gives_a_reason_or_none() -> None:
    """On this machine: a reason string where CUDA cannot run (no driver, no GPU, a missing library), else None;
    never an exception, and onnxruntime is not asked to create a CUDA session for it."""
    reason = runtime.cuda_unavailable_reason()
    assert reason is None or (isinstance(reason, str) and reason)
