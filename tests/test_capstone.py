"""Lesson 10: the transformers baseline (same tokens, batch accounting), the capstone workloads, the ablation
rows and the benchmark command's machinery on a tiny trace."""
import json

import pytest
import torch

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib import load_tiny
from course_lib.experiments.ablation import (NOT_AVAILABLE, Ablation, AblationSetup, RowConfig, engine_supports,
                                             format_table, ladder)
from course_lib.experiments.capstone_workloads import WORKLOADS, capstone_workloads
from course_lib.model.checkpoint import CHECKPOINTS
from course_lib.serving.engine import LLMEngine
from course_lib.model.generate import greedy_generate
from course_lib.serving.hf_baseline import (HFStaticBatchBaseline, kv_budget_batch_size, load_hf_model,
                                            static_batch_accounting)
from course_lib.model.sampling import SamplingParams

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    model, tokenizer = load_tiny("target", dtype=torch.float32, device="cpu")
    hf = load_hf_model(CHECKPOINTS / "tiny-target", dtype=torch.float32, device="cpu")
    return model, hf, tokenizer


# ---------------------------------------------------------------- the baseline: same tokens, honest accounting
def test_hf_baseline_greedy_tokens_equal_ours(models):
    """Left padding, EOS ignored: every row's tokens are our model's greedy tokens (the same weights)."""
    model, hf, tok = models
    prompts = [tok.encode("In the beginning God created"), tok.encode("And the LORD said unto Moses, Go"),
               tok.encode("Blessed")]
    lens = [12, 5, 9]
    baseline = HFStaticBatchBaseline(hf, batch_size=2)
    outputs = baseline.generate(prompts, [SamplingParams(max_tokens=n) for n in lens])
    for p, n, out in zip(prompts, lens, outputs):
        assert out.ok and out.token_ids == greedy_generate(model, p, max_new_tokens=n, use_cache=True)
    engine_out = LLMEngine(model, max_num_seqs=2).generate(prompts, [SamplingParams(max_tokens=n) for n in lens])
    assert [o.token_ids for o in engine_out] == [o.token_ids for o in outputs]


def test_hf_baseline_ignores_eos(models):
    """The checkpoint's eos (0) must not stop a row: a prompt whose greedy continuation emits it still gets
    every requested token (found by search, so the test cannot pass vacuously)."""
    model, hf, tok = models
    from course_lib.experiments.workloads import sharegpt_trace

    prompts = sharegpt_trace(40, scale=0.25, tokenizer=tok).prompts
    prompt, want = next((p, o) for p in prompts if 0 in (o := greedy_generate(model, p, 150, use_cache=True)))
    out = HFStaticBatchBaseline(hf, batch_size=1).generate([prompt], SamplingParams(max_tokens=150))[0]
    assert out.token_ids == want and len(want) == 150


def test_static_batch_accounting_by_hand():
    acc = static_batch_accounting([3, 5, 2], [4, 1, 6], batch_size=2)
    # batch 1: prompts 3, 5 -> 2 pads; outputs 4, 1 -> 2 x 4 slots; batch 2: prompt 2, output 6 -> 6 slots
    assert acc == dict(num_batches=2, decode_steps=10, useful_output_tokens=11, computed_output_slots=14,
                       padding_prompt_slots=2, useful_fraction=11 / 14)
    assert static_batch_accounting([3, 3], [5, 5], 2)["useful_fraction"] == 1.0    # equal lengths: no waste
    with pytest.raises(ValueError, match="batch_size"):
        static_batch_accounting([3], [4], 0)
    with pytest.raises(ValueError, match="differ"):
        static_batch_accounting([3, 4], [4], 1)


def test_hf_baseline_metrics_match_the_accounting(models):
    """Useful tokens only; one step per slot of the longest row; the second batch waits for the first."""
    _, hf, tok = models
    prompts = [tok.encode("In the beginning")[:3], tok.encode("And God said, Let there be light")[:5],
               tok.encode("Blessed are the meek")[:2]]
    outs = [4, 1, 6]
    baseline = HFStaticBatchBaseline(hf, batch_size=2)
    outputs = baseline.generate(prompts, [SamplingParams(max_tokens=n) for n in outs])
    m, acc = baseline.metrics, static_batch_accounting([3, 5, 2], outs, 2)
    assert [len(o.token_ids) for o in outputs] == outs
    assert m.num_output_tokens == acc["useful_output_tokens"] == 11
    assert len(m.steps) == acc["decode_steps"] == 10
    summary = m.summary()
    assert summary["num_padding_tokens"] == acc["padding_prompt_slots"] + acc["computed_output_slots"] - 11
    assert outputs[2].metrics.first_token_time >= outputs[0].metrics.finished_time     # waited for batch 1
    assert outputs[0].metrics.finished_time == outputs[1].metrics.finished_time        # done when generate returns
    assert m.throughput == pytest.approx(11 / m.elapsed_s)


