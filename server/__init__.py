"""charrnn-server: core/ (wire-free engine), grpc/ (protocol front ends), config, metrics, main (lifecycle)."""
