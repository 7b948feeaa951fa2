"""The charrnn-loadgen command: flags -> LoadConfig -> run_load() -> a text or JSON report on stdout.

--serve-echo runs the echo server of clients.bench.echo instead (the transport baseline that --echo drives).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import grpc

from clients.bench import echo
from clients.client import parse_fields
from clients.errors import error_from_rpc
from clients.loadgen.config import LoadConfig
from clients.loadgen.fanout import run_load
from clients.security import ClientSecurity, ClientSecurityError, add_arguments


def _fields(text: str) -> tuple[str, ...]:
    try:
        return parse_fields(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    """The charrnn-loadgen command line."""
    parser = argparse.ArgumentParser(
        prog="charrnn-loadgen",
        description="Closed-loop load generator for charrnn-server: fixed concurrency and words per request.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--target", default="127.0.0.1:50051", help="server host:port")
    add("--model", default="lstm", help="model to encode with")
    add("--concurrency", type=int, default=1, help="requests outstanding at any time")
    add("--words-per-request", type=int, default=1, help="words in each request (or stream message)")
    add("--word-length", type=int, default=8, help="letters per word (random letters of the model's alphabet)")
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, default=5.0, help="seconds to measure")
    bound.add_argument("--requests", type=int, default=None, help="measured requests to send (instead of --duration)")
    add("--warmup", type=float, default=0.5, help="seconds of unmeasured load before measuring")
    add("--stream", action="store_true", help="drive EncodeStream: one stream per worker, one message in flight")
    add("--processes", type=int, default=1, help="spread the workers over this many processes")
    add("--timeout", type=float, default=120.0, help="per-RPC deadline in seconds")
    add("--seed", type=int, default=0, help="seed of the random words")
    add("--connections", type=int, default=1,
        help="TCP connections per process, the workers dealt round-robin over them: a server's --workers "
             "share connections out, not requests, so one connection reaches one worker")
    add("--fields", type=_fields, default=None, metavar="LIST",
        help="arrays each request asks for, comma-separated: outputs, hidden, cell (default: all)")
    add("--json", action="store_true", help="print the result as JSON")
    add("--echo", action="store_true", help="drive the echo server of --serve-echo instead of charrnn-server")
    add("--echo-response-bytes", type=int, default=0, help="with --echo: size of each echo response")
    add("--serve-echo", action="store_true",
        help="run the echo server (transport baseline, clients.bench.echo) instead of load")
    echo.add_arguments(parser, prefix="with --serve-echo: ")
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        security = ClientSecurity.from_args(args)
    except ClientSecurityError as error:
        parser.error(str(error))
    if args.serve_echo:
        echo.run(args.listen, args.port_file, args.run_model)
        return 0
    config = LoadConfig(
        target=args.target,
        model=args.model,
        concurrency=args.concurrency,
        words_per_request=args.words_per_request,
        word_length=args.word_length,
        duration_s=args.duration,
        requests=args.requests,
        stream=args.stream,
        processes=args.processes,
        warmup_s=args.warmup,
        echo=args.echo,
        echo_response_bytes=args.echo_response_bytes,
        timeout_s=args.timeout,
        seed=args.seed,
        security=security,
        fields=args.fields,
        connections=args.connections,
    )
    try:
        result = run_load(config)
    except grpc.RpcError as error:
        failure = error_from_rpc(error, security.tls)
        print(f"charrnn-loadgen: {args.target}: {failure.code.name}: {failure.details}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError, TimeoutError) as error:
        print(f"charrnn-loadgen: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json(), indent=2) if args.json else result.summary())
    return 0
