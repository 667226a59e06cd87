"""Pods collector: which Kubernetes pod and container each process of the node runs in.

Three sources, read here and joined in mpswatch.derive (docs/kubernetes.md says in which order and
where each fails):
  - every process's `/proc/<pid>/cgroup`, whose path names the pod's UID and the container's ID under
    both kubelet cgroup drivers (systemd and cgroupfs), cgroup v1 and v2;
  - each container's environment, read once per container: HOSTNAME (the pod's name unless the pod
    sets a hostname) and the service-account namespace file in its root;
  - the kubelet's PodResources v1 `List` on its unix socket: every pod's namespace, name, containers
    and the devices each container was given. grpc is imported only when the socket is there, so a
    node off Kubernetes loads nothing more.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import structlog

from mpswatch.collectors import CollectorUnit
from mpswatch.metrics import Families
from mpswatch.procfs import ProcFS
from mpswatch.snapshot import (
    ContainerAssignment,
    ContainerEnv,
    DerivedFacts,
    PodCgroup,
    PodIdentity,
    PodResourcesState,
    PodsData,
    frozen_map,
)
from mpswatch.verdicts import StatusSection

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"  # in the container's root
MAX_SYMLINKS = 16
CGROUP_FILE_LIMIT = 64 << 10

_UID = r"([0-9a-f][0-9a-f_-]{7,63})"
_CONTAINER_ID = r"([0-9a-f]{12,128})"
# systemd driver: kubepods[-<qos>]-pod<uid with _>.slice; kind and other nested kubelets prefix it
# (kubelet-kubepods-...); containerd without its own scope writes `<pod slice>:cri-containerd:<id>`
_POD_SLICE = re.compile(rf"^(?:[a-z0-9-]*-)?kubepods(?:-[a-z]+)?-pod{_UID}\.slice(?::[a-z-]+:{_CONTAINER_ID})?$")
_CONTAINER_SCOPE = re.compile(rf"^(?:cri-containerd|crio|docker|cri-dockerd)-{_CONTAINER_ID}\.scope$")
# cgroupfs driver: kubepods/[<qos>/]pod<uid>/<container id>
_POD_DIR = re.compile(rf"^pod{_UID}$")
_CONTAINER_DIR = re.compile(rf"^{_CONTAINER_ID}$")
_QOS_DIRS = ("burstable", "besteffort")
# a DNS-1123 label (pod names are subdomains: dots allowed), as the kubelet's names are
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


# ---------------------------------------------------------------- pure parsers


def _pod_of_path(path: str) -> PodCgroup | None:
    parts = [part for part in path.split("/") if part]
    for i, part in enumerate(parts):
        below = parts[i + 1] if i + 1 < len(parts) else ""
        slice_match = _POD_SLICE.match(part)
        if slice_match is not None:
            scope = _CONTAINER_SCOPE.match(below)
            container = slice_match.group(2) or (scope.group(1) if scope else None)
            return PodCgroup(slice_match.group(1).replace("_", "-"), container)
        pod_dir = _POD_DIR.match(part)
        if pod_dir is not None and i > 0 and (parts[i - 1] == "kubepods" or
                                              (parts[i - 1] in _QOS_DIRS and i > 1 and parts[i - 2] == "kubepods")):
            container_dir = _CONTAINER_DIR.match(below)
            return PodCgroup(pod_dir.group(1), container_dir.group(1) if container_dir else None)
    return None


def parse_cgroup(text: str) -> PodCgroup | None:
    """The pod of a process from its /proc/<pid>/cgroup (v2's one `0::` line, or v1's line per
    hierarchy): the first line inside a container, else the first in a pod's own cgroup; None when
    no line names a pod."""
    pod_level = None
    for line in text.splitlines():
        _, _, path = line.partition(":")
        _, sep, path = path.partition(":")
        found = _pod_of_path(path.lower()) if sep else None
        if found is not None and found.container_id is not None:
            return found
        pod_level = pod_level or found
    return pod_level


def container_env(environ: dict[str, str], namespace_file: str | None) -> ContainerEnv:
    """HOSTNAME and the service-account namespace, each only when it is a valid Kubernetes name."""
    hostname = environ.get("HOSTNAME", "").strip()
    namespace = (namespace_file or "").strip()
    return ContainerEnv(hostname if _NAME.match(hostname) else None,
                        namespace if _NAME.match(namespace) and len(namespace) <= 63 else None)


def assignments_of(response: Any) -> tuple[ContainerAssignment, ...]:
    """A PodResources ListPodResourcesResponse as one row per container."""
    return tuple(
        ContainerAssignment(pod.namespace, pod.name, container.name,
                            tuple(device_id for devices in container.devices for device_id in devices.device_ids))
        for pod in response.pod_resources
        for container in pod.containers
    )


# ---------------------------------------------------------------- the kubelet's PodResources API


class PodResourcesError(Exception):
    """A failed List; `reason` is a short, bounded label value: the gRPC status code's name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


