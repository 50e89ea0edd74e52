"""The capstone benchmark (lesson 10): every feature of ``LLMEngine``, one at a time, against ``transformers``.

    python -m benchmarks.engine --quick              # CPU: a small trace, under two minutes on 2 cores
    python -m benchmarks.engine                      # GPU: the full run (tiny model, bf16; see --time-limit)
    python -m benchmarks.engine --model PATH         # any local HF LLaMA / Qwen2 checkpoint folder (+ --draft PATH)
    python -m benchmarks.engine --config llama-1b    # a random-init LLaMA-3.2-1B-shaped model, saved to a temp folder
    python -m benchmarks.engine --merge A.json B.json   # one result from per-workload runs (--workloads X --out A.json)

Prints, for each workload of ``course_lib.experiments.capstone_workloads`` (chat, multi-turn, long chain-of-thought,
multimodal-style long prefills; lengths scale with the model's context), the ablation table of
``course_lib.experiments.ablation`` (throughput, TTFT, TPOT, inter-token latency p99, KV memory; one row per feature)
and the ratio to the ``transformers`` ``generate()`` baseline (``course_lib.serving.hf_baseline``). What makes the
ratio honest:

* **same weights**: the engine loads the checkpoint folder with ``course_lib.load_pretrained``, transformers
  loads the same folder with ``from_pretrained`` (``--config`` first saves a random-init model there); same
  device, same dtype, same trace (greedy, EOS ignored, exactly each request's output length, all at t = 0);
* **same KV memory**: ``--kv-budget-contexts`` C full contexts of K/V (default 8: what LLaMA-13B leaves for K/V
  on a 40 GB A100, ~12 GB at 800 KiB a token, the setup of vLLM's claim; 4 with --quick on a CPU, whose trace
  is too short for 8 to bind). The engine gets that many blocks;
  HF gets batches of B = C (one contiguous full-context reservation per request); a second HF row uses a
  larger batch, over the budget, to show how much of the gap is memory;
* **useful tokens only**: tokens a static batch computes past a request's length (and padding) are not counted.

Timing: each system's own clock (wall time of every step, CUDA synchronized). On a GPU every engine and the
baseline first serve a small warm-up trace, untimed (Triton compilation and autotuning, cuBLAS, allocator).
Writes ``benchmarks/results/engine_<device-slug>.json`` (device, torch / triton / transformers versions, date,
the config, every row) after every row, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import course_lib.device  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)
import torch
import triton

from course_lib import Llama, ModelConfig, load_pretrained, save_pretrained
from course_lib.experiments.ablation import Ablation, AblationSetup, format_table, ratios
from course_lib.experiments.capstone_workloads import WORKLOADS, capstone_workloads
from course_lib.model.checkpoint import CHECKPOINTS
from course_lib.device import DEVICE, HAS_GPU, default_dtype
from course_lib.serving.hf_baseline import load_hf_model, static_batch_accounting
from course_lib.analysis.roofline import RESULTS_DIR
from course_lib.model.tokenizer import Tokenizer
from course_lib.experiments.workloads import Trace, with_context_length
from benchmarks.roofline import device_name, slug
from benchmarks.record import cpu_model, driver_version, git_commit

#: Random-init models for --config (no weights needed: both systems load the same random weights).
CONFIG_PRESETS = {
    # LLaMA-3.2-1B's shape (1.24 B parameters), context cut to --max-model-len
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                     rope_theta=500000.0),
    # the shipped tiny model's shape with random weights (a quick check of the --config path)
    "tiny-random": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                        num_attention_heads=8, num_key_value_heads=4),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def defaults(quick: bool) -> dict:
    """Sizes: requests per workload, sequences in the engine's batch, the KV budget. The GPU sizes are meant for a
    few minutes on an H100 (an estimate; --time-limit guarantees a JSON within a slot)."""
    if HAS_GPU:
        return dict(num_requests={"chat": 256, "multi-turn": 64, "long-cot": 32, "multimodal": 64} if not quick
                    else dict.fromkeys(WORKLOADS, 64), max_num_seqs=256, kv_budget_contexts=8)
    # a CPU: a few requests; a smaller budget, so that memory still limits the static batches of such a short trace
    return dict(num_requests={"chat": 12, "multi-turn": 12, "long-cot": 6, "multimodal": 12} if quick
                else dict.fromkeys(WORKLOADS, 32),
                max_num_seqs=16 if quick else 32, kv_budget_contexts=4 if quick else 8)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small trace (CPU: under two minutes)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, default=None,
                     help="a local HF LLaMA/Qwen2 checkpoint folder (default: the shipped tiny target)")
    src.add_argument("--config", choices=sorted(CONFIG_PRESETS), default=None,
                     help="a random-init model of this shape, saved to a temp folder that both systems load")
    p.add_argument("--draft", type=Path, default=None,
                   help="draft checkpoint for speculative decoding (default: the shipped tiny draft with the "
                        "shipped target, none otherwise)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context: of a --config model (default 2048); a --model's is capped to it (default: its own)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--num-requests", type=int, default=None, help="requests per workload (default: see defaults())")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, from {','.join(WORKLOADS)}")
    p.add_argument("--rows", default=None,
                   help="comma-separated substrings: run only the rows whose name contains one (e.g. 'HF,paged')")
    p.add_argument("--kv-budget-contexts", type=int, default=None,
                   help="KV memory budget, in full contexts of K/V (default 8, --quick on a CPU 4; HF's batch "
                        "size equals it)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="the engine's running batch at most")
    p.add_argument("--hf-large-batch", type=int, default=None, help="batch of the second HF row (default max-num-seqs)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--speculative-disable-by-batch-size", type=int, default=None,
                   help="the speculative row drafts nothing in steps that start with this many running sequences or "
                        "more (default: always drafts)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up (default: warm up on a GPU)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: rows not started by then are skipped, the JSON still written (default: 240 on a "
                        "GPU, none on a CPU)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1: steadier on shared cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="output JSON (default benchmarks/results/engine_<device>.json)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="instead of running: merge results of the same setup on different workloads into one "
                        "(--out, default engine_<device>.json)")
    return p.parse_args(argv)


def load_models(args, dtype: torch.dtype, tmp: Path):
    """(model, HF model, draft or None, tokenizer or None, description) -- the engine's and transformers' copies
    of the same checkpoint folder."""
    if args.config:
        cfg = ModelConfig(**CONFIG_PRESETS[args.config], max_position_embeddings=args.max_model_len or 2048)
        torch.manual_seed(args.seed)
        with torch.device(DEVICE):
            random_model = Llama(cfg).to(dtype)
        path = tmp / args.config
        save_pretrained(random_model, path, dtype=dtype)
        del random_model
        desc = (f"{args.config} (random init, {cfg.num_parameters() / 1e6:.0f}M parameters, "
                f"context {cfg.max_position_embeddings})")
    else:
        path = args.model or CHECKPOINTS / "tiny-target"
        desc = "course_lib tiny-target (5.4M parameters, context 512)" if args.model is None else str(path)
    model = load_pretrained(path, dtype=dtype, device=DEVICE)
    if args.max_model_len and args.max_model_len < model.config.max_position_embeddings:   # a real checkpoint's 32k
        model = with_context_length(model, args.max_model_len)   # context would make every workload huge
    hf_model = load_hf_model(path, dtype=dtype, device=DEVICE)
    draft_path = args.draft or (CHECKPOINTS / "tiny-draft" if args.model is None and args.config is None else None)
    draft = load_pretrained(draft_path, dtype=dtype, device=DEVICE) if draft_path else None
    tokenizer = Tokenizer(path) if (Path(path) / "tokenizer.json").exists() else None
    return model, hf_model, draft, tokenizer, dict(description=desc, path=str(path), draft=str(draft_path or ""),
                                                     num_parameters=model.config.num_parameters(),
                                                     config=model.config.to_hf_dict())


def warmup_trace(traces: dict[str, Trace], per_workload: int = 2) -> Trace:
    """The longest requests (prompt + output) of each workload: every kernel shape the timed runs will need."""
    prompts, params = [], []
    for t in traces.values():
        order = sorted(range(len(t)), key=lambda i: -(len(t.prompts[i]) + t.params[i].max_tokens))
        for i in order[:per_workload]:
            prompts.append(t.prompts[i])
            params.append(t.params[i])
    return Trace(prompts, params, [0.0] * len(prompts), "warm-up")


def versions() -> dict:
    import transformers

    return dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__, cuda=torch.version.cuda if HAS_GPU else None)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge_main(args.merge, args.out)
    t_start = time.perf_counter()
    if not HAS_GPU:
        torch.set_num_threads(args.threads)
    cfg = defaults(args.quick)
    time_limit = args.time_limit if args.time_limit is not None else (240.0 if HAS_GPU else None)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype()
    name = device_name()
    with tempfile.TemporaryDirectory() as tmp:
        model, hf_model, draft, tokenizer, model_info = load_models(args, dtype, Path(tmp))
    C = model.config.max_position_embeddings
    print(f"device: {name}  torch {torch.__version__}  dtype {str(dtype).removeprefix('torch.')}  "
          f"model: {model_info['description']}", flush=True)
    counts = {w: args.num_requests or cfg["num_requests"].get(w, 8) for w in names}
    traces = {w: capstone_workloads(counts[w], C, names=[w], tokenizer=tokenizer, vocab_size=model.config.vocab_size,
                                    seed=args.seed)[w] for w in names}
    contexts = args.kv_budget_contexts or cfg["kv_budget_contexts"]
    setup = AblationSetup(C, contexts * C, max_num_seqs=args.max_num_seqs or cfg["max_num_seqs"],
                          hf_large_batch=args.hf_large_batch, num_speculative_tokens=args.num_speculative_tokens,
                          speculative_disable_by_batch_size=args.speculative_disable_by_batch_size)
    warm = HAS_GPU and not args.no_warmup
    ablation = Ablation(model, setup, hf_model=hf_model, draft=draft,
                        warmup_trace=warmup_trace(traces) if warm else None)
    wanted = [s.strip() for s in args.rows.split(",")] if args.rows else None
    configs = [c for c in ablation.configs if wanted is None or any(s in c.name for s in wanted)]
    print(f"KV budget: {contexts} contexts = {setup.kv_budget_tokens} tokens = "
          f"{ablation.kv_budget_bytes / 2**20:.1f} MiB ({setup.num_blocks} blocks of {setup.block_size}); HF batch "
          f"{setup.hf_batch}; engine max_num_seqs {setup.max_num_seqs}, chunked-prefill budget {setup.chunk_tokens}",
          flush=True)

    out_path = args.out or RESULTS_DIR / f"engine_{slug(name)}.json"
    result = dict(
        benchmark="engine", device=name, device_slug=slug(name),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(), cpu_model=cpu_model(), driver=driver_version(), **versions(),
        dtype=str(dtype).removeprefix("torch."), torch_threads=torch.get_num_threads(), quick=args.quick,
        kernels="Triton (compiled)" if HAS_GPU else "plain-torch references (CPU)",
        command=" ".join(["python -m benchmarks.engine", *(argv if argv is not None else sys.argv[1:])]),
        model=model_info,
        config=dict(kv_budget_contexts=contexts, kv_budget_tokens=setup.kv_budget_tokens,
                    kv_budget_bytes=ablation.kv_budget_bytes, block_size=setup.block_size, num_blocks=setup.num_blocks,
                    max_num_seqs=setup.max_num_seqs, chunk_tokens=setup.chunk_tokens, hf_batch=setup.hf_batch,
                    hf_large_batch=setup.hf_large_batch, num_speculative_tokens=setup.num_speculative_tokens,
                    warmup=warm, seed=args.seed, time_limit_s=time_limit,
                    hf_batch_rule="kv_budget_tokens // max_model_len: one contiguous full-context reservation "
                                  "per request in the engine's KV budget"),
        workloads={w: dict(description=t.description, num_requests=len(t), mean_prompt=float(t.prompt_lens.mean()),
                           mean_output=float(t.output_lens.mean()), max_output=int(t.output_lens.max()),
                           hf_batch_accounting=static_batch_accounting(t.prompt_lens, t.output_lens, setup.hf_batch))
                   for w, t in traces.items()},
        timing="each system's own clock: measured wall time of every step (CUDA synchronized); throughput = "
               "useful output tokens / s (a request's own length; padding and tokens past it not counted)",
        rows=[], complete=False)

    def save():
        result["ratios_to_hf"] = ratios(result["rows"])
        result["total_seconds"] = time.perf_counter() - t_start
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    # the headline comparison first (the HF baseline, the engine with everything, the plain engine), so that a
    # run cut short by --time-limit still has it; the rows are stored in the ladder's order
    ladder_index = {c.name: i for i, c in enumerate(configs)}
    engine_rows = [c for c in configs if c.kind == "engine"]
    run_order = []
    for c in configs[:1] + engine_rows[-1:] + engine_rows[:1] + configs:
        if all(c is not r for r in run_order):
            run_order.append(c)
    for w, trace in traces.items():
        print(trace.description, flush=True)
        for c in run_order:
            if time_limit is not None and time.perf_counter() - t_start > time_limit:
                row = dict(workload=w, config=c.name, kind=c.kind, status="skipped: --time-limit reached")
            else:
                t0 = time.perf_counter()
                row = ablation.run(c, w, trace)
                row["wall_s"] = time.perf_counter() - t0
            result["rows"].append(row)
            result["rows"].sort(key=lambda r: (names.index(r["workload"]), ladder_index[r["config"]]))
            tput = f"{row['throughput_tok_s']:9.1f} tok/s" if row["status"] == "ok" else row["status"]
            print(f"  {w:>11} | {c.name:<34} {tput}  ({row.get('wall_s', 0):.1f} s)", flush=True)
            save()

    result["complete"] = True
    result["headline"] = headline_of(result["rows"])
    save()
    report(result, out_path)
    return result


def headline_of(rows: list[dict]) -> dict:
    """Per workload: the row with every feature and the fastest engine row, each as a multiple of HF's throughput."""
    headline = {}
    for w, r in ratios(rows).items():
        engine_rows = [row for row in rows
                       if row["workload"] == w and row["kind"] == "engine" and row["status"] == "ok"]
        if engine_rows:
            best = max(engine_rows, key=lambda row: row["throughput_tok_s"])
            headline[w] = dict(all_features=engine_rows[-1]["config"], all_features_x_hf=r[engine_rows[-1]["config"]],
                               best=best["config"], best_x_hf=r[best["config"]])
    return headline


