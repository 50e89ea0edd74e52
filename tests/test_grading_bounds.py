"""course_lib.grading.bounds: every load and store of an interpreted kernel is checked before it runs, so an
out-of-bounds access is a failed case naming the tensor and the element, never a write into the process."""
from __future__ import annotations

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import pytest
import torch
import triton
import triton.language as tl

from course_lib.grading.core import Checker, OutOfBounds
from course_lib.grading.bounds import preflight
from course_lib.grading.kernels import can_trace, launch

pytestmark = pytest.mark.skipif(not can_trace(), reason="addresses are checked in the Triton interpreter only")


@triton.jit
def _copy_rows(src_ptr, dst_ptr, n_rows, SHIFT: tl.constexpr, COLS: tl.constexpr, MASKED: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, COLS)
    x = tl.load(src_ptr + row * COLS + offs)
    if MASKED:   # lanes with the mask off may point anywhere: they are never accessed
        tl.store(dst_ptr + (row + SHIFT) * COLS + offs, x, mask=row + SHIFT < n_rows)
    else:
        tl.store(dst_ptr + (row + SHIFT) * COLS + offs, x)


def _run(shift: int, masked: bool = False):
    src = torch.arange(12, dtype=torch.float32).view(3, 4)
    buf = torch.full((5, 4), float("nan"))
    dst = buf[1:4]   # a view: the rows before and after it belong to someone else
    launch(_copy_rows, (3,), src, dst, 3, SHIFT=shift, COLS=4, MASKED=masked)
    return src, buf, dst


def test_in_bounds_runs():
    src, _, dst = _run(0)
    assert torch.equal(dst, src)


def test_store_past_the_end_names_tensor_row_and_offset():
    with pytest.raises(OutOfBounds, match=r"your kernel wrote outside `dst` \(row 3, offset 0\)") as info:
        _run(1)
    assert "`dst` has 3 rows of 4 (shape [3, 4])" in str(info.value)
    assert "program (2, 0, 0)" in str(info.value)


def test_the_access_is_stopped_before_it_happens():
    with pytest.raises(OutOfBounds):
        _run(1)
    # programs 0 and 1 ran; program 2's store into the row after the view never happened
    src = torch.arange(12, dtype=torch.float32).view(3, 4)
    buf = torch.full((5, 4), float("nan"))
    with pytest.raises(OutOfBounds):
        launch(_copy_rows, (3,), src, buf[1:4], 3, SHIFT=1, COLS=4, MASKED=False)
    assert torch.isnan(buf[4]).all() and torch.isnan(buf[:2]).all()


def test_store_before_the_start():
    with pytest.raises(OutOfBounds, match=r"wrote outside `dst` \(row -1, offset 0\)"):
        _run(-1)


def test_a_slice_of_a_wider_matrix_counts_its_rows_by_its_stride():
    @triton.jit
    def _read_tile(src_ptr, out_ptr, row_stride, COLS: tl.constexpr):   # no mask: COLS runs past the slice's width
        offs = tl.arange(0, COLS)
        tl.store(out_ptr + offs, tl.load(src_ptr + 1 * row_stride + offs))

    src = torch.zeros(2, 8)[:, :3]   # rows 8 elements apart; element [1, 3] is one past the slice's last
    with pytest.raises(OutOfBounds, match=r"read outside `src` \(row 1, offset 3\)"):
        launch(_read_tile, (1,), src, torch.zeros(4), src.stride(0), COLS=4)


def test_masked_off_lanes_are_not_accesses():
    src, _, dst = _run(1, masked=True)
    assert torch.equal(dst[1:], src[:2])


def test_a_checker_reports_it_as_a_failed_case():
    with Checker("copy_rows", points=1) as c:
        c.case = "3 rows of 4, shifted by one"
        _run(1)
    assert (c.result.status, c.result.points) == ("failed", 0)
    assert c.result.message.startswith("case: 3 rows of 4, shifted by one\nyour kernel wrote outside `dst`")
    assert "hint:" in c.result.message


