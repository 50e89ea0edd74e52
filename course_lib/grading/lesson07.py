"""Checks of lesson 07 (KV-cache quantization): symmetric per-token INT8 quantize / dequantize, and the
dequantizing load inside a paged-attention kernel in Triton.

Every check runs small edge cases first, then random ones (fixed seeds), and stops at the first failure
with the case, expected vs got, and a hint aimed at the usual mistake.
"""
from __future__ import annotations

import math
import random

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch

from course_lib.device import DEVICE
from course_lib.grading.core import Checker, CheckResult
from course_lib.model.attention import attention
from course_lib.quant.kv_quant import QuantizedPagedKVCache, quantize
from course_lib.grading.kernels import check_is_kernel, launch
from course_lib.grading.remote import run_beside
from kernels.reference import paged_attention_int8_decode as _reference_attention


# ---------------------------------------------------------------- 1. quantize / dequantize
def _inputs_for_quantize():
    """(description, x) cases, small and special first."""
    gen = torch.Generator().manual_seed(0)
    cases = [("one row [1, 4]", torch.tensor([[0.5, -1.0, 0.25, 0.1]])),
             ("the largest magnitude is negative", torch.tensor([[0.3, -2.0, 1.0, 0.0], [4.0, 1.0, -1.0, 3.9]])),
             ("a row of zeros (its scale must not divide 0 by 0)",
              torch.tensor([[1.0, 2.0, 3.0, -4.0], [0.0, 0.0, 0.0, 0.0]])),
             ("[3, 2, 8] (tokens, heads, head_dim): one scale per (token, head)", torch.randn(3, 2, 8, generator=gen)),
             ("rows of very different sizes",
              torch.randn(4, 16, generator=gen) * torch.tensor([[1e-3], [1.0], [50.0], [1e4]]))]
    for i in range(3):
        shape = [(5, 32), (2, 4, 16), (7, 3, 2, 8)][i]
        cases.append((f"random {list(shape)}", torch.randn(*shape, generator=gen) * (i + 1)))
    cases.append(("float16 input [4, 2, 32]", (torch.randn(4, 2, 32, generator=gen) * 3).half()))
    return cases


