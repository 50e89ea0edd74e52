"""``python -m benchmarks.serving --quick``: the machinery, never the speeds (rows, token counts, provenance, the choice
of the best static batch, the file written after every run, repeats interleaved), and its pieces."""
import json

import pytest

import benchmarks.serving as serving
from benchmarks.serving_runs import aggregate, merge, summarize_workload
from course_lib.experiments.workloads import nanovllm_trace

# runs the course's commands end to end: bash course.sh test runs these beside the browser test
pytestmark = pytest.mark.command


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run (about a minute on 2 cores); every save recorded: (runs so far, the file's runs so far)."""
    out = tmp_path_factory.mktemp("serving") / "serving.json"
    saves = []
    original = serving.Bench.save

    def save(self):
        original(self)
        on_disk = json.loads(out.read_text())
        count = lambda r: sum(len(x["runs"]) for x in r["rows"] + [y for v in r["sweeps"].values() for y in v])
        saves.append((count(self.result), count(on_disk)))

    serving.Bench.save = save
    try:
        result = serving.main(["--quick", "--out", str(out)])
    finally:
        serving.Bench.save = original
    return result, json.loads(out.read_text()), saves


def rows_of(result, workload, system):
    return [r for r in result["rows"] if r["workload"] == workload and r["system"] == system]


def test_rows_present(quick):
    result, on_disk, _ = quick
    assert on_disk["complete"] and on_disk["rows"] == json.loads(json.dumps(result["rows"], default=str))
    for w in ("nano-vllm", "chat"):
        for system in ("llmengine", "hf-cb", "hf-static"):
            (row,) = rows_of(result, w, system)
            assert row["status"] == "ok" and row["num_runs"] == 3, (w, system, row["status"])
            assert row["throughput_min"] <= row["throughput_tok_s"] <= row["throughput_max"]
        assert sorted(r["batch_size"] for r in rows_of(result, w, "hf-static-sweep")) == [2, 4, 8]
        (summary,) = [s for s in result["summary"] if s["workload"] == w]
        assert summary["engine_x_hf_static"]["low"] <= summary["engine_x_hf_static"]["median"] \
            <= summary["engine_x_hf_static"]["high"]
        assert summary["engine_x_hf_cb"] is not None and summary["floor_tok_s"] > 0
        d = summary["decomposition_vs_hf_static"]
        assert d["passes_ratio"] * d["time_per_pass_ratio"] == pytest.approx(summary["engine_x_hf_static"]["median"])
    for sweep, xs in (("concurrency", [2, 4]), ("context", [64, 192]), ("kv_budget", [2, 4])):
        rows = result["sweeps"][sweep]
        assert sorted({r["x"] for r in rows}) == xs
        assert {r["system"] for r in rows} == {"llmengine", "hf-static", "hf-cb"}
        assert all(r["status"] == "ok" and "tpot_p50" in r for r in rows), sweep


def test_tokens_counted_the_same_way(quick):
    result, _, _ = quick
    for w, info in result["workloads"].items():
        model, workload = w.split("/")
        runs = [run for r in result["rows"] if r["workload"] == workload and r["system"] != "hf-static-sweep"
                for run in r["runs"]]
        assert runs and {run["output_tokens"] for run in runs} == {info["output_tokens"]}
        assert {run["requested_tokens"] for run in runs} == {info["output_tokens"]}
        # greedy on the same weights, fp32 on a CPU: every system writes the engine's tokens
        assert all(run["same_tokens_as_engine"] == 1.0 for run in runs)
    for rows in result["sweeps"].values():
        for r in rows:
            assert all(run["output_tokens"] == run["requested_tokens"] for run in r["runs"])


def test_provenance(quick):
    result, _, _ = quick
    for key in ("git_commit", "date", "device", "cpu_model", "python", "torch", "triton", "transformers", "command",
                "copy_bandwidth_Bps", "host_bound_note"):
        assert result[key], key
    for key in ("driver", "gpu", "cuda"):
        assert key in result                        # None on a CPU
    assert result["models"]["tiny"]["hf_attn_implementation"]
    assert all(run["attn_implementation"] for r in result["rows"] if r["system"].startswith("hf-static")
               for run in r["runs"])
    assert all(run["hf_attn_implementation"] for r in result["rows"] if r["system"] == "hf-cb" for run in r["runs"])


def test_best_static_batch_is_the_sweeps_fastest(quick):
    result, _, _ = quick
    for w in ("nano-vllm", "chat"):
        sweep = rows_of(result, w, "hf-static-sweep")
        (best,) = rows_of(result, w, "hf-static")
        assert best["batch_size"] == max(sweep, key=lambda r: r["throughput_tok_s"])["batch_size"]
        assert best["runs"][0].get("from_sweep")    # a CPU sweeps on the whole trace: its run is the first repeat


def test_file_written_after_every_run(quick):
    result, _, saves = quick
    counts = [c for c, _ in saves]
    assert all(c == on_disk for c, on_disk in saves)                    # what was counted is what the file holds
    runs = sum(len(r["runs"]) for r in result["rows"]) + sum(len(r["runs"]) for v in result["sweeps"].values()
                                                             for r in v)
    from_sweep = sum(1 for r in result["rows"] for run in r["runs"] if run.get("from_sweep"))
    assert counts == sorted(counts) and counts[-1] == runs
    assert max(b - a for a, b in zip(counts, counts[1:])) <= 2     # a run (+ a copy of the sweep's run) per save
    assert len(set(counts)) >= runs - from_sweep


def test_repeats_interleaved():
    order = []
    rows = [dict(name=n, runs=[], status="not run", model="m") for n in "abc"]

    class FakeBench:
        def measure(self, row, fn):
            order.append(row["name"])
            row["runs"].append(dict(status="ok"))
    serving.interleave(FakeBench(), [(r, None) for r in rows], 3)
    assert order == list("abc" "bca" "cab")


def test_time_limit_stops_cleanly(tmp_path):
    out = tmp_path / "s.json"
    result = serving.main(["--quick", "--workloads", "nano-vllm", "--time-limit", "0", "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert not on_disk["complete"] and not result["complete"]
    assert all(r["runs"] == [] for r in on_disk["rows"])


def test_nanovllm_trace_is_nano_vllms():
    t = nanovllm_trace()
    assert len(t) == 256 and int(t.output_lens.sum()) == 133_966    # nano-vllm's README: 133,966 output tokens
    assert t.prompt_lens.min() >= 100 and t.prompt_lens.max() <= 1024
    assert t.output_lens.min() >= 100 and t.output_lens.max() <= 1024
    small = nanovllm_trace(8, 512, vocab_size=2048, max_output=32)
    assert all(len(p) + o <= 512 for p, o in zip(small.prompts, small.output_lens))
    assert max(max(p) for p in small.prompts) < 2048 and small.output_lens.max() <= 32


def _ok(tput, steps=10):
    return dict(status="ok", throughput_tok_s=tput, output_tokens=5, requested_tokens=5, tpot_p50=0.1,
                num_steps=steps)


def _part(command, workload, engine, hf_cb=(), git_commit="abc", trace="T", max_num_seqs=8):
    rows = [dict(model="m", workload=workload, system="llmengine", config="LLMEngine (all switches)",
                 runs=[_ok(x) for x in engine])]
    if hf_cb:
        rows.append(dict(model="m", workload=workload, system="hf-cb", config="HF continuous batching",
                         runs=[_ok(x) for x in hf_cb]))
    for row in rows:
        aggregate(row)
    rec = dict(benchmark="serving", device="X", git_commit=git_commit, date=command, command=command, rows=rows,
               floors=[dict(model="m", workload=workload, floor_tok_s=1000.0)], sweeps={}, models={},
               workloads={f"m/{workload}": dict(description=trace)}, config=dict(max_num_seqs=max_num_seqs),
               summary=[], complete=True)
    summarize_workload(rec, "m", workload)
    return rec


def test_aggregate_and_merge():
    row = dict(runs=[dict(status="ok", throughput_tok_s=x, output_tokens=5, requested_tokens=5, tpot_p50=0.1)
                     for x in (3.0, 1.0, 2.0)] + [dict(status="error: x")])
    aggregate(row)
    assert (row["throughput_tok_s"], row["throughput_min"], row["throughput_max"], row["num_runs"]) == (2.0, 1, 3, 3)
    a, b = _part("a", "w", [100.0]), _part("b", "v", [50.0])
    merged = merge([a, b])
    assert [(r["workload"], r["throughput_tok_s"]) for r in merged["rows"]] == [("w", 100.0), ("v", 50.0)]
    assert {(s["model"], s["workload"]) for s in merged["summary"]} == {("m", "w"), ("m", "v")}
    with pytest.raises(ValueError, match="git_commit"):
        merge([a, _part("b", "v", [50.0], git_commit="def")])


def test_merge_pools_the_repeats_of_one_measurement_spread_over_calls():
    """Issue 19's repeats: the engine and HF's continuous batching on one trace, one HF run per device call."""
    parts = [_part("call 1", "w", [100.0, 110.0], hf_cb=[10.0]), _part("call 2", "w", [90.0], hf_cb=[8.0]),
             _part("call 3", "w", [], hf_cb=[12.0])]
    merged = merge(parts)
    rows = {r["system"]: r for r in merged["rows"]}
    assert rows["llmengine"]["num_runs"] == 3 and rows["llmengine"]["throughput_tok_s"] == 100.0
    assert rows["hf-cb"]["num_runs"] == 3 and rows["hf-cb"]["throughput_tok_s"] == 10.0
    assert [r["part"] for r in rows["hf-cb"]["runs"]] == [0, 1, 2]
    (s,) = merged["summary"]
    assert s["engine_x_hf_cb"] == dict(median=10.0, low=90.0 / 12.0, high=110.0 / 8.0)
    assert len(merged["floors"]) == 1 and [p["command"] for p in merged["parts"]] == ["call 1", "call 2", "call 3"]
    # a merged file merged again with the next call (repeats spread over sessions) keeps every call as a part
    again = merge([merge(parts[:2]), parts[2]])
    assert [p["command"] for p in again["parts"]] == ["call 1", "call 2", "call 3"]
    assert again["date"] == "call 3" and again["command"] == "call 1 ; call 2 ; call 3"
    rows_again = {r["system"]: r for r in again["rows"]}
    assert [r["part"] for r in rows_again["hf-cb"]["runs"]] == [0, 1, 2]
    assert [r["part"] for r in rows_again["llmengine"]["runs"]] == [0, 0, 1]
    with pytest.raises(ValueError, match="not the same trace"):
        merge([parts[0], _part("call 2", "w", [90.0], trace="another trace")])
    with pytest.raises(ValueError, match="max_num_seqs"):
        merge([parts[0], _part("call 2", "w", [90.0], max_num_seqs=16)])


def test_the_lesson_reads_the_file(quick):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from course_lib.analysis.serving_results import plot_serving, plot_sweeps, serving_table

    result, _, _ = quick
    text = serving_table(result)
    assert "LLMEngine / HF best static" in text and "host-bound" in text and "HBM floor" in text
    fig, ax = plt.subplots()
    plot_serving(result, ax)
    assert ax.get_ylabel() and len(ax.patches) == 3 * len(result["summary"])   # three systems' bars per workload
    fig, axes = plt.subplots(2, 3, squeeze=False)
    assert plot_sweeps(result, axes) and all(a.get_ylabel() for row in axes for a in row)
    plt.close("all")


def test_hf_cb_graphs_option_reaches_transformers_config():
    """--hf-cb-graphs on forces transformers' CUDA graphs and async batching on (its defaults leave both off for
    paged sdpa, whose attention needs a mask); the row's config says which baseline ran."""
    from course_lib.serving.hf_continuous import HFContinuousBatching

    runner = HFContinuousBatching.__new__(HFContinuousBatching)     # the config only: no model needed
    runner.kv_tokens, runner.max_batch_tokens = 1000, None
    for graphs, want in ((None, None), (True, True)):
        runner.graphs = graphs
        _, cb, page = runner._configs(8)
        assert cb.use_cuda_graph is want and cb.use_async_batching is want
        assert cb.num_blocks == -(-1000 // page)
    args = serving.parse_args(["--quick", "--hf-cb-graphs", "on"])
    assert serving.hf_cb_graphs(args) is True
    assert serving.hf_cb_config(args) == "HF continuous batching, CUDA graphs + async batching"
    args = serving.parse_args(["--quick"])
    assert serving.hf_cb_graphs(args) is None and serving.hf_cb_config(args) == "HF continuous batching"


def test_warmup_runs_every_prompt_of_the_trace():
    """The warm-up serves every prompt of the timed trace (2 output tokens each, all at t = 0): no prompt length or
    prefill chunk of the timed run is new to the engine's kernels when the clock starts."""
    trace = nanovllm_trace(16, 2048, vocab_size=1000, seed=0)
    warm = serving.warmup_trace(trace)
    assert warm.prompts == trace.prompts and warm.prompts is not trace.prompts
    assert [p.max_tokens for p in warm.params] == [2] * len(trace)
    assert warm.arrival_times == [0.0] * len(trace)


def test_hf_cb_rows_record_whether_flash_attention_was_installed(quick, monkeypatch):
    """transformers runs its continuous batching on FlashAttention 3 or 2 where installed, paged SDPA otherwise: each
    HF CB run records which packages were there, so that a reader can tell a weaker attention from a weaker engine."""
    from transformers.utils import import_utils

    from course_lib.serving.hf_continuous import flash_attention_packages

    result, _, _ = quick
    runs = [run for row in result["rows"] if row["system"] == "hf-cb" and row["status"] == "ok" for run in row["runs"]]
    assert runs and all({"hf_flash_attn_2_installed", "hf_flash_attn_3_installed"} <= set(run) for run in runs)
    monkeypatch.setattr(import_utils, "is_flash_attn_2_available", lambda: True)
    monkeypatch.setattr(import_utils, "is_flash_attn_3_available", lambda: False)
    assert flash_attention_packages() == {"flash_attn_2_installed": True, "flash_attn_3_installed": False}
