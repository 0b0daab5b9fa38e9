"""The gateway's own test proto (``tests/gateway/proto``), compiled once per test session
into a temporary directory: Python modules plus a descriptor set with source info."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import grpc_tools
from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = Path(tempfile.mkdtemp(prefix="echo-proto-"))
DESCRIPTOR_SET = OUT / "echo.binpb"


def _compile() -> ModuleType:
    include = Path(grpc_tools.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{HERE / 'proto'}",
            f"-I{ROOT / 'proto'}",
            f"-I{include}",
            f"--python_out={OUT}",
            f"--descriptor_set_out={DESCRIPTOR_SET}",
            "--include_imports",
            "--include_source_info",
            "echo/v1/echo.proto",
        ]
    )
    if code != 0:
        raise RuntimeError("protoc failed on the echo test proto")
    for package in (OUT / "echo", OUT / "echo" / "v1"):
        (package / "__init__.py").touch()
    sys.path.insert(0, os.fspath(OUT))
    return importlib.import_module("echo.v1.echo_pb2")


echo_pb2 = _compile()
