"""The hand-written charrnn.v1 wire codec against protobuf's own API, and against the descriptor.

encode_response() (the fast path) must write exactly the bytes of reference_response() (built field by field),
on every path it has (the per-word loop: few words, reported bad words, non-ASCII; the vectorised build: one
length group, several), and must write every field the descriptor has: a field added to the .proto and not
to the codec fails here.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor

from proto.charrnn.v1 import charrnn_pb2 as pb
from server.core.batcher import BatchSettings
from server.core.engine import Engine, Limits
from server.core.runtime import ModelRuntime, load_repository
from server.grpc.charrnn_v1_codec import (
    ALL_FIELDS,
    ResultFields,
    encode_response,
    field_tag,
    initial_state,
    reference_response,
    result_fields,
)

pytestmark = pytest.mark.unit

MODELS = ("rnn", "rnn_multi_layers", "lstm", "gru", "wide_lstm")


@pytest.fixture(scope="module")
def runtimes(unit_repository: Path) -> dict[str, ModelRuntime]:
    return load_repository(unit_repository, "cpu")


def request_shapes(rng: random.Random, letters: str) -> Iterator[list[str]]:
    """Requests that take every path of the serialiser."""
    for _ in range(15):  # mixed, with bad words: the loop
        yield [
            "".join(rng.choice(letters + "xé😀") for _ in range(rng.choice([0, 1, 3, 25, rng.randint(1, 20)])))
            for _ in range(rng.randint(1, 30))
        ]
    for count in (20, 64, 300):  # all one length: one block
        length = rng.randint(1, 20)
        yield ["".join(rng.choice(letters) for _ in range(length)) for _ in range(count)]
    for count in (60, 400):  # a few lengths: blocks joined in request order
        yield ["".join(rng.choice(letters) for _ in range(rng.choice([2, 7, 19]))) for _ in range(count)]


SELECTIONS = [ResultFields(o, h, c) for o in (True, False) for h in (True, False) for c in (True, False)]
"""Every EncodeRequest.fields selection (ALL_FIELDS first)."""


def encode_all_shapes(
    runtimes: dict[str, ModelRuntime], model: str, fields: ResultFields = ALL_FIELDS
) -> list[tuple[bytes, pb.EncodeResponse]]:
    """(fast-path bytes, reference message) for every request shape, with the arrays `fields` selects."""
    rng = random.Random(7)
    letters = runtimes[model].manifest.alphabet

    async def scenario() -> list[tuple[bytes, pb.EncodeResponse]]:
        engine = Engine(runtimes, Limits(max_words=4096, max_word_length=20), BatchSettings(1024, 0.0, 65536))
        engine.start()
        pairs = []
        for words in request_shapes(rng, letters):
            rows = await engine.encode_rows(model, words, report_invalid=True)
            data = encode_response(rows, time.perf_counter(), fields)
            total_ms = pb.EncodeResponse.FromString(data).timing.total_ms
            pairs.append((data, reference_response(rows, total_ms, fields)))
        await engine.close()
        return pairs

    return asyncio.run(scenario())


@pytest.mark.parametrize("fields", SELECTIONS, ids=lambda f: f"o{f.outputs:d}h{f.hidden:d}c{f.cell:d}")
@pytest.mark.parametrize("model", MODELS)
def test_hand_serialised_response_equals_the_field_by_field_message(
    runtimes: dict[str, ModelRuntime], model: str, fields: ResultFields
) -> None:
    for data, expected in encode_all_shapes(runtimes, model, fields):
        response = pb.EncodeResponse.FromString(data)
        assert response.timing.total_ms > 0
        assert response == expected
        # Byte for byte too, but for Timing: the codec writes its doubles even when zero, protobuf omits those.
        body = pb.EncodeResponse()
        body.CopyFrom(expected)
        body.ClearField("timing")
        assert data.startswith(body.SerializeToString())
        timing = pb.EncodeResponse.FromString(data[len(body.SerializeToString()) :])
        assert timing == pb.EncodeResponse(timing=expected.timing)


def fields_present(message: pb.EncodeResponse) -> dict[str, set[str]]:
    """The fields set anywhere in a response, by message type name."""
    seen: dict[str, set[str]] = {}

    def visit(item: object) -> None:
        descriptor: Descriptor = item.DESCRIPTOR  # type: ignore[attr-defined]
        names = seen.setdefault(descriptor.name, set())
        for field, value in item.ListFields():  # type: ignore[attr-defined]
            names.add(field.name)
            if field.message_type is not None:
                for child in value if field.is_repeated else [value]:
                    visit(child)

    visit(message)
    return seen


def test_the_fast_path_writes_every_field_the_descriptor_has(runtimes: dict[str, ModelRuntime]) -> None:
    seen: dict[str, set[str]] = {}
    for data, _ in encode_all_shapes(runtimes, "lstm"):  # an LSTM: cell too; bad words reported: error too
        for name, fields in fields_present(pb.EncodeResponse.FromString(data)).items():
            seen.setdefault(name, set()).update(fields)
    for descriptor in (pb.EncodeResponse.DESCRIPTOR, pb.WordResult.DESCRIPTOR, pb.Timing.DESCRIPTOR):
        declared = {field.name for field in descriptor.fields}
        assert seen.get(descriptor.name) == declared, (
            f"{descriptor.name}: the .proto declares {sorted(declared)}, the codec writes "
            f"{sorted(seen.get(descriptor.name, set()))}: add the field to server/grpc/charrnn_v1_codec.py"
        )


@pytest.mark.parametrize("fields", SELECTIONS[1:], ids=lambda f: f"o{f.outputs:d}h{f.hidden:d}c{f.cell:d}")
def test_a_selection_writes_exactly_the_arrays_it_names(runtimes: dict[str, ModelRuntime], fields: ResultFields) -> None:
    """The other side of the descriptor check: what is not selected is never written, on any path; what is
    selected always is (an LSTM, so cell too)."""
    arrays = {"outputs": fields.outputs, "hidden": fields.hidden, "cell": fields.cell}
    seen: set[str] = set()
    for data, _ in encode_all_shapes(runtimes, "lstm", fields):
        for result in pb.EncodeResponse.FromString(data).results:
            present = {field.name for field, _ in result.ListFields()}
            seen |= present
            assert {"word", "length"} <= present or result.error
            if not result.error:
                assert {name for name in arrays if name in present} == {name for name, on in arrays.items() if on}
    assert {name for name in arrays if name in seen} == {name for name, on in arrays.items() if on}


def test_result_fields_from_the_request() -> None:
    assert result_fields([]) == ALL_FIELDS
    assert result_fields([pb.RESULT_FIELD_HIDDEN]) == ResultFields(False, True, False)
    assert result_fields([pb.RESULT_FIELD_CELL, pb.RESULT_FIELD_OUTPUTS]) == ResultFields(True, False, True)
    assert result_fields([pb.RESULT_FIELD_UNSPECIFIED]) == ResultFields(False, False, False)


def test_tags_come_from_the_descriptor() -> None:
    assert field_tag(pb.WordResult.DESCRIPTOR, "word") == b"\x0a"  # 1, length-delimited
    assert field_tag(pb.WordResult.DESCRIPTOR, "length") == b"\x10"  # 2, varint
    assert field_tag(pb.WordResult.DESCRIPTOR, "outputs") == b"\x1a"  # 3, packed floats
    assert field_tag(pb.Timing.DESCRIPTOR, "total_ms") == b"\x19"  # 3, 64-bit


@pytest.mark.parametrize("cell", [True, False])
def test_initial_state_reads_the_packed_floats(cell: bool) -> None:
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=6).astype(np.float32)
    cell_values = rng.normal(size=6).astype(np.float32)
    state = pb.State(hidden=hidden.tolist(), cell=cell_values.tolist() if cell else [])
    decoded = initial_state(state)
    np.testing.assert_array_equal(decoded.hidden, hidden)
    if cell:
        assert decoded.cell is not None
        np.testing.assert_array_equal(decoded.cell, cell_values)
    else:
        assert decoded.cell is None
    empty = initial_state(pb.State())
    assert empty.hidden.size == 0 and empty.cell is None
