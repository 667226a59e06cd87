"""Pod identity without a cluster: the cgroup parser on every kubelet layout, the container
environment's hints, and how the derive step names a process's pod and container (docs/kubernetes.md)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from mpswatch.collectors.pods import assignments_of, container_env, parse_cgroup
from mpswatch.derive import PodNames, resolve_pods
from mpswatch.snapshot import (
    ContainerAssignment,
    ContainerEnv,
    EnginesData,
    EngineState,
    GpuData,
    GpuProcess,
    GpuState,
    PodCgroup,
    PodResourcesState,
    PodsData,
    frozen_map,
)

from tests.kit.fakepodresources import response_of
from tests.kit.snapshots import snapshot_of

UID = "0c3f2e1a-5b7d-4c2e-9f00-1a2b3c4d5e6f"
UID_ = UID.replace("-", "_")
CID = "4f1e7c0d9a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5"
GPU_A = "GPU-b0364874-2b6d-037a-0496-f04da35f2f2d"
GPU_B = "GPU-2ea0ea17-0206-eb44-6b1e-8d0c3f1a2b3c"

# /proc/<pid>/cgroup as each layout writes it; every one names UID and, but the last three, CID
V1_OTHERS = "".join(f"{n}:{c}:/\n" for n, c in ((7, "blkio"), (6, "freezer"), (5, "devices"), (3, "cpuset")))
IN_CONTAINER = {
    "v2 systemd containerd burstable":
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
    "v2 systemd cri-o besteffort":
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope\n",
    "v2 systemd docker guaranteed (no qos slice)":
        f"0::/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope\n",
    "v1 systemd, a line per hierarchy":
        f"9:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
        f"8:pids:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
        + V1_OTHERS + "0::/\n",
    "v1 cgroupfs burstable":
        f"9:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n8:pids:/kubepods/burstable/pod{UID}/{CID}\n" + V1_OTHERS,
    "v1 cgroupfs guaranteed (no qos dir)": f"8:pids:/kubepods/pod{UID}/{CID}\n" + V1_OTHERS,
    "v2 cgroupfs besteffort": f"0::/kubepods/besteffort/pod{UID}/{CID}\n",
    "hybrid v1/v2 node: the pod in one v1 line, v2 at the root":
        V1_OTHERS + f"8:pids:/kubepods/besteffort/pod{UID}/{CID}\n0::/\n",
    "nested kubelet (kind): kubelet-kubepods slices":
        f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
    "containerd's own slice:prefix:id form":
        f"0::/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{CID}\n",
    "below a test- or node-owned parent": f"0::/mpswatch-test-1/kubepods/burstable/pod{UID}/{CID}\n",
}
POD_LEVEL = {
    "the pod's own slice": f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice\n",
    "cri-o's conmon beside the container": f"0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope\n",
    "cgroupfs pod dir": f"0::/kubepods/besteffort/pod{UID}\n",
}
NOT_A_POD = {
    "root": "0::/\n",
    "a systemd session": "0::/user.slice/user-1000.slice/session-2.scope\n",
    "a plain docker container": f"0::/system.slice/docker-{CID}.scope\n",
    "a qos dir only": "0::/kubepods/burstable\n",
    "a pod-like dir outside kubepods": f"0::/somewhere/pod{UID}/{CID}\n",
    "v1 with the agent's own memory cgroup": "4:memory:/process_api/2a0ee111afd8e2d936c99f5f5782b569\n0::/\n",
    "empty": "",
}


def test_every_kubelet_layout_gives_the_pod_uid_and_the_container_id():
    for layout, text in IN_CONTAINER.items():
        assert parse_cgroup(text) == PodCgroup(UID, CID), layout


def test_a_process_outside_any_container_of_its_pod_gives_the_uid_alone():
    for layout, text in POD_LEVEL.items():
        assert parse_cgroup(text) == PodCgroup(UID, None), layout


def test_a_process_in_no_pod_gives_nothing():
    for layout, text in NOT_A_POD.items():
        assert parse_cgroup(text) is None, layout


@given(st.text())
def test_the_cgroup_parser_never_fails_on_arbitrary_text(text):
    parse_cgroup(text)


def test_the_environment_gives_the_hostname_and_namespace_only_when_they_are_kubernetes_names():
    assert container_env({"HOSTNAME": "vllm-a-7d9f"}, "team-a\n") == ContainerEnv("vllm-a-7d9f", "team-a")
    assert container_env({"HOSTNAME": "My_Laptop"}, None) == ContainerEnv(None, None)
    assert container_env({}, "Not A Namespace") == ContainerEnv(None, None)


def test_a_pod_resources_answer_becomes_one_row_per_container():
    answer = response_of({"team-a/vllm-a": {"vllm": [f"{GPU_A}::0"], "proxy": []}})
    assert assignments_of(answer) == (
        ContainerAssignment("team-a", "vllm-a", "vllm", (f"{GPU_A}::0",)),
        ContainerAssignment("team-a", "vllm-a", "proxy", ()),
    )


# ---------------------------------------------------------------- the join (derive.resolve_pods)

def pods_data(processes, environments=None, assignments=()):
    return PodsData(frozen_map(processes), frozen_map(environments or {}),
                    None if assignments is None else tuple(assignments), PodResourcesState("/sock", True))


def rows(pods):
    return [ContainerAssignment(ns, pod, container, tuple(devices))
            for name, containers in pods.items() for container, devices in containers.items()
            for ns, pod in [name.split("/")]]


def named(identities):
    return {pid: (i.pod_uid, i.namespace, i.pod, i.container) for pid, i in identities.items()}


SHARED = {"team-a/vllm-a": {"vllm": [f"{GPU_A}::0"], "proxy": []}, "team-c/vllm-c": {"main": [f"{GPU_A}::1"]}}


def test_the_environment_names_a_pod_the_kubelet_lists_and_the_gpu_names_its_container():
    """GPU_A is shared by two pods' replicas: only the environment can name the pod."""
    data = pods_data({10: PodCgroup("uid-a", "c1"), 11: PodCgroup("uid-a", "c2")},
                     {"c1": ContainerEnv("vllm-a", "team-a"), "c2": ContainerEnv("vllm-a", "team-a")}, rows(SHARED))
    identities, _ = resolve_pods(data, {10: GPU_A}, PodNames())
    assert named(identities) == {10: ("uid-a", "team-a", "vllm-a", "vllm"),
                                 11: ("uid-a", "team-a", "vllm-a", None)}  # proxy: no GPU to tell it by


