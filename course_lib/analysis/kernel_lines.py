"""The README's kernel rows as text (lessons 02, 03, 07), computed from one recorded file each through
:mod:`course_lib.analysis.claims`: the strongest baseline first, the full measured range, the fraction of the
roofline (issue 21). ``tools/results_table.py`` writes them into the README; each kernel benchmark prints its own
row at the end of a GPU run (:func:`summary`), so a run's output states the same claim the README will.
"""
from __future__ import annotations

from course_lib.analysis import claims

#: what a flash_attention_bwd file's "ours" ran as its forward (its forward_variants; older files: the portable one)
_FORWARDS = {"portable": "the portable forward", "auto": "the library's default forward: TMA at D = 128 on sm_90+"}


def _x(span: tuple[float, float], digits: int = 2) -> str:
    lo, hi = span
    return f"{lo:.{digits}f}x" if f"{lo:.{digits}f}" == f"{hi:.{digits}f}" else f"{lo:.{digits}f}-{hi:.{digits}f}x"


def _pct(span: tuple[float, float]) -> str:
    lo, hi = (f"{100 * x:.0f}" for x in span)
    return f"{lo}%" if lo == hi else f"{lo}-{hi}%"


def _roof(span, cudnn_span, peak) -> str:
    """' = 46-56% of the datasheet's 989 TFLOP/s (cuDNN 53-62%)', or '' off a card whose datasheet is unknown."""
    if span is None:
        return ""
    return (f" = {_pct(span)} of the datasheet's {peak:.0f} TFLOP/s"
            + (f" (cuDNN {_pct(cudnn_span)})" if cudnn_span else ""))


def _where(run: dict) -> str:
    return f"{run['device']}, {run['date'][:10]}, `{run['file']}`"


def paged_row(run: dict) -> tuple[str, str, str]:
    """Lesson 02's row: paged decode vs SDPA's fastest backend, over every shape; bandwidth at large batch."""
    c = claims.paged_decode_claims(run)
    b, ctx, dt = c["worst_shape"]
    return ("02", f"paged decode vs SDPA's fastest backend on a contiguous cache (`paged_attention.py`; "
                  f"{_where(run)})",
            f"{_x(c['all'])} SDPA's speed over all {c['num_shapes']} shapes (lowest at batch {b}, context "
            f"{ctx}, {dt}; {c['batch64_ctx4k']:.2f}x at batch 64, context 4k"
            + (f"; medians of rounds timed in turn, single rounds {_x(c['rounds'])}" if c["rounds"] else "")
            + f"); split-K {c['split_k']:.0f}x "
            f"the unsplit kernel at batch {c['split_k_shape'][0]}, context {c['split_k_shape'][1] // 1024}k"
            + (f"; at batch ≥ {c['big_batch']}, K/V read at {_pct(c['copy_big'])} of the copy bandwidth "
               f"measured in the same run ({c['copy_bandwidth'] / 1e12:.2f} TB/s; lowest at batch "
               f"{c['copy_big_worst'][0]}, context {c['copy_big_worst'][1]}; SDPA {_pct(c['sdpa_copy_big'])})"
               if c["copy_big"] else "")
            + (f", {_pct(c['roof_big'])} of the datasheet's {c['hbm_datasheet'] / 1e12:.2f} TB/s"
               if c["roof_big"] else ""))


def flash_forward_row(run: dict) -> tuple[str, str, str]:
    """Lesson 03's forward: vs cuDNN first, then SDPA-flash; TFLOP/s and their share of the peak."""
    c = claims.flash_attention_claims(run)
    return ("03", f"FlashAttention forward (`flash_attention.py`; {_where(run)})",
            f"vs cuDNN (the fastest SDPA backend): {_x(c['cudnn_all'])} over all {c['num_shapes']} shapes, "
            f"{_x(c['cudnn_sel'])} at D = {c['head_dim']}, N ≥ {c['min_n'] // 1024}k; vs SDPA-flash "
            f"(FlashAttention-2): {_x(c['flash_all'])} over all, {_x(c['flash_sel'])} at D = {c['head_dim']}, "
            f"N ≥ {c['min_n'] // 1024}k ({c['tflops_sel'][0]:.0f}-{c['tflops_sel'][1]:.0f} TFLOP/s, cuDNN "
            f"{c['cudnn_tflops_sel'][0]:.0f}-{c['cudnn_tflops_sel'][1]:.0f})"
            + _roof(c["roof_sel"], c["cudnn_roof_sel"], c["peak_tflops"]))


def hopper_row(run: dict) -> tuple[str, str, str]:
    """Lesson 03's Hopper ablation: each variant vs cuDNN per head dim; the fastest's share of the peak."""
    c = claims.flash_attention_hopper_claims(run)
    spans = [f"D = {D}: " + ", ".join(f"{i} {_x(span)}" for i, span in per.items())
             for D, per in c["vs_cudnn"].items()]
    n, best = c["Ns"], max((i for i in c["tflops"] if i != "sdpa_cudnn"), key=lambda i: c["tflops"][i][0])
    return ("03", f"FlashAttention forward on Hopper, TMA variants (`flash_attention_hopper.py`; "
                  f"{_where(run)})",
            f"speed vs cuDNN (cuDNN time / ours) over {c['num_shapes']} shapes (N = {n[0] // 1024}k-"
            f"{n[-1] // 1024}k, causal and not, bf16 and fp16; target ≥ 0.9x): " + "; ".join(spans)
            + (f"; at D = {c['head_dim']} the fastest, {best}, {c['tflops'][best][0]:.0f}-"
               f"{c['tflops'][best][1]:.0f} TFLOP/s" + _roof(c["roof"][best], c["roof"].get("sdpa_cudnn"),
                                                             c["peak_tflops"])
               if c["tflops"] else ""))


