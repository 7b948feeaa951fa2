"""The requests a load run sends: random words of the model's alphabet, serialised once, up front.

Workers cycle through a pool of DISTINCT_REQUESTS serialised requests (fewer for very large ones, so the pool
stays under POOL_WORD_BUDGET words), so that building requests is not what the run measures. Responses are not
parsed either: only the first of each worker is decoded and checked (check_response).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clients.client import build_request
from clients.security import PLAINTEXT, ClientSecurity
from proto.charrnn.v1 import charrnn_pb2 as pb

ENCODE_METHOD = "/charrnn.v1.CharRnn/Encode"
STREAM_METHOD = "/charrnn.v1.CharRnn/EncodeStream"
GET_MODEL_METHOD = "/charrnn.v1.CharRnn/GetModel"
DISTINCT_REQUESTS = 64
"""Distinct requests in the pool the workers cycle through (fewer for very large requests)."""
POOL_WORD_BUDGET = 65536


def fetch_alphabet(target: str, model: str, timeout_s: float = 10.0, security: ClientSecurity = PLAINTEXT) -> str:
    """The model's alphabet, from GetModel."""
    with security.channel(target) as channel:
        get = channel.unary_unary(
            GET_MODEL_METHOD,
            request_serializer=pb.GetModelRequest.SerializeToString,
            response_deserializer=pb.ModelMetadata.FromString,
        )
        metadata: pb.ModelMetadata = get(pb.GetModelRequest(name=model), timeout=timeout_s, wait_for_ready=True)
    return metadata.alphabet


def build_request_pool(
    model: str, alphabet: str, words_per_request: int, word_length: int, seed: int = 0,
    fields: Sequence[str] | None = None,
) -> list[bytes]:
    """Serialised EncodeRequests of random words, all of the same size, asking for `fields` (None: all)."""
    rng = np.random.default_rng(seed)
    count = max(1, min(DISTINCT_REQUESTS, POOL_WORD_BUDGET // max(1, words_per_request)))
    letters = np.array(list(alphabet))
    pool = []
    for _ in range(count):
        picks = letters[rng.integers(0, len(letters), size=(words_per_request, word_length))]
        words = ["".join(row) for row in picks]
        pool.append(build_request(model, words, fields=fields).SerializeToString())
    return pool


def check_response(data: bytes, words: int) -> None:
    """Raise RuntimeError unless a response's bytes hold `words` results, none of them an error."""
    response = pb.EncodeResponse.FromString(data)
    if len(response.results) != words:
        raise RuntimeError(f"the server answered {len(response.results)} results for {words} words")
    bad = next((result for result in response.results if result.error), None)
    if bad is not None:
        raise RuntimeError(f"the server rejected word {bad.word!r}: {bad.error}")
