"""course_lib.analysis.roofline.cpu_cache_bytes: the CPU cache sizes lesson 10 compares a model's bytes with."""
from pathlib import Path

import pytest

from course_lib.analysis.roofline import cpu_cache_bytes


def _cache(root: Path, name: str, level: str, kind: str, size: str) -> None:
    d = root / name
    d.mkdir()
    (d / "level").write_text(level + "\n")
    (d / "type").write_text(kind + "\n")
    (d / "size").write_text(size + "\n")


def test_reads_sysfs_layout(tmp_path):
    _cache(tmp_path, "index0", "1", "Data", "48K")
    _cache(tmp_path, "index1", "1", "Instruction", "32K")   # not data: ignored
    _cache(tmp_path, "index2", "2", "Unified", "2048K")
    _cache(tmp_path, "index3", "3", "Unified", "300M")
    assert cpu_cache_bytes(tmp_path) == {1: 48 * 2**10, 2: 2 * 2**20, 3: 300 * 2**20}


def test_missing_or_garbled_is_empty_or_skipped(tmp_path):
    assert cpu_cache_bytes(tmp_path / "absent") == {}
    _cache(tmp_path, "index0", "2", "Unified", "lots")
    _cache(tmp_path, "index1", "x", "Unified", "4K")
    assert cpu_cache_bytes(tmp_path) == {}


def test_this_machine():
    sizes = cpu_cache_bytes()
    assert all(isinstance(level, int) and size > 0 for level, size in sizes.items())


@pytest.mark.parametrize("caches, want", [({}, 256 * 2**20), ({1: 32 * 2**10, 3: 32 * 2**20}, 256 * 2**20),
                                          ({2: 2 * 2**20, 3: 300 * 2**20}, 1200 * 2**20)])
def test_a_copy_buffer_beyond_the_cache_grows_with_the_last_level(monkeypatch, caches, want):
    from course_lib.analysis import roofline

    monkeypatch.setattr(roofline, "cpu_cache_bytes", lambda: caches)
    assert roofline.beyond_cache_bytes("cpu") == want                 # 4 x the last level, at least 256 MiB
    assert roofline.beyond_cache_bytes("cuda") == 2**30               # far above an H100's or H200's 50 MB of L2
