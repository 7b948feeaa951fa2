"""The committed gRPC stubs are exactly what `make proto` generates from proto/ (no drift), and the vendored Open
Inference Protocol proto is the one tritonclient speaks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PROTOS = {
    Path("proto/charrnn/v1/charrnn.proto"): ("charrnn_pb2.py", "charrnn_pb2.pyi", "charrnn_pb2_grpc.py"),
    Path("proto/kserve/grpc_service.proto"): ("grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py"),
    Path("proto/kserve/model_config.proto"): ("model_config_pb2.py", "model_config_pb2.pyi", "model_config_pb2_grpc.py"),
}


def test_generated_stubs_match_proto(tmp_path: Path) -> None:
    """Run the Makefile's own `make proto` in a scratch tree holding only the .proto files; compare byte for byte."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for proto in PROTOS:
        (tmp_path / proto.parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / proto, tmp_path / proto)
    subprocess.run(["make", "proto", f"PYTHON={sys.executable}"], cwd=tmp_path, check=True, capture_output=True)
    for proto, generated in PROTOS.items():
        for name in generated:
            fresh = (tmp_path / proto.parent / name).read_text()
            committed = (ROOT / proto.parent / name).read_text()
            assert fresh == committed, f"{proto.parent / name} is stale: run `make proto` and commit the result"


def test_enums_start_with_unspecified() -> None:
    """proto3 enums must have an UNSPECIFIED zero value (our own proto; the vendored one is as it is)."""
    from proto.charrnn.v1 import charrnn_pb2

    for enum in charrnn_pb2.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.name


@pytest.mark.parametrize("ours, theirs", [
    ("proto.kserve.grpc_service_pb2", "tritonclient.grpc.service_pb2"),
    ("proto.kserve.model_config_pb2", "tritonclient.grpc.model_config_pb2"),
])
def test_the_vendored_proto_is_tritonclients(ours: str, theirs: str) -> None:
    """Byte-identical descriptors: the same protocol, and one descriptor pool entry shared with tritonclient."""
    import importlib

    from google.protobuf import descriptor_pb2

    compiled = []
    for name in (ours, theirs):
        file = descriptor_pb2.FileDescriptorProto()
        importlib.import_module(name).DESCRIPTOR.CopyToProto(file)
        compiled.append(file.SerializeToString())
    assert compiled[0] == compiled[1]
    assert importlib.import_module(ours).DESCRIPTOR is importlib.import_module(theirs).DESCRIPTOR


def test_the_vendored_proto_text_is_what_the_reconstruction_prints() -> None:
    """proto/kserve/*.proto are descriptor_to_proto.py's output for tritonclient's descriptors (SOURCE.md)."""
    for module, proto in (("tritonclient.grpc.service_pb2", "grpc_service.proto"),
                          ("tritonclient.grpc.model_config_pb2", "model_config.proto")):
        printed = subprocess.run(
            [sys.executable, "proto/kserve/descriptor_to_proto.py", module], cwd=ROOT, check=True,
            capture_output=True, text=True,
        ).stdout
        assert printed == (ROOT / "proto/kserve" / proto).read_text(), proto
