"""The committed gRPC stubs are exactly what `make proto` generates from proto/ (no drift)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PROTO = Path("proto/charrnn/v1/charrnn.proto")
GENERATED = ("charrnn_pb2.py", "charrnn_pb2.pyi", "charrnn_pb2_grpc.py")


def test_generated_stubs_match_proto(tmp_path: Path) -> None:
    """Regenerate with the same command as the Makefile into a scratch tree and compare byte for byte."""
    (tmp_path / PROTO.parent).mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.",
         str(PROTO)],
        cwd=tmp_path, check=True, capture_output=True,
    )
    makefile = (ROOT / "Makefile").read_text()
    assert "--python_out=. --pyi_out=. --grpc_python_out=." in makefile, "Makefile and this test must agree"
    for name in GENERATED:
        fresh = (tmp_path / PROTO.parent / name).read_text()
        committed = (ROOT / PROTO.parent / name).read_text()
        assert fresh == committed, f"{PROTO.parent / name} is stale: run `make proto` and commit the result"


def test_enums_start_with_unspecified() -> None:
    """proto3 enums must have an UNSPECIFIED zero value."""
    from proto.charrnn.v1 import charrnn_pb2

    for enum in charrnn_pb2.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.name
