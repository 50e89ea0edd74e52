"""Online softmax and tiled attention in plain torch (lesson 03): the algorithm of FlashAttention, readable.

- ``online_softmax``: softmax over the last dim reading x one block at a time, with a running max ``m`` and a
  running sum ``l`` of exp(x - m) that is rescaled by exp(m_old - m_new) whenever the max grows.
- ``tiled_attention``: attention that streams K/V in blocks of ``block_n`` rows and never holds more than
  [Sq, block_n] scores: the same loop the Triton kernel ``kernels.flash_attention`` runs per query block.
- ``naive_attention``: "standard" attention that materializes the [Sq, Skv] score and probability matrices in
  the input dtype, the memory-bound baseline.
- Formulas: FLOPs (forward, and backward with or without recomputation), bytes of the score matrix, HBM traffic
  of naive vs flash attention, what a training step keeps for the backward; ``peak_memory`` measures the extra
  memory a function allocates (CUDA allocator stats on a GPU, live torch tensors on CPU), ``saved_tensor_bytes``
  what autograd saves for the backward.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


# ---------------------------------------------------------------- softmax, three ways
def softmax_naive(x: torch.Tensor) -> torch.Tensor:
    """exp(x) / sum(exp(x)) over the last dim: overflows to inf (then nan) once x exceeds ~88 in fp32."""
    e = torch.exp(x)
    return e / e.sum(dim=-1, keepdim=True)


def softmax_safe(x: torch.Tensor) -> torch.Tensor:
    """The usual stable softmax: subtract the row max first. Three passes over x: max, sum, normalize."""
    m = x.amax(dim=-1, keepdim=True)
    e = torch.exp(x - m)
    return e / e.sum(dim=-1, keepdim=True)


def online_softmax_stats(x: torch.Tensor, block_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over x's last dim in blocks: the row max m and the sum l = Σ exp(x - m), shapes x.shape[:-1]."""
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    l = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[-1], block_size):
        block = x[..., start:start + block_size]
        m_new = torch.maximum(m, block.amax(dim=-1))
        # The old sum was taken relative to m; relative to m_new each of its terms shrinks by exp(m - m_new).
        # (Where m == m_new nothing changes: alpha = 1, also when both are -inf, a row with no finite value yet.)
        alpha = torch.where(m == m_new, 1.0, torch.exp(m - m_new))
        p = torch.where(block == float("-inf"), 0.0, torch.exp(block - m_new[..., None]))  # exp(-inf) = 0
        l = l * alpha + p.sum(dim=-1)
        m = m_new
    return m, l


def online_softmax(x: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """softmax(x) over the last dim from the streamed statistics: exp(x - m) / l (two passes instead of three)."""
    m, l = online_softmax_stats(x, block_size)
    return torch.exp(x - m[..., None]) / l[..., None]


# ---------------------------------------------------------------- attention
def _scale(D: int, sm_scale: float | None) -> float:
    return sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)


def _causal_visible(Sq: int, Skv: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Bottom-right causal mask: query row i sits at position i + Skv - Sq and sees keys j <= that."""
    return cols[None, :] <= rows[:, None] + (Skv - Sq)


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    sm_scale: float | None = None, block_n: int = 16) -> torch.Tensor:
    """softmax(q kᵀ·scale) v streaming K/V in blocks of ``block_n`` rows (the FlashAttention loop, in torch).

    q: [..., Sq, D]; k, v: [..., Skv, D] with the same leading dims. Computed in float32, returned in q's dtype.
    Holds at most [..., Sq, block_n] scores at a time, plus the running m [..., Sq], l [..., Sq], acc [..., Sq, D].
    """
    Sq, D, Skv = q.shape[-2], q.shape[-1], k.shape[-2]
    qf = q.float() * _scale(D, sm_scale)
    m = torch.full(q.shape[:-1], float("-inf"), device=q.device)  # running row max
    l = torch.zeros(q.shape[:-1], device=q.device)  # running Σ exp(s - m)
    acc = torch.zeros(q.shape, device=q.device)  # running Σ exp(s - m) v
    rows = torch.arange(Sq, device=q.device)
    for start in range(0, Skv, block_n):
        kb, vb = k[..., start:start + block_n, :].float(), v[..., start:start + block_n, :].float()
        s = qf @ kb.transpose(-1, -2)  # [..., Sq, block_n]: the only scores that ever exist
        if causal:
            cols = torch.arange(start, start + kb.shape[-2], device=q.device)
            s = s.masked_fill(~_causal_visible(Sq, Skv, rows, cols), float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1))
        alpha = torch.where(m == m_new, 1.0, torch.exp(m - m_new))  # rescales the old l and acc
        p = torch.where(s == float("-inf"), 0.0, torch.exp(s - m_new[..., None]))  # masked keys weigh 0
        l = l * alpha + p.sum(dim=-1)
        acc = acc * alpha[..., None] + p @ vb
        m = m_new
    return (acc / l[..., None]).to(q.dtype)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    sm_scale: float | None = None) -> torch.Tensor:
    """Standard attention as three kernels, each result written to memory in q's dtype: S = q kᵀ·scale,
    P = softmax(S), O = P v. q: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D] (GQA by repeating K/V heads)."""
    Hq, Sq, D = q.shape[1], q.shape[2], q.shape[3]
    Hkv, Skv = k.shape[1], k.shape[2]
    if Hkv != Hq:
        k, v = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) * _scale(D, sm_scale)  # [B, Hq, Sq, Skv]: O(S²) memory
    if causal:
        rows, cols = torch.arange(Sq, device=q.device), torch.arange(Skv, device=q.device)
        s = s.masked_fill(~_causal_visible(Sq, Skv, rows, cols), float("-inf"))
    p = torch.softmax(s, dim=-1)  # another [B, Hq, Sq, Skv]
    return p @ v


# ---------------------------------------------------------------- counting
def attention_flops(B: int, H: int, Sq: int, Skv: int, D: int, causal: bool = False) -> float:
    """Matmul FLOPs of attention: q kᵀ and P v are 2·Sq·Skv·D each, per head; causal counts half (the usual
    convention of FlashAttention's and Triton's benchmarks for Sq = Skv)."""
    flops = 4.0 * B * H * Sq * Skv * D
    return flops / 2 if causal else flops


#: Matmuls of attention's backward, each 2·Sq·Skv·D FLOPs per head: dV = Pᵀ dO, dP = dO Vᵀ, dQ = dS K, dK = dSᵀ Q
#: with P stored by the forward; + S = Q Kᵀ to recompute P (FlashAttention-2); + Q Kᵀ and dO Vᵀ once more in a
#: separate dQ pass (``kernels.flash_attention_bwd``, Triton's tutorial), which FlashAttention-2's CUDA code avoids
#: by adding dQ with atomics.
BACKWARD_MATMULS = {"P stored": 4, "P recomputed": 5, "P recomputed, separate dQ pass": 7}


def attention_backward_flops(B: int, H: int, Sq: int, Skv: int, D: int, causal: bool = False, *,
                             matmuls: int = BACKWARD_MATMULS["P recomputed"]) -> float:
    """Matmul FLOPs of attention's backward: ``matmuls`` products of 2·Sq·Skv·D per head (5 with recomputation,
    10·Sq·Skv·D, the convention of FlashAttention's benchmarks: 2.5x the forward); causal counts half. The
    elementwise work (exp, P ∘ (dP - Δ), row sums) is O(Sq·Skv) per head, D times less, and not counted."""
    flops = 2.0 * matmuls * B * H * Sq * Skv * D
    return flops / 2 if causal else flops


def saved_for_backward_bytes(B: int, H: int, Sq: int, Skv: int, bytes_per_element: float, *, flash: bool) -> float:
    """What attention keeps for its backward beyond q, k, v and its output: the probabilities P [B, H, Sq, Skv] in
    the activations' dtype (standard autograd), or the log-sum-exp [B, H, Sq] in float32 (FlashAttention)."""
    return B * H * Sq * 4.0 if flash else B * H * Sq * Skv * bytes_per_element


