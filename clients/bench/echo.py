"""The transport baseline: a trivial grpc.aio service answering raw bytes, the floor any gRPC server stands on.

charrnn.bench.Echo is a generic handler (no protobuf parsing): each request starts with the size of the
response it wants (ECHO_HEADER_BYTES, little-endian) followed by the bytes of a real EncodeRequest, so requests
are as large as real ones, and the answer is a fixed payload of that size (the size of a real response).
charrnn-loadgen --echo drives it; the benchmark compares charrnn-server against it cell by cell.

With --run-model FOLDER (an exported model version: manifest.json + model.onnx) it is the *model floor*
instead: each request also runs the model once, on the event loop, over a batch shaped like the request's
words (their count and lengths, read once per distinct request), through the server's own ModelRuntime.run
(one-hot, onnxruntime, the server's session options) - and nothing else: no parsing, no checks, no response
built. No server that runs this model in its own process, one run per request, can cost less per request
than that (one that merges requests shares a run's fixed cost between them); python -m clients.bench.scaling
floors measures both echoes beside charrnn-server. The characters are not looked
up (charrnn-loadgen --echo sends words of "a"): every word runs as the alphabet's first letter, and the
run's cost does not depend on which letters it sees.

    python -m clients.bench.echo [--listen HOST:PORT] [--port-file FILE] [--run-model FOLDER]
    (or: charrnn-loadgen --serve-echo)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from clients.client import MAX_MESSAGE_BYTES

if TYPE_CHECKING:  # the model floor's types; the echo itself needs none of the server
    import numpy as np
    import numpy.typing as npt

    from server.core.runtime import RunOutputs

ECHO_SERVICE = "charrnn.bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
ECHO_STREAM_METHOD = f"/{ECHO_SERVICE}/EchoStream"
ECHO_HEADER_BYTES = 8
"""An echo request starts with the response size wanted (little-endian uint64), then a real request's bytes."""


def echo_request(request: bytes, response_bytes: int) -> bytes:
    """An echo request the size of `request` plus a header asking for a response of response_bytes."""
    return response_bytes.to_bytes(ECHO_HEADER_BYTES, "little") + request


MODEL_FEEDS_KEPT = 4096
"""Distinct requests whose run inputs the model floor keeps (charrnn-loadgen sends a few dozen); beyond that
it starts over."""


def model_runner(folder: Path) -> Callable[[bytes], RunOutputs]:
    """The model floor's work for one echo request: one run of the model in `folder` over the request's words
    (see the module doc); returns the run's outputs. Inputs are built once per distinct request and kept."""
    import numpy as np  # the server's dependencies, imported only for the model floor

    from export.manifest import Manifest
    from proto.charrnn.v1 import charrnn_pb2 as pb
    from server.core.alphabet import WordIndices
    from server.core.runtime import ModelRuntime

    runtime = ModelRuntime(folder, "cpu", name=Manifest.read(folder).name)
    runtime.warm_up()
    inputs: dict[bytes, tuple[WordIndices, npt.NDArray[np.float32], npt.NDArray[np.float32] | None]] = {}

    def prepare(request: bytes) -> tuple[WordIndices, npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
        words = pb.EncodeRequest.FromString(request[ECHO_HEADER_BYTES:]).words
        if not words:
            raise ValueError("the model floor needs requests with words")
        lengths = np.fromiter(map(len, words), dtype=np.int32, count=len(words))
        letters = WordIndices(np.zeros(int(lengths.sum()), dtype=np.int64), lengths, int(lengths.max()))
        h0 = runtime.zero_state(len(words))
        if len(inputs) >= MODEL_FEEDS_KEPT:
            inputs.clear()
        prepared = inputs[request] = (letters, h0, np.zeros_like(h0) if runtime.manifest.has_cell_state else None)
        return prepared

    def run(request: bytes) -> RunOutputs:
        return runtime.run(*(inputs.get(request) or prepare(request)))

    return run


async def serve_echo(
    port_file: Path | None = None, address: str = "127.0.0.1", port: int = 0,
    run_model: Callable[[bytes], object] | None = None,
) -> None:
    """A trivial grpc.aio server (generic handler, raw bytes): each request gets a fixed payload of the size
    its header asks for; with run_model (model_runner()), after that work (the runs are counted, and printed
    on stopping). Runs until SIGTERM/SIGINT; writes {"port": N} to port_file once serving."""
    payloads: dict[int, bytes] = {}
    runs = 0

    def payload(request: bytes) -> bytes:
        nonlocal runs
        if run_model is not None:
            run_model(request)
            runs += 1
        size = int.from_bytes(request[:ECHO_HEADER_BYTES], "little")
        data = payloads.get(size)
        if data is None:
            data = payloads[size] = bytes(size)
        return data

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return payload(request)

    async def echo_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            yield payload(request)

    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                ECHO_SERVICE,
                {
                    "Echo": grpc.unary_unary_rpc_method_handler(echo),
                    "EchoStream": grpc.stream_stream_rpc_method_handler(echo_stream),
                },
            ),
        )
    )
    bound = server.add_insecure_port(f"{address}:{port}")
    await server.start()
    if port_file is not None:
        port_file.write_text(json.dumps({"port": bound, "pid": os.getpid()}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)
    if run_model is not None:
        print(f"model floor: {runs} runs", flush=True)


def run(listen: str, port_file: Path | None, model: Path | None = None) -> None:
    """serve_echo() on host:port (port 0: any free port), until SIGTERM/SIGINT; with `model`, the model floor
    (a folder that does not load is a SystemExit naming it)."""
    run_model = None
    if model is not None:
        try:
            run_model = model_runner(model)
        except Exception as error:  # noqa: BLE001 - any reason the folder is not a model: said in one line
            raise SystemExit(f"--run-model {model}: not a loadable model version folder: {error}") from None
    host, _, port = listen.rpartition(":")
    asyncio.run(serve_echo(port_file, host or "127.0.0.1", int(port or 0), run_model))


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The echo server's flags (--listen, --port-file); charrnn-loadgen says they go with --serve-echo."""
    parser.add_argument("--listen", default="127.0.0.1:0",
                        help=f"{prefix}host:port to listen on (port 0: any free port)")
    parser.add_argument("--port-file", type=Path, default=None, help=f"{prefix}write the bound port here as JSON")
    parser.add_argument("--run-model", type=Path, default=None, metavar="FOLDER",
                        help=f"{prefix}the model floor: also run this exported model version once per request")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the echo server until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m clients.bench.echo", description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(args.listen, args.port_file, args.run_model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
