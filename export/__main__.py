"""charrnn-export: write the built-in models, or a user's checkpoint, into a model repository."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DEFAULT_REPOSITORY = "./model_repository"


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags; each has an environment-variable default where operators need one."""
    parser = argparse.ArgumentParser(
        prog="charrnn-export",
        description=(
            "Export char-RNN models to TorchScript (model.pt) and ONNX (model.onnx) with a manifest. "
            "With no --checkpoint, exports the built-in models rnn, rnn_multi_layers and lstm (alphabet 'helo', "
            "weights from a fixed seed)."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("CHARRNN_REPOSITORY", DEFAULT_REPOSITORY)),
        help=f"model repository to write (env CHARRNN_REPOSITORY; default {DEFAULT_REPOSITORY})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the built-in models' weights (default 0)")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="export only this built-in model (repeatable)"
    )
    parser.add_argument(
        "--version", type=int, default=None, metavar="N",
        help="version to write, <out>/<name>/N/ (default: one above the model's highest version; 1 for a new model; "
             "an existing N is replaced once the new one is complete)",
    )
    user = parser.add_argument_group("a user's checkpoint (torch.save(module.state_dict(), PATH))")
    user.add_argument("--checkpoint", type=Path, help="state_dict of a torch.nn.RNN, LSTM or GRU")
    user.add_argument("--name", help="model name in the repository")
    user.add_argument("--kind", choices=["rnn", "lstm", "gru"], help="the module the state_dict came from")
    user.add_argument("--alphabet", help="the letters, in one-hot order; its length must equal the input size")
    user.add_argument(
        "--nonlinearity", choices=["tanh", "relu"], default=None, help="rnn only: the module's nonlinearity (default tanh)"
    )
    parser.add_argument("--log-level", default=os.environ.get("CHARRNN_LOG_LEVEL", "INFO"), help="logging level")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the export; exit status 0 on success, 2 on a user error (bad checkpoint, flags), 1 otherwise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    user_flags = {"--name": args.name, "--kind": args.kind, "--alphabet": args.alphabet}
    if args.checkpoint is None and any(value is not None for value in user_flags.values()):
        parser.error("--name, --kind and --alphabet go with --checkpoint")
    if args.checkpoint is not None:
        missing = [flag for flag, value in user_flags.items() if value is None]
        if missing:
            parser.error(f"--checkpoint needs {', '.join(missing)}")
        if args.only:
            parser.error("--only selects built-in models; it does not go with --checkpoint")
    elif args.nonlinearity is not None:
        parser.error("--nonlinearity goes with --checkpoint")
    if args.version is not None and args.version < 1:
        parser.error("--version must be at least 1")

    # Imported here so that --help answers without loading torch.
    from export.manifest import next_version
    from export.models import BUILTIN_SPECS, CheckpointError, load_checkpoint, seeded_model
    from export.repository import ParityError, export_model

    try:
        if args.checkpoint is not None:
            loaded = [
                load_checkpoint(
                    args.checkpoint,
                    name=args.name,
                    kind=args.kind,
                    alphabet=args.alphabet,
                    nonlinearity=args.nonlinearity,
                )
            ]
        else:
            names = args.only or list(BUILTIN_SPECS)
            unknown = [name for name in names if name not in BUILTIN_SPECS]
            if unknown:
                parser.error(f"unknown built-in model(s) {', '.join(unknown)}; choose from {', '.join(BUILTIN_SPECS)}")
            loaded = [seeded_model(BUILTIN_SPECS[name], args.seed) for name in names]
        for model in loaded:
            version = args.version if args.version is not None else next_version(args.out, model.spec.name)
            manifest = export_model(model, args.out, version)
            print(f"{manifest.name} version {version}: {args.out / manifest.name / str(version)}")
    except CheckpointError as error:
        print(f"charrnn-export: error: {error}", file=sys.stderr)
        return 2
    except ParityError as error:
        print(f"charrnn-export: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
