"""The Open Inference Protocol's gRPC messages: open_inference.proto and the Python code protoc generates from it.

The generated files are checked in (the serving image has no protoc); after editing the .proto, regenerate them
from the repository root with grpcio-tools (the dev extra):

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. service/grpc_proto/open_inference.proto

tests/service/test_grpc_proto.py runs the same command and fails when the checked-in files differ.
"""
