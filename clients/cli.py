"""charrnn: the command-line client of a charrnn-server (encode words, list models, check health).

    charrnn [--target HOST:PORT] [--timeout S] [SECURITY] encode --model NAME [--version N] [--json] [WORD ...]
    charrnn [--target HOST:PORT] [--timeout S] models [--json]
    charrnn [--target HOST:PORT] [--timeout S] health [--service NAME]

SECURITY (before the command, like --target): --tls, --tls-ca PEM, --tls-cert PEM --tls-key PEM (mTLS),
--token-file FILE (default: $CHARRNN_TOKEN). The target defaults to $CHARRNN_TARGET, else 127.0.0.1:50051. `encode` without WORD arguments reads one word per
line from stdin (an empty line is an empty word, which the server rejects; the newline ending the last line is
not a word; a trailing carriage return is dropped from each line).

Exit status:
    0  success (health: the server reports SERVING)
    1  health reports anything but SERVING; or an RPC failed with any other code (UNAVAILABLE,
       DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, ...); or stdout was closed early (`| head`)
    2  the server rejected the request: INVALID_ARGUMENT (bad word, no words) or NOT_FOUND (unknown model);
       also a bad command line (argparse)
    130 interrupted (Ctrl-C)
An RPC error is reported on stderr as `charrnn: error: <CODE> (<REASON>): <server message>`, without a
traceback; the reason (the server's ErrorInfo reason, e.g. WORD_NOT_IN_ALPHABET) is left out when the error
did not come from the server's handlers (unreachable server, client-side deadline, health service).
"""

from __future__ import annotations

import os

# Before grpc loads: its core logs every failed TLS handshake at INFO on stderr, and the CLI's one error line
# (clients.security.tls_failure) says it once, clearly. An explicit GRPC_VERBOSITY still wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import TextIO  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

from clients.client import DEFAULT_TIMEOUT_S, CharRnnClient, CharRnnError, Encoding, parse_fields  # noqa: E402
from clients.errors import is_request_error  # noqa: E402
from clients.security import ClientSecurity, ClientSecurityError, add_arguments  # noqa: E402

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "CHARRNN_TARGET"
DECIMALS = 6

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_REQUEST = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The charrnn command line."""
    parser = argparse.ArgumentParser(
        prog="charrnn",
        description="Command-line client of a charrnn-server.",
        epilog="exit status: 0 ok; 1 not SERVING or an RPC error; 2 INVALID_ARGUMENT/NOT_FOUND or bad usage",
    )
    parser.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
        help=f"server address HOST:PORT (default: ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S,
        help=f"seconds each RPC may take, retries included (default: {DEFAULT_TIMEOUT_S:g})",
    )
    add_arguments(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    encode = commands.add_parser(
        "encode", help="encode words with a model",
        description="Encode words with a model. Without WORD arguments, words are read from stdin, one per line.",
    )
    encode.add_argument("--model", required=True, help="model name (see `charrnn models`)")
    encode.add_argument("--json", action="store_true", help="print JSON instead of a table")
    encode.add_argument("--version", type=int, default=0, metavar="N",
                        help="encode with this loaded version of the model (default: the model's default version)")
    encode.add_argument("--fields", type=_fields, default=None, metavar="LIST",
                        help="arrays to ask for, comma-separated: outputs, hidden, cell (default: all)")
    encode.add_argument("words", nargs="*", metavar="WORD", help="words to encode (default: one per line from stdin)")

    models = commands.add_parser("models", help="list the server's models", description="List the server's models.")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")

    health = commands.add_parser(
        "health", help="print the server's health status; exit 0 iff SERVING",
        description="Print the health service's status; exit 0 iff SERVING (usable as a container healthcheck).",
    )
    health.add_argument("--service", default="", help="service to check (default: the server as a whole)")
    return parser


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def read_words(stream: TextIO) -> list[str]:
    """One word per line; an empty line is an empty word, but the newline ending the input is not a word."""
    lines = stream.read().split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


# ---- formatting -------------------------------------------------------------------------------------------------


def _fields(text: str) -> tuple[str, ...]:
    try:
        return parse_fields(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _numbers(values: npt.NDArray[np.float32]) -> str:
    return "  ".join(f"{float(value):+.{DECIMALS}f}" for value in values)


def format_encoding(model: str, encoding: Encoding) -> str:
    """A readable block for one word: outputs per character, final hidden (and cell) per layer."""
    word = encoding.word
    lines = [f"{model}: {word!r}, length {len(word)}"]
    labels = [f"{index:>3} {char!r}" for index, char in enumerate(word)]
    width = max([len(label) for label in labels] + [len("layer 00")])
    if encoding.outputs is not None:
        lines.append("  outputs (per character)")
        lines += [f"    {label:<{width}}  {_numbers(row)}" for label, row in zip(labels, encoding.outputs, strict=True)]
    if encoding.hidden is not None:
        lines.append("  hidden (final, per layer)")
        lines += [f"    {f'layer {layer}':<{width}}  {_numbers(row)}" for layer, row in enumerate(encoding.hidden)]
    if encoding.cell is not None:
        lines.append("  cell (final, per layer)")
        lines += [f"    {f'layer {layer}':<{width}}  {_numbers(row)}" for layer, row in enumerate(encoding.cell)]
    return "\n".join(lines)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    )


# ---- commands ---------------------------------------------------------------------------------------------------


def _encode(client: CharRnnClient, args: argparse.Namespace) -> int:
    words: list[str] = args.words if args.words else read_words(sys.stdin)
    encodings = client.encode(args.model, words, version=args.version, fields=args.fields)
    if args.json:
        print(json.dumps({"model": args.model, "results": [encoding.to_json() for encoding in encodings]}))
    else:
        print("\n\n".join(format_encoding(args.model, encoding) for encoding in encodings))
    return EXIT_OK


def _models(client: CharRnnClient, args: argparse.Namespace) -> int:
    models = client.models()
    if args.json:
        print(json.dumps({"models": [model.to_json() for model in models]}))
        return EXIT_OK
    header = ("NAME", "KIND", "INPUT", "HIDDEN", "LAYERS", "ALPHABET", "PROVIDER")
    rows = [
        (m.name, m.kind, str(m.input_size), str(m.hidden_size), str(m.num_layers), m.alphabet, m.execution_provider)
        for m in models
    ]
    print(format_table(header, rows))
    return EXIT_OK


def _health(client: CharRnnClient, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    print(status)
    return EXIT_OK if status == "SERVING" else EXIT_FAILURE


_COMMANDS = {"encode": _encode, "models": _models, "health": _health}


def exit_code(error: CharRnnError) -> int:
    """2 when the server rejected the request itself (INVALID_ARGUMENT, NOT_FOUND), 1 for any other failure."""
    return EXIT_BAD_REQUEST if is_request_error(error.code) else EXIT_FAILURE


def error_line(error: CharRnnError) -> str:
    """The one stderr line for a failed RPC: code, the server's reason if it sent one, and its message."""
    reason = f" ({error.reason})" if error.reason else ""
    return f"charrnn: error: {error.code.name}{reason}: {error.details}"


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        security = ClientSecurity.from_args(args)
    except ClientSecurityError as error:
        parser.error(str(error))
    try:
        with CharRnnClient(args.target, timeout=args.timeout, security=security) as client:
            return _COMMANDS[args.command](client, args)
    except CharRnnError as error:
        print(error_line(error), file=sys.stderr)
        return exit_code(error)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`charrnn ... | head`): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
