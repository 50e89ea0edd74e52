"""Lesson 00: the Triton add kernel vs its reference, the roofline helpers, the benchmark script, and the checks."""
from __future__ import annotations

import json
import math

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import matplotlib
import pytest
import torch

import kernels
import kernels.reference
from course_lib.analysis import roofline
from course_lib.device import DEVICE, kernel_dtypes
from course_lib.grading import lesson00
from conftest import assert_caught, assert_not_attempted, edited, exercise, solution, stub

matplotlib.use("Agg")


# ---------------------------------------------------------------- kernels.add vs kernels.reference.add
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", [(1,), (7,), (1000,), (1024,), (1025,), (4099,), (3, 5), (2, 3, 130)])
@pytest.mark.parametrize("block_size", [128, 1024])
def test_add_matches_reference(shape, dtype, block_size):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    y = torch.randn(shape, device=DEVICE).to(dtype)
    # One rounding of an exact sum in every dtype: the kernel and torch agree bit for bit.
    torch.testing.assert_close(kernels.add(x, y, block_size=block_size), kernels.reference.add(x, y), rtol=0, atol=0)


def test_add_empty():
    x = torch.empty(0, device=DEVICE)
    assert kernels.add(x, x).shape == (0,)


@pytest.mark.parametrize("make_args, match", [
    (lambda x: ([1.0, 2.0], x), "x must be a torch.Tensor"),
    (lambda x: (x, x[:-1]), r"y has shape \(9,\); expected the shape of x, \(10,\)"),
    (lambda x: (x, x.double()), "y has dtype torch.float64"),
    (lambda x: (x, x.half()), "y has dtype torch.float16; expected the dtype of x"),
    (lambda x: (x.long(), x.long()), "x has dtype torch.int64"),
    (lambda x: (x.view(2, 5).t(), x.view(5, 2)), "x with shape .* is not contiguous"),
    (lambda x: (x, x.to("meta")), "y is on meta"),
])
def test_add_rejects_bad_inputs(make_args, match):
    x = torch.randn(10, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        kernels.add(*make_args(x))


@pytest.mark.parametrize("block_size", [0, 100, -64, 2.0])
def test_add_rejects_bad_block_size(block_size):
    x = torch.randn(10, device=DEVICE)
    with pytest.raises(ValueError, match="block_size"):
        kernels.add(x, x, block_size=block_size)


# ---------------------------------------------------------------- course_lib.analysis.roofline
def test_intensity_formulas():
    assert roofline.matmul_intensity(1, 1, 1, 4) == pytest.approx(2 / 12)
    # GEMV in fp16 is ~1 FLOP/byte: each 2-byte weight is used for one multiply-add.
    assert roofline.matmul_intensity(1, 4096, 4096, 2) == pytest.approx(1.0, rel=1e-3)
    assert roofline.matmul_intensity(4096, 4096, 4096, 2) == pytest.approx(4096 / 3)
    assert roofline.matmul_flops(2, 3, 5) == 60 and roofline.matmul_bytes(2, 3, 5, 2) == (10 + 15 + 6) * 2


def test_roofline_model():
    peak, bw = roofline.H100_SXM.peak_flops, roofline.H100_SXM.hbm_bandwidth
    ridge = roofline.ridge_point(peak, bw)
    assert ridge == pytest.approx(295.2, abs=0.1)
    assert roofline.attainable_flops(1.0, peak, bw) == bw
    assert roofline.attainable_flops(1e4, peak, bw) == peak
    assert roofline.attainable_flops(ridge, peak, bw) == pytest.approx(peak)
    assert roofline.bound(1.0, peak, bw) == "memory"
    assert roofline.bound(ridge, peak, bw) == roofline.bound(1e4, peak, bw) == "compute"


def test_human():
    assert roofline.human(9.89e14, "FLOP/s") == "989 TFLOP/s"
    assert roofline.human(3.35e12, "B/s") == "3.35 TB/s"
    assert roofline.human(12.0, "B") == "12 B"


def test_measurements_are_positive_and_finite():
    calls = []
    assert roofline.time_fn(lambda: calls.append(1), warmup=2, reps=3) >= 0 and len(calls) == 5
    assert roofline.time_fn(lambda: None, reps=1, flush=True) >= 0
    for value in (roofline.measure_matmul_flops(8, 64, 64, reps=2), roofline.measure_copy_bandwidth(2**20, reps=2)):
        assert math.isfinite(value) and value > 0


def test_plot_roofline_and_results(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    line = roofline.plot_roofline(ax, 1e12, 1e11, [(1.0, 1e11, "GEMV"), (100.0, 9e11, None)], label="toy")
    assert ax.get_xscale() == ax.get_yscale() == "log" and "FLOP/byte" in ax.get_xlabel()
    assert max(line.get_ydata()) == 1e12 and min(line.get_ydata()) == pytest.approx(0.05 * 1e11)
    plt.close(fig)
    assert roofline.load_recorded_results(results_dir=tmp_path) == []
    (tmp_path / "roofline_toy.json").write_text(json.dumps({"device": "toy"}))
    assert roofline.load_recorded_results(results_dir=tmp_path) == [{"device": "toy"}]


@pytest.mark.command
def test_benchmark_script_quick(tmp_path):
    from benchmarks import roofline as bench

    out = tmp_path / "r.json"
    result = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for key in ("device", "date", "git_commit", "cpu_model", "driver", "torch", "triton", "peak_matmul",
                "copy_bandwidth", "gemm_sweep", "vector_add", "roofline"):
        assert key in result
    assert result["gemm_sweep"]["points"][0]["M"] == 1
    assert bench.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


# ---------------------------------------------------------------- the checks: pass, not attempted, broken
@pytest.mark.parametrize("check, good, broken", [
    (lesson00.check_matmul_intensity, roofline.matmul_intensity, [
        lambda M, N, K, b: M * N * K / ((M * K + K * N + M * N) * b),  # forgot the 2 of multiply-add
        lambda M, N, K, b: 2 * M * N * K / ((M * K + K * N) * b),  # forgot writing C
        lambda M, N, K, b: 2 * M * N * K / (M * K + K * N + M * N),  # elements, not bytes
        lambda M, N, K, b: 2 * M * N * K // ((M * K + K * N + M * N) * b),  # integer division
    ]),
    (lesson00.check_attainable_flops, roofline.attainable_flops, [
        lambda i, p, w: max(p, i * w),
        lambda i, p, w: min(p, w),
        lambda i, p, w: min(p, i / w),
    ]),
    (lesson00.check_bound, roofline.bound, [
        lambda i, p, w: "compute" if i < p / w else "memory",  # inverted
        lambda i, p, w: "memory" if i <= p / w else "compute",  # wrong at the ridge
        lambda i, p, w: "Memory" if i < p / w else "Compute",  # wrong strings
        lambda i, p, w: "memory" if i < w / p else "compute",  # ridge upside down
    ]),
])
def test_python_checks(check, good, broken):
    assert check(good).status == "passed"
    assert_not_attempted(check(stub))
    for fn in broken:
        assert_caught(check(fn), "hint:")


def test_solution_notebook_answers_pass():
    answers = solution("00_start_here")
    assert lesson00.check_matmul_intensity(answers.matmul_intensity).status == "passed"
    assert lesson00.check_attainable_flops(answers.attainable_flops).status == "passed"
    assert lesson00.check_bound(answers.bound).status == "passed"


def test_scale_add_kernel_check():
    good = solution("00_start_here")._scale_add_kernel
    assert lesson00.check_scale_add_kernel(good).status == "passed"
    assert_not_attempted(lesson00.check_scale_add_kernel(exercise("00_start_here")._scale_add_kernel))
    no_mask = edited(good, {", mask=mask)": ")"})              # loads and stores past the end of the tensors
    assert_caught(lesson00.check_scale_add_kernel(no_mask), "read outside `x` (element 1)")
    no_pid = edited(good, {"offsets = pid * BLOCK_SIZE + tl.arange": "offsets = tl.arange"})   # every program: block 0
    assert_caught(lesson00.check_scale_add_kernel(no_pid), "pid * BLOCK_SIZE")
    assert_caught(lesson00.check_scale_add_kernel(lambda *args: None), "@triton.jit")


class _CompiledStub:
    """Stands in for a stub kernel compiled on a GPU, where `raise` fails to compile instead of raising."""

    src = 'def _scale_add_kernel(...):\n    raise NotImplementedError("Exercise: write the body")\n'

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("at 3:4: unsupported AST node type: Raise")
        return launch


def test_scale_add_kernel_check_compiled_stub_is_not_attempted():
    result = lesson00.check_scale_add_kernel(_CompiledStub())
    assert (result.status, result.points) == ("not attempted", 0)


# ---------------------------------------------------------------- more mistakes a learner makes (issue 23)
def test_scale_add_kernel_check_catches():
    good = solution("00_start_here")._scale_add_kernel
    constant_block = edited(good, {"offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)":
                                   "offsets = pid * 128 + tl.arange(0, 128)"})      # right only for BLOCK_SIZE=128
    assert_caught(lesson00.check_scale_add_kernel(constant_block), "never a constant block size")
    mask_one_past = edited(good, {"mask = offsets < n_elements": "mask = offsets <= n_elements"})   # off by one
    assert_caught(lesson00.check_scale_add_kernel(mask_one_past), "read outside `x` (element 1)")
    store_no_mask = edited(good, {"a * x + y, mask=mask)": "a * x + y)"})   # loads masked, the store is not
    assert_caught(lesson00.check_scale_add_kernel(store_no_mask), "wrote outside `out` (element 1)")
    assert_caught(lesson00.check_scale_add_kernel(edited(good, {"a * x + y": "x + y"})), "a * x + y")
    assert_caught(lesson00.check_scale_add_kernel(edited(good, {"a * x + y": "a * (x + y)"})), "a * x + y")
    assert_caught(lesson00.check_scale_add_kernel(edited(good, {"tl.store(out_ptr": "tl.store(x_ptr"})), "hint:")


@pytest.mark.parametrize("check, fn, hint", [
    (lesson00.check_matmul_intensity, lambda M, N, K, b: 2 * M * N * K / ((M * K + K * N + M * K) * b), "hint:"),
    (lesson00.check_matmul_intensity, lambda M, N, K, b: 2 * M * N * K / ((M * K + K * N + M * N) * 2), "hint:"),
    (lesson00.check_attainable_flops, lambda i, p, w: min(p, i * w) if i < 295 else p, "hint:"),   # H100 built in
    (lesson00.check_bound, lambda i, p, w: "memory" if i < 295.2 else "compute", "ridge point"),   # H100's ridge
])
def test_python_checks_catch_more(check, fn, hint):
    assert_caught(check(fn), hint)
