"""A run directory too deep for Unix socket paths still works: its sockets live in a short private folder.

Regression: with pytest-xdist's deeper temp paths, nodes failed to start ("ipc path ... is
longer than 107 characters"); a user with a long home or temp directory would meet the same.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import zmesh
from zmesh.testing import NodeProcess
from zmesh.transport import rundir


@zmesh.remote
class Echo:
    def pid(self) -> int:
        return os.getpid()


def _deep(base: Path, length: int) -> Path:
    path = base
    while len(str(path)) < length:
        path = path / ("d" * 20)
    return path


@pytest.mark.parametrize("length", [40, rundir.MAX_SOCKET_DIR_BYTES - 2, rundir.MAX_SOCKET_DIR_BYTES + 1, 200])
def test_socket_paths_fit_whatever_the_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, length: int) -> None:
    deep = _deep(tmp_path, length)
    monkeypatch.setenv("ZMESH_RUN_DIR", str(deep))
    folder = rundir.socket_dir()
    assert folder == rundir.socket_dir()  # every process of the run directory finds the same folder
    assert len(os.fsencode(folder / f"{4194304}-node-{'0' * 12}.sock")) <= 107
    info = folder.stat()
    assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
    if len(str(deep / "s")) <= rundir.MAX_SOCKET_DIR_BYTES:
        assert folder == deep / "s"
    else:
        assert folder == rundir.short_socket_dir(deep)
        folder.rmdir()


def test_a_node_in_a_deep_run_directory_starts_and_serves_actors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = _deep(tmp_path, 150)
    monkeypatch.setenv("ZMESH_RUN_DIR", str(deep))
    node = NodeProcess(str(deep))
    try:
        zmesh.init(address="auto")
        assert zmesh.get(Echo.remote().pid.remote(), timeout=30) > 0
    finally:
        zmesh.shutdown()
        assert node.stop() == 0, node.output
    assert not list(rundir.short_socket_dir(deep).glob("*.sock"))
