"""Built-in model configurations and loading of users' checkpoints (state_dicts of nn.RNN / nn.LSTM / nn.GRU)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.manifest import KINDS, NONLINEARITIES, AlphabetError, validate_alphabet

BUILTIN_ALPHABET = "helo"
DEFAULT_SEED = 0


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded, or does not match what the user declared."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The architecture of a single-direction char-RNN; the alphabet fixes the input size."""

    name: str
    kind: str
    alphabet: str
    hidden_size: int
    num_layers: int
    nonlinearity: str | None = "tanh"
    bias: bool = True

    @property
    def input_size(self) -> int:
        """One input per letter of the alphabet (one-hot)."""
        return len(self.alphabet)

    def build(self) -> nn.RNNBase:
        """A fresh module with this architecture, batch_first=True, in eval mode."""
        common: dict[str, Any] = dict(
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            bias=self.bias,
            batch_first=True,
        )
        if self.kind == "rnn":
            module: nn.RNNBase = nn.RNN(nonlinearity=self.nonlinearity or "tanh", **common)
        elif self.kind == "lstm":
            module = nn.LSTM(**common)
        elif self.kind == "gru":
            module = nn.GRU(**common)
        else:
            raise ValueError(f"unknown kind {self.kind!r}")
        return module.eval()


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A module with its weights in place, and a record of where those weights came from."""

    spec: ModelSpec
    module: nn.RNNBase
    weights: dict[str, Any]


BUILTIN_SPECS: dict[str, ModelSpec] = {
    "rnn": ModelSpec("rnn", "rnn", BUILTIN_ALPHABET, hidden_size=2, num_layers=1),
    "rnn_multi_layers": ModelSpec("rnn_multi_layers", "rnn", BUILTIN_ALPHABET, hidden_size=2, num_layers=3),
    "lstm": ModelSpec("lstm", "lstm", BUILTIN_ALPHABET, hidden_size=2, num_layers=3, nonlinearity=None),
}


def seeded_model(spec: ModelSpec, seed: int = DEFAULT_SEED) -> LoadedModel:
    """The spec's module with PyTorch's default initialisation drawn from a fixed seed (same seed, same weights)."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        module = spec.build()
    finally:
        torch.random.set_rng_state(generator_state)
    return LoadedModel(spec, module, {"source": "seed", "seed": seed})


_LAYER_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)$")
_GATES = {"rnn": 1, "gru": 3, "lstm": 4}
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_model_name(name: str) -> str:
    """A model name is a folder name and part of the API: letters, digits, '_', '.', '-'; at most 64."""
    if not MODEL_NAME.fullmatch(name):
        raise CheckpointError(
            f"model name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def infer_spec(
    state_dict: dict[str, Any], *, name: str, kind: str, alphabet: str, nonlinearity: str | None
) -> ModelSpec:
    """Infer hidden size, layer count and bias from a state_dict, checking it against the declared kind and alphabet."""
    if kind not in KINDS:
        raise CheckpointError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    try:
        validate_alphabet(alphabet)
    except AlphabetError as error:
        raise CheckpointError(str(error)) from error
    unsupported = sorted(key for key in state_dict if key.endswith("_reverse") or key.startswith("weight_hr"))
    if unsupported:
        raise CheckpointError(
            f"bidirectional or projected (proj_size) modules are not supported; found {', '.join(unsupported)}"
        )
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            raise CheckpointError(
                f"unexpected key {key!r}: expected the state_dict of a torch.nn.RNN/LSTM/GRU "
                "(keys weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0, ...)"
            )
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{key} is not a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{key} holds NaN or infinite values")
        layers.setdefault(int(match.group(2)), {})[match.group(1)] = value
    if not layers:
        raise CheckpointError("the checkpoint holds no RNN weights")
    num_layers = len(layers)
    if sorted(layers) != list(range(num_layers)):
        raise CheckpointError(f"layer indices are not contiguous from 0: {sorted(layers)}")
    if "weight_hh" not in layers[0] or "weight_ih" not in layers[0]:
        raise CheckpointError("layer 0 lacks weight_ih_l0 or weight_hh_l0")
    weight_hh = layers[0]["weight_hh"]
    hidden_size = int(weight_hh.shape[1])
    gates = int(weight_hh.shape[0]) // max(hidden_size, 1)
    found_kind = next((k for k, g in _GATES.items() if g == gates and weight_hh.shape[0] == g * hidden_size), None)
    if found_kind is None:
        raise CheckpointError(f"weight_hh_l0 has shape {tuple(weight_hh.shape)}, which fits no RNN, GRU or LSTM")
    if found_kind != kind:
        raise CheckpointError(
            f"the checkpoint is a {found_kind} ({gates} gate block(s) of {hidden_size} in weight_hh_l0 "
            f"{tuple(weight_hh.shape)}) but --kind {kind} was declared"
        )
    input_size = int(layers[0]["weight_ih"].shape[1])
    if input_size != len(alphabet):
        raise CheckpointError(
            f"the alphabet has {len(alphabet)} letters but the checkpoint's input size is {input_size} "
            f"(weight_ih_l0 {tuple(layers[0]['weight_ih'].shape)})"
        )
    bias = "bias_ih" in layers[0]
    if kind == "rnn":
        nonlinearity = nonlinearity or "tanh"
        if nonlinearity not in NONLINEARITIES:
            raise CheckpointError(f"nonlinearity must be tanh or relu, not {nonlinearity!r}")
    elif nonlinearity is not None:
        raise CheckpointError(f"--nonlinearity applies to rnn checkpoints only, not {kind}")
    return ModelSpec(name, kind, alphabet, hidden_size, num_layers, nonlinearity, bias)


def load_checkpoint(
    path: Path, *, name: str, kind: str, alphabet: str, nonlinearity: str | None = None
) -> LoadedModel:
    """Load a state_dict saved with torch.save(module.state_dict(), path), safely (weights_only=True)."""
    validate_model_name(name)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or unsafe files
        raise CheckpointError(f"{path}: cannot be loaded as a weights-only state_dict ({error})") from error
    if isinstance(state_dict, nn.Module) or not isinstance(state_dict, dict):
        raise CheckpointError(
            f"{path}: expected a state_dict (a dict of tensors), got {type(state_dict).__name__}; "
            "save it with torch.save(module.state_dict(), path)"
        )
    spec = infer_spec(state_dict, name=name, kind=kind, alphabet=alphabet, nonlinearity=nonlinearity)
    module = spec.build()
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit a {kind} of that shape: {error}") from error
    weights = {"source": "checkpoint", "path": str(path), "sha256": _file_sha256(path)}
    return LoadedModel(spec, module.eval(), weights)
