"""k8s/: the manifests checked as YAML against the API fields: k8s/kserve/ (ServingRuntime, InferenceService:
the CRDs' fields) and k8s/base, k8s/gpu, k8s/tls (Deployment, Services, HPA, PDB, Secrets: Kubernetes' own).

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
                    if re.fullmatch(r"(kserve/models|kubernetes/client/models)/v[12]\w*\.py", name):
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
        """Fail naming the path of the first key or value that the schema does not allow (None: a strategic
        merge patch deleting the key)."""
        if value is None:
            return
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


# ---- k8s/base, k8s/gpu, k8s/tls: plain Kubernetes objects ---------------------------------------------------------

KINDS = {
    ("apps/v1", "Deployment"): "V1Deployment",
    ("v1", "Service"): "V1Service",
    ("v1", "Secret"): "V1Secret",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
}
OVERLAYS = ("base", "gpu", "tls")


def documents(folder: str) -> dict[str, list[dict[str, Any]]]:
    """Every YAML file of a kustomization folder but kustomization.yaml: file name -> its documents."""
    return {
        path.name: [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        for path in sorted((ROOT / "k8s" / folder).glob("*.yaml")) if path.name != "kustomization.yaml"
    }


def kustomization(folder: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "k8s" / folder / "kustomization.yaml").read_text())


def server_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server"]
    return container


def base_deployment() -> dict[str, Any]:
    (deployment,) = documents("base")["deployment.yaml"]
    return deployment


@pytest.mark.parametrize("folder", OVERLAYS)
def test_manifests_use_only_kubernetes_fields(schemas: Schemas, folder: str) -> None:
    """Every object (patches too: a patch may only name real fields) against the Kubernetes 37 SDK's models."""
    for name, docs in documents(folder).items():
        for doc in docs:
            kind = KINDS[(doc["apiVersion"], doc["kind"])]
            schemas.check(doc, kind, f"{folder}/{name}:{doc['kind']}")


@pytest.mark.parametrize("folder", OVERLAYS)
def test_kustomizations_name_files_that_exist(folder: str) -> None:
    config = kustomization(folder)
    assert config["kind"] == "Kustomization"
    for entry in config.get("resources", []) + [p["path"] for p in config.get("patches", [])]:
        assert (ROOT / "k8s" / folder / entry).exists(), f"k8s/{folder}: {entry} does not exist"
    if folder != "base":
        assert config["resources"][0] == "../base"


def test_the_checker_rejects_a_field_kubernetes_does_not_have(schemas: Schemas) -> None:
    wrong = base_deployment()
    server_container(wrong)["readinessProbe"]["grpc"]["tls"] = True
    with pytest.raises(AssertionError, match=r"grpc\.tls: no such field"):
        schemas.check(wrong, "V1Deployment", "Deployment")


def test_deployment_exports_then_serves_read_only_with_grpc_probes() -> None:
    deployment = base_deployment()
    pod = deployment["spec"]["template"]["spec"]
    (export,) = pod["initContainers"]
    assert export["image"].startswith("charrnn-export:") and export["args"] == ["--out", "/models"]
    server = server_container(deployment)
    args = server["args"]
    repository = args[args.index("--repository") + 1]
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert mounts[repository]["readOnly"] is True
    assert {m["mountPath"]: m["name"] for m in export["volumeMounts"]}[repository] == mounts[repository]["name"]
    port = int(args[args.index("--port") + 1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == port, f"{probe}: kubelet's native gRPC probe on the served port"
    grace = float(args[args.index("--grace-seconds") + 1])
    assert pod["terminationGracePeriodSeconds"] > grace, "SIGKILL must come after the drain"
    assert float(args[args.index("--max-connection-age-s") + 1]) > 0, "connections rebalance over new replicas"


def test_pods_run_non_root_read_only_without_capabilities() -> None:
    pod = base_deployment()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    for container in pod["initContainers"] + pod["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert container["resources"]["limits"]["memory"] and container["resources"]["limits"]["cpu"]
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, "a writable /tmp"


def test_services_hpa_and_pdb_select_the_deployment() -> None:
    deployment = base_deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = documents("base")["service.yaml"]
    assert {s["metadata"]["name"] for s in services} == {"charrnn-server", "charrnn-server-headless"}
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
    (headless,) = [s for s in services if s["metadata"]["name"].endswith("-headless")]
    assert headless["spec"]["clusterIP"] == "None", "DNS returns every pod: client-side round_robin"
    (hpa,) = documents("base")["hpa.yaml"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    (pdb,) = documents("base")["pdb.yaml"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain can always evict one pod"


def test_gpu_variant_asks_for_a_gpu_and_cuda() -> None:
    (patch,) = documents("gpu")["deployment-gpu.yaml"]
    server = server_container(patch)
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = server["args"]
    assert args[args.index("--device") + 1] == "cuda"
    assert server["image"].startswith("charrnn-server:"), "the CUDA image"
    base_args = server_container(base_deployment())["args"]
    assert args == base_args[: base_args.index("--device") + 1] + ["cuda"] + base_args[base_args.index("--device") + 2 :]


def test_tls_variant_mounts_the_secrets_and_probes_over_tls() -> None:
    from server.config import parse_config

    files = documents("tls")
    secrets = {s["metadata"]["name"]: s for s in files["secrets.yaml"]}
    (patch,) = files["deployment-tls.yaml"]
    server = server_container(patch)
    volumes = {v["name"]: v["secret"]["secretName"] for v in patch["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in server["volumeMounts"]}
    assert set(volumes.values()) == set(secrets)
    assert secrets["charrnn-tls"]["type"] == "kubernetes.io/tls"
    environment = {e["name"]: e["value"] for e in server["env"]}
    config = parse_config(server_container(base_deployment())["args"], environ=environment)

    def secret_key(path: Path) -> tuple[str, str]:
        return mounts[str(path.parent)], path.name

    assert secret_key(config.tls_cert) == ("charrnn-tls", "tls.crt")
    assert secret_key(config.tls_key) == ("charrnn-tls", "tls.key")
    assert secret_key(config.auth_token_file) == ("charrnn-tokens", "tokens.txt")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"] is None, f"{probe}: kubelet's gRPC probe has no TLS; the patch removes it"
        command = server[probe]["exec"]["command"]
        assert command[0] == "charrnn" and command[-1] == "health"
        ca = Path(command[command.index("--tls-ca") + 1])
        assert secret_key(ca) == ("charrnn-tokens", "ca.crt")
        assert "--token-file" not in command, "grpc.health.v1 is open"
