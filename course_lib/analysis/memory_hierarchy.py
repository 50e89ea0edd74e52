"""GPU memory bandwidths from the spec sheet: SRAM (shared memory / L1), L2 and HBM (lesson 11, the document's Q4).

On-chip bandwidths are not datasheet figures: they are *estimated* as (SMs) x (bytes per clock) x (clock).
The numbers used and where each comes from:

* **Shared memory / L1, per SM**: 32 banks, each 4 bytes wide per clock = 128 B/clock (CUDA C++ Programming
  Guide, shared memory section of compute capabilities 5.x-9.0). Summed over the A100's 108 SMs at 1.41 GHz this is
  the FlashAttention paper's "estimated around 19TB/s" (Dao et al., 2022, §2.1).
* **L2 read bandwidth**: the A100 whitepaper (NVIDIA, 2020) gives 5,120 B/clock for A100 against 2,048 for V100,
  "2.3x the L2 cache read bandwidth of V100" once the clocks (1.41 vs 1.53 GHz) are counted. NVIDIA publishes no L2
  bytes per clock for Hopper (H100, H200): ``None`` here, and ``python -m benchmarks.memory_hierarchy`` measures it.
* **Clock**: the one at which the datasheet's dense FP16/BF16 Tensor Core peak is reached:
  peak = SMs x (dense FMA per clock per SM) x 2 x clock, with 1,024 FMA per clock per A100 SM (A100 whitepaper) and
  twice that per Hopper SM (Hopper whitepaper: "2x the MMA rate of A100, clock for clock").
* **HBM**: the datasheets (A100 80GB SXM4 2.039 TB/s, A100 40GB 1.555 TB/s, H100 SXM5 3.35 TB/s, H200 4.8 TB/s).
"""
from __future__ import annotations

from dataclasses import dataclass

SMEM_BYTES_PER_CLOCK = 32 * 4     # 32 banks x 4 B per clock and SM (CUDA C++ Programming Guide)


@dataclass(frozen=True)
class GPUMemorySpec:
    name: str
    num_sms: int
    clock_hz: float                      # clock of the datasheet's dense Tensor Core peak
    dense_fma_per_clock_per_sm: int      # FP16/BF16 Tensor Core FMAs per clock and SM
    peak_flops: float                    # datasheet, dense FP16/BF16 Tensor Core
    hbm_bandwidth: float                 # datasheet, bytes/s
    l2_bytes_per_clock: int | None       # whole-chip L2 read bytes per clock; None: not published
    l2_bytes: float
    smem_bytes_per_clock: int = SMEM_BYTES_PER_CLOCK
    source: str = ""


GPU_SPECS: dict[str, GPUMemorySpec] = {
    "A100 SXM4 40GB": GPUMemorySpec("A100 SXM4 40GB", 108, 1.41e9, 1024, 312e12, 1.555e12, 5120, 40e6,
                                    source="NVIDIA A100 datasheet and whitepaper (2020)"),
    "A100 SXM4 80GB": GPUMemorySpec("A100 SXM4 80GB", 108, 1.41e9, 1024, 312e12, 2.039e12, 5120, 40e6,
                                    source="NVIDIA A100 datasheet and whitepaper (2020)"),
    "H100 SXM5 80GB": GPUMemorySpec("H100 SXM5 80GB", 132, 1.83e9, 2048, 989e12, 3.35e12, None, 50e6,
                                    source="NVIDIA H100 datasheet, Hopper whitepaper (2022)"),
    "H200 SXM 141GB": GPUMemorySpec("H200 SXM 141GB", 132, 1.83e9, 2048, 989e12, 4.8e12, None, 50e6,
                                    source="NVIDIA H200 datasheet (same GH100 chip as the H100 SXM5)"),
}


def smem_bandwidth(spec: GPUMemorySpec) -> float:
    """Shared memory / L1 bandwidth summed over all SMs (bytes/s): SMs x 128 B/clock x clock."""
    return spec.num_sms * spec.smem_bytes_per_clock * spec.clock_hz


def l2_bandwidth(spec: GPUMemorySpec) -> float | None:
    """L2 read bandwidth (bytes/s) from the published bytes per clock, or None where none is published."""
    return None if spec.l2_bytes_per_clock is None else spec.l2_bytes_per_clock * spec.clock_hz


def implied_peak_flops(spec: GPUMemorySpec) -> float:
    """SMs x FMA per clock x 2 x clock: checks the clock against the datasheet's dense peak."""
    return spec.num_sms * spec.dense_fma_per_clock_per_sm * 2 * spec.clock_hz


def bandwidth_table() -> list[dict]:
    """One row per GPU: SRAM, L2 and HBM bandwidths (bytes/s; L2 None where unpublished) and SRAM / HBM."""
    rows = []
    for spec in GPU_SPECS.values():
        smem = smem_bandwidth(spec)
        rows.append(dict(gpu=spec.name, sms=spec.num_sms, clock_ghz=spec.clock_hz / 1e9, smem=smem,
                         l2=l2_bandwidth(spec), hbm=spec.hbm_bandwidth, smem_over_hbm=smem / spec.hbm_bandwidth,
                         source=spec.source))
    return rows