def check_quantize_per_token(quantize_fn, dequantize_fn) -> CheckResult:
    """``quantize_fn(x) -> (codes, scale)``: x ``[..., D]``, one scale per row of D values (per token and head):
    scale = max|row| / 127 (float32, shape ``x.shape[:-1]``), codes = round(x / scale) (int8, x's shape), an
    all-zero row gives codes 0 and a small positive scale. ``dequantize_fn(codes, scale) -> codes · scale`` (float32).
    Checked: dtypes and shapes, the scales, |x - dequantize(quantize(x))| <= scale / 2, and dequantize alone."""
    with Checker("quantize_per_token", points=2) as c:
        for name, x in _inputs_for_quantize():
            x = x.to(DEVICE)
            case = f"{name}: x of shape {list(x.shape)}, {x.dtype}"
            result = quantize_fn(x.clone())
            c.check(isinstance(result, tuple) and len(result) == 2, case=case, expected="a tuple (codes, scale)",
                    got=type(result).__name__, hint="return codes, scale")
            codes, scale = result
            c.check(isinstance(codes, torch.Tensor) and codes.dtype == torch.int8 and codes.shape == x.shape, case=case,
                    expected=f"codes: an int8 tensor of shape {list(x.shape)}",
                    got=f"{type(codes).__name__} {getattr(codes, 'dtype', '')} {list(getattr(codes, 'shape', []))}",
                    hint="round first, then .to(torch.int8) (values are already in [-127, 127])")
            want_shape = list(x.shape[:-1])
            c.check(isinstance(scale, torch.Tensor) and list(scale.shape) in (want_shape, want_shape + [1]), case=case,
                    expected=f"scale of shape {want_shape} (one per row of D values)",
                    got=f"shape {list(getattr(scale, 'shape', []))}",
                    hint="one scale per row: the max of |x| over the LAST dimension only "
                         "(x.abs().amax(dim=-1)), not over the whole tensor")
            c.check(scale.dtype == torch.float32, case=case, expected="scale in float32", got=f"scale in {scale.dtype}",
                    hint="compute the scale in float32 (x.float() first): a float16 scale has 11 bits of mantissa, "
                         "and max|row| / 127 of a small row underflows in float16")
            scale = scale.reshape(want_shape).float()
            amax = x.float().abs().amax(dim=-1)
            nonzero = amax > 0
            c.check(bool(torch.isfinite(scale).all()) and bool(torch.isfinite(codes.float()).all()), case=case,
                    expected="finite scales", got=f"scale {scale.flatten()[:6].tolist()}",
                    hint="an all-zero row has max|x| = 0: clamp the scale to a tiny positive number (clamp_min(1e-8)) "
                         "so that x / scale is 0, not 0 / 0 = NaN")
            c.check_close(scale[nonzero], amax[nonzero] / 127, case=case + ": the scales of the non-zero rows",
                          rtol=1e-5, atol=0,
                          hint="symmetric INT8: scale = max|row| / 127, so that the largest value becomes code ±127 "
                               "(127, not 128: +128 does not fit in an int8, and ±127 keeps the grid symmetric)")
            c.check(bool((scale > 0).all()), case=case + ": the scales of all-zero rows", expected="a positive scale",
                    got=f"scale {scale[~nonzero].flatten()[:4].tolist()}",
                    hint="clamp the scale to a tiny positive number (clamp_min(1e-8)): with scale 0, x / scale is "
                         "0 / 0 = NaN, and NaN cast to int8 is undefined (0 on one machine, -128 on another)")
            c.check(bool((codes[~nonzero] == 0).all()), case=case + ": all-zero rows", expected="codes 0",
                    got=str(codes[~nonzero].flatten()[:8].tolist()), hint="0 / scale is 0")
            err = (codes.float() * scale[..., None] - x.float()).abs()
            bound = (scale[..., None] / 2 * (1 + 1e-4) + 1e-12).expand_as(err)
            worst = int(torch.argmax((err - bound).flatten()))
            c.check(bool((err <= bound).all()), case=case,
                    expected="|codes · scale - x| <= scale / 2 for every element (round to the NEAREST code)",
                    got=f"error {err.flatten()[worst].item():.4g} > scale / 2 = "
                        f"{(bound.flatten()[worst].item()):.4g} at "
                        f"flat index {worst} (x = {x.flatten()[worst].item():.4g}, code {int(codes.flatten()[worst])})",
                    hint="codes = torch.round(x / scale[..., None]): .to(torch.int8) alone truncates toward zero; "
                         "and divide by the scale of the element's own row (scale[..., None] broadcasts)")
            ref = quantize(x[..., None, :], "head")       # the library's symmetric per-(token, head) quantization
            got = dequantize_fn(ref.codes[..., 0, :], ref.scale[..., 0, 0])
            c.check_close(got, ref.codes[..., 0, :].float() * ref.scale[..., 0, :],
                          case=case + ": dequantize_fn(codes, scale)",
                          rtol=1e-6, atol=0, hint="dequantize: codes.float() * scale[..., None] (float32, x's shape)")
    return c.result


# ---------------------------------------------------------------- 2. the dequantizing load in Triton


