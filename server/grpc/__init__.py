"""gRPC front ends over the core, one module per protocol (charrnn_v1 and its codec), and the one place
that turns core errors into gRPC statuses with google.rpc details (status.py)."""
