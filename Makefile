# Generated gRPC stubs are committed; regenerate them after editing proto/ with `make proto`.
PYTHON ?= python
PROTO := proto/charrnn/v1/charrnn.proto
PROTOC_OUT := --python_out=. --pyi_out=. --grpc_python_out=.
# The vendored Open Inference Protocol (KServe V2 / Triton) proto, compiled under its canonical file names
# (grpc_service.proto imports "model_config.proto"), so that its descriptors are the very ones tritonclient
# registers: both can live in one process. protoc writes `import model_config_pb2`; the sed makes that a
# package import.
KSERVE := proto/kserve
KSERVE_PROTOS := grpc_service.proto model_config.proto

.PHONY: proto
proto:
	$(PYTHON) -m grpc_tools.protoc -I . $(PROTOC_OUT) $(PROTO)
	$(PYTHON) -m grpc_tools.protoc -I $(KSERVE) --python_out=$(KSERVE) --pyi_out=$(KSERVE) --grpc_python_out=$(KSERVE) \
		$(addprefix $(KSERVE)/,$(KSERVE_PROTOS))
	sed -i -E 's/^import (grpc_service|model_config)_pb2 as/from proto.kserve import \1_pb2 as/' $(KSERVE)/*_pb2*.py*

# The export and CPU server images with no registry and no index in the build (docs/deployment.md):
# a Debian base from mmdebstrap, a wheelhouse from pip, `docker build --network none`. Needs a Docker engine.
.PHONY: offline-images
offline-images:
	bash docker/offline-images.sh

# Workers 1/2/4/8 on a lent GPU machine (16 cores, Python 3.12 with numpy, onnxruntime, psutil and tqdm, no
# package index; docs/performance.md, "Workers on a lent 16-core machine"). Here: `make device-prepare` puts
# the wheels it lacks in .whl/ and the exported built-ins in .bench-repo/ (both git-ignored). There, with both
# carried, one run: `make device-workers OUT=$OUT`; the section and the raw rows land in $(OUT).
DEVICE_WHEELS := grpcio==1.85.4 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 grpcio-status==1.85.3 \
	protobuf==7.36.2 googleapis-common-protos==1.76.0 prometheus-client==0.26.0 typing-extensions==4.16.0
DEVICE_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
OUT ?= /tmp/device-out
DEVICE_WORKERS ?= 1,2,4,8
DEVICE_SERVER_CPUS ?= 0-7
DEVICE_CLIENT_CPUS ?= 8-15

.PHONY: device-prepare device-workers
device-prepare:
	rm -rf .whl .bench-repo
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(DEVICE_PLATFORMS) -d .whl $(DEVICE_WHEELS)
	$(PYTHON) -m export --out .bench-repo

device-workers:
	mkdir -p $(OUT)
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
	(nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true) | tee $(OUT)/gpu.txt
	PYTHONPATH=/tmp/site:$(CURDIR) python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" | tee -a $(OUT)/gpu.txt
	PYTHONPATH=/tmp/site:$(CURDIR) PYTHONUNBUFFERED=1 python3 -m clients.bench.scaling --out $(OUT)/performance.md \
		workers --workers $(DEVICE_WORKERS) --repeats 2 --duration 3 --device auto --server-cpus $(DEVICE_SERVER_CPUS) \
		--client-cpus $(DEVICE_CLIENT_CPUS) --client-processes 8 --repository .bench-repo --json $(OUT)/workers.json >$(OUT)/workers.log 2>&1; \
		status=$$?; tail -n 40 $(OUT)/workers.log; exit $$status
