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
