"""The roofline model, and honest measurements to put on it (lesson 00).

A kernel that does F FLOPs while moving Q bytes to/from main memory has arithmetic intensity I = F / Q
(FLOP/byte). On a machine with peak compute P (FLOP/s) and memory bandwidth W (bytes/s) it can reach
at most ``min(P, I * W)`` FLOP/s: below the *ridge point* I = P / W it is memory-bound, above it
compute-bound. For a matmul ``[M, K] @ [K, N]``: F = 2·M·N·K and, each matrix moved once, Q = (MK + KN + MN)·bytes.

Timing rules used here (as in ``triton.testing.do_bench``): warm up first (the first call pays for
allocation, kernel selection, compilation), then take the *median* of several repetitions (robust to
one slow outlier); on a GPU time with CUDA events (kernels run asynchronously, a host clock would only
see the launch); optionally overwrite a buffer larger than the last-level cache before each repetition,
so the inputs come from DRAM/HBM as they do in real inference, not from a warm cache.
"""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from course_lib.device import DEVICE

#: Where ``benchmarks/roofline.py`` writes its recorded results (one JSON file per device).
RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@dataclass(frozen=True)
class DeviceSpec:
    """Datasheet numbers of an accelerator (vendor figures, not measurements)."""

    name: str
    peak_flops: float  # dense FLOP/s in `flops_dtype`
    flops_dtype: str
    hbm_bandwidth: float  # bytes/s
    hbm_bytes: float
    l2_bytes: float
    smem_per_sm_bytes: float  # shared memory (SRAM) per streaming multiprocessor
    registers_per_sm_bytes: float
    num_sms: int


#: NVIDIA H100 SXM5 80 GB, from NVIDIA's H100 datasheet / Hopper whitepaper
#: (989 TFLOP/s is dense BF16 Tensor Core; the often-quoted 1,979 assumes 2:4 sparsity).
H100_SXM = DeviceSpec(
    name="NVIDIA H100 SXM5 80GB (datasheet)", peak_flops=989e12, flops_dtype="bfloat16 (dense, Tensor Cores)",
    hbm_bandwidth=3.35e12, hbm_bytes=80e9, l2_bytes=50e6, smem_per_sm_bytes=228 * 1024,
    registers_per_sm_bytes=256 * 1024, num_sms=132,
)

#: NVIDIA H200 SXM 141 GB, from NVIDIA's H200 datasheet: the H100's GH100 die (same Tensor Core peak, SMs and L2)
#: with 141 GB of HBM3e at 4.8 TB/s.
H200_SXM = DeviceSpec(
    name="NVIDIA H200 SXM 141GB (datasheet)", peak_flops=989e12, flops_dtype="bfloat16 (dense, Tensor Cores)",
    hbm_bandwidth=4.8e12, hbm_bytes=141e9, l2_bytes=50e6, smem_per_sm_bytes=228 * 1024,
    registers_per_sm_bytes=256 * 1024, num_sms=132,
)


def datasheet(device: str) -> DeviceSpec | None:
    """The datasheet of a device as a result file names it (``torch.cuda.get_device_name``): "NVIDIA H200" and
    "NVIDIA H100 80GB HBM3" (the SXM cards; the PCIe and NVL cards have other clocks, peaks and memory). None for
    any other device: a fraction of a roofline is given only where the roofline is known."""
    name = device.upper()
    if "NVL" in name or "PCIE" in name:   # the H100 / H200 NVL and PCIe cards: lower clocks, other peaks
        return None
    if "H200" in name:
        return H200_SXM
    if "H100" in name and ("HBM3" in name or "SXM" in name):
        return H100_SXM
    return None


# ---------------------------------------------------------------- the model (pure arithmetic)
def matmul_flops(M: int, N: int, K: int) -> int:
    """FLOPs of ``[M, K] @ [K, N]``: each of the M·N outputs needs K multiplies and K adds."""
    return 2 * M * N * K


def matmul_bytes(M: int, N: int, K: int, bytes_per_element: float) -> float:
    """Minimum bytes moved by ``[M, K] @ [K, N]``: read A and B once, write C once."""
    return (M * K + K * N + M * N) * bytes_per_element


def matmul_intensity(M: int, N: int, K: int, bytes_per_element: float) -> float:
    """Arithmetic intensity (FLOP/byte) of ``[M, K] @ [K, N]`` when each matrix crosses memory once."""
    return matmul_flops(M, N, K) / matmul_bytes(M, N, K, bytes_per_element)


def ridge_point(peak_flops: float, peak_bandwidth: float) -> float:
    """Intensity (FLOP/byte) where the memory roof meets the compute roof."""
    return peak_flops / peak_bandwidth


def attainable_flops(intensity: float, peak_flops: float, peak_bandwidth: float) -> float:
    """Roofline bound: the best FLOP/s a kernel of this intensity can reach."""
    return min(peak_flops, intensity * peak_bandwidth)


def bound(intensity: float, peak_flops: float, peak_bandwidth: float) -> str:
    """"memory" if the kernel sits left of the ridge point (bandwidth limits it), else "compute"."""
    return "memory" if intensity < ridge_point(peak_flops, peak_bandwidth) else "compute"


