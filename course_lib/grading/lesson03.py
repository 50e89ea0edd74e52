"""Checks of lesson 03 (FlashAttention): online softmax, tiled attention in torch, the Triton forward kernel
(non-causal, GQA) and its causal two-stage version, and the backward pass blocked in torch (P recomputed from the
log-sum-exp, GQA, causal). The kernels are launched in the interpreter on CPU (compiled on a GPU) at tiny shapes,
lengths that are not multiples of the blocks first among the cases."""
from __future__ import annotations

import contextlib
import math

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from course_lib.model.attention import attention
from course_lib.device import DEVICE, HAS_GPU
from course_lib.grading.core import Checker, CheckResult
from course_lib.grading.kernels import check_is_kernel, launch, launch_traced
from course_lib.grading.remote import run_beside, type_name
from kernels import reference as kernels_reference

LOG2E = 1.4426950408889634


def _forbidden(kind: str) -> list[tuple[object, str]]:
    """What an exercise must not call: torch's own softmax (it computes one), or autograd (it computes gradients)."""
    import torch.func
    import torch.nn.functional as F

    if kind == "autograd":
        return [(torch.autograd, "grad"), (torch.autograd, "backward"), (torch.Tensor, "backward"),
                (torch.func, "vjp"), (torch.func, "grad"), (torch.func, "grad_and_value"), (torch.func, "jacrev")]
    return [(torch, "softmax"), (torch, "logsumexp"), (F, "softmax"), (torch.Tensor, "softmax"),
            (torch.Tensor, "logsumexp"), (torch, "log_softmax"), (F, "log_softmax")]


@contextlib.contextmanager
def _watch(kind: str = "softmax"):
    """Count calls of what ``_forbidden(kind)`` lists."""
    used: list[str] = []
    originals = _forbidden(kind)
    saved = [(owner, name, getattr(owner, name)) for owner, name in originals]

    def wrap(name, fn):
        def spy(*args, **kwargs):
            used.append(name)
            return fn(*args, **kwargs)
        return spy

    try:
        for owner, name, fn in saved:
            setattr(owner, name, wrap(f"{getattr(owner, '__name__', owner)}.{name}", fn))
        yield used
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def call_watched(student_fn, *args, spy_shapes: bool = False, _forbid: str = "softmax", **kwargs):
    """``student_fn(*args, **kwargs)`` under the watch of ``_forbidden(_forbid)`` (and the shape spy): ``(result,
    forbidden calls seen, shapes created, reductions made as (op, input shape))``. Runs where the learner's function
    lives (the grader runs it in the notebook's kernel)."""
    spy = _ShapeSpy() if spy_shapes else contextlib.nullcontext()
    with _watch(_forbid) as used, spy:
        result = student_fn(*args, **kwargs)
    return result, list(used), spy.shapes if spy_shapes else [], spy.reductions if spy_shapes else []


def _watched(student_fn, *args, **kwargs):
    return run_beside(student_fn, "course_lib.grading.lesson03:call_watched", student_fn, *args, **kwargs)


_NO_SOFTMAX_HINT = ("compute it yourself with a running max m and running sum l (that is the exercise); "
                    "torch.softmax / logsumexp are not allowed here")


