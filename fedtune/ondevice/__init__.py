"""Everything a phone runs or downloads: the artifacts, the engines, the gRPC protocol.

``artifacts`` builds the ONNX files on the server (it imports torch, lazily);
``engines`` and ``proto`` are what the device side needs (numpy, ONNX Runtime, grpcio).
Importing this package imports nothing heavy, so the device client stays torch-free.
"""