def test_hf_baseline_rejects_what_it_cannot_do(models):
    _, hf, _ = models
    with pytest.raises(ValueError, match="batch_size"):
        HFStaticBatchBaseline(hf, batch_size=0)
    out = HFStaticBatchBaseline(hf, batch_size=2).generate(
        [[5, 6, 7], [5, 6]], [SamplingParams(temperature=1.0), SamplingParams(max_tokens=2)])
    assert "greedy" in str(out[0].error) and out[1].ok and len(out[1].token_ids) == 2


def test_kv_budget_batch_size():
    assert kv_budget_batch_size(8 * 512, 512) == 8
    assert kv_budget_batch_size(8 * 512 + 511, 512) == 8
    with pytest.raises(ValueError, match="at least one full context"):
        kv_budget_batch_size(100, 512)


# ---------------------------------------------------------------- workloads scale with the context
@pytest.mark.parametrize("context", [512, 2048])
def test_capstone_workloads_fit_and_scale(context):
    traces = capstone_workloads(8, context, vocab_size=1000)
    assert list(traces) == list(WORKLOADS)
    for t in traces.values():
        assert all(len(p) + sp.max_tokens <= context and len(p) < context for p, sp in zip(t.prompts, t.params))
        assert all(0 < x < 1000 for p in t.prompts for x in p)
    cot = traces["long-cot"]
    assert cot.output_lens.min() >= 0.45 * (context - cot.prompt_lens.max())          # long answers
    assert len(traces["multi-turn"]) == 8
    image_and_question = round(2880 / 4096 * context) + round(32 * context / 2048)
    assert len(traces["multimodal"].prompts[0]) == image_and_question
    turn0, turn1 = traces["multi-turn"].prompts[0], traces["multi-turn"].prompts[2]     # 2 conversations
    assert turn1[:len(turn0)] == turn0                                                  # history re-sent


def test_capstone_workloads_bad_input():
    with pytest.raises(ValueError, match="unknown workload"):
        capstone_workloads(4, 512, names=["chat", "video"], vocab_size=100)
    with pytest.raises(ValueError, match="num_requests"):
        capstone_workloads(0, 512, vocab_size=100)


# ---------------------------------------------------------------- the ablation rows
def test_ladder_is_cumulative():
    setup = AblationSetup(512, 4 * 512, max_num_seqs=16)
    assert (setup.hf_batch, setup.num_blocks, setup.chunk_tokens, setup.hf_large_batch) == (4, 128, 128, 16)
    rows = ladder(setup, draft=object())
    assert [r.kind for r in rows] == ["hf", "hf", "static"] + ["engine"] * 5
    engine = [r for r in rows if r.kind == "engine"]
    for a, b in zip(engine, engine[1:]):
        assert set(a.features) < set(b.features), (a.name, b.name)
    assert all(r.engine_kwargs["num_blocks"] == 128 for r in engine)
    assert [r.name for r in engine[3:]] == ["+ INT8 KV", "+ speculative (k=4)"]
    last = engine[-1].engine_kwargs
    assert last["kv_cache_dtype"] == "int8" and last["num_speculative_tokens"] == 4
    assert engine[1].engine_kwargs["max_num_batched_tokens"] == 128                     # the chunked-prefill budget
    assert engine[4].engine_kwargs["max_num_batched_tokens"] == 128                     # 16 x (1 + 4) fit
    wide = ladder(AblationSetup(512, 4 * 512, max_num_seqs=64), draft=object())
    assert wide[-1].engine_kwargs["max_num_batched_tokens"] == 64 * (1 + 4)             # room for 1 + k per sequence
    assert "speculative_disable_by_batch_size" not in last
    paused = ladder(AblationSetup(512, 4 * 512, max_num_seqs=16, speculative_disable_by_batch_size=8), draft=object())
    assert paused[-1].name == "+ speculative (k=4, off from batch 8)"
    assert paused[-1].engine_kwargs["speculative_disable_by_batch_size"] == 8


def test_missing_engine_keyword_is_reported_not_raised(models):
    model, _, _ = models
    assert not engine_supports("no_such_keyword") and engine_supports("enable_prefix_caching")
    ablation = Ablation(model, AblationSetup(512, 2 * 512, max_num_seqs=4))
    trace = capstone_workloads(2, 512, names=["chat"], vocab_size=2048)["chat"]
    row = ablation.run(RowConfig("future feature", "engine", engine_kwargs=dict(no_such_keyword=1),
                                 needs=("no_such_keyword",)), "chat", trace)
    assert row["status"] == NOT_AVAILABLE
    hf_row = ablation.run(ladder(ablation.setup)[0], "chat", trace)        # no transformers model given
    assert hf_row["status"] == "no transformers model"
    bad = ablation.run(RowConfig("bad", "engine", engine_kwargs=dict(block_size=0)), "chat", trace)
    assert bad["status"].startswith("error: ValueError") and "block_size" in bad["status"]
    assert "not available" in format_table([row])


