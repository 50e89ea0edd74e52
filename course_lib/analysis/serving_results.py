"""Reading ``python -m benchmarks.serving``'s result files (lesson 10): the comparison as a table, its plot and the
sweeps' plot. Every number printed here is read or computed from a file, never typed."""
from __future__ import annotations

import json
from pathlib import Path

from course_lib.analysis.roofline import RESULTS_DIR

#: the systems of a run, in the order the table and the plot show them
SYSTEMS = {"llmengine": "LLMEngine", "hf-static": "HF generate (best B)", "hf-cb": "HF continuous batching",
           "static-ours": "static, ours (best B)"}


def load_serving_results(results_dir: Path = RESULTS_DIR) -> list[dict]:
    """Every ``serving_*.json`` written by ``benchmarks.serving`` (not ``serving_step_*``), oldest first."""
    runs = []
    for path in sorted(Path(results_dir).glob("serving_*.json")):
        run = json.loads(path.read_text())
        if run.get("benchmark") == "serving":
            run["file"] = path.name
            runs.append(run)
    return sorted(runs, key=lambda r: r["date"])


def is_gpu_run(run: dict) -> bool:
    return bool(run.get("gpu"))


def label(run: dict) -> str:
    """'<device>, <date>, commit <sha>' and, for a CPU run, that it is host-bound."""
    text = f"{run['device']}, {run['dtype']}, {run['date'][:10]}, commit {run['git_commit'][:7]}"
    return text + ("" if is_gpu_run(run) else " (CPU: host-bound)")


def _rows(run: dict, model: str, workload: str) -> dict:
    return {r["system"]: r for r in run["rows"] if r.get("model") == model and r.get("workload") == workload}


def _cell(row: dict | None) -> str:
    if not row:
        return "-"
    if row.get("status") != "ok":
        return row.get("status", "-")[:24]
    return f"{row['throughput_tok_s']:,.0f} ({row['throughput_min']:,.0f}-{row['throughput_max']:,.0f})"


def _ratio(r: dict | None) -> str:
    return "-" if not r else f"{r['median']:.2f}x ({r['low']:.2f}-{r['high']:.2f})"


def serving_table(run: dict) -> str:
    """Per model and workload: tok/s (median, min-max over the repeats) of every system, the HBM floor, the ratios of
    the engine to HF's best static batch and to HF's continuous batching (medians' ratio, and the range from the
    runs' extremes), and the decomposition of the first: forward passes x time per pass."""
    lines = [label(run) + f"; transformers {run['transformers']}, torch {run['torch']}",
             "tok/s: median (min-max) of the repeats; ratios: medians' ratio (range from the runs' extremes)"]
    for s in run["summary"]:
        rows = _rows(run, s["model"], s["workload"])
        model_info = run["models"].get(s["model"], {})
        lines.append(f"--- {s['model']} ({model_info.get('description', '')}), {s['workload']}: "
                     f"{run['workloads'].get(s['model'] + '/' + s['workload'], {}).get('description', '')}")
        for system, name in SYSTEMS.items():
            if system in rows:
                extra = ""
                if system == "hf-static" and rows[system].get("batch_size"):
                    runs = rows[system].get("runs") or [{}]
                    extra = f"  B={rows[system]['batch_size']}, attn {runs[0].get('attn_implementation', '?')}"
                if system == "hf-cb" and rows[system].get("runs"):
                    extra = f"  attn {rows[system]['runs'][0].get('hf_attn_implementation', '?')}"
                lines.append(f"  {name:<26} {_cell(rows[system]):>28} tok/s{extra}")
        if s.get("floor_tok_s"):
            lines.append(f"  {'HBM floor of its schedule':<26} {s['floor_tok_s']:>28,.0f} tok/s  (the engine reaches "
                         f"{s['engine_fraction_of_floor']:.0%} of it)")
        lines.append(f"  LLMEngine / HF best static: {_ratio(s['engine_x_hf_static'])};  "
                     f"LLMEngine / HF continuous batching: {_ratio(s['engine_x_hf_cb'])}")
        d = s.get("decomposition_vs_hf_static")
        if d:
            lines.append(f"    = {d['passes_ratio']:.2f} (HF's forward passes / the engine's: {d['hf_passes']:.0f} / "
                         f"{d['engine_passes']:.0f}) x {d['time_per_pass_ratio']:.2f} (HF's time per pass / the "
                         f"engine's)")
        if s.get("hf_static_over_ours"):
            lines.append(f"    HF's own overhead: HF's static batches run at {_ratio(s['hf_static_over_ours'])} "
                         f"the throughput of the course's static batches at the same B")
    if run.get("host_bound_note"):
        lines.append(run["host_bound_note"])
    return "\n".join(lines)