def bwd_row(run: dict) -> tuple[str, str, str]:
    """Lesson 03's training pass: fwd+bwd vs cuDNN first, the targets, the backward alone, the roof."""
    c = claims.flash_attention_bwd_claims(run)
    miss = ", ".join(f"D = {d}, N = {n // 1024}k{' causal' if causal else ''} {r:.3f}x"
                     for d, n, causal, r in c["cudnn_misses"])
    return ("03", f"FlashAttention forward + backward, training (`flash_attention_bwd.py`; {_where(run)})",
            f"{c['dtype']}, ours ({_FORWARDS[run.get('forward_variants', {}).get('ours', 'portable')]}) "
            f"fwd+bwd time vs cuDNN (the fastest SDPA backend): {_x(c['cudnn_all'])} over all "
            f"{c['num_shapes']} shapes, {_x(c['cudnn_sel'])} at N ≥ {c['min_n'] // 1024}k (target ≥ "
            f"{c['cudnn_target']}x: " + (f"missed at {miss}" if miss else "met") + "); vs SDPA-flash "
            f"(FlashAttention-2): {_x(c['flash_all'])} over all (target ≥ {c['flash_target']}x: "
            + ("met" if not c["flash_misses"] else "missed") + f"); backward alone at N ≥ "
            f"{c['min_n'] // 1024}k: {_x(c['bwd_flash_sel'])} SDPA-flash, {_x(c['bwd_cudnn_sel'])} cuDNN; "
            f"gradients within {c['max_grad_rel_err']:.1%} of SDPA-flash's largest"
            + (f"; fwd+bwd at N ≥ {c['min_n'] // 1024}k {c['tflops_sel'][0]:.0f}-{c['tflops_sel'][1]:.0f} "
               f"TFLOP/s" + _roof(c["roof_sel"], c["cudnn_roof_sel"], c["peak_tflops"])
               if c["roof_sel"] else "")
            + (f"; dQ by fp32 atomics instead (`dq_mode=\"atomic\"`): {_x(c['atomic_cudnn_all'])} cuDNN, "
               f"{_x(c['atomic_over_separate'])} the default mode's time" if c["atomic_cudnn_all"] else "")
            + (f"; the forward through the TMA kernel instead (`hopper=\"{c['tma_variant']}\"`), same "
               f"backward: {_x(c['tma_cudnn_sel'])} cuDNN at N ≥ {c['min_n'] // 1024}k (target: "
               + ("met" if not c["tma_cudnn_misses"] else "missed") + f"), {_x(c['tma_flash_sel'])} "
               f"SDPA-flash" if c["tma_cudnn_sel"] else "")
            + (f"; the portable forward instead (`hopper=False`), same backward: {_x(c['portable_cudnn_sel'])} "
               f"cuDNN, {_x(c['portable_flash_sel'])} SDPA-flash at N ≥ {c['min_n'] // 1024}k"
               if c["portable_cudnn_sel"] else "")
            + (f"; the Gluon forward instead (`hopper=\"gluon\"`), same backward: {_x(c['gluon_cudnn_sel'])} cuDNN "
               f"at N ≥ {c['min_n'] // 1024}k (target: " + ("met" if not c["gluon_cudnn_misses"] else "missed")
               + f"), {_x(c['gluon_flash_sel'])} SDPA-flash" if c["gluon_cudnn_sel"] else ""))


def int8_part(run: dict) -> tuple[str, dict]:
    """Lesson 07: one card's part of the INT8 row (the row joins every card's), and its claims."""
    c = claims.int8_decode_claims(run)
    return (f"{run['device']}: {_x(c['all'])} over all shapes, {_x(c['long'])} at ≥ "
            f"{c['min_context'] // 1024}k tokens (target ≤ {c['target']}x: {'met' if c['met'] else 'not met'})"
            + (f"; there INT8 reads its bytes at {_pct(c['int8_roof_long'])} of the datasheet's "
               f"{c['hbm_datasheet'] / 1e12:.2f} TB/s, FP16 at {_pct(c['fp16_roof_long'])}"
               if c["int8_roof_long"] else "") + f" (`{run['file']}`)", c)


def int8_row(runs: list[dict]) -> tuple[str, str, str] | None:
    """Lesson 07's row over every card's kv_quant file (None without one)."""
    parts = [int8_part(run) for run in runs]
    if not parts:
        return None
    return ("07", "INT8 vs FP16 K/V: the paged decode attention kernel's time (`kv_quant.py`)",
            f"{parts[-1][1]['memory']:.2f}x the bytes; kernel time " + "; ".join(text for text, _ in parts))


ROWS = {"paged_attention": paged_row, "flash_attention": flash_forward_row, "flash_attention_hopper": hopper_row,
        "flash_attention_bwd": bwd_row}


def summary(result: dict, file: str) -> str | None:
    """A kernel benchmark's own README row, for the end of its output: None for a quick or interpreter run (no
    strongest baseline there) and for a benchmark without a row."""
    if result.get("quick") or result.get("kernel_mode") != "compiled":
        return None
    run = dict(result, file=file)
    if result.get("benchmark") == "kv_quant":
        return int8_part(run)[0]
    row = ROWS.get(result.get("benchmark"))
    return None if row is None else row(run)[2]
