"""Print the project's dependencies (and extras) as a requirements file, onnxruntime-gpu swapped if asked.

The images install these from a wheelhouse or an index, then the project itself with --no-deps: a CPU image
gets the plain `onnxruntime` wheel (tens of MB) in place of `onnxruntime-gpu` (hundreds, with CUDA kernels
it never runs). `docker/offline-images.sh` downloads the wheelhouse from the same list. Standard library only.

    python3 docker/requirements.py [--onnxruntime onnxruntime] [--extra export] [pyproject.toml]
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib

GPU_PACKAGE = "onnxruntime-gpu"


def requirements(pyproject: dict, onnxruntime: str, extras: list[str]) -> list[str]:
    """Dependencies, then each extra's, without self-references; onnxruntime-gpu replaced by `onnxruntime`."""
    project = pyproject["project"]
    found: list[str] = []
    for requirement in project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]:
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
        if name == project["name"]:
            continue
        if name == GPU_PACKAGE:
            requirement = onnxruntime + requirement[len(name):]
        found.append(requirement)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", nargs="?", default="pyproject.toml")
    parser.add_argument("--onnxruntime", default=GPU_PACKAGE, choices=(GPU_PACKAGE, "onnxruntime"),
                        help="the onnxruntime distribution to install (default onnxruntime-gpu)")
    parser.add_argument("--extra", action="append", default=[], help="add an extra's requirements (repeatable)")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as file:
        print("\n".join(requirements(tomllib.load(file), args.onnxruntime, args.extra)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
