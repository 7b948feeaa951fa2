"""Write one version of a model into a model repository, atomically: build in a temporary folder, then rename."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

import onnx
import torch

from export.manifest import ONNX_FILE, TORCHSCRIPT_FILE, Manifest, next_version, sha256_file
from export.models import LoadedModel
from export.trace import ONNX_OPSET, PARITY_TOLERANCE, export_onnx, export_torchscript, io_specs, measure_parity

logger = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """An exported artifact disagrees with eager PyTorch beyond PARITY_TOLERANCE."""


def export_model(loaded: LoadedModel, repository: Path, version: int | None = None) -> Manifest:
    """Export a loaded model to repository/<name>/<version>/ (model.onnx, model.pt, manifest.json) and return
    its manifest; the version defaults to one above the highest the model has (next_version).

    Nothing is left half-written: the folder appears complete or not at all (a server rescanning the
    repository never sees a partial version), and an existing folder of the same version is replaced only
    once the new one is complete and passes parity.
    """
    spec, module = loaded.spec, loaded.module
    if version is None:
        version = next_version(repository, spec.name)
    if version < 1:
        raise ValueError(f"a version is a positive integer, not {version}")
    model_folder = repository / spec.name
    created = not model_folder.exists()
    model_folder.mkdir(parents=True, exist_ok=True)
    target = model_folder / str(version)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=model_folder))
    try:
        export_onnx(module, staging / ONNX_FILE)
        export_torchscript(module, staging / TORCHSCRIPT_FILE)
        parity = measure_parity(module, staging, ONNX_FILE, TORCHSCRIPT_FILE)
        worst = max(parity.values())
        if not worst <= PARITY_TOLERANCE:
            raise ParityError(
                f"{spec.name}: artifacts differ from eager PyTorch by {worst:.3g} (> {PARITY_TOLERANCE:g}): {parity}"
            )
        inputs, outputs = io_specs(module)
        manifest = Manifest(
            name=spec.name,
            kind=spec.kind,
            input_size=spec.input_size,
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            nonlinearity=spec.nonlinearity,
            bias=spec.bias,
            alphabet=spec.alphabet,
            onnx_opset=ONNX_OPSET,
            onnx_inputs=inputs,
            onnx_outputs=outputs,
            artifacts={name: sha256_file(staging / name) for name in (ONNX_FILE, TORCHSCRIPT_FILE)},
            weights=loaded.weights,
            versions={
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "python": platform.python_version(),
            },
            parity={**parity, "tolerance": PARITY_TOLERANCE, "device": "cpu", "dtype": "float32"},
        )
        manifest.validate()
        manifest.write(staging)
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(model_folder, ignore_errors=True)  # a new model's first export failed: leave no trace
        raise
    logger.info(
        "exported %s version %d (%s, %d layer(s), hidden %d, alphabet of %d) to %s; max abs error onnx %.2g, "
        "torchscript %.2g",
        spec.name, version, spec.kind, spec.num_layers, spec.hidden_size, spec.input_size, target,
        parity["onnx_max_abs_error"], parity["torchscript_max_abs_error"],
    )
    return manifest


def _replace(staging: Path, target: Path) -> None:
    """Move a complete staging folder into place, replacing an existing target only after the move succeeds."""
    os.chmod(staging, 0o755)
    if not target.exists():
        staging.rename(target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    retired.rmdir()
    target.rename(retired)
    try:
        staging.rename(target)
    except BaseException:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