def saved_tensor_bytes(fn: Callable[[], torch.Tensor], exclude: tuple[torch.Tensor, ...] = ()) -> tuple[int, list]:
    """Run ``fn()`` and measure what autograd keeps for the backward pass: the bytes of the distinct storages of
    every tensor saved for backward (``torch.autograd.graph.saved_tensors_hooks``), except those of ``exclude``
    (the inputs) and of the output. Returns (bytes, [(shape, dtype) of each tensor counted])."""
    saved: dict[int, tuple] = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    skip = {t.untyped_storage().data_ptr() for t in (*exclude, out)}
    kept = [v for ptr, v in saved.items() if ptr not in skip]
    return sum(nbytes for nbytes, _, _ in kept), [(shape, dtype) for _, shape, dtype in kept]


def score_matrix_bytes(B: int, H: int, Sq: int, Skv: int, bytes_per_element: float) -> float:
    """Bytes of one materialized [B, H, Sq, Skv] score (or probability) matrix."""
    return B * H * Sq * Skv * bytes_per_element


def hbm_bytes_naive(B: int, H: int, Sq: int, Skv: int, D: int, bytes_per_element: float) -> float:
    """HBM traffic of standard attention: read Q, K, V, write O (Sq·D + 2·Skv·D + Sq·D per head), plus the
    score matrix S written by q kᵀ and read by softmax, and P written by softmax and read by P v: 4·Sq·Skv."""
    return B * H * (2 * Sq * D + 2 * Skv * D + 4 * Sq * Skv) * bytes_per_element


def hbm_bytes_flash(B: int, H: int, Sq: int, Skv: int, D: int, bytes_per_element: float,
                    block_m: int | None = 128) -> float:
    """HBM traffic of FlashAttention's forward: Q read and O written once, no Sq·Skv term at all. Each program
    (``block_m`` query rows) streams all of K and V, so with no reuse from the L2 cache K and V are read
    ceil(Sq / block_m) times; ``block_m=None`` counts them once (perfect L2 reuse across a head's programs,
    which run side by side and share one head's K/V of Skv·D elements)."""
    kv_reads = 1 if block_m is None else math.ceil(Sq / block_m)
    return B * H * (2 * Sq * D + 2 * Skv * D * kv_reads) * bytes_per_element


# ---------------------------------------------------------------- measuring memory
class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of storages created by torch ops while active, and frees them when their last tensor dies."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}  # storage address -> live tensors using it
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                key = t.untyped_storage().data_ptr()
                if key not in self.refs:
                    self.refs[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
                    self.current += self.sizes[key]
                    self.peak = max(self.peak, self.current)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


def peak_memory(fn: Callable[[], object], device: torch.device | str | None = None) -> int:
    """Peak bytes allocated while ``fn()`` runs, beyond what was allocated before (its inputs).

    CUDA: the caching allocator's ``max_memory_allocated``. CPU: the largest total size of live tensors created
    by torch operations inside ``fn`` (what a Triton kernel allocates outside torch, e.g. in the interpreter,
    is not seen; its output tensor is).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    with _LiveTensorBytes() as tracker:
        out = fn()
    del out
    return tracker.peak