ListPods = Callable[[str, float], tuple[ContainerAssignment, ...]]


def list_pod_resources(socket: str, timeout: float) -> tuple[ContainerAssignment, ...]:
    """One PodResources v1 List on the kubelet's unix socket, within `timeout` seconds. grpc and the
    generated stubs are imported here, on the first call: never on a node without the socket."""
    import grpc

    from mpswatch.podresources import api_pb2, api_pb2_grpc

    with grpc.insecure_channel(f"unix://{socket}") as channel:
        try:
            response = api_pb2_grpc.PodResourcesListerStub(channel).List(api_pb2.ListPodResourcesRequest(),
                                                                         timeout=timeout)
        except grpc.RpcError as err:  # raised by a call: a grpc.Call, with its status code
            raise PodResourcesError(err.code().name.lower(), str(err.details())) from None
    return assignments_of(response)


# ---------------------------------------------------------------- the collector


class PodsCollector:
    name = "pods"

    def __init__(
        self,
        *,
        pod_resources_socket: str,
        interval_seconds: float = 5.0,
        timeout_seconds: float = 2.0,
        max_processes: int = 4096,
        procfs: ProcFS | None = None,
        list_pods: ListPods = list_pod_resources,
    ) -> None:
        self.interval_seconds = interval_seconds
        self.deadline_seconds = timeout_seconds + 3.0
        self._socket = pod_resources_socket
        self._timeout = timeout_seconds
        self._max_processes = max_processes
        self._procfs = procfs or ProcFS()
        self._list_pods = list_pods
        self._environments: dict[str, ContainerEnv | None] = {}  # container ID -> env: read once per container
        self._failures: dict[str, int] = {}
        self._last_error: str | None = None
        self._log = structlog.get_logger().bind(collector=self.name)

    def collect(self) -> PodsData:
        processes, cut = self._pod_processes()
        notes = []
        if cut:
            notes.append(f"more than {self._max_processes} processes in pods: the others were not looked at "
                         "(pods.max_processes)")
        environments = self._read_environments(processes)
        unreadable = sum(1 for env in environments.values() if env is None)
        if unreadable:
            notes.append(f"the environment of {unreadable} container(s) is unreadable (needs CAP_SYS_PTRACE and, for "
                         "another user's process, CAP_DAC_READ_SEARCH): their pods are named from their GPUs where "
                         "that is unambiguous")
        assignments, state = self._pod_resources()
        return PodsData(frozen_map(processes), frozen_map(environments), assignments, state, tuple(notes))

    def _pod_processes(self) -> tuple[dict[int, PodCgroup], bool]:
        """Every visible process in a pod's cgroup, at most max_processes of them; whether some were cut."""
        found: dict[int, PodCgroup] = {}
        for pid in self._procfs.pids():
            pod = parse_cgroup(self._procfs.read_text(f"{pid}/cgroup", CGROUP_FILE_LIMIT) or "")
            if pod is None:
                continue
            if len(found) == self._max_processes:
                return found, True
            found[pid] = pod
        return found, False

    def _read_environments(self, processes: dict[int, PodCgroup]) -> dict[str, ContainerEnv | None]:
        """Each container's environment from its first process, read when the container is first
        seen (a container's pod never changes) and forgotten when it is gone."""
        first: dict[str, int] = {}
        for pid, pod in sorted(processes.items()):
            if pod.container_id is not None:
                first.setdefault(pod.container_id, pid)
        self._environments = {cid: env for cid, env in self._environments.items() if cid in first}
        for cid, pid in first.items():
            if cid in self._environments:
                continue
            try:
                environ = self._procfs.environ(pid)
            except PermissionError:
                self._environments[cid] = None
                continue
            if environ is not None:  # None: the process is gone; its container is read next cycle
                self._environments[cid] = container_env(environ, self._read_in_root(pid, NAMESPACE_FILE))
        return dict(self._environments)

    def _read_in_root(self, pid: int, path: str) -> str | None:
        """A small file of the process's root filesystem, its symlinks resolved inside that root: read
        through /proc/<pid>/root, an absolute link (images' /var/run -> /run) would otherwise point
        into the agent's own filesystem."""
        root = f"{self._procfs.root}/{pid}/root"
        parts = [p for p in path.split("/") if p]
        resolved: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part in (".", ".."):
                resolved = resolved[:-1] if part == ".." else resolved
                continue
            try:
                target = os.readlink("/".join([root, *resolved, part]))
            except OSError:  # not a link (or not there: the read below says so)
                resolved.append(part)
                continue
            hops += 1
            if hops > MAX_SYMLINKS:
                return None
            resolved = [] if target.startswith("/") else resolved
            parts = [p for p in target.split("/") if p] + parts
        return self._procfs.read_text("/".join([str(pid), "root", *resolved]), 256)

    def _pod_resources(self) -> tuple[tuple[ContainerAssignment, ...] | None, PodResourcesState]:
        if not os.path.exists(self._socket):
            return None, PodResourcesState(self._socket, failures=frozen_map(self._failures))
        try:
            assignments = self._list_pods(self._socket, self._timeout)
        except PodResourcesError as err:
            self._failures[err.reason] = self._failures.get(err.reason, 0) + 1
            error = f"{err.reason}: {err.detail}"[:300]
            if self._last_error is None or not self._last_error.startswith(err.reason):
                self._log.warning("pod_resources_failed", socket=self._socket, reason=err.reason, detail=err.detail)
            self._last_error = error
            return None, PodResourcesState(self._socket, False, error, frozen_map(self._failures))
        if self._last_error is not None:
            self._log.info("pod_resources_answered", socket=self._socket)
        self._last_error = None
        return assignments, PodResourcesState(self._socket, True, None, frozen_map(self._failures))