def test_preflight_runs_a_copy_in_the_interpreter():
    """What a GPU runs before the compiled launch (here on CPU): the kernel's Python function interpreted on copies."""
    src = torch.arange(12, dtype=torch.float32).view(3, 4)
    dst = torch.full((3, 4), float("nan"))
    preflight(_copy_rows, (3,), (src, dst, 3), dict(SHIFT=0, COLS=4, MASKED=False))
    assert torch.isnan(dst).all()            # the copies were written, not the tensors passed in

    with pytest.raises(OutOfBounds, match=r"wrote outside `dst` \(row 3, offset 0\)"):
        preflight(_copy_rows, (3,), (src, dst, 3), dict(SHIFT=1, COLS=4, MASKED=False))


def test_preflight_copies_keep_the_strides_of_a_slice():
    """A slice of a wider matrix, copied for the preflight, keeps its row stride: the kernel, given that stride,
    stays inside the copy (a contiguous copy would end before the kernel's last row)."""
    @triton.jit
    def _copy_strided(src_ptr, dst_ptr, row_stride, COLS: tl.constexpr):
        offs = tl.arange(0, COLS)
        tl.store(dst_ptr + tl.program_id(0) * COLS + offs, tl.load(src_ptr + tl.program_id(0) * row_stride + offs))

    src = torch.arange(24, dtype=torch.float32).view(3, 8)[:, :4]
    preflight(_copy_strided, (3,), (src, torch.zeros(3, 4), src.stride(0)), dict(COLS=4))   # raises if it did not


def test_preflight_leaves_other_errors_to_the_launch():
    preflight(_copy_rows, (3,), (torch.zeros(3, 4),), dict(SHIFT=0, COLS=4, MASKED=False))   # missing arguments


def test_launch_on_a_gpu_preflights(monkeypatch):
    from course_lib.grading import kernels as grading_kernels

    monkeypatch.setattr(grading_kernels, "can_trace", lambda: False)   # as where kernels are compiled
    monkeypatch.setattr(grading_kernels, "_on_gpu", lambda: True)
    buf = torch.full((5, 4), float("nan"))
    with pytest.raises(OutOfBounds, match="wrote outside `dst`"):
        launch(_copy_rows, (3,), torch.ones(3, 4), buf[1:4], 3, SHIFT=1, COLS=4, MASKED=False)
    assert torch.isnan(buf).all()            # stopped before the real launch wrote anything


@triton.jit
def _sum_pairs(a_ptr, b_ptr, out_ptr, COLS: tl.constexpr, READ_ROWS: tl.constexpr):
    """out[row] = a[row] + b[row], reading READ_ROWS rows of a at once: past a's end when READ_ROWS > a's rows."""
    rows = tl.arange(0, READ_ROWS)
    offs = tl.arange(0, COLS)
    a = tl.load(a_ptr + rows[:, None] * COLS + offs[None, :])
    b = tl.load(b_ptr + offs)
    tl.store(out_ptr + offs, tl.sum(a, 0) + b)


def test_a_read_past_one_tensor_into_its_neighbour_names_the_first():
    """Two arguments side by side in memory (a before b, as an allocator may place them): a tile that runs past a's
    end lies mostly in b. It is named after a, the tensor it started in, not after b, where most of its lanes fall
    (the kernel's arguments are copied apart, with gaps, before the launch)."""
    buf = torch.arange(40, dtype=torch.float32)
    a, b = buf[:8].view(2, 4), buf[8:].view(8, 4)   # b follows a directly
    out = torch.zeros(4)
    with pytest.raises(OutOfBounds, match=r"read outside `a`"):
        launch(_sum_pairs, (1,), a, b, out, COLS=4, READ_ROWS=8)   # rows 2-7 of the tile lie in b
    launch(_sum_pairs, (1,), a, b, out, COLS=4, READ_ROWS=2)       # in bounds: runs, and writes back into out
    assert torch.equal(out, a.sum(0) + b[0])


def test_the_copies_keep_the_bytes_between_the_rows_of_a_slice():
    """A slice of a wider matrix keeps its neighbours' values in the copy (a kernel reading with the wrong row
    stride reads them, as it would in place, and the check can say which stride it used)."""
    from course_lib.grading.bounds import spaced_copies

    wide = torch.arange(30, dtype=torch.float32).view(5, 6)
    view = wide[1:4, 1:5]
    (copy,) = spaced_copies([view])
    assert copy.stride() == view.stride() and torch.equal(copy, view)
    flat = torch.as_strided(copy, (3 * 6 - 2,), (1,))   # the span from the first element to the last
    assert torch.equal(flat, wide.flatten()[7:23])
