"""The model manifest: what the server needs to know about an exported model, readable without torch.

A model repository is a directory with one folder per model, and in it one folder per version:

    <repository>/<name>/<version>/manifest.json
    <repository>/<name>/<version>/model.onnx
    <repository>/<name>/<version>/model.pt

<version> is a positive integer written in decimal (1, 2, ...). The flat layout of earlier releases
(<repository>/<name>/manifest.json, no version folder) is read as version 1 of that model; a `1/` folder, if
there is one as well, takes precedence. Hidden entries (a leading dot: the export's staging folders) are
never models or versions.

Tensor layouts (identical for model.onnx and model.pt):

    x        float32 [batch, max_len, input_size]   one-hot characters, batch first; rows past a word's end are zero
    lengths  int32   [batch]  (ONNX)                number of characters of each word, >= 1
             int64   [batch]  (TorchScript)
    h0       float32 [num_layers, batch, hidden]    initial hidden state per layer (zeros = fresh start)
    c0       float32 [num_layers, batch, hidden]    initial cell state per layer, LSTM only
    outputs  float32 [batch, max_len, hidden]       top layer output at every character; zero past a word's end
    h_n      float32 [num_layers, batch, hidden]    hidden state of every layer after each word's last character
    c_n      float32 [num_layers, batch, hidden]    cell state of every layer, LSTM only
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.pt"
FORMAT_VERSION = 1
KINDS = ("rnn", "lstm", "gru")
NONLINEARITIES = ("tanh", "relu")


class ManifestError(ValueError):
    """A manifest, or the model folder it describes, is missing, malformed or inconsistent."""


class AlphabetError(ValueError):
    """An alphabet is empty or repeats a letter."""


def validate_alphabet(alphabet: str) -> str:
    """Return the alphabet if every letter is distinct and there is at least one, else raise AlphabetError."""
    if not alphabet:
        raise AlphabetError("the alphabet is empty: give at least one letter")
    seen: dict[str, int] = {}
    for position, letter in enumerate(alphabet):
        if letter in seen:
            raise AlphabetError(
                f"the alphabet repeats the letter {letter!r} (positions {seen[letter]} and {position})"
            )
        seen[letter] = position
    return alphabet


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, element type and shape of one graph input or output; strings in a shape are dynamic axes."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything known about one exported model."""

    name: str
    kind: str
    input_size: int
    hidden_size: int
    num_layers: int
    nonlinearity: str | None
    bias: bool
    alphabet: str
    onnx_opset: int
    onnx_inputs: list[TensorSpec]
    onnx_outputs: list[TensorSpec]
    artifacts: dict[str, str]
    weights: dict[str, Any]
    versions: dict[str, str]
    parity: dict[str, Any]
    format_version: int = FORMAT_VERSION
    layout: str = "batch_first"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_cell_state(self) -> bool:
        """True for LSTM, whose state is (h, c) rather than h alone."""
        return self.kind == "lstm"

    def to_json(self) -> str:
        """Stable JSON text (sorted keys), so identical models give identical manifests."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def write(self, folder: Path) -> Path:
        """Write manifest.json into folder and return its path."""
        path = folder / MANIFEST_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Build and validate a manifest from parsed JSON."""
        try:
            version = int(data.get("format_version", 0))
            if version != FORMAT_VERSION:
                raise ManifestError(f"unsupported manifest format_version {version} (expected {FORMAT_VERSION})")
            fields = dict(data)
            fields["onnx_inputs"] = [TensorSpec(**spec) for spec in data["onnx_inputs"]]
            fields["onnx_outputs"] = [TensorSpec(**spec) for spec in data["onnx_outputs"]]
            manifest = cls(**fields)
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise ManifestError(f"malformed manifest: {error}") from error
        manifest.validate()
        return manifest

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """Read folder/manifest.json."""
        path = folder / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise ManifestError(f"{path}: no manifest") from error
        except json.JSONDecodeError as error:
            raise ManifestError(f"{path}: not valid JSON ({error})") from error
        try:
            return cls.from_dict(data)
        except ManifestError as error:
            raise ManifestError(f"{path}: {error}") from error

    def validate(self) -> None:
        """Raise ManifestError if the fields contradict each other."""
        if self.kind not in KINDS:
            raise ManifestError(f"unknown kind {self.kind!r} (expected one of {', '.join(KINDS)})")
        if self.kind == "rnn" and self.nonlinearity not in NONLINEARITIES:
            raise ManifestError(f"rnn nonlinearity must be tanh or relu, not {self.nonlinearity!r}")
        try:
            validate_alphabet(self.alphabet)
        except AlphabetError as error:
            raise ManifestError(str(error)) from error
        if len(self.alphabet) != self.input_size:
            raise ManifestError(
                f"alphabet has {len(self.alphabet)} letters but input_size is {self.input_size}"
            )
        for name in ("hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ManifestError(f"{name} must be >= 1")
        if ONNX_FILE not in self.artifacts:
            raise ManifestError(f"artifacts lists no {ONNX_FILE}")

    def verify_artifacts(self, folder: Path) -> None:
        """Raise ManifestError unless every artifact exists with the sha256 the manifest records."""
        for file_name, expected in sorted(self.artifacts.items()):
            path = folder / file_name
            if not path.is_file():
                raise ManifestError(f"{path}: artifact listed in the manifest is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise ManifestError(
                    f"{path}: sha256 {actual} does not match the manifest's {expected}; "
                    "the artifact was modified or the manifest is stale: re-export the model"
                )


FLAT_LAYOUT_VERSION = 1
"""The version a model folder in the flat layout (<name>/manifest.json, no version folder) stands for."""


@dataclass(frozen=True, slots=True)
class VersionFolder:
    """One version of one model in a repository: where its files are (they may be incomplete or broken)."""

    name: str
    version: int
    path: Path


def parse_version(text: str) -> int | None:
    """The version a folder name stands for (a positive decimal integer, no sign, no leading zero), else None."""
    if not text.isascii() or not text.isdigit() or text.startswith("0"):
        return None
    return int(text)


def version_folders(model_folder: Path) -> list[VersionFolder]:
    """Every version of one model folder, oldest first: its numbered folders, and the flat layout as version 1.

    A numbered folder counts even without a manifest, so that a half-copied version is reported as broken
    rather than silently skipped.
    """
    found: dict[int, Path] = {}
    if (model_folder / MANIFEST_FILE).is_file():
        found[FLAT_LAYOUT_VERSION] = model_folder
    for child in model_folder.iterdir():
        version = parse_version(child.name)
        if version is not None and child.is_dir():
            found[version] = child  # a 1/ folder wins over the flat layout
    return [VersionFolder(model_folder.name, version, found[version]) for version in sorted(found)]


def list_model_folders(repository: Path) -> list[Path]:
    """Model folders of a repository (those holding a manifest or a version folder), sorted by name; hidden
    folders are skipped."""
    if not repository.is_dir():
        raise ManifestError(f"{repository}: model repository does not exist or is not a directory")
    return sorted(
        child
        for child in repository.iterdir()
        if child.is_dir() and not child.name.startswith(".") and version_folders(child)
    )


def scan_repository(repository: Path) -> dict[str, list[VersionFolder]]:
    """Every model of a repository with its versions, oldest first (ManifestError if it is not a directory)."""
    return {folder.name: version_folders(folder) for folder in list_model_folders(repository)}


def latest_version_folder(repository: Path, name: str) -> Path:
    """The folder of a model's highest version (ManifestError if the model has none)."""
    folder = repository / name
    versions = version_folders(folder) if folder.is_dir() else []
    if not versions:
        raise ManifestError(f"{folder}: no versions of model {name!r}")
    return versions[-1].path


def next_version(repository: Path, name: str) -> int:
    """The version a new export of a model gets by default: one above the highest there is (1 for a new model)."""
    folder = repository / name
    versions = version_folders(folder) if folder.is_dir() else []
    return versions[-1].version + 1 if versions else 1