def test_an_overridden_hostname_falls_back_to_the_one_container_holding_the_gpu():
    data = pods_data({20: PodCgroup("uid-b", "c3")}, {"c3": ContainerEnv("custom-host", None)},
                     rows({"team-b/vllm-b": {"main": [GPU_B]}, "team-a/vllm-a": {"vllm": [GPU_A]}}))
    identities, _ = resolve_pods(data, {20: GPU_B}, PodNames())
    assert named(identities) == {20: ("uid-b", "team-b", "vllm-b", "main")}


def test_an_unreadable_environment_falls_back_to_the_gpu_too():
    data = pods_data({20: PodCgroup("uid-b", "c3")}, {"c3": None}, rows({"team-b/vllm-b": {"main": [GPU_B]}}))
    assert named(resolve_pods(data, {20: GPU_B}, PodNames())[0])[20][1:] == ("team-b", "vllm-b", "main")


def test_a_gpu_shared_by_replicas_of_several_pods_names_no_pod():
    data = pods_data({30: PodCgroup("uid-c", "c4")}, {"c4": ContainerEnv("custom-host", None)}, rows(SHARED))
    assert named(resolve_pods(data, {30: GPU_A}, PodNames())[0]) == {30: ("uid-c", None, None, None)}


def test_a_gpu_held_by_a_pod_of_another_namespace_than_the_process_says_names_no_pod():
    """A pod given no GPU can still reach one (NVIDIA_VISIBLE_DEVICES=all): its namespace gives it away."""
    data = pods_data({40: PodCgroup("uid-d", "c5")}, {"c5": ContainerEnv("tools-1", "ops")},
                     rows({"team-b/vllm-b": {"main": [GPU_B]}}))
    assert named(resolve_pods(data, {40: GPU_B}, PodNames())[0]) == {40: ("uid-d", None, None, None)}


