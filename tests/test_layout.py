"""The architecture's import rules (docs/architecture.md), checked on the source and in fresh interpreters.

- server/core/ imports neither grpc nor protobuf (nor the generated stubs): a new front end never touches it.
- The serving path imports no torch: `import server.main` in a fresh interpreter leaves torch unloaded, and so
  does the manifest format the server reads from export/.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
WIRE_MODULES = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "google.protobuf", "google.rpc", "proto")


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of the file names (relative imports resolved to server.core)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "" if node.level == 0 else f"server.core.{node.module or ''}")
    return names


def is_wire(module: str) -> bool:
    return any(module == wire or module.startswith(f"{wire}.") for wire in WIRE_MODULES)


def test_the_core_imports_no_grpc_and_no_protobuf_in_its_source() -> None:
    files = sorted((ROOT / "server" / "core").glob("*.py"))
    assert len(files) >= 6
    offending = {
        str(path.relative_to(ROOT)): sorted(filter(is_wire, imported_modules(path))) for path in files
    }
    assert {name: wires for name, wires in offending.items() if wires} == {}


def loaded_after(statement: str) -> set[str]:
    """Top-level module names loaded by a fresh interpreter after running the statement."""
    script = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    output = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return set(output.split())


def test_importing_the_whole_core_loads_no_grpc_and_no_protobuf() -> None:
    modules = loaded_after("import server.core.alphabet, server.core.batcher, server.core.engine, "
                           "server.core.errors, server.core.runtime")
    assert sorted(filter(is_wire, modules)) == []


def test_the_serving_path_loads_no_torch() -> None:
    modules = loaded_after("import server.main, server.grpc.charrnn_v1, export.manifest, clients.client")
    assert "server.main" in modules
    assert sorted(module for module in modules if module.split(".")[0] in ("torch", "onnx")) == []


def test_a_core_import_of_grpc_would_be_caught(tmp_path: Path) -> None:
    """The source check is not vacuous: it sees the kinds of import a slip would add."""
    sample = tmp_path / "sample.py"
    sample.write_text("import grpc\nfrom google.protobuf import message\nfrom proto.charrnn.v1 import charrnn_pb2\n")
    assert sorted(filter(is_wire, imported_modules(sample))) == ["google.protobuf", "grpc", "proto.charrnn.v1"]
