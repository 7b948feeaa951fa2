"""Shared fixtures: a model repository exported once per test session, and a user checkpoint with a large alphabet."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

from export.models import BUILTIN_SPECS, load_checkpoint, seeded_model
from export.repository import export_model

LARGE_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + "0123"  # 56 letters
LARGE_ALPHABET += "-"  # 57 letters, as in the issue
assert len(LARGE_ALPHABET) == 57 and len(set(LARGE_ALPHABET)) == 57

LARGE_MODEL = "large_lstm"


@pytest.fixture(scope="session")
def large_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state_dict of LSTM(57, 64, num_layers=2) saved the way users save theirs."""
    torch.manual_seed(1234)
    module = torch.nn.LSTM(input_size=len(LARGE_ALPHABET), hidden_size=64, num_layers=2)
    path = tmp_path_factory.mktemp("checkpoints") / "large_lstm.pt"
    torch.save(module.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory, large_checkpoint: Path) -> Path:
    """The three built-in models plus the checkpoint-imported large LSTM, exported once per session."""
    repository = tmp_path_factory.mktemp("model_repository")
    for spec in BUILTIN_SPECS.values():
        export_model(seeded_model(spec), repository)
    export_model(
        load_checkpoint(large_checkpoint, name=LARGE_MODEL, kind="lstm", alphabet=LARGE_ALPHABET), repository
    )
    return repository