def test_a_cut_short_mps_device_matches_its_replica_id():
    data = pods_data({20: PodCgroup("uid-b", "c3")}, {}, rows({"team-b/vllm-b": {"main": [f"{GPU_B}::3"]}}))
    assert named(resolve_pods(data, {20: "GPU-2ea0ea17-0206-eb44"}, PodNames())[0])[20][2] == "vllm-b"


def test_a_pod_named_once_keeps_its_name_while_the_kubelet_does_not_answer_and_is_forgotten_when_gone():
    data = pods_data({20: PodCgroup("uid-b", "c3")}, {}, rows({"team-b/vllm-b": {"main": [GPU_B]}}))
    _, known = resolve_pods(data, {20: GPU_B}, PodNames())
    no_answer = pods_data({20: PodCgroup("uid-b", "c3")}, {}, None)
    identities, known = resolve_pods(no_answer, {20: GPU_B}, known)
    assert named(identities) == {20: ("uid-b", "team-b", "vllm-b", "main")}
    identities, known = resolve_pods(pods_data({}, {}, None), {}, known)
    assert identities == {} and not known.pods and not known.containers


def test_without_the_kubelet_an_environment_alone_names_no_pod():
    data = pods_data({10: PodCgroup("uid-a", "c1")}, {"c1": ContainerEnv("vllm-a", "team-a")}, None)
    assert named(resolve_pods(data, {}, PodNames())[0]) == {10: ("uid-a", None, None, None)}


def test_a_pod_named_by_its_environment_cannot_be_claimed_by_another_uid_through_the_gpu():
    data = pods_data({10: PodCgroup("uid-a", "c1"), 50: PodCgroup("uid-old", "c9")},
                     {"c1": ContainerEnv("vllm-b", "team-b")}, rows({"team-b/vllm-b": {"main": [GPU_B]}}))
    identities, _ = resolve_pods(data, {50: GPU_B, 10: GPU_B}, PodNames())
    assert named(identities)[10][1:3] == ("team-b", "vllm-b") and named(identities)[50][1:3] == (None, None)


def test_facts_name_the_pods_of_gpu_processes_and_engines_not_of_the_mps_server_serving_them():
    """The MPS server runs in the device plugin's pod, which holds no GPU: it is not named after its
    only client's pod. A CPU-only process of a pod gets no identity in the facts (no series)."""
    gpu = GpuData("580", (GpuState(0, GPU_B, "NVIDIA H200", True, processes=(
        GpuProcess(20, "mps_client", 1 << 30), GpuProcess(90, "mps_server", 1 << 26))),))
    pods = pods_data({20: PodCgroup("uid-b", "c3"), 21: PodCgroup("uid-b", "c3"), 90: PodCgroup("uid-plugin", "c8")},
                     {}, rows({"team-b/vllm-b": {"main": [f"{GPU_B}::0"]}, "gpu-operator/mps-daemon": {"mps": []}}))
    engines = EnginesData((EngineState("qwen:8000", "http://10.0.0.7:8000/metrics", "discovered", True, pids=(21, 20)),),
                          frozen_map())
    facts = snapshot_of(gpu=gpu, pods=pods, engines=engines).derived
    assert {pid: i.name for pid, i in facts.pods.items()} == {20: "team-b/vllm-b", 90: None}
    assert facts.engine_pods["qwen:8000"].name == "team-b/vllm-b"
