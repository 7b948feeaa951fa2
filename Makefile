# Generated gRPC stubs are committed; regenerate them after editing proto/ with `make proto`.
PYTHON ?= python
PROTO := proto/charrnn/v1/charrnn.proto

.PHONY: proto
proto:
	$(PYTHON) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)
