"""Checks of lesson 00's Triton warm-ups (Triton-Puzzles style): a masked 2-D copy, a row softmax, a row reduction
with tl.max / tl.sum, a tiled matmul; each a step towards the attention kernels of lessons 02 and 03.

Every kernel is launched through ``grading.kernels.launch``: in the interpreter each load and store is checked before
it runs, so a missing mask fails the case with the tensor and the element it reached. The cases go from block
multiples to a partial block in one dimension at a time, so the hint of an access outside a tensor can name the
dimension whose mask is missing. A wrong result is compared with what the usual mistakes compute, and the hint names
the mistake it matches.
"""
from __future__ import annotations

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton

from course_lib.device import DEVICE
from course_lib.grading.core import Checker, CheckResult
from course_lib.grading.kernels import check_is_kernel, launch

NAN, INF = float("nan"), float("inf")
_GUARD_ROWS = 64   # at least any block size of the checks
_UNWRITTEN = ("some outputs were never written: the program ids choose what each program writes: tl.program_id(0) "
              "the row (block of rows), on a 2-D grid tl.program_id(1) the block of columns, each times its own "
              "block size")


def _strided(values: torch.Tensor, row_stride: int, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, view): ``values`` [R, C] in the first C columns of R rows of ``row_stride`` elements, so the view's rows
    are ``row_stride`` apart, as in a slice of a wider matrix; the other columns are padding, set to ``fill`` (NaN in
    an output: a write there shows). Guard rows follow the R rows: an access past the last row lands there, outside
    every tensor of the launch, so the bounds check names this tensor, not the one the allocator put next to it."""
    rows = torch.full((values.shape[0] + _GUARD_ROWS, row_stride), fill, dtype=values.dtype, device=values.device)
    rows = rows[: values.shape[0]]
    rows[:, : values.shape[1]] = values
    return rows, rows[:, : values.shape[1]]


def _as_contiguous(view: torch.Tensor) -> torch.Tensor:
    """What a kernel reads when it takes the row stride of the strided ``view`` to be its row length."""
    return torch.as_strided(view, view.shape, (view.shape[1], 1))


def _matches(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> bool:
    return torch.allclose(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol, equal_nan=True)


def _diagnose(got, candidates: dict[str, torch.Tensor | None], want, default: str, rtol: float, atol: float) -> str:
    """The hint of the first mistake whose result ``got`` matches; else, when outputs the answer has were left NaN
    (never written), the hint about program ids; else ``default``."""
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return default
    got, want = got.cpu(), want.cpu()      # a kernel's output is on the GPU where there is one, the answers here
    for hint, value in candidates.items():
        if value is not None and _matches(got, value.to(got.dtype), rtol, atol):
            return hint
    if (torch.isnan(got) & ~torch.isnan(want)).any():
        return _UNWRITTEN
    return default


def _edge_hint(dims: list[tuple[str, int, str, int, str]], offsets: str) -> str:
    """The hint for an access outside a tensor: each dimension (name, size, block name, block, offsets) whose last
    block is partial needs a mask; with none partial, no mask is needed and the offsets themselves are wrong."""
    partial = [f"{name} = {size} is not a multiple of {block_name} = {block}: mask {offs} < {name}"
               for name, size, block_name, block, offs in dims if size % block]
    if partial:
        return "the last block runs past the edge: " + "; ".join(partial) + ", in every tl.load and tl.store"
    return "every size here is a multiple of its block, so nothing needs a mask: an offset is wrong. " + offsets


# ---------------------------------------------------------------- exercise 5: a masked 2-D copy
def check_copy_tile_kernel(kernel) -> CheckResult:
    """``(src_ptr, dst_ptr, M, N, src_row_stride, dst_row_stride, BLOCK_M, BLOCK_N)`` copies src [M, N] into dst [M, N],
    one [BLOCK_M, BLOCK_N] tile per program on the grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``.

    src and dst are slices of wider matrices (rows N + 3 and N + 5 elements apart; dst's padding columns must stay
    untouched), float32 and float16. M and N are block multiples first, then one of them is partial, then both."""
    gen = torch.Generator().manual_seed(5)
    cases = [(16, 32, 16, 16), (32, 16, 16, 8), (16, 37, 16, 16), (37, 32, 16, 16), (37, 45, 16, 16),
             (1, 50, 16, 32), (45, 1, 8, 16), (1, 1, 16, 16), (70, 20, 32, 8)]
    strides = ("row m of src starts at src_ptr + m * src_row_stride and of dst at dst_ptr + m * dst_row_stride "
               "(not m * N: both are slices of wider matrices); program (i, j) starts at row i * BLOCK_M, "
               "column j * BLOCK_N")
    with Checker("copy_tile_kernel", points=1, timeout_s=120) as c:
        check_is_kernel(c, kernel, "check_copy_tile_kernel(_copy_tile_kernel)")
        for dtype in (torch.float32, torch.float16):
            for M, N, bm, bn in cases:
                _, src = _strided(torch.randn(M, N, generator=gen).to(dtype=dtype, device=DEVICE), N + 3)
                dst_buf, dst = _strided(torch.full((M, N), NAN, dtype=dtype, device=DEVICE), N + 5, fill=NAN)
                grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
                c.case = case = (f"M={M}, N={N}, {dtype}, BLOCK_M={bm}, BLOCK_N={bn}, grid={grid}, "
                                 f"src_row_stride={N + 3}, dst_row_stride={N + 5}")
                edge = _edge_hint([("M", M, "BLOCK_M", bm, "offs_m[:, None]"),
                                   ("N", N, "BLOCK_N", bn, "offs_n[None, :]")], strides)
                launch(kernel, grid, src, dst, M, N, N + 3, N + 5, BLOCK_M=bm, BLOCK_N=bn, bounds_hint=edge,
                       exercise="Exercise: write the body of _copy_tile_kernel")
                touched = int((~torch.isnan(dst_buf[:, N:])).sum())
                c.check(touched == 0, case=case, expected="dst's padding (columns N ... dst_row_stride - 1) untouched",
                        got=f"{touched} padding element(s) overwritten", hint=edge)
                hint = _diagnose(dst, {"src's rows are src_row_stride elements apart, not N (src is a slice of a wider "
                                       "matrix): row m starts at src_ptr + m * src_row_stride": _as_contiguous(src)},
                                 src, "dst[m, n] = src[m, n]: " + strides, rtol=0, atol=0)
                c.check_equal(dst, src, case=case, hint=hint)
    return c.result


# ---------------------------------------------------------------- exercise 6: a row softmax
def _scores(kind: str, M: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """[M, n] float32 scores: "random", "large" (around +1000), "very negative" (around -1000) or "-inf entries"
    (about half of them -inf; every row keeps at least one finite score)."""
    x = 3 * torch.randn(M, n, generator=gen)
    if kind == "large":
        return x + 1000
    if kind == "very negative":
        return x - 1000
    if kind == "-inf entries":
        drop = torch.rand(M, n, generator=gen) < 0.5
        drop[torch.arange(M), torch.randint(0, n, (M,), generator=gen)] = False
        return x.masked_fill(drop, -INF)
    return x


_MAX_HINT = ("subtract the row max before tl.exp: exp(1000) overflows float32 to inf and exp(-1000) underflows to 0, "
             "so inf / inf or 0 / 0 is NaN; exp(x - max) is at most 1, and at least one term is exactly 1")
_PAD_HINT = ("the masked lanes past n_cols must load as -inf (tl.load(..., mask=mask, other=float('-inf'))): "
             "exp(-inf) = 0 adds nothing to the sum and -inf never becomes the max; a 0 there does both")


def check_softmax_kernel(kernel) -> CheckResult:
    """``(x_ptr, out_ptr, n_cols, x_row_stride, out_row_stride, BLOCK_N)``: out[r] = softmax(x[r]), one program per row
    (grid ``(M,)``), BLOCK_N a power of two >= n_cols.

    n_cols equal to BLOCK_N, below it, 1; a single row; scores around +1000 and -1000 (a softmax without the max
    subtracted gives NaN) and rows with -inf entries; float32 and float16 (out has x's dtype). x and out are slices of
    wider matrices (rows n_cols + 3 and n_cols + 2 elements apart)."""
    gen = torch.Generator().manual_seed(6)
    cases = [("random", 4, 16, 16), ("random", 3, 7, 8), ("random", 1, 100, 128), ("random", 5, 1, 1),
             ("random", 3, 33, 64), ("random", 2, 20, 64), ("large", 3, 50, 64), ("very negative", 3, 50, 64),
             ("-inf entries", 4, 37, 64)]
    with Checker("softmax_kernel", points=2, timeout_s=120) as c:
        check_is_kernel(c, kernel, "check_softmax_kernel(_softmax_kernel)")
        for dtype in (torch.float32, torch.float16):
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=1e-5)
            for kind, M, n, block in cases:
                x32 = _scores(kind, M, n, gen).to(dtype).float()   # the scores the kernel sees, in float32
                _, x = _strided(x32.to(dtype=dtype, device=DEVICE), n + 3)
                out_buf, out = _strided(torch.full((M, n), NAN, dtype=dtype, device=DEVICE), n + 2, fill=NAN)
                c.case = case = f"{kind} scores, M={M}, n_cols={n}, {dtype}, BLOCK_N={block}, grid=({M},)"
                edge = _edge_hint([("n_cols", n, "BLOCK_N", block, "offs")],
                                  "row r of x starts at x_ptr + r * x_row_stride, of out at out_ptr + r * "
                                  "out_row_stride (row = tl.program_id(0))")
                launch(kernel, (M,), x, out, n, n + 3, n + 2, BLOCK_N=block, bounds_hint=edge,
                       exercise="Exercise: write the body of _softmax_kernel")
                touched = int((~torch.isnan(out_buf[:, n:])).sum())
                c.check(touched == 0, case=case, expected="out's padding (columns n_cols ... out_row_stride - 1) "
                        "untouched", got=f"{touched} padding element(s) overwritten", hint=edge)
                want = torch.softmax(x32, dim=-1)
                padded = torch.nn.functional.pad(x32, (0, block - n)) if block > n else None
                exp = torch.exp(x32 - x32.max(dim=-1, keepdim=True).values)
                hint = _diagnose(out, {
                    _MAX_HINT: torch.exp(x32) / torch.exp(x32).sum(dim=-1, keepdim=True),
                    _PAD_HINT: None if padded is None else torch.softmax(padded, dim=-1)[:, :n],
                    "divide by the row sum: out = e / tl.sum(e, axis=0) with e = exp(x - max)": exp,
                    "x's rows are x_row_stride elements apart (x is a slice of a wider matrix), not n_cols":
                        torch.softmax(_as_contiguous(x).float(), dim=-1),
                }, want, "out[r] = exp(x[r] - max(x[r])) / sum(exp(x[r] - max(x[r]))), in float32", **tol)
                c.check_close(out, want.to(dtype), case=case, hint=hint, **tol)
    return c.result


# ---------------------------------------------------------------- exercise 7: a row reduction with tl.max / tl.sum
def check_row_max_sumexp_kernel(kernel) -> CheckResult:
    """``(x_ptr, m_ptr, l_ptr, n_cols, x_row_stride, BLOCK_N)``: for each row r (one program per row, grid ``(M,)``),
    m[r] = max(x[r]) and l[r] = sum(exp(x[r] - m[r])), reading the row in blocks of BLOCK_N: a row may be many blocks
    long, the last one partial. softmax(x[r]) = exp(x[r] - m[r]) / l[r]: the two numbers online softmax keeps.

    n_cols a multiple of BLOCK_N, one less, one more, 1, many blocks; scores around +1000 and -1000 and with -inf
    entries; x float32 and float16 (m and l float32), its rows n_cols + 3 elements apart."""
    gen = torch.Generator().manual_seed(7)
    cases = [("random", 3, 16, 16), ("random", 2, 64, 16), ("random", 2, 15, 16), ("random", 2, 17, 16),
             ("random", 3, 1, 16), ("random", 1, 100, 32), ("random", 4, 53, 16), ("very negative", 3, 40, 16),
             ("large", 3, 40, 16), ("-inf entries", 4, 45, 16)]
    with Checker("row_max_sumexp_kernel", points=2, timeout_s=120) as c:
        check_is_kernel(c, kernel, "check_row_max_sumexp_kernel(_row_max_sumexp_kernel)")
        for dtype in (torch.float32, torch.float16):
            for kind, M, n, block in cases:
                x32 = _scores(kind, M, n, gen).to(dtype).float()
                _, x = _strided(x32.to(dtype=dtype, device=DEVICE), n + 3)
                m_out = torch.full((M,), NAN, device=DEVICE)
                l_out = torch.full((M,), NAN, device=DEVICE)
                c.case = case = f"{kind} scores, M={M}, n_cols={n}, {dtype}, BLOCK_N={block}, grid=({M},)"
                edge = _edge_hint([("n_cols", n, "BLOCK_N", block, "cols")],
                                  "row r starts at x_ptr + r * x_row_stride (r = tl.program_id(0)), and the loop "
                                  "must stop after tl.cdiv(n_cols, BLOCK_N) blocks")
                launch(kernel, (M,), x, m_out, l_out, n, n + 3, BLOCK_N=block, bounds_hint=edge,
                       exercise="Exercise: write the body of _row_max_sumexp_kernel")
                want_m = x32.max(dim=-1).values
                contiguous = _as_contiguous(x).float()   # what a kernel reads with row stride n_cols
                full = n // block * block                # columns in whole blocks
                last = (triton.cdiv(n, block) - 1) * block   # the first column of the last block
                head = x32[:, :full] if full else torch.full((M, 1), -INF)
                tail_hint = ("loop over tl.cdiv(n_cols, BLOCK_N) blocks, not n_cols // BLOCK_N: the last, partial "
                             "block (masked) holds scores too")
                hint = _diagnose(m_out, {
                    tail_hint: head.max(dim=-1).values,
                    "m must start at -inf, and masked lanes must load as -inf (other=float('-inf')): a 0 there "
                    "becomes the max of a row of negative scores": want_m.clamp(min=0),
                    "keep the running max across blocks: m = max(m, the block's max), not the last block's max":
                        x32[:, last:].max(dim=-1).values,
                    "x's rows are x_row_stride elements apart, not n_cols": contiguous.max(dim=-1).values,
                }, want_m, "m[r] = the max of all n_cols scores of row r, over every block", rtol=0, atol=0)
                c.check_close(m_out, want_m, case=case, hint=hint, rtol=0, atol=0)
                e = torch.exp(x32 - want_m[:, None])
                want_l = e.sum(dim=-1)
                padding = triton.cdiv(n, block) * block - n
                hint = _diagnose(l_out, {
                    tail_hint: e[:, :full].sum(dim=-1),
                    "subtract m before tl.exp: exp(x) overflows (inf) for large scores; exp(x - m) <= 1":
                        torch.exp(x32).sum(dim=-1),
                    "masked lanes must add nothing: load them as -inf (exp(-inf) = 0), or tl.where(mask, e, 0)":
                        want_l + padding * torch.exp(-want_m),
                    "add every block to l (l += tl.sum(...)), not only the last one": e[:, last:].sum(dim=-1),
                    "x's rows are x_row_stride elements apart, not n_cols":
                        torch.exp(contiguous - contiguous.max(dim=-1, keepdim=True).values).sum(dim=-1),
                }, want_l, "l[r] = the sum of exp(x - m[r]) over all n_cols scores of row r, with m[r] its max",
                    rtol=1e-5, atol=1e-6)
                c.check_close(l_out, want_l, case=case, hint=hint, rtol=1e-5, atol=1e-6)
    return c.result


# ---------------------------------------------------------------- exercise 8: a tiled matmul
_FP16_HINT = ("the result is off by float16 rounding: keep the accumulator in float32 (acc = tl.zeros([BLOCK_M, "
              "BLOCK_N], dtype=tl.float32)), add tl.dot's float32 result to it, and store it without a cast")


def check_matmul_kernel(kernel) -> CheckResult:
    """``(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, BLOCK_M,
    BLOCK_N, BLOCK_K)``: c [M, N] float32 = a [M, K] @ b [K, N] (float16), one [BLOCK_M, BLOCK_N] tile of c per
    program on the grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``, looping over K in blocks of BLOCK_K.

    Sizes are block multiples first, then K, M or N partial alone, then all, a single row and column, a long K; a
    transposed b and a strided a (a slice of a wider matrix) test the strides. c must equal the float32 product
    within float32 rounding: a float16 accumulator fails."""
    gen = torch.Generator().manual_seed(8)
    cases = [(16, 16, 16, 16, 16, 16, ""), (32, 32, 64, 16, 16, 32, ""), (16, 16, 40, 16, 16, 16, ""),
             (20, 16, 32, 16, 16, 16, ""), (16, 24, 32, 16, 16, 16, ""), (45, 33, 70, 32, 16, 32, ""),
             (1, 32, 48, 16, 16, 16, ""), (32, 1, 48, 16, 16, 16, ""), (1, 1, 1, 16, 16, 16, ""),
             (40, 24, 56, 16, 16, 16, "b transposed"), (24, 40, 56, 16, 16, 32, "a strided"),
             (16, 16, 512, 16, 16, 32, "")]
    strides = ("a[m, k] is at a_ptr + m * stride_am + k * stride_ak, b[k, n] at b_ptr + k * stride_bk + n * stride_bn "
               "(use the strides passed in: a and b need not be contiguous); the K loop must stop after "
               "tl.cdiv(K, BLOCK_K) blocks")
    with Checker("matmul_kernel", points=2, timeout_s=120) as c:
        check_is_kernel(c, kernel, "check_matmul_kernel(_matmul_kernel)")
        for M, N, K, bm, bn, bk, layout in cases:
            a = torch.randn(M, K, generator=gen).half().to(DEVICE)
            b = torch.randn(K, N, generator=gen).half().to(DEVICE)
            a = _strided(a, K + 8 if layout == "a strided" else K)[1]
            # b transposed: the same values, stored column by column (stride_bk = 1, stride_bn = K)
            b = _strided(b.t(), K)[1].t() if layout == "b transposed" else _strided(b, N)[1]
            out = _strided(torch.full((M, N), NAN, device=DEVICE), N, fill=NAN)[1]
            grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
            c.case = case = (f"M={M}, N={N}, K={K}, BLOCK_M={bm}, BLOCK_N={bn}, BLOCK_K={bk}, grid={grid}"
                             + (f", {layout} (strides a {a.stride()}, b {b.stride()})" if layout else ""))
            edge = _edge_hint([("M", M, "BLOCK_M", bm, "offs_m"), ("N", N, "BLOCK_N", bn, "offs_n"),
                               ("K", K, "BLOCK_K", bk, "offs_k (in both loads, other=0.0)")], strides)
            launch(kernel, grid, a, b, out, M, N, K, *a.stride(), *b.stride(), *out.stride(),
                   BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, bounds_hint=edge,
                   exercise="Exercise: write the body of _matmul_kernel")
            a32, b32 = a.float(), b.float()
            want = a32 @ b32
            full, last = K // bk * bk, (triton.cdiv(K, bk) - 1) * bk
            hint = _diagnose(out, {
                "loop over tl.cdiv(K, BLOCK_K) blocks, not K // BLOCK_K: the last, partial K block (masked, "
                "other=0.0) holds terms of the sum too": a32[:, :full] @ b32[:full],
                "accumulate: acc += tl.dot(a, b) (acc = tl.zeros(...) before the loop), not acc = tl.dot(a, b)":
                    a32[:, last:] @ b32[last:],
                "each iteration must load the next K block: offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)":
                    triton.cdiv(K, bk) * (a32[:, :bk] @ b32[:bk]),
            }, want, "c = a @ b: " + strides, rtol=1e-4, atol=1e-4)
            if hint.startswith("c = a @ b") and _matches(out, want, rtol=2e-2, atol=2e-2):
                hint = _FP16_HINT   # close, but not within float32 rounding
            c.check_close(out, want, case=case, hint=hint, rtol=1e-4, atol=1e-4)
    return c.result


# ---------------------------------------------------------------- end to end: two warm-ups run the shipped model
# One prompt of 15 tokens, prefilled, then 5 decode steps from the KV cache: the softmax runs on rows of 15 scores
# (BLOCK_N = 16, some of them -inf: the causal mask), then of 16 (BLOCK_N = 16) and 17 ... 20 (BLOCK_N = 32). Every
# greedy token wins by a logit margin of 1.1 or more, far above the float16 rounding of the logits' inputs: only a
# real mistake flips it.
_E2E_PROMPT = "1 Thus the heavens and the earth were finished, and all the host of them."   # (its first 15 tokens)
_E2E_LEN, _E2E_NEW = 15, 6
_E2E_MATMUL_BLOCKS = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)


def _softmax_attention(kernel):
    """Causal attention (bottom-right, GQA) whose probabilities come from the softmax kernel, one program per row of
    scores: q [B, Hq, S, D], k/v [B, Hkv, L, D] -> [B, Hq, S, D]."""
    def attend(q, k, v):
        B, Hq, S, D = q.shape
        L = k.shape[2]
        k, v = (t.repeat_interleave(Hq // t.shape[1], dim=1) for t in (k, v))
        scores = (q @ k.transpose(-1, -2)) / D ** 0.5                                  # [B, Hq, S, L]
        hidden = torch.arange(L, device=q.device)[None, :] > torch.arange(S, device=q.device)[:, None] + (L - S)
        x = scores.masked_fill(hidden, float("-inf")).reshape(-1, L).contiguous()      # [B*Hq*S, L]
        p = torch.full_like(x, NAN)
        launch(kernel, (x.shape[0],), x, p, L, L, L, BLOCK_N=triton.next_power_of_2(L),
               exercise="Exercise: write the body of _softmax_kernel",
               bounds_hint="rows of L scores, L <= BLOCK_N: mask offs < n_cols in the load (other=-inf) and the store")
        return p.view(B, Hq, S, L) @ v
    return attend


class _MatmulHead(torch.nn.Module):
    """The model's lm_head, logits = h @ Wᵀ, through the matmul kernel: a = h [M, E] in float16, b = Wᵀ [E, V] in
    float16 read through the strides of the weight [V, E] (stride_bk = 1, stride_bn = E: no copy), c float32."""

    def __init__(self, weight: torch.Tensor, kernel):
        super().__init__()
        self.weight, self.kernel = weight, kernel

    def forward(self, x):                                                               # x [B, S, E]
        a = x.reshape(-1, x.shape[-1]).half()
        b = self.weight.t().half()                                                      # a view: strides (1, E)
        M, (K, N) = a.shape[0], b.shape
        c = torch.full((M, N), NAN, device=x.device)
        bm, bn = _E2E_MATMUL_BLOCKS["BLOCK_M"], _E2E_MATMUL_BLOCKS["BLOCK_N"]
        launch(self.kernel, (triton.cdiv(M, bm), triton.cdiv(N, bn)), a, b, c, M, N, K, *a.stride(), *b.stride(),
               *c.stride(), **_E2E_MATMUL_BLOCKS, exercise="Exercise: write the body of _matmul_kernel",
               bounds_hint=f"M = {M} rows of hidden states, less than BLOCK_M = {bm}: mask offs_m < M in the load of "
                           "a and the store of c")
        return c.view(*x.shape[:-1], N)


def kernel_decode(softmax_kernel, matmul_kernel, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decode of ``prompt`` on the shipped tiny model (float32) with lesson 01's KV cache, the attention
    probabilities from ``softmax_kernel`` and the logits from ``matmul_kernel`` (None: torch's). Returns the new
    tokens. Runs where the learner's kernels live (the grader runs it in the notebook's kernel)."""
    import copy

    from course_lib.grading.lesson01 import _float32_target
    from course_lib.model.attention import attention
    from course_lib.model.kv_cache import KVCache

    model = _float32_target()[0]
    if matmul_kernel is not None:   # a shallow copy that shares every weight, its lm_head swapped
        model = copy.copy(model)
        model._modules = {**model._modules, "lm_head": _MatmulHead(model.lm_head.weight, matmul_kernel)}
    attend = _softmax_attention(softmax_kernel) if softmax_kernel is not None else \
        (lambda q, k, v: attention(q, k, v, causal=True))

    class Cache(KVCache):   # lesson 01's contiguous cache, its attention swapped
        def attend(self, layer, q, k, v):
            return attend(q, *self.update(layer, k, v))

    cache = Cache(model.config, 1, len(prompt) + max_new_tokens, dtype=torch.float32, device=model.device)
    out, ids = [], list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids], device=model.device), cache=cache, last_token_only=True)
            out.append(int(logits[0, -1].argmax()))
            ids = out[-1:]
    return out


