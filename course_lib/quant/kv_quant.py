"""KV-cache quantization (lesson 07): 8-bit codes plus scales, and a paged cache that stores K/V that way.

Quantizing a tensor x to 8 bits keeps one byte per value (a **code**) and, per group of values, a **scale**
(and optionally a **zero point**): x ≈ code · scale (+ zero). The group is the **granularity**:

* ``"tensor"``  one scale for everything: one outlier anywhere coarsens every value;
* ``"token"``   one scale per token (all heads and channels of it);
* ``"head"``    one scale per (token, kv head): what the cache kernels store (``kernels.store_kv_int8``);
* ``"channel"`` one scale per (kv head, channel) over all tokens (KIVI's choice for K): handles channels that
  are large for *every* token, but the scale depends on tokens not seen yet — a streaming cache can't use it.

Rounding is half away from zero, computed exactly as the Triton kernels do, so ``kernels.reference`` built on
these helpers matches the kernels code for code. ``QuantizedPagedKVCache`` is lesson 02's ``PagedKVCache``
with 8-bit blocks; ``make_paged_kv_cache(..., kv_dtype="int8")`` is the one switch an engine needs.
"""
from __future__ import annotations

import math

import torch

import kernels
import kernels.reference
from course_lib.model.attention import attention
from course_lib.model.config import ModelConfig
from course_lib.device import DEVICE
from course_lib.model.kv_cache import KVCache
from course_lib.paging.paged_cache import PagedKVCache
from kernels.quant import (GRANULARITIES, KV_DTYPES, Quantized, dequantize, fake_quantize,  # noqa: F401  (re-exported)
                           quantize, round_half_away)