# ---------------------------------------------------------------- the benchmark command, on a tiny trace
def _bench():
    from benchmarks import engine

    return engine


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "engine.json"
    result = _bench().main(["--quick", "--num-requests", "3", "--workloads", "chat,multimodal", "--dtype", "float32",
                            "--out", str(out)])
    return result, out


@pytest.mark.command
def test_benchmark_quick_machinery(quick_run):
    result, out = quick_run
    assert json.loads(out.read_text()) == result and result["complete"]
    for key in ("device", "date", "git_commit", "cpu_model", "driver", "torch", "triton", "transformers", "config",
                "workloads", "rows", "ratios_to_hf"):
        assert key in result, key
    rows = result["rows"]
    assert [r["workload"] for r in rows] == ["chat"] * 8 + ["multimodal"] * 8
    assert rows[0]["config"].startswith("HF generate") and rows[3]["config"] == "paged + continuous"   # ladder order
    assert rows[6]["config"] == "+ INT8 KV" and rows[7]["config"].startswith("+ speculative")
    for r in rows:
        assert r["status"] == "ok" or r["status"] == NOT_AVAILABLE, (r["config"], r["status"])
        if r["status"] == "ok":     # every row counts the same useful tokens: each request's own length
            assert r["num_output_tokens"] == rows[0 if r["workload"] == "chat" else 8]["num_output_tokens"]
            if r["kind"] != "hf" and "INT8 KV" not in r["features"]:
                assert r["same_tokens_as_hf"] == 1.0, r["config"]     # float32: the very same tokens
    assert result["ratios_to_hf"]["chat"][rows[0]["config"]] == 1.0
    assert result["headline"]["chat"]["all_features"] == rows[7]["config"] or rows[7]["status"] != "ok"


@pytest.mark.command
def test_merge_puts_per_workload_runs_back_together(quick_run):
    """Runs of one setup on different workloads (one per GPU) merge into the result of one run of both."""
    result, _ = quick_run
    bench = _bench()
    parts = []
    for w in ("chat", "multimodal"):
        rows = [r for r in result["rows"] if r["workload"] == w]
        parts.append(dict(result, workloads={w: result["workloads"][w]}, rows=rows, command=f"run {w}",
                          ratios_to_hf=bench.ratios(rows), headline=bench.headline_of(rows), total_seconds=1.0))
    merged = bench.merge(parts)
    assert merged["rows"] == result["rows"] and merged["workloads"] == result["workloads"]
    assert merged["ratios_to_hf"] == result["ratios_to_hf"] and merged["headline"] == result["headline"]
    assert merged["command"] == "run chat ; run multimodal" and merged["total_seconds"] == 2.0
    assert [p["workloads"] for p in merged["parts"]] == [["chat"], ["multimodal"]]
    with pytest.raises(ValueError, match="'device' differs"):
        bench.merge([parts[0], dict(parts[1], device="another GPU")])
    with pytest.raises(ValueError, match="configs differ"):
        bench.merge([parts[0], dict(parts[1], config=dict(parts[1]["config"], kv_budget_contexts=99))])
    with pytest.raises(ValueError, match="more than one run"):
        bench.merge([parts[0], parts[0]])


def test_benchmark_random_config_loads_the_same_weights(tmp_path):
    """--config: a random-init model saved once, loaded by both systems: identical greedy tokens."""
    result = _bench().main(["--config", "tiny-random", "--max-model-len", "256", "--num-requests", "2",
                            "--workloads", "chat", "--rows", "HF generate (B=2),paged", "--kv-budget-contexts", "2",
                            "--max-num-seqs", "4", "--dtype", "float32", "--out", str(tmp_path / "r.json")])
    rows = result["rows"]
    assert [r["config"] for r in rows] == ["HF generate (B=2)", "paged + continuous"]
    assert rows[1]["same_tokens_as_hf"] == 1.0 and "random init" in result["model"]["description"]
    assert result["model"]["config"]["max_position_embeddings"] == 256


def test_benchmark_runs_a_local_qwen2_checkpoint(tmp_path):
    """--model PATH with a Qwen2 folder (q/k/v biases): both systems load it, and produce the same greedy tokens."""
    import transformers
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):            # HF starts them at zero: make them count
                p.copy_(0.5 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "qwen2", safe_serialization=True)
    result = _bench().main(["--model", str(tmp_path / "qwen2"), "--num-requests", "2", "--workloads", "chat",
                            "--rows", "HF generate (B=2),paged", "--kv-budget-contexts", "2", "--max-num-seqs", "4",
                            "--dtype", "float32", "--out", str(tmp_path / "r.json")])
    rows = result["rows"]
    assert [r["config"] for r in rows] == ["HF generate (B=2)", "paged + continuous"]
    assert all(r["status"] == "ok" for r in rows) and rows[1]["same_tokens_as_hf"] == 1.0
    assert result["model"]["config"]["attention_bias"] is True
