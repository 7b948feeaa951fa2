"""The model floor of clients.bench.echo: one real onnxruntime run per echo request, shaped like the request's words."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clients.bench.echo import echo_request, model_runner
from clients.client import build_request
from export.manifest import Manifest
from server.core.runtime import ModelRuntime

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", ["lstm", "rnn_multi_layers"])
def test_each_request_runs_its_words_count_and_lengths_as_the_alphabets_first_letter(
    unit_repository: Path, name: str
) -> None:
    folder = unit_repository / name
    run = model_runner(folder)
    request = echo_request(build_request(name, ["aaaaa", "aa", "aaa"]).SerializeToString(), 99)
    outputs = run(request)
    runtime = ModelRuntime(folder, "cpu", name=Manifest.read(folder).name)
    first = runtime.manifest.alphabet[0]
    h0 = runtime.zero_state(3)
    expected = runtime.run(runtime.alphabet.indices([first * 5, first * 2, first * 3]), h0,
                           np.zeros_like(h0) if runtime.manifest.has_cell_state else None)
    assert outputs.outputs.shape == expected.outputs.shape == (3, 5, runtime.manifest.hidden_size)
    np.testing.assert_array_equal(outputs.outputs, expected.outputs)
    np.testing.assert_array_equal(outputs.h_n, expected.h_n)
    assert (outputs.c_n is None) == (not runtime.manifest.has_cell_state)
    again = run(request)  # the second time from the kept inputs: the same run
    np.testing.assert_array_equal(again.h_n, outputs.h_n)


def test_a_request_without_words_is_refused(unit_repository: Path) -> None:
    run = model_runner(unit_repository / "lstm")
    with pytest.raises(ValueError, match="needs requests with words"):
        run(echo_request(build_request("lstm", []).SerializeToString(), 10))