def quantization_error(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """How far x_hat is from x: max abs error, RMSE, relative error ||x - x_hat|| / ||x|| and SQNR in dB
    (signal-to-quantization-noise ratio, 10·log10(||x||² / ||x - x_hat||²): +6 dB per extra bit)."""
    x, err = x.double(), (x_hat.double() - x.double())
    noise, signal = err.pow(2).sum().item(), x.pow(2).sum().item()
    return dict(max_abs=err.abs().max().item(), rmse=math.sqrt(noise / max(x.numel(), 1)),
                relative=math.sqrt(noise / signal) if signal else 0.0,
                sqnr_db=10 * math.log10(signal / noise) if noise else math.inf)


def kv_bytes_per_token(config: ModelConfig, kv_dtype: str | torch.dtype = torch.float16, *,
                       scale_dtype: torch.dtype = torch.float16, zero_point: bool = False) -> int:
    """K and V bytes one token takes in every layer: 2·L·Hkv·(D·code bytes + scale (+ zero) bytes).
    ``kv_dtype``: "int8" / "fp8", or a torch dtype for an unquantized cache (no scales)."""
    L, Hkv, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    if isinstance(kv_dtype, torch.dtype):
        return 2 * L * Hkv * D * kv_dtype.itemsize
    per_row = D + scale_dtype.itemsize * (2 if zero_point else 1)
    return 2 * L * Hkv * per_row


def sequences_that_fit(memory_bytes: float, bytes_per_token: float, tokens_per_sequence: int) -> int:
    """How many sequences of ``tokens_per_sequence`` tokens a KV budget of ``memory_bytes`` holds."""
    return int(memory_bytes // (bytes_per_token * tokens_per_sequence))


class RoundedKVCache(KVCache):
    """Lesson 01's contiguous ``KVCache`` storing K/V exactly as a lossy cache would hold them: rounded to
    ``"fp16"`` / ``"bf16"``, or 8-bit codes (``"int8"``, ``"fp8"``) dequantized back, one scale per ``granularity``
    group of each write. A measuring tool (quality of a format, independent of kernels), not a memory saver."""

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int, *, kv_format: str = "fp16",
                 granularity: str = "head", zero_point: bool = False, device: torch.device | str | None = None):
        if kv_format not in ("fp16", "bf16", *KV_DTYPES):
            raise ValueError(f"kv_format must be 'fp16', 'bf16', 'int8' or 'fp8', got {kv_format!r}")
        super().__init__(config, batch_size, max_seq_len, dtype=torch.float32, device=device)
        self.kv_format, self.granularity, self.zero_point = kv_format, granularity, zero_point

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return super().update(layer, self._round(k), self._round(v))

    def _round(self, x: torch.Tensor) -> torch.Tensor:                       # x [B, Hkv, S, D]
        if self.kv_format in ("fp16", "bf16"):
            return x.to(torch.float16 if self.kv_format == "fp16" else torch.bfloat16).to(x.dtype)
        tokens_first = x.transpose(1, 2)                                     # [B, S, Hkv, D]
        return fake_quantize(tokens_first, self.granularity, kv_dtype=self.kv_format,
                             zero_point=self.zero_point).transpose(1, 2)


# ---------------------------------------------------------------- the paged cache, in 8 bits
class QuantizedPagedKVCache(PagedKVCache):
    """``PagedKVCache`` (lesson 02) whose blocks hold 8-bit codes plus a scale per (slot, kv head).

    Per layer: ``k_caches[l]``, ``v_caches[l]`` ``[N, P, Hkv, D]`` int8 (or float8_e4m3fn, ``kv_dtype="fp8"``,
    GPU only), ``k_scales[l]``, ``v_scales[l]`` ``[N, P, Hkv]`` in ``scale_dtype`` (and ``k_zeros``, ``v_zeros``
    with ``zero_point=True``). New K/V are quantized as they are written (``kernels.store_kv_int8``); a decode
    step (S == 1) dequantizes inside the attention kernel (``kernels.paged_attention_int8_decode``); a prefill
    gathers and dequantizes its blocks, then uses the plain attention — so prefill tokens, too, attend to the
    quantized K/V. ``use_kernel=False`` uses the plain-torch references (same codes; fast on CPU).
    Block sharing (``fork``, ``reorder``, copy-on-write) works as in ``PagedKVCache``: scales travel with codes.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 16, batch_size: int = 1, *,
                 kv_dtype: str = "int8", zero_point: bool = False, scale_dtype: torch.dtype = torch.float16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, use_kernel: bool = True):
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {tuple(KV_DTYPES)}, got {kv_dtype!r}")
        if zero_point and kv_dtype != "int8":
            raise ValueError("zero_point=True is for kv_dtype='int8' (FP8 is symmetric)")
        if scale_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"scale_dtype must be torch.float16 or torch.float32, got {scale_dtype}")
        device = DEVICE if device is None else device   # the course's device by default
        super().__init__(config, num_blocks, block_size, batch_size, dtype=KV_DTYPES[kv_dtype][0], device=device,
                         use_kernel=use_kernel)
        self.kv_dtype, self.zero_point, self.scale_dtype, self.dtype = kv_dtype, zero_point, scale_dtype, dtype
        shape = (num_blocks, block_size, config.num_key_value_heads)                       # [N, P, Hkv]
        layers = range(config.num_hidden_layers)
        self.k_scales = [torch.ones(shape, dtype=scale_dtype, device=device) for _ in layers]
        self.v_scales = [torch.ones(shape, dtype=scale_dtype, device=device) for _ in layers]
        self.k_zeros = [torch.zeros(shape, dtype=scale_dtype, device=device) for _ in layers] if zero_point else None
        self.v_zeros = [torch.zeros(shape, dtype=scale_dtype, device=device) for _ in layers] if zero_point else None

    def _zeros(self, layer: int) -> dict:
        return dict(k_zero=self.k_zeros[layer], v_zero=self.v_zeros[layer]) if self.zero_point else {}

    # ---------------------------------------------------------------- the model's cache protocol
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Quantize and store k, v ``[B, Hkv, S, D]``; causal attention of q ``[B, Hq, S, D]`` over each
        sequence's (dequantized) tokens: ``[B, Hq, S, D]`` in q's dtype."""
        B, Hq, S, D = q.shape
        if B != len(self.seq_ids):
            raise ValueError(f"the batch has {B} rows but the cache holds {len(self.seq_ids)} sequences")
        if self._step is None:   # the first layer of this forward: reserve the slots of the new tokens
            self._step = self._prepare(S)
        slot_mapping, block_tables, context_lens = self._step
        caches = (self.k_caches[layer], self.v_caches[layer], self.k_scales[layer], self.v_scales[layer])
        store = kernels.store_kv_int8 if self.use_kernel else kernels.reference.store_kv_int8
        # [B, Hkv, S, D] -> [B*S, Hkv, D]: token-major, in the order of slot_mapping
        store(k.transpose(1, 2).reshape(B * S, -1, D), v.transpose(1, 2).reshape(B * S, -1, D), *caches,
              slot_mapping, **self._zeros(layer))
        L = self.length + S
        if S == 1 and self.use_kernel:   # decode: the kernel dequantizes the blocks as it reads them
            out = kernels.paged_attention_int8_decode(q[:, :, 0], *caches, block_tables, context_lens,
                                                      max_context_len=L, validate=False, **self._zeros(layer))
            return out[:, :, None]                                                       # [B, Hq, 1, D]
        k_all, v_all = self.gather(layer, block_tables, L, q.dtype)
        return attention(q, k_all, v_all, causal=True)

    def gather(self, layer: int, block_tables: torch.Tensor, length: int, dtype: torch.dtype = torch.float32):
        """The first ``length`` tokens of every sequence, dequantized: k, v ``[B, Hkv, length, D]``."""
        B = block_tables.shape[0]
        idx = block_tables.long()
        out = []
        k = (self.k_caches[layer], self.k_scales[layer], self.k_zeros and self.k_zeros[layer])
        v = (self.v_caches[layer], self.v_scales[layer], self.v_zeros and self.v_zeros[layer])
        for codes, scales, zeros in (k, v):
            Hkv, D = codes.shape[2:]
            q = Quantized(codes[idx].reshape(B, -1, Hkv, D)[:, :length], scales[idx].reshape(B, -1, Hkv, 1)[:, :length],
                          None if zeros is None else zeros[idx].reshape(B, -1, Hkv, 1)[:, :length])
            out.append(dequantize(q, dtype).transpose(1, 2))                              # [B, Hkv, length, D]
        return out

    # ---------------------------------------------------------------- memory
    def nbytes(self) -> int:
        """Bytes of the whole preallocated pool: codes, scales and zero points of all N blocks."""
        tensors = self.k_caches + self.v_caches + self.k_scales + self.v_scales
        tensors += (self.k_zeros + self.v_zeros) if self.zero_point else []
        return sum(t.numel() * t.element_size() for t in tensors)

    def bytes_per_token(self) -> float:
        """nbytes() per token slot, measured from the tensors (scales included)."""
        N, P = self.k_caches[0].shape[:2]
        return self.nbytes() / (N * P)

    # ---------------------------------------------------------------- internals
    def _block_tensors(self) -> list[torch.Tensor]:
        """The codes, and their scales (and zeros): a copy-on-write copies all of a block."""
        return (self.k_caches + self.v_caches + self.k_scales + self.v_scales
                + ((self.k_zeros + self.v_zeros) if self.zero_point else []))


def make_paged_kv_cache(config: ModelConfig, num_blocks: int, block_size: int = 16, batch_size: int = 1, *,
                        kv_dtype: str | None = None, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None, use_kernel: bool = True,
                        **quant_options) -> PagedKVCache:
    """The engine's one switch: ``kv_dtype=None`` (K/V in the model's ``dtype``: lesson 02's ``PagedKVCache``),
    ``"int8"`` or ``"fp8"`` (``QuantizedPagedKVCache``; ``quant_options``: zero_point, scale_dtype)."""
    if kv_dtype is None:
        if quant_options:
            raise ValueError(f"{sorted(quant_options)} only apply to a quantized cache (kv_dtype='int8' or 'fp8')")
        return PagedKVCache(config, num_blocks, block_size, batch_size, dtype=dtype, device=device,
                            use_kernel=use_kernel)
    return QuantizedPagedKVCache(config, num_blocks, block_size, batch_size, kv_dtype=kv_dtype, dtype=dtype,
                                 device=device, use_kernel=use_kernel, **quant_options)


def num_blocks_for_memory(config: ModelConfig, memory_bytes: float, block_size: int = 16, *,
                          kv_dtype: str | None = None, dtype: torch.dtype = torch.float16,
                          scale_dtype: torch.dtype = torch.float16, zero_point: bool = False) -> int:
    """How many KV blocks a memory budget holds, for the cache ``make_paged_kv_cache`` would build (an engine
    sizes its pool with this: same budget, about twice the blocks in INT8)."""
    per_token = kv_bytes_per_token(config, dtype if kv_dtype is None else kv_dtype, scale_dtype=scale_dtype,
                                   zero_point=zero_point)
    return int(memory_bytes // (per_token * block_size))
