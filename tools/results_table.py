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

from course_lib.analysis import claims, feature_lines, kernel_lines  # noqa: E402

README = ROOT / "README.md"
BEGIN, END = "<!-- results-table:begin -->", "<!-- results-table:end -->"
from course_lib.analysis.kernel_lines import _where, _x  # noqa: E402


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
    for pattern, row in (("paged_attention_*.json", kernel_lines.paged_row),
                         ("flash_attention_*.json", kernel_lines.flash_forward_row),
                         ("flash_attention_hopper_*.json", kernel_lines.hopper_row),
                         ("flash_attention_bwd_*.json", kernel_lines.bwd_row)):
        for run in claims.recorded(pattern, results_dir):
            # flash_attention_*.json also matches the hopper and bwd files: each benchmark has its own row
            if run.get("benchmark") == pattern.removesuffix("_*.json"):
                out.append(row(run))
    for lesson, what, pattern, module, row in (
            ("04", "continuous vs static batching, same trace", "batching_*.json", "engine_batching",
             feature_lines.batching_row),
            ("05", "prefix caching, hit rate and time to first token", "prefix_caching_*.json", "prefix_caching",
             feature_lines.prefix_row),
            ("06", "speculative decoding, batch 1", "speculative_*.json", "speculative",
             feature_lines.speculative_row)):
        runs = claims.recorded(pattern, results_dir)
        out += [row(run) for run in runs] or [(lesson, what,
                                               _no_file("the GPU run", f"python -m benchmarks.{module}"))]
    int8 = kernel_lines.int8_row(claims.recorded("kv_quant_*.json", results_dir))
    if int8:
        out.append(int8)
    out.append(("08-09", "TP = 2 and PP = 2 over NCCL on 2 GPUs (log in `gpu_checks.md`)",
                "logits within 2e-5 of one process, greedy tokens identical"))
    serving = [r for r in claims.recorded("serving_*.json", results_dir) if r.get("benchmark") == "serving"]
    for run in serving:
        out.append(("10", f"serving at real model shapes, random weights (`python -m benchmarks.serving`; "
                          f"{_where(run)}, commit {run['git_commit'][:7]})", claims.serving_line(run)))
    names = {"hf_cb": "transformers' continuous batching", "hf_static": "transformers' best static batch"}
    verdicts = [t for t in claims.serving_targets(claims.real_size_serving_runs(results_dir)) if t["file"]]
    for device in dict.fromkeys(t["device"] for t in verdicts):
        out.append(("10", f"the serving targets: `qwen3-0.6b` shape, nano-vllm's workload ({device}; per baseline "
                          "the latest file that measured it beside the engine)",
                    "; ".join(f"LLMEngine over {names[t['baseline']]}"
                              + (f" (B = {t['batch_size']})" if t["batch_size"] else "")
                              + (f" ({t['setup']})" if t.get("setup") else "")
                              + f" {t['ratio']['median']:.1f}x (target ≥ {t['target']:.0f}x: "
                              f"{'met' if t['met'] else 'missed'}; {t['repeats']} run(s) of each, "
                              f"{'as required' if t['repeats_met'] else 'the 3 required: missed'}; `{t['file']}`)"
                              for t in verdicts if t["device"] == device)))
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
