"""/proc reads where the kernel lists a directory but refuses what is in it."""

from __future__ import annotations

import os

from mpswatch.procfs import ProcFS


def test_an_fd_table_whose_links_refuse_to_be_read_is_unknown_not_empty(tmp_path, monkeypatch):
    fd = tmp_path / "42" / "fd"
    fd.mkdir(parents=True)
    (fd / "3").symlink_to("socket:[123]")
    procfs = ProcFS(tmp_path)
    assert procfs.socket_inodes(42) == frozenset({123})

    def refuse(path: str) -> str:
        raise PermissionError(path)  # uid 0 without CAP_SYS_PTRACE looking at a more privileged process

    monkeypatch.setattr(os, "readlink", refuse)
    assert procfs.socket_inodes(42) is None