def plot_serving(run: dict, ax) -> None:
    """Grouped bars: tok/s of every system (median, whiskers min-max) for each model/workload, and the HBM floor."""
    import numpy as np

    groups = [(s["model"], s["workload"]) for s in run["summary"]]
    systems = [k for k in SYSTEMS if any(k in _rows(run, m, w) for m, w in groups)]
    width = 0.8 / max(len(systems), 1)
    x = np.arange(len(groups))
    for k, system in enumerate(systems):
        vals, lo, hi = [], [], []
        for m, w in groups:
            r = _rows(run, m, w).get(system)
            ok = r is not None and r.get("status") == "ok"
            vals.append(r["throughput_tok_s"] if ok else np.nan)
            lo.append(r["throughput_tok_s"] - r["throughput_min"] if ok else 0)
            hi.append(r["throughput_max"] - r["throughput_tok_s"] if ok else 0)
        ax.bar(x + (k - (len(systems) - 1) / 2) * width, vals, width, yerr=[lo, hi], capsize=2,
               label=SYSTEMS[system])
    floors = [s.get("floor_tok_s") or np.nan for s in run["summary"]]
    ax.scatter(x, floors, marker="_", s=400, color="black", label="HBM floor of the engine's schedule", zorder=3)
    ax.set_xticks(x, [f"{m}\n{w}" for m, w in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("throughput (output tokens/s, log)")
    ax.set_title(label(run), fontsize=9)
    ax.legend(fontsize=7)


def plot_sweeps(run: dict, axes) -> bool:
    """Throughput (top) and TPOT p50 (bottom) against concurrency, context length and KV budget: one line per model
    and system. ``axes``: a 2 x 3 array. Returns False when the run has no sweep."""
    titles = dict(concurrency="concurrent requests", context="prompt length (tokens)",
                  kv_budget="KV budget (full contexts)")
    any_rows = False
    for j, (sweep, xlabel) in enumerate(titles.items()):
        rows = [r for r in run.get("sweeps", {}).get(sweep, []) if r.get("status") == "ok"]
        any_rows |= bool(rows)
        for key in dict.fromkeys((r["model"], r["system"]) for r in rows):
            line = sorted((r["x"], r["throughput_tok_s"], r.get("tpot_p50", float("nan")) * 1e3)
                          for r in rows if (r["model"], r["system"]) == key)
            name = f"{key[0]}: {SYSTEMS.get(key[1], key[1]).replace(' (best B)', '')}"
            axes[0][j].plot([p[0] for p in line], [p[1] for p in line], "o-", label=name)
            axes[1][j].plot([p[0] for p in line], [p[2] for p in line], "o-", label=name)
        axes[0][j].set_title(f"vs {xlabel}", fontsize=9)
        axes[0][j].set_ylabel("throughput (output tokens/s)")
        axes[1][j].set_ylabel("TPOT p50 (ms)")
        axes[1][j].set_xlabel(xlabel)
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log", base=2)
            if rows:
                ax.legend(fontsize=7)
    return any_rows
