"""A kubelet's PodResources v1 API for tests: a real grpcio server, with the servicer generated
from agent/mpswatch/podresources/api.proto, on a unix socket in the test's directory.

    with FakePodResources(tmp_path / "kubelet.sock", {"team-a/vllm-a": {"vllm": ["GPU-...::0"]}}) as kubelet:
        ...
        kubelet.fail = grpc.StatusCode.PERMISSION_DENIED  # every List fails so from now on
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from mpswatch.podresources import api_pb2, api_pb2_grpc

Pods = dict[str, dict[str, list[str]]]  # "namespace/pod" -> container name -> device IDs given to it


def response_of(pods: Pods) -> api_pb2.ListPodResourcesResponse:
    """As the kubelet answers: every pod, each container with its nvidia.com/gpu devices (none: no entry)."""
    answer = api_pb2.ListPodResourcesResponse()
    for name, containers in pods.items():
        namespace, _, pod_name = name.partition("/")
        pod = answer.pod_resources.add(name=pod_name, namespace=namespace)
        for container_name, device_ids in containers.items():
            container = pod.containers.add(name=container_name)
            if device_ids:
                container.devices.add(resource_name="nvidia.com/gpu", device_ids=device_ids)
    return answer


class FakePodResources(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, socket: Path, pods: Pods) -> None:
        self.socket = socket
        self.pods = pods
        self.fail: grpc.StatusCode | None = None
        self.calls = 0
        self._server = grpc.server(ThreadPoolExecutor(max_workers=2))
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"unix://{socket}")
        self._server.start()

    def List(self, request, context):  # noqa: N802 - the generated servicer's name
        self.calls += 1
        if self.fail is not None:
            context.abort(self.fail, "refused by the test")
        return response_of(self.pods)

    def close(self) -> None:
        self._server.stop(None).wait()

    def __enter__(self) -> FakePodResources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
