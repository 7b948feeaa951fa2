"""k8s/kserve/: the ServingRuntime and InferenceService manifests, checked as YAML against the CRD fields.

No cluster runs them (k8s/kserve/README.md). The schemas are the KServe and Kubernetes Python SDKs' model
classes, generated from the CRDs' and the Kubernetes API's OpenAPI: each class lists its fields'
JSON names (attribute_map) and types (openapi_types). They are read from the wheels (pip download, no install,
nothing imported) with ast, and every key of the manifests is looked up, recursively, with its type.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[1]
KSERVE = "kserve==0.21.0"
KUBERNETES = "kubernetes==37.0.2"
PROTOCOL_VERSIONS = ("v1", "v2", "grpc-v1", "grpc-v2")
"""KServe's protocol versions (constants.InferenceServiceProtocol in its Go API)."""


class Schemas:
    """Model classes of the two SDKs, by class name: (JSON name -> type) of each."""

    def __init__(self, wheels: list[Path]) -> None:
        self.files: dict[str, str] = {}
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                for name in archive.namelist():
                    if re.fullmatch(r"(kserve/models|kubernetes/client/models)/v1\w*\.py", name):
                        source = archive.read(name).decode()
                        for class_name in re.findall(r"^class (\w+)\(", source, re.M):
                            self.files[class_name] = source

    def fields(self, class_name: str) -> dict[str, str]:
        """JSON field name -> openapi type of one model class."""
        source = self.files[class_name]
        found: dict[str, dict[str, str]] = {}
        for node in ast.walk(ast.parse(source)):
            # `openapi_types = {...}` (kserve) or `openapi_types: ClassVar[...] = {...}` (kubernetes)
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            if isinstance(target, ast.Name) and target.id in ("openapi_types", "attribute_map") and node.value:
                found[target.id] = ast.literal_eval(node.value)
        return {found["attribute_map"][attr]: kind for attr, kind in found["openapi_types"].items()}

    def check(self, value: Any, kind: str, path: str) -> None:
        """Fail naming the path of the first key or value that the schema does not allow."""
        if kind.startswith(("list[", "List[")):
            assert isinstance(value, list), f"{path}: expected a list"
            for index, item in enumerate(value):
                self.check(item, kind[5:-1], f"{path}[{index}]")
        elif kind.startswith(("dict(", "Dict[")):
            assert isinstance(value, dict) and all(isinstance(v, str) for v in value.values()), f"{path}: {kind}"
        elif kind in ("str", "int", "bool"):
            assert isinstance(value, {"str": str, "int": int, "bool": bool}[kind]), f"{path}: expected {kind}"
        elif kind in ("object", "Quantity"):  # resource quantities: a string or a number
            assert isinstance(value, (str, int, float)), f"{path}: expected a quantity"
        else:
            assert isinstance(value, dict), f"{path}: expected an object ({kind})"
            fields = self.fields(kind)
            for key, item in value.items():
                assert key in fields, f"{path}.{key}: no such field in {kind} (fields: {', '.join(sorted(fields))})"
                self.check(item, fields[key], f"{path}.{key}")


@pytest.fixture(scope="module")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> Schemas:
    folder = tmp_path_factory.mktemp("sdk_wheels")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder), KSERVE, KUBERNETES],
                   check=True, capture_output=True)
    return Schemas(sorted(folder.glob("*.whl")))


def manifest(name: str) -> dict[str, Any]:
    documents = list(yaml.safe_load_all((ROOT / "k8s" / "kserve" / name).read_text()))
    assert len(documents) == 1
    return documents[0]


def test_serving_runtime_uses_only_crd_fields_and_speaks_grpc_v2(schemas: Schemas) -> None:
    runtime = manifest("servingruntime.yaml")
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    schemas.check(runtime, "V1alpha1ServingRuntime", "ServingRuntime")
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["grpc-v2"]
    container = spec["containers"][0]
    assert container["ports"] == [{"name": "h2c", "containerPort": 8081, "protocol": "TCP"}]
    assert container["args"][container["args"].index("--repository") + 1] == "/mnt/models"
    assert container["args"][container["args"].index("--port") + 1] == "8081"
    assert container["readinessProbe"]["grpc"] == {"port": 8081, "service": "inference.GRPCInferenceService"}


def test_inference_service_uses_only_crd_fields_and_the_runtime(schemas: Schemas) -> None:
    service = manifest("inferenceservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    schemas.check(service, "V1beta1InferenceService", "InferenceService")
    model = service["spec"]["predictor"]["model"]
    runtime = manifest("servingruntime.yaml")
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in PROTOCOL_VERSIONS and model["protocolVersion"] in runtime["spec"]["protocolVersions"]


def test_the_checker_rejects_a_field_the_crd_does_not_have(schemas: Schemas) -> None:
    wrong = manifest("inferenceservice.yaml")
    wrong["spec"]["predictor"]["model"]["protocol"] = "grpc-v2"
    with pytest.raises(AssertionError, match=r"model\.protocol: no such field"):
        schemas.check(wrong, "V1beta1InferenceService", "InferenceService")
