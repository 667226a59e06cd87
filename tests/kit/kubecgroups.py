"""Processes placed in kubelet-style cgroups, for real: directories made under this machine's cgroup
mounts, below one parent the test owns (`mpswatch-test-<pid>-<random>`), and a test's child process
moved into them through `cgroup.procs`. Everything is removed at the end, also on failure: the
children are moved back to the hierarchy's root and killed, and the directories removed bottom-up.

Needs root and a kernel that lets it; `KubeCgroups.open()` skips the test with the reason otherwise.
Both driver layouts are made (`kubepods.slice/...` as the systemd driver writes it, and
`kubepods/<qos>/pod<uid>/<id>` as the cgroupfs driver does), in cgroup v2 and in a v1 hierarchy.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

V1_CONTROLLER = "pids"  # a v1 hierarchy whose limits the test never sets; memory would move its accounting


def _mounts() -> dict[str, Path]:
    """'v2' -> the cgroup2 mount, 'v1' -> the V1_CONTROLLER hierarchy's mount, where there are."""
    found: dict[str, Path] = {}
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 4:
                continue
            if fields[2] == "cgroup2":
                found.setdefault("v2", Path(fields[1]))
            elif fields[2] == "cgroup" and V1_CONTROLLER in fields[3].split(","):
                found.setdefault("v1", Path(fields[1]))
    return found


def systemd_path(uid: str, container_id: str, qos: str | None = "burstable", runtime: str = "cri-containerd") -> str:
    """What the systemd cgroup driver makes: kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/
    <runtime>-<id>.scope; a Guaranteed pod (qos None) has no qos slice."""
    pod = uid.replace("-", "_")
    if qos is None:
        return f"kubepods.slice/kubepods-pod{pod}.slice/{runtime}-{container_id}.scope"
    return f"kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{pod}.slice/{runtime}-{container_id}.scope"


def cgroupfs_path(uid: str, container_id: str, qos: str | None = "besteffort") -> str:
    """What the cgroupfs driver makes: kubepods/<qos>/pod<uid>/<id>; Guaranteed: kubepods/pod<uid>/<id>."""
    return "/".join(part for part in ("kubepods", qos, f"pod{uid}", container_id) if part)


class KubeCgroups:
    def __init__(self) -> None:
        self.parent = f"mpswatch-test-{os.getpid()}-{secrets.token_hex(4)}"
        self.mounts = _mounts()
        self._placed: list[tuple[subprocess.Popen[bytes], Path]] = []

    @classmethod
    def open(cls, *versions: str) -> KubeCgroups:
        if os.geteuid() != 0:
            pytest.skip("placing processes in cgroups needs root (CI runs as root)")
        made = cls()
        missing = [v for v in versions if v not in made.mounts]
        if missing:
            pytest.skip(f"no cgroup {', '.join(missing)} mount here (looked in /proc/self/mounts)")
        return made

    def place(self, child: subprocess.Popen[bytes], version: str, path: str) -> None:
        """Moves the running child into <mount>/<parent>/<path>: /proc/<pid>/cgroup shows /<parent>/<path>."""
        directory = self.mounts[version] / self.parent / path
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "cgroup.procs").write_text(str(child.pid))
        except OSError as err:
            self.close()  # this child is not placed: it stays where it was, the caller's to end
            pytest.skip(f"the kernel refused a test cgroup under {self.mounts[version]}: {err}")
        self._placed.append((child, self.mounts[version]))

    def close(self) -> None:
        for child, mount in self._placed:
            if child.poll() is None:
                try:
                    (mount / "cgroup.procs").write_text(str(child.pid))
                except OSError:
                    pass  # killed below all the same; an empty cgroup can be removed
                child.kill()
            child.wait()
        self._placed.clear()
        for mount in self.mounts.values():
            top = mount / self.parent
            if not top.exists():
                continue
            for directory, _, _ in sorted(os.walk(top), key=lambda entry: -entry[0].count("/")):
                os.rmdir(directory)  # cgroup dirs hold only kernel files: rmdir takes them with it
