"""Communication: counting all-reduces, timing them, and what the interconnects of real machines promise.

A ring all-reduce of ``n`` bytes over ``p`` ranks sends and receives ``2 (p - 1) / p · n`` bytes per rank
(a reduce-scatter, then an all-gather), so its time is about ``2 (p - 1) / p · n / link_bandwidth``
plus a latency per step. nccl-tests calls ``n / time`` the *algorithm* bandwidth and
``2 (p - 1) / p · n / time`` the *bus* bandwidth, the number to compare with a link's speed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Counts the all-reduces of a tensor-parallel forward and the bytes they carry (payload per rank)."""

    all_reduces: int = 0
    bytes: int = 0
    seconds: float = 0.0                         # filled only when ``timed`` (synchronizes around each call)
    timed: bool = False
    sizes: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.all_reduces, self.bytes, self.seconds, self.sizes = 0, 0, 0.0, []

    def all_reduce(self, tensor: torch.Tensor, all_reduce=None) -> None:
        """Sum ``tensor`` over the ranks in place (``dist.all_reduce`` unless another function is given)."""
        self.all_reduces += 1
        self.bytes += tensor.numel() * tensor.element_size()
        self.sizes.append(tensor.numel() * tensor.element_size())
        if self.timed:
            _sync(tensor.device)
            t0 = time.perf_counter()
        (all_reduce or dist.all_reduce)(tensor)
        if self.timed:
            _sync(tensor.device)
            self.seconds += time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ring_bytes_per_rank(payload_bytes: float, world_size: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``payload_bytes``."""
    return 2 * (world_size - 1) / world_size * payload_bytes


def all_reduce_seconds(payload_bytes: float, world_size: int, link_bytes_per_s: float, latency_s: float = 0.0) -> float:
    """Bandwidth model of a ring all-reduce: 2(p-1) steps of latency + the ring traffic over one link direction."""
    return 2 * (world_size - 1) * latency_s + ring_bytes_per_rank(payload_bytes, world_size) / link_bytes_per_s


@dataclass(frozen=True)
class Link:
    name: str
    bytes_per_s: float      # per direction, per GPU
    source: str


#: Interconnect speeds from the vendors' specifications (per GPU, per direction).
LINKS = [
    Link("NVLink 4 (H100 SXM, 18 links)", 450e9,
         "NVIDIA H100 Tensor Core GPU datasheet: NVLink 900 GB/s (bidirectional total) -> 450 GB/s each way"),
    Link("NVLink 3 (A100 SXM, 12 links)", 300e9,
         "NVIDIA A100 datasheet: NVLink 600 GB/s (bidirectional total) -> 300 GB/s each way"),
    Link("PCIe 5.0 x16", 63e9,
         "PCI-SIG PCIe 5.0 spec: 32 GT/s per lane, 128b/130b coding, 16 lanes -> ~63 GB/s each way "
         "(H100 datasheet: PCIe Gen5 128 GB/s, both directions)"),
    Link("PCIe 4.0 x16", 31.5e9, "PCI-SIG PCIe 4.0 spec: 16 GT/s per lane, x16 -> ~31.5 GB/s each way"),
    Link("InfiniBand NDR (1 port, 400 Gb/s)", 50e9,
         "NVIDIA ConnectX-7 / Quantum-2 NDR: 400 Gb/s per port = 50 GB/s each way (DGX H100: one port per GPU)"),
    Link("InfiniBand HDR (1 port, 200 Gb/s)", 25e9, "NVIDIA ConnectX-6 HDR: 200 Gb/s per port = 25 GB/s each way"),
]


def time_all_reduce(ctx, sizes_bytes: list[int], *, dtype: torch.dtype = torch.float32, warmup: int = 3,
                    reps: int = 10) -> list[dict]:
    """Rank function (run it with ``launch``): median time of ``dist.all_reduce`` for each payload size.

    Returns one dict per size: bytes, seconds (median over ``reps``, the slowest rank's view is what
    matters, so each rep starts after a barrier), algorithm and bus bandwidth in bytes/s.
    """
    element = torch.tensor([], dtype=dtype).element_size()
    out = []
    for size in sizes_bytes:
        x = torch.ones(max(1, size // element), dtype=dtype, device=ctx.device)
        for _ in range(warmup):
            dist.all_reduce(x)
        times = []
        for _ in range(reps):
            dist.barrier()
            _sync(ctx.device)
            t0 = time.perf_counter()
            dist.all_reduce(x)
            _sync(ctx.device)
            times.append(time.perf_counter() - t0)
        seconds = sorted(times)[len(times) // 2]
        nbytes = x.numel() * element
        out.append(dict(bytes=nbytes, seconds=seconds, algbw=nbytes / seconds,
                        busbw=ring_bytes_per_rank(nbytes, ctx.world_size) / seconds))
    return out


def cross_node_bytes_per_token(num_layers: int, hidden_size: int, *, layout: str, num_nodes: int = 2,
                               gpus_per_node: int = 8, bytes_per_element: int = 2, count: str = "message",
                               tensors_per_boundary: int = 1) -> float:
    """Bytes that cross between nodes per token of one forward pass, for a model split over ``num_nodes`` nodes.

    layout="tp": tensor parallelism across all the GPUs of all nodes: 2 all-reduces per layer (lesson 08) of the
        token's hidden state ([hidden_size] values). ``count`` says what one all-reduce costs between nodes:
        "message": the message once (hidden_size x bytes; the simplest count, and the one a "-98.3%" style
        comparison needs), "ring": a flat ring over all N GPUs, which crosses ``num_nodes`` node boundaries and
        carries 2(N-1)/N x the message over each (``ring_bytes_per_rank``).
    layout="pp": tensor parallelism inside each node and pipeline stages across nodes: one hand-over per stage
        boundary (num_nodes - 1 of them), of ``tensors_per_boundary`` [hidden_size] tensors (1: the hidden state;
        2: the hidden state and the residual stream, as vLLM's pipeline sends for LLaMA-style models).
    """
    message = hidden_size * bytes_per_element
    if layout == "tp":
        if count == "message":
            per_all_reduce = message
        elif count == "ring":
            per_all_reduce = num_nodes * ring_bytes_per_rank(message, num_nodes * gpus_per_node)
        else:
            raise ValueError(f"count must be 'message' or 'ring', got {count!r}")
        return 2 * num_layers * per_all_reduce
    if layout == "pp":
        return (num_nodes - 1) * tensors_per_boundary * message
    raise ValueError(f"layout must be 'tp' or 'pp', got {layout!r}")