def report(result: dict, out_path: Path) -> None:
    print()
    print(format_table(result["rows"]))
    print()
    for w, h in result["headline"].items():
        print(f"{w}: all features ({h['all_features']}) {h['all_features_x_hf']:.1f}x transformers' generate(); "
              f"best row ({h['best']}) {h['best_x_hf']:.1f}x")
    print(f"wrote {out_path} ({result['total_seconds']:.0f} s)")


#: Fields that must agree for runs to be merged into one result (the time limit and the workloads may differ).
SAME_SETUP = ("benchmark", "device", "python", "torch", "triton", "transformers", "cuda", "dtype", "quick", "kernels",
              "model")


def merge(records: list[dict]) -> dict:
    """One result from runs of the same setup on different workloads (e.g. one workload per GPU of a host, with
    ``--workloads X --out ...``): rows, workloads, ratios and headline together; ``parts`` keeps each run's
    command, date and duration. Raises ValueError if the runs differ in device, versions, dtype or model, or in
    the config (KV budget, batch sizes), or repeat a workload."""
    if not records:
        raise ValueError("nothing to merge")
    first = records[0]
    config = lambda r: {k: v for k, v in r["config"].items() if k != "time_limit_s"}
    for r in records[1:]:
        for key in SAME_SETUP:
            if r.get(key) != first.get(key):
                raise ValueError(f"cannot merge: '{key}' differs ({first.get(key)!r} vs {r.get(key)!r})")
        if config(r) != config(first):
            raise ValueError(f"cannot merge: the configs differ ({config(first)} vs {config(r)})")
    workloads = [w for r in records for w in r["workloads"]]
    if len(set(workloads)) != len(workloads):
        raise ValueError(f"cannot merge: a workload appears in more than one run ({workloads})")
    rows = [row for r in records for row in r["rows"]]
    return dict(
        first, date=max(r["date"] for r in records), command=" ; ".join(r["command"] for r in records),
        workloads={w: d for r in records for w, d in r["workloads"].items()}, rows=rows,
        complete=all(r.get("complete") for r in records) and all(row["status"] == "ok" for row in rows),
        ratios_to_hf=ratios(rows), headline=headline_of(rows), total_seconds=sum(r["total_seconds"] for r in records),
        parts=[dict(command=r["command"], date=r["date"], total_seconds=r["total_seconds"],
                    workloads=list(r["workloads"])) for r in records])


def merge_main(paths: list[Path], out: Path | None) -> dict:
    result = merge([json.loads(p.read_text()) for p in paths])
    out = out or RESULTS_DIR / f"engine_{result['device_slug']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    report(result, out)
    return result


if __name__ == "__main__":
    main()