def human(value: float, unit: str) -> str:
    """``human(9.89e14, "FLOP/s") -> '989 TFLOP/s'`` (SI prefixes, 3 significant digits)."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def cpu_cache_bytes(root: str | Path = "/sys/devices/system/cpu/cpu0/cache") -> dict[int, int]:
    """This machine's CPU caches as seen by CPU 0, ``{level: bytes}`` (the data or unified cache of each level; L3 is
    usually shared by all cores), read from Linux's sysfs; ``{}`` where it is not available (macOS, Windows).
    What a decode step re-reads every step (the weights) is served from cache when it fits in the last level."""
    sizes: dict[int, int] = {}
    for index in sorted(Path(root).glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or not text:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1].upper(), 1)
        try:
            size = int(text.rstrip("KkMmGg")) * unit
        except ValueError:
            continue
        sizes[level] = max(size, sizes.get(level, 0))
    return sizes


# ---------------------------------------------------------------- measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_FLUSH_BUFFERS: dict[str, torch.Tensor] = {}


def beyond_cache_bytes(device: torch.device | str | None = None, factor: int = 4) -> int:
    """A buffer size that the last-level cache cannot hold: 1 GiB on a GPU (H100 L2: 50 MB; H200 the same), and on a
    CPU ``factor`` x its last-level cache, at least 256 MiB (a laptop's L3 is 8-64 MB, a server's can be 300 MB or
    more: with a fixed 256 MB, a copy would be timed in the cache, not in DRAM)."""
    device = torch.device(device or DEVICE)
    if device.type == "cuda":
        return 2**30
    return max(256 * 2**20, factor * max(cpu_cache_bytes().values(), default=0))


def flush_cache(device: torch.device | str | None = None) -> None:
    """Overwrite a buffer larger than the last-level cache (``beyond_cache_bytes(device, factor=2)``)."""
    device = torch.device(device or DEVICE)
    buf = _FLUSH_BUFFERS.get(str(device))
    if buf is None:
        nbytes = beyond_cache_bytes(device, factor=2)
        buf = _FLUSH_BUFFERS[str(device)] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    buf.zero_()


def time_fn(fn: Callable[[], object], *, device: torch.device | str | None = None, warmup: int = 2,
            reps: int = 5, flush: bool = False) -> float:
    """Median time of ``fn()`` in seconds, after `warmup` untimed calls; `flush`: cold cache each rep."""
    device = torch.device(device or DEVICE)
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        # Events are recorded into the stream, so they time the GPU work itself, not the launch.
        events = []
        for _ in range(reps):
            if flush:
                flush_cache(device)  # runs before `start`, so it is not timed
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        _sync(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in events]  # elapsed_time is in ms
    else:
        times = []
        for _ in range(reps):
            if flush:
                flush_cache(device)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_matmul_flops(M: int, N: int, K: int, dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None, *, warmup: int = 2, reps: int = 5,
                         flush: bool = True) -> float:
    """Measured FLOP/s of ``torch.mm`` on ``[M, K] @ [K, N]`` (M=1 runs as a matrix-vector product)."""
    device = torch.device(device or DEVICE)
    a = torch.randn(M, K, dtype=dtype, device=device)  # activations [M, K]
    b = torch.randn(K, N, dtype=dtype, device=device)  # weights [K, N]
    c = torch.empty(M, N, dtype=dtype, device=device)  # preallocated: time the matmul, not the allocator
    seconds = time_fn(lambda: torch.mm(a, b, out=c), device=device, warmup=warmup, reps=reps, flush=flush)
    return matmul_flops(M, N, K) / seconds


def measure_copy_bandwidth(nbytes: int, device: torch.device | str | None = None, *, warmup: int = 2,
                           reps: int = 5) -> float:
    """Measured bytes/s of copying `nbytes` (counts the read and the write: 2·nbytes per copy).

    Use a size well above the last-level cache (``beyond_cache_bytes()``), or you measure the cache, not DRAM/HBM.
    """
    device = torch.device(device or DEVICE)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)  # ones, not empty: touch every page first
    dst = torch.zeros_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device=device, warmup=warmup, reps=reps)
    return 2 * nbytes / seconds


def load_recorded_results(pattern: str = "roofline_*.json", results_dir: Path = RESULTS_DIR) -> list[dict]:
    """Every result file of ``benchmarks/roofline.py`` found (sorted by name); [] when none was recorded."""
    return [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob(pattern))]


# ---------------------------------------------------------------- plotting
def plot_roofline(ax, peak_flops: float, peak_bandwidth: float,
                  points: Iterable[tuple[float, float, str | None]] = (), *, label: str | None = None,
                  color: str | None = None, x_range: tuple[float, float] = (0.05, 5000.0),
                  marker: str = "o", annotate: bool = True):
    """Draw a roofline on a log-log `ax`, its ridge point, and measured `points` (intensity, FLOP/s, text).

    Returns the line of the roof (its colour is reused for the points, so several devices can share an axis).
    """
    xs = np.logspace(np.log10(x_range[0]), np.log10(x_range[1]), 256)
    roof = np.minimum(peak_flops, xs * peak_bandwidth)
    ridge = ridge_point(peak_flops, peak_bandwidth)
    if label is None:
        label = f"roof: {human(peak_flops, 'FLOP/s')}, {human(peak_bandwidth, 'B/s')}"
    (line,) = ax.loglog(xs, roof, color=color, lw=2, label=f"{label} (ridge {ridge:.3g} FLOP/B)")
    ax.axvline(ridge, color=line.get_color(), ls=":", lw=1)
    points = list(points)
    if points:
        px, py = [p[0] for p in points], [p[1] for p in points]
        ax.scatter(px, py, color=line.get_color(), marker=marker, zorder=3, s=25)
        if annotate:
            labelled = [(x, y, text) for x, y, text in points if text]
            for k, (x, y, text) in enumerate(labelled):  # alternate below/above: neighbours on a flat roof
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, -11 if k % 2 == 0 else 6),
                            fontsize=7, color=line.get_color())
    ax.set_ylim(top=max(ax.get_ylim()[1], 8 * peak_flops))  # headroom above the roof for a legend
    ax.set_xlabel("arithmetic intensity (FLOP/byte, log scale)")
    ax.set_ylabel("performance (FLOP/s, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    return line
