"""Atomic writes: the content lands whole, a failed write leaves the old file, and permissions are those of a
plainly created file (or of the file replaced), not mkstemp's 0600."""

import os
import stat

import pytest

from gqsa.utils import io


def test_new_file_gets_the_umask_permissions_and_old_ones_are_kept(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "a.txt"
        io.atomic_write_text(path, "one")
        assert path.read_text() == "one" and stat.S_IMODE(path.stat().st_mode) == 0o644
        path.chmod(0o640)
        io.atomic_write_text(path, "two")
        assert path.read_text() == "two" and stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "b.bin"
    io.atomic_write_bytes(path, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin"]