# ---------------------------------------------------------------- exercise 1: online softmax
def check_online_softmax(student_fn) -> CheckResult:
    """``online_softmax(x, block_size)`` == softmax(x, dim=-1), reading x in blocks of ``block_size`` columns.

    Cases: a growing max (the running sum must be rescaled), logits near 1000 (exp overflows without
    subtracting the max), rows that start with -inf (masked), block sizes that do not divide the length.
    """
    gen = torch.Generator().manual_seed(3)
    cases = [("increasing: the max grows in every block", torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]), 2),
             ("decreasing", torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]]), 2),
             ("one block", torch.randn(2, 5, generator=gen), 8),
             ("random, block does not divide 10", torch.randn(3, 10, generator=gen), 4),
             ("large logits (~1000)", torch.randn(4, 37, generator=gen) * 50 + 1000, 8),
             ("first block all -inf (masked)",
              torch.cat([torch.full((2, 4), float("-inf")), torch.randn(2, 9, generator=gen)], 1), 4),
             ("very negative logits (~ -1000): every exp(x) underflows to 0",
              torch.randn(3, 12, generator=gen) - 1000, 4),
             ("block_size=1: one column per block", torch.randn(2, 7, generator=gen) * 5, 1),
             ("3-D input", torch.randn(2, 3, 33, generator=gen) * 10, 5)]
    with Checker("online_softmax", points=2) as c:
        for name, x, block in cases:
            c.case = case = f"{name}: x {tuple(x.shape)}, block_size={block}"
            got, used, _, reductions = _watched(student_fn, x.clone(), block, spy_shapes=True)
            c.check(not used, case=case, expected="no call of torch's softmax", got=f"called {used[0]}" if used else "",
                    hint=_NO_SOFTMAX_HINT)
            N = x.shape[-1]
            whole = [(op, shape) for op, shape in reductions if N > block and shape and shape[-1] == N]
            c.check(not whole, case=case, expected=f"reductions (max, sum) over blocks of at most {block} columns",
                    got=f"{whole[0][0]} over a tensor of shape {list(whole[0][1])}, whole rows of {N}" if whole else "",
                    hint="that is not streaming: reading the whole row to find its max (or sum) first is the "
                         "two-pass softmax. Keep a running max m and sum l, updated block by block (rescale l by "
                         "exp(m - m_new) when the max grows); only the final exp(x - m) / l touches whole rows")
            want = torch.softmax(x, dim=-1)
            hint = ("when a block raises the running max from m to m_new, the sum so far was taken relative to m: "
                    "multiply it by exp(m - m_new) before adding the new block's exp(x - m_new)")
            if "large" in name:
                hint = "subtract the running max before exp: exp(1000) overflows to inf in float32"
            elif "-inf" in name:
                hint = "a block of only -inf leaves m = -inf, and exp(-inf - (-inf)) is nan: treat exp(-inf) as 0"
            elif "very negative" in name:
                hint = ("start the running max at -inf, not 0: with m = 0, exp(x - m) = exp(-1000) underflows to 0 "
                        "for every column and l = 0 (0/0 = nan)")
            c.check_close(got, want, case=case, rtol=1e-5, atol=1e-6, hint=hint)
    return c.result


# ---------------------------------------------------------------- exercise 2: tiled attention
_REDUCTIONS = {"amax", "amin", "max", "min", "sum", "mean", "logsumexp", "sort", "topk", "argmax", "argmin",
               "cumsum", "prod", "norm", "linalg_vector_norm", "std", "var", "nansum", "kthvalue", "median"}


