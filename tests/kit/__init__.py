"""The test kit: fakes, stand-ins and harnesses that tests, benchmarks and the demo import.

  scope.py        the session's marker (TESTKIT_SCOPE) and the process filter of agents under test
  agent.py        the launcher of agents under test: `python -m tests.kit.agent [--nvml FAKE] run|status|advise ...`
  agentproc.py    runs agents through the launcher, scrapes them; one-shot commands; exposition parsing
  fakecontrol.py  the fake nvidia-cuda-mps-control program (scenario files, replay files)
  fakedaemon.py   a fake daemon's pipe dir and stand-in processes; FAKE_CONTROL, the program to run
  fakenvml.py     a fake of nvidia-ml-py replaying a real H200 recording
  fakevllm.py     vLLM-like engines on loopback (the tests' body, or a full-size one), as servers or processes
  realmps.py      a real MPS control daemon, its CUDA clients (cuda_client.py), for the GPU machine
  replaystack.py  a whole node replayed with Prometheus and Alertmanager (end-to-end alert tests, the demo)
  matrix.py       the fault matrix's record and its promtool tests
  podnet.py       a pod network built as root (network namespaces on a bridge), for the engines' netns tests
  kubecgroups.py  kubelet-style cgroups (v1 and v2, both drivers) to place the test's processes in pods
  fakepodresources.py  a kubelet's PodResources gRPC API on a unix socket
  nobody.py       processes of another user (nobody): hostile stand-ins, and agents run as nobody
  stagednode.py   the benchmarks' reference and large nodes, staged on a CPU machine, and the agent's collectors for them
  snapshots.py    snapshots built as the agent builds them, for tests of what is derived from them
  tlscerts.py     a throwaway CA, server and client certificates (openssl) for the TLS tests
"""

# Before anything starts a process: the session's marker goes into this process's environment,
# from which every process started here inherits it.
from tests.kit import scope  # noqa: F401
