"""Print a compiled FileDescriptorProto back as .proto text: how grpc_service.proto and model_config.proto were
reconstructed from the descriptors tritonclient's wheel ships (see SOURCE.md).

    python proto/kserve/descriptor_to_proto.py tritonclient.grpc.service_pb2 > proto/kserve/grpc_service.proto

Covers what those two files use (proto3 messages, nested types, enums, maps, oneofs, services with streaming);
tests/test_proto.py checks that compiling the printed text gives back the same descriptor, byte for byte.
"""

from __future__ import annotations

import importlib
import sys

from google.protobuf import descriptor_pb2

F = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    F.TYPE_DOUBLE: "double", F.TYPE_FLOAT: "float", F.TYPE_INT64: "int64", F.TYPE_UINT64: "uint64",
    F.TYPE_INT32: "int32", F.TYPE_FIXED64: "fixed64", F.TYPE_FIXED32: "fixed32", F.TYPE_BOOL: "bool",
    F.TYPE_STRING: "string", F.TYPE_BYTES: "bytes", F.TYPE_UINT32: "uint32", F.TYPE_SFIXED32: "sfixed32",
    F.TYPE_SFIXED64: "sfixed64", F.TYPE_SINT32: "sint32", F.TYPE_SINT64: "sint64",
}
HEADER = """\
// Copyright (c) 2020, NVIDIA CORPORATION. All rights reserved. (the licence text of the tritonclient wheel)
//
// Redistribution and use in source and binary forms, with or without
// modification, are permitted provided that the following conditions
// are met:
//  * Redistributions of source code must retain the above copyright
//    notice, this list of conditions and the following disclaimer.
//  * Redistributions in binary form must reproduce the above copyright
//    notice, this list of conditions and the following disclaimer in the
//    documentation and/or other materials provided with the distribution.
//  * Neither the name of NVIDIA CORPORATION nor the names of its
//    contributors may be used to endorse or promote products derived
//    from this software without specific prior written permission.
//
// THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS ``AS IS'' AND ANY
// EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
// IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR
// PURPOSE ARE DISCLAIMED.  IN NO EVENT SHALL THE COPYRIGHT OWNER OR
// CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL,
// EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO,
// PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR
// PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY
// OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT
// (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
// OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.

// Triton Inference Server's {name} (triton-inference-server/common, protobuf/{name}),
// reconstructed from the compiled descriptor in the tritonclient {version} wheel
// (tritonclient/grpc/{module}.py) by proto/kserve/descriptor_to_proto.py: the definitions are the
// original's, its comments are not (see proto/kserve/SOURCE.md).
"""


def type_name(name: str, package: str) -> str:
    prefix = f".{package}."
    return name[len(prefix):] if name.startswith(prefix) else name


def field_type(field: descriptor_pb2.FieldDescriptorProto, package: str) -> str:
    return SCALARS.get(field.type) or type_name(field.type_name, package)


def print_enum(enum: descriptor_pb2.EnumDescriptorProto, indent: str, out: list[str]) -> None:
    out.append(f"{indent}enum {enum.name} {{")
    if enum.options.allow_alias:
        out.append(f"{indent}  option allow_alias = true;")
    for value in enum.value:
        out.append(f"{indent}  {value.name} = {value.number};")
    out.append(f"{indent}}}")


def print_message(message: descriptor_pb2.DescriptorProto, package: str, indent: str, out: list[str]) -> None:
    out.append(f"{indent}message {message.name} {{")
    inner = indent + "  "
    entries = {nested.name: nested for nested in message.nested_type if nested.options.map_entry}
    for enum in message.enum_type:
        print_enum(enum, inner, out)
    for nested in message.nested_type:
        if not nested.options.map_entry:
            print_message(nested, package, inner, out)
    printed_oneofs: set[int] = set()

    def line(field: descriptor_pb2.FieldDescriptorProto, at: str) -> str:
        entry = entries.get(field.type_name.rsplit(".", 1)[-1]) if field.type == F.TYPE_MESSAGE else None
        if entry is not None and field.label == F.LABEL_REPEATED:
            key, value = entry.field
            kind = f"map<{field_type(key, package)}, {field_type(value, package)}>"
        else:
            label = "repeated " if field.label == F.LABEL_REPEATED else ""
            label = "optional " if field.proto3_optional else label
            kind = f"{label}{field_type(field, package)}"
        options = []
        if field.options.HasField("packed"):
            options.append(f"packed = {'true' if field.options.packed else 'false'}")
        if field.options.deprecated:
            options.append("deprecated = true")
        suffix = f" [{', '.join(options)}]" if options else ""
        return f"{at}{kind} {field.name} = {field.number}{suffix};"

    for field in message.field:
        if field.HasField("oneof_index") and not field.proto3_optional:
            if field.oneof_index in printed_oneofs:
                continue
            printed_oneofs.add(field.oneof_index)
            out.append(f"{inner}oneof {message.oneof_decl[field.oneof_index].name} {{")
            for member in message.field:
                if member.HasField("oneof_index") and member.oneof_index == field.oneof_index:
                    out.append(line(member, inner + "  "))
            out.append(f"{inner}}}")
        else:
            out.append(line(field, inner))
    for reserved in message.reserved_range:
        end = reserved.end - 1
        out.append(f"{inner}reserved {reserved.start}{'' if end == reserved.start else f' to {end}'};")
    if message.reserved_name:
        out.append(f"{inner}reserved {', '.join(repr(name).replace(chr(39), chr(34)) for name in message.reserved_name)};")
    out.append(f"{indent}}}")


def to_proto(file: descriptor_pb2.FileDescriptorProto, module: str, version: str) -> str:
    """The .proto text of one file."""
    out = [HEADER.format(name=file.name, version=version, module=module.rsplit(".", 1)[-1]).rstrip("\n"), ""]
    out.append(f'syntax = "{file.syntax or "proto2"}";')
    out.append("")
    out.append(f"package {file.package};")
    out.append("")
    for dependency in file.dependency:
        out.append(f'import "{dependency}";')
    if file.dependency:
        out.append("")
    for enum in file.enum_type:
        print_enum(enum, "", out)
        out.append("")
    for message in file.message_type:
        print_message(message, file.package, "", out)
        out.append("")
    for service in file.service:
        out.append(f"service {service.name} {{")
        for method in service.method:
            request = ("stream " if method.client_streaming else "") + type_name(method.input_type, file.package)
            response = ("stream " if method.server_streaming else "") + type_name(method.output_type, file.package)
            out.append(f"  rpc {method.name}({request}) returns ({response}) {{}}")
        out.append("}")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    """Print the .proto text of the descriptor in the named _pb2 module."""
    module = argv[1]
    from importlib.metadata import version

    compiled = descriptor_pb2.FileDescriptorProto()
    importlib.import_module(module).DESCRIPTOR.CopyToProto(compiled)
    sys.stdout.write(to_proto(compiled, module, version(module.split(".")[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
