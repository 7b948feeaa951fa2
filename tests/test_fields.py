"""EncodeRequest.fields end to end, in process: the Python client, the CLI, charrnn-batch and charrnn-loadgen
ask for some arrays only and get exactly those (equal to the full response's), in smaller responses.

The codec's byte-level check of every selection is tests/test_codec.py; these run over real loopback gRPC
against tests/onnx_models.py's torch-free models.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clients.batch.cli import main as batch_main
from clients.cli import main as cli_main
from clients.client import FIELDS, CharRnnClient, EncodeRequest, parse_fields
from clients.loadgen.config import LoadConfig
from clients.loadgen.fanout import run_load
from tests.helpers import InProcessServer

pytestmark = pytest.mark.unit

WORDS = ["hello", "h", "oleh", "hell"]


@pytest.fixture(scope="module")
def served(unit_repository: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(unit_repository)
    yield server
    server.stop()


SELECTIONS = [combo for size in range(1, 4) for combo in itertools.combinations(FIELDS, size)]


@pytest.mark.parametrize("model", ["lstm", "gru"])
def test_the_client_gets_exactly_the_arrays_it_asks_for(served: InProcessServer, model: str) -> None:
    with CharRnnClient(served.target) as client:
        full = client.encode(model, WORDS)
        for fields in SELECTIONS:
            for encoding, whole in zip(client.encode(model, WORDS, fields=fields), full, strict=True):
                assert encoding.word == whole.word and encoding.version == whole.version
                for name in FIELDS:
                    got, want = getattr(encoding, name), getattr(whole, name)
                    if name in fields and want is not None:  # a GRU has no cell whatever is asked
                        np.testing.assert_array_equal(got, want)
                    else:
                        assert got is None, (fields, name)
        streamed = list(client.encode_stream([EncodeRequest(model, WORDS, fields=("hidden",))]))
        assert [e.outputs for e in streamed[0]] == [None] * len(WORDS)
        for encoding, whole in zip(streamed[0], full, strict=True):
            np.testing.assert_array_equal(encoding.hidden, whole.hidden)


def test_parse_fields() -> None:
    assert parse_fields("hidden") == ("hidden",)
    assert parse_fields("outputs, cell") == ("outputs", "cell")
    assert parse_fields("all") == FIELDS
    with pytest.raises(ValueError, match="unknown field"):
        parse_fields("hiden")


def test_cli_fields(served: InProcessServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--target", served.target, "encode", "--model", "lstm", "--fields", "hidden", "--json", "hello"]) == 0
    (record,) = json.loads(capsys.readouterr().out)["results"]
    assert set(record) == {"word", "version", "hidden"}
    assert cli_main(["--target", served.target, "encode", "--model", "lstm", "--fields", "hidden,cell", "hello"]) == 0
    table = capsys.readouterr().out
    assert "hidden (final" in table and "cell (final" in table and "outputs" not in table


def test_batch_fields(served: InProcessServer, tmp_path: Path) -> None:
    source, output = tmp_path / "words.txt", tmp_path / "out.jsonl"
    source.write_text("\n".join(WORDS * 10) + "\n")
    code = batch_main(["--target", served.target, "--model", "lstm", "--input", str(source), "--output", str(output),
                       "--fields", "hidden", "--quiet"])
    assert code == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 40 and all(set(record) == {"index", "word", "version", "hidden"} for record in records)


def test_loadgen_fields_make_responses_smaller(served: InProcessServer) -> None:
    sizes = {}
    for fields in (None, ("hidden",)):
        result = run_load(LoadConfig(served.target, "lstm", words_per_request=32, requests=20, warmup_s=0, fields=fields))
        assert result.requests == 20 and result.errors == {}
        sizes[fields] = result.response_bytes
    assert sizes[("hidden",)] < sizes[None] / 2, sizes