class _ShapeSpy(TorchDispatchMode):
    """Records the shapes of floating-point tensors that torch ops create, and every reduction (max, sum, ...) of
    one tensor with the shape of that tensor: a streaming answer reduces blocks, never the whole row."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.reductions: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_flatten(out)[0]
                        if isinstance(t, torch.Tensor) and t.is_floating_point()]
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in _REDUCTIONS and len(tensors) == 1:   # (torch.max(a, b) of two tensors is elementwise)
            self.reductions.append((name, tuple(tensors[0].shape)))
        return out


def check_tiled_attention(student_fn) -> CheckResult:
    """``tiled_attention(q, k, v, causal=..., block_n=...)`` == attention, q [B, H, Sq, D], k/v [B, H, Skv, D],
    computed block by block: no [Sq, Skv] score matrix may be created (only [Sq, block_n] pieces)."""
    gen = torch.Generator().manual_seed(4)
    # (B, H, Sq, Skv, D, causal, block_n, kind); D != Skv in every case, so that the only [.., Sq, Skv] tensor can be
    # a score matrix
    cases = [(1, 1, 4, 8, 16, False, 4, "random"), (1, 2, 5, 13, 16, False, 4, "random"),
             (2, 2, 7, 30, 8, False, 8, "random"), (1, 2, 6, 20, 16, True, 8, "random"),
             (1, 1, 1, 33, 8, True, 16, "random"), (1, 2, 9, 9, 16, True, 4, "random"),
             (1, 1, 3, 5, 8, False, 1, "random"), (1, 2, 4, 12, 8, False, 4, "very negative"),
             (1, 2, 5, 11, 16, True, 4, "float16")]
    with Checker("tiled_attention", points=2) as c:
        for B, H, Sq, Skv, D, causal, block_n, kind in cases:
            q, k, v = (torch.randn(B, H, s, D, generator=gen) for s in (Sq, Skv, Skv))
            q = q * 3  # scores of a few tens: large enough that a missing rescale shows
            if kind == "very negative":  # q along +u, k along -u: every score is about -400 / sqrt(D)
                u = torch.ones(D) / D ** 0.5
                q, k = q + 20 * u, k - 20 * u
            if kind == "float16":
                q, k, v = q.half(), k.half(), v.half()
            c.case = case = (f"q {tuple(q.shape)}, k/v {tuple(k.shape)}, causal={causal}, block_n={block_n}"
                             + ("" if kind == "random" else f", {kind}" + (" scores" if kind != "float16" else "")))
            got, used, shapes, _ = _watched(student_fn, q, k, v, causal=causal, block_n=block_n, spy_shapes=True)
            c.check(not used, case=case, expected="no call of torch's softmax", got=f"called {used[0]}" if used else "",
                    hint=_NO_SOFTMAX_HINT)
            full = [s for s in shapes if len(s) >= 2 and s[-2:] == (Sq, Skv)]
            c.check(not full or Skv <= block_n, case=case,
                    expected=f"no [.., {Sq}, {Skv}] score matrix (that is O(S²) memory)",
                    got=f"a tensor of shape {full[0] if full else ''} was created",
                    hint="compute q @ k_blockᵀ for one block of block_n keys at a time, inside the loop")
            hint = ("keep m, l and acc per query row; when m grows to m_new, multiply BOTH l and acc by exp(m - m_new)")
            want = attention(q.float(), k.float(), v.float(), causal=causal).to(q.dtype)
            if isinstance(got, torch.Tensor) and got.dtype != q.dtype:
                hint = f"compute in float32, but return q's dtype ({q.dtype}): (acc / l[..., None]).to(q.dtype)"
            elif kind == "very negative":
                hint = ("start the running max m at -inf, not 0: with m = 0, exp(s - m) underflows to 0 for every "
                        "score here (about -250) and l = 0")
            elif causal and Skv > Sq:
                hint = ("queries are the LAST Sq positions: query row i sits at position i + Skv - Sq and may see "
                        "keys j <= i + Skv - Sq (bottom-right alignment)")
            tol = dict(rtol=1e-4, atol=1e-5) if q.dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
            c.check_close(got, want, case=case, hint=hint, **tol)
    return c.result


# ---------------------------------------------------------------- exercises 3 and 4: the Triton kernels


_BLOCK = dict(BLOCK_M=16, BLOCK_N=16)
_BOUNDS_HINT = ("rows of q and out run to Sq, rows of k and v to Skv: q/out of (batch b, head h) start at "
                "(b*Hq + h)*Sq*HEAD_DIM, k/v of kv head g at (b*Hkv + g)*Skv*HEAD_DIM (a swapped Sq/Skv lands outside "
                "them); the last query block and the last key block are partial: mask offs_m < Sq in the loads "
                "of q and the store of out, cols < Skv in the loads of k and v")


def _run_kernel_cases(c: Checker, kernel, cases, causal: bool) -> None:
    check_is_kernel(c, kernel, "check_flash_kernel(_flash_fwd_kernel)")
    gen = torch.Generator().manual_seed(5)
    dtypes = [torch.float16, torch.bfloat16] if HAS_GPU else [torch.float32, torch.float16]
    bm, bn = _BLOCK["BLOCK_M"], _BLOCK["BLOCK_N"]
    for dtype in dtypes:
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
        for B, Hq, Hkv, Sq, Skv, D, scale in cases:
            q = torch.randn(B, Hq, Sq, D, generator=gen) * (1.0 if scale == "very negative" else scale)
            k = torch.randn(B, Hkv, Skv, D, generator=gen)
            v = torch.randn(B, Hkv, Skv, D, generator=gen).to(DEVICE, dtype)
            if scale == "very negative":  # q along +u, k along -u: every score about -24·24 / sqrt(D) · log2(e)
                u = torch.ones(D) / D ** 0.5
                q, k = q + 24 * u, k - 24 * u
            q, k = q.to(DEVICE, dtype), k.to(DEVICE, dtype)
            # out is followed by a guard region of NaN: compiled on a GPU a store of rows past Sq lands there (the
            # interpreter stops it before it happens: OutOfBounds)
            out_buf = torch.full((B * Hq * Sq * D + 16 * D,), float("nan"), device=DEVICE, dtype=dtype)
            out = out_buf[: B * Hq * Sq * D].view(B, Hq, Sq, D)
            qk_scale = LOG2E / math.sqrt(D)
            grid = (triton.cdiv(Sq, bm), B * Hq)
            c.case = case = (f"q [B={B}, Hq={Hq}, Sq={Sq}, D={D}], k/v [B={B}, Hkv={Hkv}, Skv={Skv}, D={D}], {dtype}, "
                             f"qk_scale={qk_scale:.4f}, BLOCK_M=BLOCK_N=16, grid={grid}"
                             + (", every score very negative" if scale == "very negative" else ""))
            loads = launch_traced(kernel, grid, q, k, v, out, Hq, Hkv, Sq, Skv, qk_scale, HEAD_DIM=D, **_BLOCK,
                                  watch=(1,), exercise="Exercise: write the kernel", bounds_hint=_BOUNDS_HINT)
            spill = int((~torch.isnan(out_buf[out.numel():])).sum())
            c.check(spill == 0, case=case, expected="nothing written after the last query row",
                    got=f"{spill} element(s) past the end of out were written",
                    hint="the last query block is partial: store with mask=offs_m[:, None] < Sq")
            if causal and loads:   # (counted in the interpreter only)
                for (start_m, off_bh, _), (blocks, _read) in sorted(loads[1].items()):
                    diag_end = min((start_m + 1) * bm + Skv - Sq, Skv)
                    visible = triton.cdiv(diag_end, bn)
                    c.check(blocks <= visible, case=f"{case}: program (start_m={start_m}, off_bh={off_bh})",
                            expected=f"K loaded at most {visible} time(s): its rows see only keys 0 ... "
                                     f"{diag_end - 1}, {visible} block(s) of BLOCK_N={bn}",
                            got=f"K loaded {blocks} times (one load per block of keys visited)",
                            hint="skip the blocks that every row of the query block must ignore: stage 2 ends at "
                                 "diag_end = min((start_m + 1)·BLOCK_M + Skv - Sq, Skv); keys from there on are "
                                 "hidden from every row, never load them (that skipped work is the point of the "
                                 "two-stage loop: about half of the blocks when Sq = Skv); and stage 1 ends on a block "
                                 "boundary, full_end = min(start_m·BLOCK_M + Skv - Sq + 1, Skv) // BLOCK_N·BLOCK_N, "
                                 "where stage 2 starts (else the blocks overlap)")
            want = attention(q.float(), k.float(), v.float(), causal=causal).to(dtype)
            wrong_heads = [name for name, kv_head in (("h // Hkv", lambda h: h // Hkv), ("h % Hkv", lambda h: h % Hkv))
                           if any(kv_head(h) != h // (Hq // Hkv) for h in range(Hq)) and bool(torch.isclose(
                               out.float(), _heads_mapped(q, k, v, causal, kv_head), **tol).all())]
            if wrong_heads:
                hint = (f"query head h read kv head {wrong_heads[0]}: heads are grouped, h // (Hq // Hkv) (Hq // Hkv "
                        "consecutive query heads share one kv head)")
            elif Hkv != Hq:
                hint = ("GQA: query head h reads kv head h // (Hq // Hkv), so Hq // Hkv consecutive query heads "
                        "share one kv head; k/v of batch b, kv head g start at (b * Hkv + g) * Skv * D")
            elif scale == "very negative":
                hint = ("start m_i at -inf (tl.full([BLOCK_M], float(\"-inf\"), ...)), not 0: with m_i = 0, "
                        "exp2(qk - m_i) underflows to 0 for every score here and l_i = 0")
            elif Sq % 16 or Skv % 16:
                hint = ("lengths that are not multiples of the blocks: load K/V with mask=cols[:, None] < Skv "
                        "(other=0) AND set the scores of those columns to -inf, or the padding keys get weight")
            else:
                hint = ("online softmax in log2 units: qk = q·kᵀ·qk_scale; m_new = max(m_i, rowmax(qk)); "
                        "p = exp2(qk - m_new); alpha = exp2(m_i - m_new); l_i = l_i·alpha + rowsum(p); "
                        "acc = acc·alpha + p @ v; at the end out = acc / l_i")
            if causal and Skv > Sq:
                hint = ("queries are the LAST Sq of the Skv positions: row i sees keys j <= i + (Skv - Sq); "
                        "the stage bounds and the mask both need that offset")
            elif causal:
                hint = ("causal: row i sees keys j <= i. Stage 1 runs over the key blocks every row of the query "
                        "block may see (no mask), stage 2 over the diagonal blocks with the mask; " + hint)
            c.check_close(out, want, case=case, hint=hint, **tol)


def _heads_mapped(q, k, v, causal: bool, kv_head) -> torch.Tensor:
    """Attention where query head h reads kv head ``kv_head(h)`` (a wrong mapping gives a wrong output)."""
    index = torch.tensor([min(kv_head(h), k.shape[1] - 1) for h in range(q.shape[1])], device=k.device)
    return attention(q.float(), k.float()[:, index], v.float()[:, index], causal=causal)


def check_flash_kernel(kernel) -> CheckResult:
    """The non-causal FlashAttention forward kernel
    ``(q_ptr, k_ptr, v_ptr, out_ptr, Hq, Hkv, Sq, Skv, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N)`` on contiguous
    q [B, Hq, Sq, D] and k/v [B, Hkv, Skv, D], grid (cdiv(Sq, BLOCK_M), B * Hq), against the torch reference:
    block multiples, ragged lengths, GQA and MQA, one query, large logits."""
    cases = [(1, 1, 1, 16, 16, 16, 1.0), (1, 2, 2, 16, 48, 16, 1.0), (1, 2, 2, 20, 37, 16, 1.0),
             (1, 2, 2, 1, 23, 32, 1.0), (1, 2, 2, 33, 33, 16, 8.0), (2, 4, 2, 16, 32, 16, 1.0),
             (1, 4, 1, 7, 19, 32, 1.0), (1, 6, 2, 5, 17, 16, 1.0), (1, 1, 1, 17, 20, 16, "very negative")]
    with Checker("flash_kernel", points=3, timeout_s=180) as c:
        _run_kernel_cases(c, kernel, cases, causal=False)
    return c.result


def check_causal_kernel(kernel) -> CheckResult:
    """The causal kernel with the two-stage loop, same signature and launch as ``check_flash_kernel``; queries
    are the last Sq of the Skv positions (bottom-right). Sq == Skv first, then Skv > Sq (a cached prefix),
    one query (decoding), GQA. In the interpreter the loads of K are counted per program: a program that visits key
    blocks hidden from all its rows fails, even when its masked output is right (skipping them is the exercise)."""
    cases = [(1, 1, 1, 32, 32, 16, 1.0), (1, 2, 2, 20, 20, 16, 1.0), (1, 2, 2, 16, 48, 16, 1.0),
             (1, 2, 2, 5, 40, 16, 1.0), (1, 2, 2, 1, 33, 32, 1.0), (1, 2, 2, 17, 50, 16, 8.0),
             (2, 4, 2, 12, 29, 16, 1.0), (1, 1, 1, 48, 48, 16, 1.0), (1, 6, 2, 18, 18, 16, 1.0),
             (1, 1, 1, 20, 20, 16, "very negative")]
    with Checker("causal_kernel", points=3, timeout_s=180) as c:
        _run_kernel_cases(c, kernel, cases, causal=True)
    return c.result


# ---------------------------------------------------------------- exercise 5: the backward pass, blocked
def check_attention_backward(student_fn) -> CheckResult:
    """``attention_backward(q, k, v, out, lse, do, causal=..., block_n=...)`` -> (dq, dk, dv) of
    out = softmax(q kᵀ / sqrt(D)) v, q/out/do [B, Hq, Sq, D], k/v [B, Hkv, Skv, D], lse [B, Hq, Sq], computed over
    K/V blocks of ``block_n`` rows without autograd and without an [.., Sq, Skv] matrix; against torch.autograd of the
    reference attention. Plain attention first, then causal (square, then with the Skv - Sq offset), then GQA."""
    gen = torch.Generator().manual_seed(6)
    cases = [(1, 1, 1, 6, 10, 8, False, 4), (1, 2, 2, 5, 13, 8, False, 4), (1, 2, 2, 9, 9, 8, True, 4),
             (1, 2, 2, 4, 11, 8, True, 4), (1, 4, 2, 7, 10, 8, True, 4), (2, 6, 2, 5, 12, 16, False, 8),
             (1, 4, 1, 1, 9, 8, True, 4)]
    with Checker("attention_backward", points=3) as c:
        for B, Hq, Hkv, Sq, Skv, D, causal, block_n in cases:
            q = (torch.randn(B, Hq, Sq, D, generator=gen) * 2).requires_grad_()  # sharp enough that mistakes show
            k, v = (torch.randn(B, Hkv, Skv, D, generator=gen).requires_grad_() for _ in range(2))
            do = torch.randn(B, Hq, Sq, D, generator=gen)
            out, lse = (t.detach() for t in kernels_reference.flash_attention_lse(q, k, v, causal=causal))
            want = torch.autograd.grad(attention(q, k, v, causal=causal), (q, k, v), do)
            q, k, v = q.detach(), k.detach(), v.detach()
            case = (f"q/out/do [B={B}, Hq={Hq}, Sq={Sq}, D={D}], k/v [B={B}, Hkv={Hkv}, Skv={Skv}, D={D}], "
                    f"causal={causal}, block_n={block_n}")
            got, used, shapes, _ = _watched(student_fn, q, k, v, out, lse, do, causal=causal, block_n=block_n,
                                         spy_shapes=True, _forbid="autograd")
            c.check(not used, case=case, expected="no autograd", got=f"called {used[0]}" if used else "",
                    hint="write the gradients out yourself (that is the exercise): dV = Pᵀ dO, dP = dO Vᵀ, ...")
            full = [s for s in shapes if len(s) >= 2 and s[-2:] == (Sq, Skv)]
            c.check(not full, case=case, expected=f"no [.., {Sq}, {Skv}] matrix (that is O(S²) memory)",
                    got=f"a tensor of shape {full[0] if full else ''} was created",
                    hint="recompute P for one block of block_n keys at a time, inside the loop")
            c.check(isinstance(got, (tuple, list)) and len(got) == 3, case=case, expected="a tuple (dq, dk, dv)",
                    got=type_name(got), hint="return dq, dk, dv")
            for name, g, w in zip(("dv", "dq", "dk"), (got[2], got[0], got[1]), (want[2], want[0], want[1])):
                c.check_close(g, w, case=f"{case}: {name}", rtol=1e-4, atol=1e-5,
                              hint=_backward_hint(name, g, w, D, causal, Hq // Hkv))
    return c.result


def _backward_hint(name: str, got, want, D: int, causal: bool, G: int) -> str:
    """The likeliest mistake behind a wrong ``name``, the gradients before it in the order dv, dq, dk being right."""
    scaled = isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(
        got.float() / math.sqrt(D), want, rtol=1e-3, atol=1e-5)
    group = (f"; a kv head's rows are the sum over its G = {G} query heads: axis 2 of [B, Hkv, G, n, D] (axis 1 "
             "runs over the kv heads)")
    if name == "dv":
        hint = ("dV = Pᵀ dO with P recomputed from the forward's lse: P = exp(q kᵀ / sqrt(D) - lse) for this block "
                "(lse [B, Hq, Sq] broadcasts over the block's keys)")
        if causal:
            hint += ("; causal: set P to 0 where key j > i + Skv - Sq (the recomputed P is masked as the forward's "
                     "was)")
        return hint + group
    if scaled:
        return (f"{name} is sqrt(D) = {math.sqrt(D):g} times too large: the scores were scaled, S = q kᵀ / sqrt(D), "
                "so their gradient is too: dQ = dS K / sqrt(D) and dK = dSᵀ Q / sqrt(D)")
    if name == "dq":
        return ("dS = P ∘ (dP - Δ) with dP = dO Vᵀ and Δ = rowsum(dO ∘ O), one number per query row (the softmax's "
                "normalization: without Δ the gradient of the row sum is missing); use P, not the scores S; "
                "then dQ = dS K / sqrt(D), added over the blocks")
    return "dK = dSᵀ Q / sqrt(D) for this block's keys" + group


# ---------------------------------------------------------------- end to end: the pieces run the shipped model
# Two prompts of 20 tokens decoded together (B = 2), prefilled in two chunks as a serving engine's chunked prefill
# does: 17 tokens (Sq = Skv, a full block of 16 and a partial one), then 3 more over all 20 keys (Sq < Skv: the
# queries are the last 3 positions, their loop has both stages); then 3 decode steps (Sq = 1) over 21 ... 23 keys.
# Every greedy token wins by a logit margin of 0.85 or more, far above float32 rounding: only a real mistake flips it.
_E2E_PROMPTS = ["4 These are the generations of the heavens and of the earth when they were created, in the day that",
                "5 And every plant of the field before it was in the earth, and every herb of the field before it "
                "grew"]   # (cut to their first 20 tokens)
_E2E_LEN, _E2E_CHUNK, _E2E_NEW = 20, 17, 4
_E2E_PIECES = ("tiled_attention", "_flash_fwd_kernel", "_causal_flash_fwd_kernel")


def _kernel_attention(kernel, name: str, expand_kv: bool):
    """The model's attention through a learner's kernel, launched as the unit checks launch it (contiguous q, k, v,
    BLOCK_M = BLOCK_N = 16). ``expand_kv``: K/V repeated to one head per query head first (no GQA left to get
    wrong)."""
    def attend(q, k, v):
        B, Hq, Sq, D = q.shape
        if expand_kv:
            k, v = (t.repeat_interleave(Hq // t.shape[1], dim=1) for t in (k, v))
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.full_like(q, float("nan"))
        launch(kernel, (triton.cdiv(Sq, _BLOCK["BLOCK_M"]), B * Hq), q, k, v, out, Hq, k.shape[1], Sq, k.shape[2],
               LOG2E / math.sqrt(D), HEAD_DIM=D, **_BLOCK, exercise=f"Exercise: write the body of {name}",
               bounds_hint=_BOUNDS_HINT)
        return out
    return attend


def chunked_decode(tiled_fn, flash_kernel, causal_kernel, prompts, max_new_tokens: int, chunk: int | None, *,
                   expand_kv: bool = False, tiled_decode: bool = True):
    """Greedy decode of ``prompts`` (token lists of one length, decoded together) on the shipped tiny model
    (float32) with lesson 01's contiguous KV cache, its attention the learner's: ``tiled_fn`` for the prefill and
    (``tiled_decode``) the decode steps, K/V repeated to Hq heads since tiled_attention takes one kv head per query
    head; ``causal_kernel`` for the prefill; ``flash_kernel`` for the decode steps (one query sees every cached key:
    no causal mask needed). A piece given as None is the library's attention. The prompts are prefilled in two
    chunks split at ``chunk`` (None: in one). Returns the new tokens of each prompt. Runs where the learner's code
    lives (the grader runs it in the notebook's kernel)."""
    from course_lib.grading.lesson01 import _float32_target
    from course_lib.model.kv_cache import KVCache

    def library(q, k, v):
        return attention(q, k, v, causal=True)

    def tiled(q, k, v):   # on CPU tensors, as the lesson calls it (its m, l, acc and masks are made there)
        G = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(G, dim=1).cpu() for t in (k, v))
        return tiled_fn(q.cpu(), k, v, causal=True, block_n=8).to(q.device)

    prefill = tiled if tiled_fn is not None else library
    decode = tiled if tiled_fn is not None and tiled_decode else library
    if causal_kernel is not None:
        prefill = _kernel_attention(causal_kernel, "_causal_flash_fwd_kernel", expand_kv)
    if flash_kernel is not None:
        decode = _kernel_attention(flash_kernel, "_flash_fwd_kernel", expand_kv)

    class Cache(KVCache):   # lesson 01's contiguous cache, its attention swapped
        def attend(self, layer, q, k, v):
            k_all, v_all = self.update(layer, k, v)
            return (decode if q.shape[2] == 1 else prefill)(q, k_all, v_all)

    model = _float32_target()[0]
    ids = torch.tensor(prompts, device=model.device)
    cache = Cache(model.config, len(prompts), ids.shape[1] + max_new_tokens, dtype=torch.float32, device=model.device)
    bounds = [0, chunk, ids.shape[1]] if chunk else [0, ids.shape[1]]
    with torch.no_grad():
        for start, end in zip(bounds, bounds[1:]):      # prefill, chunk by chunk
            logits = model(ids[:, start:end], cache=cache, last_token_only=True)
        outs = [[int(t)] for t in logits[:, -1].argmax(-1)]
        for _ in range(max_new_tokens - 1):            # decode: one token per sequence per step
            logits = model(torch.tensor([o[-1:] for o in outs], device=model.device), cache=cache,
                           last_token_only=True)
            for o, t in zip(outs, logits[:, -1].argmax(-1)):
                o.append(int(t))
    return outs


