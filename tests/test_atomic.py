"""imgsearch.atomic: the target is replaced whole or left alone, and no temp file outlives the write."""

import stat

import pytest

from imgsearch.atomic import atomic_file, write_bytes_atomic


def test_a_write_replaces_the_file_whole_with_readable_permissions(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")
    write_bytes_atomic(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600: servers may run as other users
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.ckpt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def test_a_missing_folder_is_an_error_not_a_silent_mkdir(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_bytes_atomic(tmp_path / "absent" / "CURRENT", b"v1\n")
