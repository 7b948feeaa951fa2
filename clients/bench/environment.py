"""What a benchmark or soak run stands on: the machine (machine_info) and the models (export_repository).

export_repository() exports the built-in models and a larger LSTM from a checkpoint, as charrnn-export
does; it imports torch (the export extras) only when called, so the reports can be rendered and --help
shown without it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime
import psutil

from clients.bench.plan import LARGE_ALPHABET, LARGE_HIDDEN, LARGE_LAYERS, LARGE_MODEL


def machine_info(device: str) -> dict[str, Any]:
    """nproc, CPU model, memory, versions; GPU name when nvidia-smi answers."""
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    if device != "cpu":
        try:
            gpu = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            gpu = ""
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "gpu": gpu or "none",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers_available": onnxruntime.get_available_providers(),
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


def gpu_memory_used_mib() -> float | None:
    """Memory in use on the first GPU (nvidia-smi), MiB; None where no nvidia-smi answers."""
    try:
        answer = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10,
        )
        return float(answer.stdout.split()[0]) if answer.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def export_repository(folder: Path) -> Path:
    """The built-in models and the large checkpoint LSTM, exported as charrnn-export would."""
    import torch  # the export extras; imported here so --help works without them

    from export.models import BUILTIN_SPECS, load_checkpoint, seeded_model
    from export.repository import export_model

    repository = folder / "model_repository"
    for spec in BUILTIN_SPECS.values():
        export_model(seeded_model(spec), repository)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(2024)
    module = torch.nn.LSTM(input_size=len(LARGE_ALPHABET), hidden_size=LARGE_HIDDEN, num_layers=LARGE_LAYERS)
    torch.random.set_rng_state(generator_state)
    checkpoint = folder / f"{LARGE_MODEL}.pt"
    torch.save(module.state_dict(), checkpoint)
    export_model(load_checkpoint(checkpoint, name=LARGE_MODEL, kind="lstm", alphabet=LARGE_ALPHABET), repository)
    return repository
