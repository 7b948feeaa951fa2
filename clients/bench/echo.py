"""The transport baseline: a trivial grpc.aio service answering raw bytes, the floor any gRPC server stands on.

charrnn.bench.Echo is a generic handler (no protobuf parsing): each request starts with the size of the
response it wants (ECHO_HEADER_BYTES, little-endian) followed by the bytes of a real EncodeRequest, so requests
are as large as real ones, and the answer is a fixed payload of that size (the size of a real response).
charrnn-loadgen --echo drives it; the benchmark compares charrnn-server against it cell by cell.

    python -m clients.bench.echo [--listen HOST:PORT] [--port-file FILE]     (or: charrnn-loadgen --serve-echo)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc

from clients.client import MAX_MESSAGE_BYTES

ECHO_SERVICE = "charrnn.bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
ECHO_STREAM_METHOD = f"/{ECHO_SERVICE}/EchoStream"
ECHO_HEADER_BYTES = 8
"""An echo request starts with the response size wanted (little-endian uint64), then a real request's bytes."""


def echo_request(request: bytes, response_bytes: int) -> bytes:
    """An echo request the size of `request` plus a header asking for a response of response_bytes."""
    return response_bytes.to_bytes(ECHO_HEADER_BYTES, "little") + request


async def serve_echo(port_file: Path | None = None, address: str = "127.0.0.1", port: int = 0) -> None:
    """A trivial grpc.aio server (generic handler, raw bytes): each request gets a fixed payload of the size
    its header asks for. Runs until SIGTERM/SIGINT; writes {"port": N} to port_file once serving."""
    payloads: dict[int, bytes] = {}

    def payload(request: bytes) -> bytes:
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


def run(listen: str, port_file: Path | None) -> None:
    """serve_echo() on host:port (port 0: any free port), until SIGTERM/SIGINT."""
    host, _, port = listen.rpartition(":")
    asyncio.run(serve_echo(port_file, host or "127.0.0.1", int(port or 0)))


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The echo server's flags (--listen, --port-file); charrnn-loadgen says they go with --serve-echo."""
    parser.add_argument("--listen", default="127.0.0.1:0",
                        help=f"{prefix}host:port to listen on (port 0: any free port)")
    parser.add_argument("--port-file", type=Path, default=None, help=f"{prefix}write the bound port here as JSON")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the echo server until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m clients.bench.echo", description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(args.listen, args.port_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
