"""Atomic writes leave the old file or the new one, never a partial one, with ordinary permissions."""
import json
import os
import stat

import pytest

from safelib.atomic import atomic_path, atomic_write_json


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path) -> None:
    path = tmp_path / "sub" / "record.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2}, sort_keys=True)
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "record.json"
    atomic_write_json(path, {"version": "old"})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"version": "ne')  # killed half-way
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"version": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_files_get_the_permissions_open_would_give(tmp_path) -> None:
    umask = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "shared.json", {})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_write_removes_what_a_killed_writer_left_and_keeps_a_live_ones(tmp_path):
    """Issue 16: a kill -9 between the temporary file and the rename used to leave it there forever."""
    import subprocess
    import sys

    from safelib.atomic import atomic_write_text, host_tag

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = tmp_path / f".r.json.{host_tag()}-{child.pid}-abc.tmp"
    live = tmp_path / f".r.json.{host_tag()}-{os.getppid()}-def.tmp"  # another shard writing now
    other = tmp_path / f".other.json.{host_tag()}-{child.pid}-ghi.tmp"  # another file's: judged by its own writes
    for leftover in (dead, live, other):
        leftover.write_text("half")
    atomic_write_text(tmp_path / "r.json", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.json", live.name, other.name])
