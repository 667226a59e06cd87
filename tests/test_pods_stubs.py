"""The generated PodResources modules are exactly what the pinned grpcio-tools makes of api.proto,
and speak the kubelet's wire format: its method path and field numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mpswatch.podresources import api_pb2

AGENT = Path(__file__).resolve().parent.parent / "agent"
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")


def test_the_committed_stubs_are_what_grpcio_tools_generates_from_api_proto(tmp_path):
    run = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{AGENT}", f"--python_out={tmp_path}",
                          f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                          str(AGENT / "mpswatch" / "podresources" / "api.proto")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for name in GENERATED:
        assert (tmp_path / "mpswatch" / "podresources" / name).read_text() == \
            (AGENT / "mpswatch" / "podresources" / name).read_text(), f"{name}: regenerate (README, Dependencies)"


def test_the_stubs_keep_the_kubelets_service_and_field_numbers():
    service = api_pb2.DESCRIPTOR.services_by_name["PodResourcesLister"]
    assert service.full_name == "v1.PodResourcesLister" and service.methods_by_name["List"].input_type.name == \
        "ListPodResourcesRequest"
    numbers = {message: {f.name: f.number for f in api_pb2.DESCRIPTOR.message_types_by_name[message].fields}
               for message in ("ListPodResourcesResponse", "PodResources", "ContainerResources", "ContainerDevices")}
    assert numbers == {
        "ListPodResourcesResponse": {"pod_resources": 1},
        "PodResources": {"name": 1, "namespace": 2, "containers": 3},
        "ContainerResources": {"name": 1, "devices": 2},
        "ContainerDevices": {"resource_name": 1, "device_ids": 2},
    }
