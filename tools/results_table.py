"""The README's "Measured on a GPU" table, computed from the result files in benchmarks/results/ (issue 19).

Every number of the table is read or computed here from a recorded file (course_lib.analysis.claims), never typed:
each ratio leads with the strongest baseline the file holds and gives the full measured range. A lesson whose GPU
numbers exist only as a log says so and names the command that records a file.

    python tools/results_table.py           # rewrite the table between the README's markers
    python tools/results_table.py --check   # fail if the README's table is out of date (tests/test_no_typed_numbers)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_lib.analysis import claims  # noqa: E402

README = ROOT / "README.md"
BEGIN, END = "<!-- results-table:begin -->", "<!-- results-table:end -->"
#: what a flash_attention_bwd file's "ours" ran as its forward (its forward_variants; older files: the portable one)
_FORWARDS = {"portable": "the portable forward", "auto": "the library's default forward: TMA at D = 128 on sm_90+"}


def _x(span: tuple[float, float], digits: int = 2) -> str:
    lo, hi = span
    return f"{lo:.{digits}f}x" if f"{lo:.{digits}f}" == f"{hi:.{digits}f}" else f"{lo:.{digits}f}-{hi:.{digits}f}x"


def _pct(span: tuple[float, float]) -> str:
    lo, hi = (f"{100 * x:.0f}" for x in span)
    return f"{lo}%" if lo == hi else f"{lo}-{hi}%"


def _roof(span, cudnn_span, peak) -> str:
    """'; = 46-56% of the datasheet's 989 TFLOP/s (cuDNN 53-62%)', or '' off a card whose datasheet is unknown."""
    if span is None:
        return ""
    return (f" = {_pct(span)} of the datasheet's {peak:.0f} TFLOP/s"
            + (f" (cuDNN {_pct(cudnn_span)})" if cudnn_span else ""))


def _where(run: dict) -> str:
    return f"{run['device']}, {run['date'][:10]}, `{run['file']}`"


def _no_file(what: str, command: str) -> str:
    return f"no GPU result file yet ({what} exists only as a log in `gpu_checks.md`): `{command}` on a GPU records one"