def check_end_to_end(tiled_fn, flash_kernel, causal_kernel) -> CheckResult:
    """Your attention runs the shipped tiny model (float32; GQA: 8 query heads on 4 kv heads, D = 32): two prompts
    of 20 tokens decoded together, prefilled in two chunks (17 tokens, then 3 over all 20 keys), then 3 decode steps.
    First your tiled_attention is all of the model's attention; then your _causal_flash_fwd_kernel runs the prefill
    chunks; then your _flash_fwd_kernel the decode steps (one query sees every cached key: no causal mask). Each time
    the greedy tokens must equal ``greedy_generate(..., use_cache=False)`` exactly."""
    from course_lib.grading.lesson01 import _float32_target
    from course_lib.model.generate import greedy_generate

    model, tok = _float32_target()
    prompts = [tok.encode(text)[:_E2E_LEN] for text in _E2E_PROMPTS]
    want = [greedy_generate(model, p, _E2E_NEW, use_cache=False) for p in prompts]
    pieces = (tiled_fn, flash_kernel, causal_kernel)

    def run(i, rows=(0, 1), chunk=_E2E_CHUNK, **options):   # piece i is the learner's, the others the library's
        used = [p if j == i else None for j, p in enumerate(pieces)]
        return run_beside(pieces[i], "course_lib.grading.lesson03:chunked_decode", *used,
                          [prompts[r] for r in rows], _E2E_NEW, chunk, **options)

    def right(i, rows=(0, 1), **options):   # the tokens of these prompts come out right
        return run(i, rows, **options) == [want[r] for r in rows]

    with Checker("end_to_end", points=2, timeout_s=240) as c:
        for kernel in (flash_kernel, causal_kernel):
            check_is_kernel(c, kernel, "check_end_to_end(tiled_attention, _flash_fwd_kernel, "
                            "_causal_flash_fwd_kernel)")
        stubs = [name for name, p in zip(_E2E_PIECES, pieces) if run_beside(p, "course_lib.grading.kernels:is_stub", p)]
        if stubs:
            raise NotImplementedError(f"Exercise: this check runs exercises 2, 3 and 4 together: finish them first "
                                      f"({' and '.join(stubs)} {'is' if len(stubs) == 1 else 'are'} still the stub)")
        case = (f"2 prompts of {_E2E_LEN} tokens decoded together, prefilled in chunks of {_E2E_CHUNK} and "
                f"{_E2E_LEN - _E2E_CHUNK} tokens, then {_E2E_NEW - 1} decode steps; q [2, 8, S, 32], k/v [2, 4, S, 32]")
        for i, used in [(0, "your tiled_attention as all of the model's attention (K/V repeated to 8 heads)"),
                        (2, "your _causal_flash_fwd_kernel for the prefill chunks"),
                        (1, "your _flash_fwd_kernel for the decode steps (Sq = 1)")]:
            c.case = f"{case}; {used}, the library's attention elsewhere"
            got = run(i)
            if got == want:
                c.cases_passed += 1
                continue
            c.check_equal(got, want, case=f"{c.case}: the new tokens of both prompts vs greedy_generate(use_cache="
                          "False)", hint=_end_to_end_hint(i, right))
    return c.result


