"""service/grpc_proto: the checked-in code is what protoc generates from the .proto, and it is Triton's wire format."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from grpc_tools import protoc
from tritonclient.grpc import service_pb2 as triton

from service.grpc_proto import open_inference_pb2 as ours
from service.grpc_server import SERVICE_NAME

ROOT = Path(__file__).resolve().parents[2]
PROTO = "service/grpc_proto/open_inference.proto"
GENERATED = ["open_inference_pb2.py", "open_inference_pb2.pyi"]


def test_the_checked_in_code_is_what_protoc_generates(tmp_path):
    (tmp_path / PROTO).parent.mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    # The command service/grpc_proto/__init__.py gives, run in a copy of the tree.
    status = protoc.main(["grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                          str(tmp_path / PROTO)])
    assert status == 0
    for name in GENERATED:
        fresh = (tmp_path / PROTO).with_name(name).read_text()
        assert fresh == (ROOT / PROTO).with_name(name).read_text(), (
            f"{name} is stale: regenerate it (service/grpc_proto/__init__.py says how)")


def messages(descriptor) -> dict:
    """Every message of a file, nested ones included, by name relative to the package."""
    found, queue = {}, list(descriptor.message_types_by_name.values())
    while queue:
        message = queue.pop()
        found[message.full_name.removeprefix(descriptor.package + ".")] = message
        queue.extend(message.nested_types)
    return found


@pytest.mark.parametrize("name", sorted(messages(ours.DESCRIPTOR)))
def test_each_message_has_tritons_field_numbers_and_types(name):
    mine, theirs = messages(ours.DESCRIPTOR)[name], messages(triton.DESCRIPTOR)[name]
    for field in mine.fields:
        other = theirs.fields_by_number[field.number]
        wire = (field.name, field.type, field.is_repeated)
        assert (other.name, other.type, other.is_repeated) == wire, field.full_name
        if field.message_type is not None:
            assert other.message_type.name == field.message_type.name


def test_the_service_is_served_under_tritons_name_with_its_rpcs():
    mine = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert SERVICE_NAME == theirs.full_name == "inference.GRPCInferenceService"
    for method in mine.methods:
        other = theirs.methods_by_name[method.name]
        assert (other.input_type.name, other.output_type.name) == (method.input_type.name, method.output_type.name)