def rows(results_dir: Path | None = None) -> list[tuple[str, str, str]]:
    out = []
    for run in claims.recorded("roofline_*.json", results_dir):
        r, sweep = run["roofline"], run["gemm_sweep"]["points"][0]
        out.append(("00", f"roofline (`roofline.py`; {_where(run)})",
                    f"bf16 matmul {r['peak_flops'] / 1e12:.0f} TFLOP/s, copy {r['peak_bandwidth'] / 1e12:.2f} TB/s, "
                    f"ridge {r['ridge_point']:.0f} FLOP/byte; a batch-{sweep['M']} decode GEMM reaches "
                    f"{sweep['flops_per_s'] / 1e12:.1f} TFLOP/s"))
    for run in claims.recorded("paged_attention_*.json", results_dir):
        c = claims.paged_decode_claims(run)
        b, ctx, dt = c["worst_shape"]
        out.append(("02", f"paged decode vs SDPA's fastest backend on a contiguous cache (`paged_attention.py`; "
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
                       if c["roof_big"] else "")))
    for run in claims.recorded("flash_attention_*.json", results_dir):
        if run.get("benchmark") != "flash_attention":      # flash_attention_bwd_* has its own row below
            continue
        c = claims.flash_attention_claims(run)
        out.append(("03", f"FlashAttention forward (`flash_attention.py`; {_where(run)})",
                    f"vs cuDNN (the fastest SDPA backend): {_x(c['cudnn_all'])} over all {c['num_shapes']} shapes, "
                    f"{_x(c['cudnn_sel'])} at D = {c['head_dim']}, N ≥ {c['min_n'] // 1024}k; vs SDPA-flash "
                    f"(FlashAttention-2): {_x(c['flash_all'])} over all, {_x(c['flash_sel'])} at D = {c['head_dim']}, "
                    f"N ≥ {c['min_n'] // 1024}k ({c['tflops_sel'][0]:.0f}-{c['tflops_sel'][1]:.0f} TFLOP/s, cuDNN "
                    f"{c['cudnn_tflops_sel'][0]:.0f}-{c['cudnn_tflops_sel'][1]:.0f})"
                    + _roof(c["roof_sel"], c["cudnn_roof_sel"], c["peak_tflops"])))
    for run in claims.recorded("flash_attention_hopper_*.json", results_dir):
        c = claims.flash_attention_hopper_claims(run)
        spans = [f"D = {D}: " + ", ".join(f"{i} {_x(span)}" for i, span in per.items())
                 for D, per in c["vs_cudnn"].items()]
        n, best = c["Ns"], max((i for i in c["tflops"] if i != "sdpa_cudnn"), key=lambda i: c["tflops"][i][0])
        out.append(("03", f"FlashAttention forward on Hopper, TMA variants (`flash_attention_hopper.py`; "
                          f"{_where(run)})",
                    f"speed vs cuDNN (cuDNN time / ours) over {c['num_shapes']} shapes (N = {n[0] // 1024}k-"
                    f"{n[-1] // 1024}k, causal and not, bf16 and fp16; target ≥ 0.9x): " + "; ".join(spans)
                    + (f"; at D = {c['head_dim']} the fastest, {best}, {c['tflops'][best][0]:.0f}-"
                       f"{c['tflops'][best][1]:.0f} TFLOP/s" + _roof(c["roof"][best], c["roof"].get("sdpa_cudnn"),
                                                                     c["peak_tflops"])
                       if c["tflops"] else "")))
    for run in claims.recorded("flash_attention_bwd_*.json", results_dir):
        c = claims.flash_attention_bwd_claims(run)
        miss = ", ".join(f"D = {d}, N = {n // 1024}k{' causal' if causal else ''} {r:.3f}x"
                         for d, n, causal, r in c["cudnn_misses"])
        out.append(("03", f"FlashAttention forward + backward, training (`flash_attention_bwd.py`; {_where(run)})",
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
                       if c["portable_cudnn_sel"] else "")))
    out.append(("04", "continuous vs static batching, same trace",
                _no_file("the GPU run", "python -m benchmarks.engine_batching")))
    out.append(("05", "prefix caching, hit rate and time to first token",
                _no_file("the GPU run", "python -m benchmarks.prefix_caching")))
    out.append(("06", "speculative decoding, batch 1", _no_file("the GPU run", "python -m benchmarks.speculative")))
    parts = []
    for run in claims.recorded("kv_quant_*.json", results_dir):
        c = claims.int8_decode_claims(run)
        parts.append(f"{run['device']}: {_x(c['all'])} over all shapes, {_x(c['long'])} at ≥ "
                     f"{c['min_context'] // 1024}k tokens (target ≤ {c['target']}x: {'met' if c['met'] else 'not met'})"
                     + (f"; there INT8 reads its bytes at {_pct(c['int8_roof_long'])} of the datasheet's "
                        f"{c['hbm_datasheet'] / 1e12:.2f} TB/s, FP16 at {_pct(c['fp16_roof_long'])}"
                        if c["int8_roof_long"] else "") + f" (`{run['file']}`)")
    if parts:
        out.append(("07", "INT8 vs FP16 K/V: the paged decode attention kernel's time (`kv_quant.py`)",
                    f"{c['memory']:.2f}x the bytes; kernel time " + "; ".join(parts)))
    out.append(("08-09", "TP = 2 and PP = 2 over NCCL on 2 GPUs (log in `gpu_checks.md`)",
                "logits within 2e-5 of one process, greedy tokens identical"))
    serving = [r for r in claims.recorded("serving_*.json", results_dir) if r.get("benchmark") == "serving"]
    for run in serving:
        out.append(("10", f"serving at real model shapes, random weights (`python -m benchmarks.serving`; "
                          f"{_where(run)}, commit {run['git_commit'][:7]})", claims.serving_line(run)))
    if not serving:
        out.append(("10", "serving at real model shapes vs `transformers`' best (`python -m benchmarks.serving`)",
                    "not measured at real size yet: no GPU `serving_*.json` recorded"))
    complete, mixed = claims.serving_step_runs(results_dir)
    # claims.serving_step_tok_s, in words
    tok_s_rule = ("output tokens over the median of its timed runs of the trace, or over the faster of its two where "
                  "it ran once")
    tok_s = claims.serving_step_tok_s
    for run in complete.values():   # per card, the latest complete run (the earlier ones are in gpu_checks.md)
        floor = ", ".join(f"B = {r['batch']} {r['graph_fused_over_floor']:.2f}x" for r in run["decode"]
                          if r["batch"] >= 64)
        # the engine as it ships: the row run with the engine's defaults (later rows try what is not default yet)
        old_row = run["serving"][0]
        best = claims.default_row(run["serving"])
        pre, dec = best["phases"]["prefill"], best["phases"]["decode"]
        out.append(("10", f"the engine's step on the GPU (`python -m benchmarks.serving_step`; {_where(run)}, commit "
                          f"{run['git_commit'][:7]})",
                    f"{run['decode_model']}: a replayed decode step over its HBM floor {floor} (target ≤ 1.5x). "
                    f"{run['serving_model'].split(' (')[0]}, {run['serving_trace'].split(',')[0]}: "
                    f"{tok_s(best):,.0f} tok/s = {tok_s(best) / tok_s(old_row):.2f}x "
                    f"the old engine ({old_row['row']}, {tok_s(old_row):,.0f} tok/s) in the same run, each "
                    f"{tok_s_rule} (target ≥ 4x); GPU busy "
                    f"{best['busy']['busy_fraction']:.0%} of the whole trace: "
                    f"{dec['busy_fraction']:.0%} in the decode phase, {pre['busy_fraction']:.0%} in the prefill "
                    f"phase ({pre['steps']} steps, {pre['wall_s'] / (pre['wall_s'] + dec['wall_s']):.0%} of "
                    f"the wall time) (target ≥ 80%); the default at that commit: "
                    f"{best['row'].removesuffix(' (the default)').lstrip('+ ')}"
                    + "".join(f"; {r['row'].lstrip('+ ')} instead: {tok_s(r):,.0f} tok/s, GPU busy "
                              f"{r['busy']['busy_fraction']:.0%}" for r in run["serving"][3:] if r is not best)))
    for run in mixed.values():   # a run with mixed-step graph rows that is not its card's latest complete run
        if run is complete.get(run["device_slug"]):
            continue
        old_row = run["serving"][0]
        parts = [f"{r['row'].lstrip('+ ')} (`cudagraph_mode=\"{r['cudagraph_mode']}\"`): {tok_s(r):,.0f} "
                 f"tok/s = {tok_s(r) / tok_s(old_row):.1f}x the old engine in the same run, GPU "
                 f"busy {r['busy']['busy_fraction']:.0%} of the whole trace (target ≥ 80%), "
                 f"{r['phases']['prefill']['busy_fraction']:.0%} in the prefill phase"
                 for r in claims.mixed_graph_rows(run)]
        out.append(("10", f"mixed steps replayed as CUDA graphs too (`python -m "
                          f"benchmarks.serving_step`; {_where(run)}, commit {run['git_commit'][:7]})",
                    f"{run['serving_model'].split(' (')[0]}, {run['serving_trace'].split(',')[0]}, tok/s "
                    f"{tok_s_rule}: " + "; ".join(parts)))
    for run in claims.recorded("engine_*.json", results_dir):
        s = claims.engine_summary(run)
        n = len(s["workloads"])
        out.append(("10", f"the capstone on the **tiny model** ({s['num_parameters'] / 1e6:.1f}M parameters: "
                          f"host-bound steps) vs `transformers`' `generate()` (`python -m benchmarks.engine`; "
                          f"{_where(run)})",
                    f"fastest engine row vs HF's strongest row (B = {run['config']['hf_large_batch']}, over the KV "
                    f"budget): "
                    f"{_x(s['best_x_strongest_hf'], 1)} over {n} workloads. Vs HF at the budget's batch (B = "
                    f"{run['config']['hf_batch']}), per workload: {_x(s['best_x_hf'], 1)} = HF's own overhead "
                    f"{_x(s['overhead'], 1)} (our static loop, same schedule) x fewer passes {_x(s['passes'], 1)} x "
                    f"time per pass {_x(s['step_cost'], 2)} (below 1: dearer). A host-bound result: it says nothing "
                    "of a 7B model"))
    return out


def render(results_dir: Path | None = None) -> str:
    lines = [BEGIN, "| lesson | what (device, date, file) | result, computed from the file |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows(results_dir)]
    return "\n".join(lines + [END])


def replaced(text: str, table: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + table + text[end:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md's table is out of date")
    args = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    new = replaced(text, render())
    if args.check:
        if new != text:
            print("README.md: the results table is out of date; run python tools/results_table.py")
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    print("wrote the results table of README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