def int8_paged_inputs(B, Hq, Hkv, D, P, lens, dtype, seed, scale_dtype=torch.float16):
    """q, INT8 caches with per-(slot, head) scales, block tables (blocks scattered at random), context lengths."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-L // P) for L in lens) + 1
    N = B * max_blocks + 2
    # K with a few large channels and rows of different sizes: a wrong scale index shows
    k = torch.randn(N, P, Hkv, D, generator=gen) * torch.rand(N, P, Hkv, 1, generator=gen).mul(4).add(0.1)
    v = torch.randn(N, P, Hkv, D, generator=gen) * torch.rand(N, P, Hkv, 1, generator=gen).mul(4).add(0.1)
    qk, qv = quantize(k, "head", scale_dtype=scale_dtype), quantize(v, "head", scale_dtype=scale_dtype)
    tables = torch.randperm(N, generator=gen)[: B * max_blocks].view(B, max_blocks).to(DEVICE, torch.int32)
    q = torch.randn(B, Hq, D, generator=gen).to(DEVICE, dtype)
    return (q, qk.codes.to(DEVICE), qv.codes.to(DEVICE), qk.scale[..., 0].contiguous().to(DEVICE),
            qv.scale[..., 0].contiguous().to(DEVICE), tables, torch.tensor(lens, dtype=torch.int32, device=DEVICE))


def check_int8_attention_kernel(kernel) -> CheckResult:
    """A Triton kernel, launched on the grid (B, Hq), computing one decode step of attention over an INT8 paged
    cache: ``kernel[(B, Hq)](q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, out, sm_scale,
    max_blocks_per_seq, NUM_KV_HEADS=Hkv, QUERIES_PER_KV=Hq // Hkv, BLOCK_SIZE=P, HEAD_DIM=D)``; caches int8
    ``[N, P, Hkv, D]``, scales float16 ``[N, P, Hkv]``, all contiguous. Compared with
    ``kernels.reference.paged_attention_int8_decode`` (MHA, GQA, partly filled blocks, float32 and float16 q)."""
    cases = [(1, 1, 1, 16, 4, [4], torch.float32), (1, 1, 1, 16, 4, [6], torch.float32),
             (2, 2, 2, 16, 4, [3, 7], torch.float32), (2, 4, 2, 16, 8, [9, 16], torch.float32),
             (3, 8, 2, 32, 16, [1, 33, 40], torch.float32), (2, 4, 1, 16, 8, [8, 13], torch.float16)]
    rng = random.Random(7)
    for _ in range(2):
        Hkv, G, P = rng.choice([1, 2]), rng.choice([1, 2, 4]), rng.choice([4, 8, 16])
        cases.append((2, Hkv * G, Hkv, 16, P, [rng.randint(1, 3 * P) for _ in range(2)], torch.float32))
    with Checker("int8_attention_kernel", points=3, timeout_s=180) as c:
        check_is_kernel(c, kernel, "check_int8_attention_kernel(_int8_attention_kernel)")
        for i, (B, Hq, Hkv, D, P, lens, dtype) in enumerate(cases):
            q, kc, vc, ks, vs, tables, context_lens = int8_paged_inputs(B, Hq, Hkv, D, P, lens, dtype, seed=i)
            out = torch.full_like(q, float("nan"))
            launch(kernel, (B, Hq), q, kc, vc, ks, vs, tables, context_lens, out, 1 / math.sqrt(D), tables.shape[1],
                    NUM_KV_HEADS=Hkv, QUERIES_PER_KV=Hq // Hkv, BLOCK_SIZE=P, HEAD_DIM=D,
                   exercise="Exercise: write the dequantizing loads of _int8_attention_kernel",
                   bounds_hint="a scale has no HEAD_DIM axis: the scale of slot (block, offset) and kv head h is at "
                               "(block*BLOCK_SIZE + offset)*NUM_KV_HEADS + h, its codes at that index * HEAD_DIM + d; "
                               "mask positions >= context_len in every load")
            want = _reference_attention(q, kc, vc, ks, vs, tables, context_lens)
            tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-3, atol=3e-3)

            def close(k_scale, v_scale):
                other = _reference_attention(q, kc, vc, k_scale, v_scale, tables, context_lens)
                return bool(torch.isclose(out.float(), other.float(), **tol).all())

            ones = torch.ones_like(ks)
            if bool(torch.isnan(out).any()):
                hint = ("some outputs are NaN or were never written: mask the loads (other=0) and the scores of "
                        "positions >= context_len, and store one [HEAD_DIM] row per program")
            elif close(ones, ones) or close(ones, vs) or close(ks, ones):
                hint = ("a cache holds codes, not values: multiply each row of codes by its scale, "
                        "k = k_codes.to(tl.float32) * k_scale[:, None] (and the same for v with v_scale)")
            elif close(ks, ks) or close(vs, vs):
                hint = "keys and values have their own scales: dequantize K with k_scale_ptr, V with v_scale_ptr"
            else:
                hint = ("the scale of token slot (block, offset) and kv head h is at (block * BLOCK_SIZE + offset) * "
                        "NUM_KV_HEADS + h: the same `rows` index as its codes (without their * HEAD_DIM); GQA: "
                        "query head `head` reads kv head h = head // QUERIES_PER_KV")
            c.check_close(out, want,
                          case=f"B={B}, Hq={Hq}, Hkv={Hkv}, D={D}, block_size={P}, context_lens={lens}, q {dtype}",
                          hint=hint, **tol)
    return c.result


# ---------------------------------------------------------------- end to end: the pieces decode the shipped model
# Two prompts of 15 tokens decoded together from one pool of INT8 blocks of 8 slots: the prefill leaves the second
# block one slot short, the first decode step fills it, the second opens a third block. Every greedy token wins by
# a logit margin of 0.47 or more, far above float32 rounding: only a real mistake flips it.
_E2E_PROMPTS = ["4 These are the generations of the heavens and of the earth when they were created, in the day that",
                "5 And every plant of the field before it was in the earth, and every herb of the field before it "
                "grew"]   # (cut to their first 15 tokens)
_E2E_LEN, _E2E_NEW, _E2E_BLOCK_SIZE = 15, 3, 8
_E2E_PIECES = ("quantize_per_token", "dequantize_per_token", "_int8_attention_kernel")


class _PieceError(Exception):
    """A piece returned something the cache cannot store: the message names it."""


class _Int8Cache(QuantizedPagedKVCache):
    """The library's INT8 paged cache (float32 scales, one per slot and kv head), with its three pieces passed in
    (None: the library's): ``quantize_fn`` turns the new tokens' K/V ``[T, Hkv, D]`` into the codes and scales
    stored at their slots; a prefill reads its blocks back through ``dequantize_fn`` and attends causally; a decode
    step attends through ``kernel`` (the library's: ``kernels.reference.paged_attention_int8_decode``)."""

    def __init__(self, model, num_blocks: int, batch_size: int, quantize_fn=None, dequantize_fn=None, kernel=None):
        super().__init__(model.config, num_blocks, _E2E_BLOCK_SIZE, batch_size, kv_dtype="int8",
                         scale_dtype=torch.float32, device=model.device, use_kernel=False)
        self.quantize_fn, self.dequantize_fn, self.kernel = quantize_fn, dequantize_fn, kernel

    def _quantize(self, x):                                                      # x [T, Hkv, D]
        if self.quantize_fn is None:
            q = quantize(x, "head")
            return q.codes, q.scale[..., 0]
        got = self.quantize_fn(x)
        codes, scale = got if isinstance(got, tuple) and len(got) == 2 else (None, None)
        if not (isinstance(codes, torch.Tensor) and codes.dtype == torch.int8 and codes.shape == x.shape
                and isinstance(scale, torch.Tensor) and scale.numel() == x.shape[0] * x.shape[1]):
            raise _PieceError(f"quantize_per_token(x) with x of shape {list(x.shape)} returned {_describe(got)}: "
                              f"expected (codes int8 {list(x.shape)}, scale {list(x.shape[:-1])}): one scale per "
                              "(token, kv head)")
        return codes, scale.reshape(x.shape[:-1]).float()

    def _dequantize(self, codes, scale):                              # codes [B, L, Hkv, D], scale [B, L, Hkv]
        if self.dequantize_fn is None:
            return codes.float() * scale[..., None]
        x = self.dequantize_fn(codes, scale)
        if not (isinstance(x, torch.Tensor) and x.shape == codes.shape and x.is_floating_point()):
            raise _PieceError(f"dequantize_per_token(codes, scale) with codes {list(codes.shape)}, scale "
                              f"{list(scale.shape)} returned {_describe(x)}: expected float32 of the codes' shape")
        return x.float()

    def attend(self, layer, q, k, v):
        B, Hq, S, D = q.shape
        if self._step is None:   # the first layer of this forward: reserve the slots of the new tokens
            self._step = self._prepare(S)
        slot_mapping, block_tables, context_lens = self._step
        caches = (self.k_caches[layer], self.v_caches[layer], self.k_scales[layer], self.v_scales[layer])
        N, P, Hkv, _ = caches[0].shape
        for x, codes, scales in ((k, caches[0], caches[2]), (v, caches[1], caches[3])):
            new_codes, new_scales = self._quantize(x.transpose(1, 2).reshape(B * S, Hkv, D))   # token-major
            codes.view(N * P, Hkv, D)[slot_mapping] = new_codes
            scales.view(N * P, Hkv)[slot_mapping] = new_scales
        if S == 1:   # decode: the kernel dequantizes the blocks as it reads them
            if self.kernel is None:
                return _reference_attention(q[:, :, 0], *caches, block_tables, context_lens)[:, :, None]
            out = torch.full_like(q[:, :, 0], float("nan"))
            launch(self.kernel, (B, Hq), q[:, :, 0].contiguous(), *caches, block_tables, context_lens, out,
                   1 / math.sqrt(D), block_tables.shape[1], NUM_KV_HEADS=Hkv, QUERIES_PER_KV=Hq // Hkv,
                   BLOCK_SIZE=P, HEAD_DIM=D,
                   exercise="Exercise: write the dequantizing loads of _int8_attention_kernel")
            return out[:, :, None]
        L, idx = self.length + S, block_tables.long()
        k_all, v_all = (self._dequantize(codes[idx].reshape(B, -1, Hkv, D)[:, :L],
                                         scales[idx].reshape(B, -1, Hkv)[:, :L]).transpose(1, 2)   # [B, Hkv, L, D]
                        for codes, scales in ((caches[0], caches[2]), (caches[1], caches[3])))
        return attention(q, k_all, v_all, causal=True)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    if isinstance(x, tuple):
        return "(" + ", ".join(_describe(t) for t in x) + ")"
    return type(x).__name__


def int8_decode(quantize_fn, dequantize_fn, kernel, prompts, max_new_tokens: int):
    """Greedy decode of ``prompts`` (token lists of one length, decoded together) on the shipped tiny model
    (float32) from an ``_Int8Cache`` built with these pieces (None: the library's). Returns the new tokens of each
    prompt, or ``{"error": message}`` when a piece returned something the cache cannot store. Runs where the
    learner's code lives (the grader runs it in the notebook's kernel)."""
    from course_lib.grading.lesson01 import _float32_target

    model = _float32_target()[0]
    num_blocks = len(prompts) * -(-(len(prompts[0]) + max_new_tokens) // _E2E_BLOCK_SIZE) + 1
    cache = _Int8Cache(model, num_blocks, len(prompts), quantize_fn, dequantize_fn, kernel)
    try:
        with torch.no_grad():
            logits = model(torch.tensor(prompts, device=model.device), cache=cache, last_token_only=True)
            outs = [[int(t)] for t in logits[:, -1].argmax(-1)]
            for _ in range(max_new_tokens - 1):
                logits = model(torch.tensor([o[-1:] for o in outs], device=model.device), cache=cache,
                               last_token_only=True)
                for o, t in zip(outs, logits[:, -1].argmax(-1)):
                    o.append(int(t))
    except _PieceError as err:
        return {"error": str(err)}
    return outs


def check_end_to_end(quantize_fn, dequantize_fn, kernel) -> CheckResult:
    """Your pieces decode the shipped tiny model (float32) from an INT8 paged cache: two prompts of 15 tokens decoded
    together, blocks of 8 slots; your quantize_per_token writes the codes and scales of every new token, the prefill
    reads its blocks back through your dequantize_per_token, your kernel attends at every decode step. The greedy
    tokens must equal the library's INT8 decode (``kernels.quant.quantize(x, "head")``, float32 scales) exactly: the
    same quantization gives the same tokens. Your quantize / dequantize run first with the library's kernel (each
    alone, with the library's other, when the tokens differ), then with your kernel. How many tokens agree with the
    float32 decode without quantization is shown for information."""
    from course_lib.grading.lesson01 import _float32_target
    from course_lib.model.generate import greedy_generate

    model, tok = _float32_target()
    prompts = [tok.encode(text)[:_E2E_LEN] for text in _E2E_PROMPTS]
    want = int8_decode(None, None, None, prompts, _E2E_NEW)   # the library's INT8 decode
    fp = [greedy_generate(model, p, _E2E_NEW, use_cache=False) for p in prompts]
    pieces = (quantize_fn, dequantize_fn, kernel)

    def decode(*used):
        return run_beside(quantize_fn, "course_lib.grading.lesson07:int8_decode", *used, prompts, _E2E_NEW)

    with Checker("end_to_end", points=2, timeout_s=240) as c:
        check_is_kernel(c, kernel, "check_end_to_end(quantize_per_token, dequantize_per_token, _int8_attention_kernel)")
        stubs = [name for name, p in zip(_E2E_PIECES, pieces) if run_beside(p, "course_lib.grading.kernels:is_stub", p)]
        if stubs:
            raise NotImplementedError(f"Exercise: this check runs exercises 1 and 2 together: finish them first "
                                      f"({' and '.join(stubs)} {'is' if len(stubs) == 1 else 'are'} still the stub)")
        case = (f"2 prompts of {_E2E_LEN} tokens, {_E2E_NEW} new tokens each, decoded together from INT8 blocks of "
                f"{_E2E_BLOCK_SIZE} slots")
        for used, name in [((quantize_fn, dequantize_fn, None), "your quantize_per_token and dequantize_per_token with "
                                                                 "the library's attention"),
                           (pieces, "your three pieces")]:
            c.case = f"{case}; {name}"
            got = decode(*used)
            if isinstance(got, dict):
                c.check(False, expected="codes and scales the cache can store", got=got["error"],
                        hint="the unit check of exercise 1 above shows the rule (run it again); here it broke the "
                             "cache")
            if got == want:
                c.cases_passed += 1
                continue
            if used[2] is None:   # quantize and dequantize each alone, with the library's other
                guilty = [piece for i, piece in enumerate(_E2E_PIECES[:2])
                          if decode(*[p if j == i else None for j, p in enumerate(pieces[:2])], None) != want]
                hint = (f"with the library's other piece, your {' and your '.join(guilty)} alone already "
                        f"change{'s' * (len(guilty) == 1)} the tokens: scale = max|row| / 127 per (token, kv head), "
                        "codes = round(x / scale), x ≈ codes · scale" if guilty else
                        "each of your two functions decodes correctly with the library's other, not together: "
                        "dequantize_per_token must read exactly the codes and scales quantize_per_token returns")
            else:
                hint = ("your quantize / dequantize decode correctly with the library's attention, with your "
                        "_int8_attention_kernel the tokens change: k = k_codes · k_scale and v = v_codes · v_scale, "
                        "each slot's scale read at the same `rows` index as its codes (without * HEAD_DIM)")
            row = next(r for r in range(len(want)) if got[r] != want[r])
            c.check_equal(got[row], want[row], case=f"{c.case}: the new tokens of prompt {row} vs the library's INT8 "
                          "decode", hint=hint)
        agree = sum(a == b for w, f in zip(want, fp) for a, b in zip(w, f))
        c.note = (f"for information: the INT8 decode agrees with the float32 decode (no quantization) in {agree} of "
                  f"{len(fp) * _E2E_NEW} positions")
    return c.result
