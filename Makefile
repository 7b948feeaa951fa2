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