def check_end_to_end(softmax_kernel, matmul_kernel) -> CheckResult:
    """Two of your warm-ups run the shipped tiny model (float32): greedy decoding of one prompt of 15 tokens with a KV
    cache, 6 new tokens. First your _softmax_kernel computes the attention probabilities of every layer (rows of 15
    scores in the prefill, the hidden future as -inf; one row per query head in each decode step); then your
    _matmul_kernel computes the logits, hidden state [1, 256] @ lm_head weightᵀ [256, 2048] (float16 tiles, float32
    accumulator, the weight read through its strides). Each time the tokens must equal
    ``greedy_generate(..., use_cache=False)``."""
    from course_lib.grading.lesson01 import _float32_target
    from course_lib.grading.remote import run_beside
    from course_lib.model.generate import greedy_generate

    model, tok = _float32_target()
    prompt = tok.encode(_E2E_PROMPT)[:_E2E_LEN]
    want = greedy_generate(model, prompt, _E2E_NEW, use_cache=False)
    with Checker("end_to_end", points=1, timeout_s=240) as c:
        for kernel in (softmax_kernel, matmul_kernel):
            check_is_kernel(c, kernel, "check_end_to_end(_softmax_kernel, _matmul_kernel)")
        stubs = [name for name, k in (("_softmax_kernel", softmax_kernel), ("_matmul_kernel", matmul_kernel))
                 if run_beside(k, "course_lib.grading.kernels:is_stub", k)]
        if stubs:
            raise NotImplementedError(f"Exercise: this check runs exercises 6 and 8 together: finish them first "
                                      f"({' and '.join(stubs)} {'is' if len(stubs) == 1 else 'are'} still the stub)")
        case = f"prompt {tok.decode(prompt)!r} ({len(prompt)} tokens), {_E2E_NEW} new tokens with a KV cache"
        for kernels, used, hint in [
                ((softmax_kernel, None), "your _softmax_kernel for the attention probabilities of every layer",
                 "the attention scores here are rows of n_cols = 15 ... 20 with BLOCK_N = 16 or 32 (padding lanes "
                 "past n_cols) and -inf where the causal mask hides a key: out = exp(x - max) / sum(exp(x - max)) "
                 "over the row's n_cols entries only (padding loads -inf, exp(-inf) = 0)"),
                ((None, matmul_kernel), "your _matmul_kernel for the logits (lm_head)",
                 "the logits are c [1, 2048] = a [1, 256] @ b [256, 2048], b the transpose of the lm_head weight "
                 "(strides (1, 256): use the strides passed in), K = 256 walked in blocks of BLOCK_K = 64: "
                 "acc += tl.dot(a, b) over every K block, in float32")]:
            c.case = f"{case}; {used}"
            got = run_beside(softmax_kernel, "course_lib.grading.lesson00_warmups:kernel_decode", *kernels, prompt,
                             _E2E_NEW)
            c.check_equal(got, want, case=f"{c.case}: the new tokens vs greedy_generate(use_cache=False)", hint=hint)
    return c.result