def _end_to_end_hint(i: int, right) -> str:
    """Why piece ``i`` changed the tokens, from re-runs that each take one difficulty away (``right(i, ...)``: do
    the tokens come out right then)."""
    name = _E2E_PIECES[i]
    if i > 0 and right(i, expand_kv=True):
        return (f"your {name} decodes correctly once K/V are repeated to one head per query head, not with GQA: query "
                "head h reads kv head h // (Hq // Hkv) (here Hq = 8, Hkv = 4)")
    if i > 0 and right(i, rows=(0,)) and right(i, rows=(1,)):
        return (f"your {name} decodes each prompt correctly alone (B = 1), not the two together: q and out of (batch "
                "b, head h) start at (b·Hq + h)·Sq·HEAD_DIM, k and v of kv head g at (b·Hkv + g)·Skv·HEAD_DIM")
    if i != 1 and right(i, chunk=None, tiled_decode=False):
        return (f"your {name} is right for a prefill in one chunk (Sq = Skv), wrong when Sq < Skv: the second chunk's "
                f"{_E2E_LEN - _E2E_CHUNK} queries are the LAST {_E2E_LEN - _E2E_CHUNK} of {_E2E_LEN} positions (and "
                "a decode step's one query is the last of all): query row i sits at position i + Skv - Sq and sees "
                "keys j <= i + Skv - Sq (bottom-right alignment)")
    if i == 1:
        return (f"a decode step is one query (Sq = 1) over every cached key, Skv = {_E2E_LEN + 1} ... "
                f"{_E2E_LEN + _E2E_NEW - 1}, the last block of BLOCK_N = 16 partial (it holds the newest token): "
                "visit every block, scores q·kᵀ·qk_scale (log2 units, so exp2), the columns >= Skv masked in the "
                "loads of K and V and in the scores")
    return (f"your {name} passes small cases, not the model's (D = 32, scores of a trained model): keep m, l and acc "
            "per query row, start m at -inf, and when m grows to m_new multiply BOTH l and acc by exp(m - m_new)")