# ---------------------------------------------------------------- metrics and status


def _identity_labels(identity: PodIdentity) -> list[str]:
    return [identity.pod_uid, identity.namespace or "", identity.pod or "", identity.container or ""]


def render(data: PodsData, facts: DerivedFacts, out: Families) -> None:
    """The PodResources calls, and the pods of the MPS clients, GPU processes and engines (the
    identities joined by mpswatch.derive); a process in no pod has no series."""
    state = data.pod_resources
    if state.up is not None:
        out.add("mps_pod_resources_up", [], 1 if state.up else 0)
    for reason, count in sorted(state.failures.items()):
        out.add("mps_pod_resources_failures_total", [reason], count)
    for pid, identity in sorted(facts.pods.items()):
        out.add("mps_pod_info", [pid, *_identity_labels(identity)], 1)
    for engine, identity in sorted(facts.engine_pods.items()):
        out.add("mps_engine_pod_info", [engine, *_identity_labels(identity)], 1)


def status(data: PodsData, facts: DerivedFacts, now: float) -> StatusSection:
    """Notes only: pods are named beside the PIDs in the clients' and engines' entries."""
    notes = [f"pods: {note}" for note in data.notes]
    state = data.pod_resources
    if state.up is False:
        notes.append(f"pods: the kubelet's PodResources API at {state.socket} failed ({state.error}): "
                     "pods named before keep their names, new ones go unnamed until it answers")
    unnamed = sorted({i.pod_uid for i in (*facts.pods.values(), *facts.engine_pods.values()) if i.name is None})
    if unnamed:
        notes.append(f"pods: {len(unnamed)} pod(s) of GPU processes or engines have no known name (UID "
                     f"{', '.join(unnamed[:3])}{', ...' if len(unnamed) > 3 else ''}): docs/kubernetes.md says why")
    return StatusSection({}, (), tuple(notes))


UNIT = CollectorUnit("pods", render, status)
