"""The serving core: word -> indices -> dynamic batch -> onnxruntime -> per-word results.

Knows nothing of any wire protocol: no grpc and no protobuf import anywhere in this package
(tests/test_layout.py enforces it). Front ends (server/grpc/) translate their messages to Engine calls.
"""
