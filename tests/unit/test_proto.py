"""The committed gRPC code is exactly what scripts/gen-proto generates from our api.proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.message import Message

from nvdp.kubelet._proto import api_pb2 as pb

ROOT = Path(__file__).parents[2]
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py", "api_pb2_grpc.pyi")


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    env = {**os.environ, "PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run([str(ROOT / "scripts/gen-proto"), str(tmp_path)], check=True, env=env, capture_output=True)
    for name in GENERATED:
        fresh = (tmp_path / "nvdp/kubelet/_proto" / name).read_text()
        committed = (ROOT / "src/nvdp/kubelet/_proto" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto`"


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        pytest.param(pb.DevicePluginOptions, {"pre_start_required": 1, "get_preferred_allocation_available": 2},
                     id="DevicePluginOptions"),
        pytest.param(pb.RegisterRequest, {"version": 1, "endpoint": 2, "resource_name": 3, "options": 4},
                     id="RegisterRequest"),
        pytest.param(pb.Device, {"ID": 1, "health": 2, "topology": 3}, id="Device"),
        pytest.param(pb.ContainerPreferredAllocationRequest,
                     {"available_deviceIDs": 1, "must_include_deviceIDs": 2, "allocation_size": 3},
                     id="ContainerPreferredAllocationRequest"),
        pytest.param(pb.ContainerAllocateResponse,
                     {"envs": 1, "mounts": 2, "devices": 3, "annotations": 4, "cdi_devices": 5},
                     id="ContainerAllocateResponse"),
        pytest.param(pb.Mount, {"container_path": 1, "host_path": 2, "read_only": 3}, id="Mount"),
        pytest.param(pb.DeviceSpec, {"container_path": 1, "host_path": 2, "permissions": 3}, id="DeviceSpec"),
        pytest.param(pb.NUMANode, {"ID": 1}, id="NUMANode"),
    ],
)
def test_wire_field_numbers(message: type[Message], fields: dict[str, int]) -> None:
    descriptor = message.DESCRIPTOR
    assert {f.name: f.number for f in descriptor.fields} == fields


def test_service_paths() -> None:
    services = pb.DESCRIPTOR.services_by_name
    assert services["Registration"].full_name == "v1beta1.Registration"
    assert set(services["DevicePlugin"].methods_by_name) == {
        "GetDevicePluginOptions", "ListAndWatch", "GetPreferredAllocation", "Allocate", "PreStartContainer",
    }
