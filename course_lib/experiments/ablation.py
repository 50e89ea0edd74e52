"""What each feature of the engine buys (lesson 10): one trace through a ladder of configurations, one row each.

The ladder, every engine row adding one feature to the row above it (all in the same KV memory budget):

    HF generate            ``transformers`` ``generate()``, static batches of B = KV budget // context
                           (``course_lib.serving.hf_baseline``): the baseline of the "14-24x" claim
    HF generate, large B   the same with a larger batch (memory ignored): how much of the gap is memory
    static (ours)          the course's model in the same static batches (``StaticBatchEngine``): how much is HF
    paged + continuous     ``LLMEngine``: paged KV in the budget's blocks, continuous batching, whole prefills
    + chunked prefill      prompts cut into chunks of a smaller token budget, mixed with decodes
    + prefix caching       K/V of prompt prefixes computed before are reused
    + INT8 KV              8-bit K/V: the same bytes hold about twice the blocks
    + speculative          a draft model proposes k tokens, the target verifies them in one pass

Speculative decoding and INT8 K/V are optional in ``LLMEngine`` (``speculative_model=``,
``num_speculative_tokens=``, ``kv_cache_dtype=``); a row whose keyword the engine lacks is reported as "not
available in this engine" instead of failing, and a row that raises (an unsupported combination, say) reports
the error. Each row records throughput (useful output tokens / s), TTFT, TPOT, the inter-token latency p99 and
KV memory: the peak bytes holding K/V and the budget (for static batches, B reservations of the full context).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from course_lib.serving.config import CONFIG_FIELDS
from course_lib.serving.engine import LLMEngine
from course_lib.serving.hf_baseline import HFStaticBatchBaseline, kv_budget_batch_size
from course_lib.model.kv_cache import kv_cache_bytes
from course_lib.serving.static_batching import StaticBatchEngine
from course_lib.experiments.workloads import Trace

NOT_AVAILABLE = "not available in this engine"
KEYS = ("num_requests", "num_errors", "num_output_tokens", "elapsed_s", "throughput_tok_s", "num_steps", "ttft_p50",
        "ttft_p99", "tpot_p50", "tpot_mean", "itl_p99", "itl_max", "prefix_cache_hit_rate", "num_prefill_tokens",
        "num_padding_tokens", "max_blocks_used", "num_blocks", "preemptions", "num_recomputed_tokens")


def engine_supports(*kwargs: str) -> bool:
    """Whether ``LLMEngine`` takes all these keyword arguments (its signature and its ``EngineConfig``'s fields,
    read at run time)."""
    params = set(inspect.signature(LLMEngine).parameters) | set(CONFIG_FIELDS)
    return all(k in params for k in kwargs)


@dataclass
class AblationSetup:
    """The shared budget and sizes. ``kv_budget_tokens``: K/V slots (in the model's dtype) every row may use;
    ``chunk_tokens``: the token budget of a step with chunked prefill (default a quarter of the context)."""

    max_model_len: int
    kv_budget_tokens: int
    max_num_seqs: int = 64
    block_size: int = 16
    chunk_tokens: int | None = None            # rows with speculative decoding: at least max_num_seqs * (1 + k)
    hf_large_batch: int | None = None          # default max_num_seqs
    num_speculative_tokens: int = 4
    speculative_disable_by_batch_size: int | None = None   # the speculative row: no drafts from this batch on

    def __post_init__(self):
        self.hf_batch = kv_budget_batch_size(self.kv_budget_tokens, self.max_model_len)
        self.num_blocks = self.kv_budget_tokens // self.block_size
        self.chunk_tokens = self.chunk_tokens or max(self.max_num_seqs, self.max_model_len // 4)
        self.hf_large_batch = self.hf_large_batch or self.max_num_seqs


@dataclass
class RowConfig:
    name: str
    kind: str                                   # "hf", "static" or "engine"
    batch_size: int | None = None
    engine_kwargs: dict = field(default_factory=dict)
    needs: tuple[str, ...] = ()                 # LLMEngine keywords the row needs
    features: tuple[str, ...] = ()


def ladder(setup: AblationSetup, *, draft=None) -> list[RowConfig]:
    """The rows, in order (see the module docstring). Engine rows are cumulative: memory and scheduling first,
    then INT8 K/V (more sequences in the same bytes), then speculative decoding (trades compute for passes). A
    row builds on the one above only if that one can run (engine support; a draft model for speculation)."""
    s = setup
    rows = [RowConfig(f"HF generate (B={s.hf_batch})", "hf", s.hf_batch),
            RowConfig(f"HF generate (B={s.hf_large_batch}, over budget)", "hf", s.hf_large_batch),
            RowConfig(f"static, ours (B={s.hf_batch})", "static", s.hf_batch)]
    kw = dict(block_size=s.block_size, num_blocks=s.num_blocks, max_num_seqs=s.max_num_seqs,
              enable_chunked_prefill=False, enable_prefix_caching=False)
    feats = ("paged KV", "continuous batching")
    rows.append(RowConfig("paged + continuous", "engine", engine_kwargs=dict(kw), features=feats))
    kw.update(enable_chunked_prefill=True, max_num_batched_tokens=s.chunk_tokens)
    feats += ("chunked prefill",)
    rows.append(RowConfig("+ chunked prefill", "engine", engine_kwargs=dict(kw), features=feats))
    kw.update(enable_prefix_caching=True)
    feats += ("prefix caching",)
    rows.append(RowConfig("+ prefix caching", "engine", engine_kwargs=dict(kw), features=feats))
    int8 = dict(kv_cache_dtype="int8")
    rows.append(RowConfig("+ INT8 KV", "engine", engine_kwargs=kw | int8, needs=tuple(int8),
                          features=feats + ("INT8 KV",)))
    if engine_supports(*int8):
        kw, feats = kw | int8, feats + ("INT8 KV",)
    k, off = s.num_speculative_tokens, s.speculative_disable_by_batch_size
    spec = dict(speculative_model=draft, num_speculative_tokens=k,
                # a step must hold 1 + k tokens of every running sequence: a smaller token budget grows to that
                max_num_batched_tokens=max(s.chunk_tokens, s.max_num_seqs * (1 + k)))
    if off is not None:
        spec["speculative_disable_by_batch_size"] = off
    name = f"+ speculative (k={k})" if off is None else f"+ speculative (k={k}, off from batch {off})"
    rows.append(RowConfig(name, "engine", engine_kwargs=kw | spec,
                          needs=("speculative_model", "num_speculative_tokens"),
                          features=feats + ("speculative decoding",)))
    return rows


def kv_bytes_per_block(model, block_size: int, **engine_kwargs) -> int:
    """Bytes of one KV block (all layers, K and V) of the pool an engine with these kwargs builds."""
    if not engine_kwargs:
        return kv_cache_bytes(model.config, block_size, bytes_per_element=model.dtype.itemsize)
    probe = LLMEngine(model, block_size=block_size, num_blocks=1, max_num_seqs=1, **engine_kwargs)
    return probe.pool.bytes_per_block


class Ablation:
    """Runs ``ladder`` rows on traces. Builds each engine once (and, with ``warmup``, runs it once untimed on
    ``warmup_trace`` first: Triton compilation and autotuning on a GPU); the prefix cache is emptied before
    each timed run, so every run starts cold."""

    def __init__(self, model, setup: AblationSetup, *, hf_model=None, draft=None, warmup_trace: Trace | None = None):
        self.model, self.setup, self.hf_model, self.draft = model, setup, hf_model, draft
        self.configs = ladder(setup, draft=draft)
        self.warmup_trace = warmup_trace
        self.runners: dict[str, object] = {}
        self.kv_budget_bytes = setup.num_blocks * kv_bytes_per_block(model, setup.block_size)
        self.hf_tokens: dict[str, list] = {}     # workload -> HF's output tokens (first row), for the comparison

    def _skip_reason(self, cfg: RowConfig) -> str | None:
        if cfg.kind == "hf" and self.hf_model is None:
            return "no transformers model"
        if cfg.needs and not engine_supports(*cfg.needs):
            return NOT_AVAILABLE
        if "speculative_model" in cfg.engine_kwargs and self.draft is None:
            return "no draft model"
        return None

    def _runner(self, cfg: RowConfig):
        if cfg.name not in self.runners:
            s = self.setup
            if cfg.kind == "hf":
                runner = HFStaticBatchBaseline(self.hf_model, batch_size=cfg.batch_size, block_size=s.block_size,
                                               max_model_len=s.max_model_len)
            elif cfg.kind == "static":
                runner = StaticBatchEngine(self.model, max_batch_size=cfg.batch_size, block_size=s.block_size)
            else:
                kw = dict(cfg.engine_kwargs)
                if kw.get("kv_cache_dtype", "auto") != "auto":     # the same bytes: more blocks of 8-bit K/V
                    per_block = kv_bytes_per_block(self.model, s.block_size, kv_cache_dtype=kw["kv_cache_dtype"])
                    kw["num_blocks"] = self.kv_budget_bytes // per_block
                runner = LLMEngine(self.model, **kw)
            if self.warmup_trace is not None:
                t = self.warmup_trace
                runner.generate(t.prompts, t.params, arrival_times=t.arrival_times, use_tqdm=False)
            self.runners[cfg.name] = runner
        return self.runners[cfg.name]

    def run(self, cfg: RowConfig, workload: str, trace: Trace) -> dict:
        """One row: the config on the trace. Never raises for a row that cannot run; its ``status`` says why."""
        row = dict(workload=workload, config=cfg.name, kind=cfg.kind, features=list(cfg.features),
                   batch_size=cfg.batch_size, status="ok")
        reason = self._skip_reason(cfg)
        if reason:
            return row | dict(status=reason)
        try:
            runner = self._runner(cfg)
            if cfg.kind == "engine":
                runner.reset_prefix_cache()
            outputs = runner.generate(trace.prompts, trace.params, arrival_times=trace.arrival_times, use_tqdm=False)
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:   # a combination the engine
            # rejects, out of memory, ...: the row says so and the other rows still run
            return row | dict(status=f"error: {type(err).__name__}: {err}")
        summary = runner.metrics.summary()
        row.update({k: summary[k] for k in KEYS if k in summary})
        row.update({k: v for k, v in summary.items() if "accept" in k or k.startswith("spec")})
        row["errors"] = sorted({str(o.error) for o in outputs if o.error is not None})[:3]
        tokens = [o.token_ids for o in outputs]
        if cfg.kind == "hf" and workload not in self.hf_tokens:
            self.hf_tokens[workload] = tokens
        if workload in self.hf_tokens:
            ref = self.hf_tokens[workload]
            row["same_tokens_as_hf"] = sum(a == b for a, b in zip(tokens, ref)) / len(ref)
        self._kv_memory(row, cfg, runner, summary)
        return row

    def _kv_memory(self, row: dict, cfg: RowConfig, runner, summary: dict) -> None:
        s = self.setup
        if cfg.kind == "engine":
            per_block = runner.pool.bytes_per_block
            row["kv_budget_bytes"] = runner.num_blocks * per_block
            row["num_blocks"] = runner.num_blocks
        else:   # contiguous: the batch's actual cache at its peak; the budget B full-context reservations
            per_block = kv_bytes_per_block(self.model, s.block_size)
            row["kv_budget_bytes"] = cfg.batch_size * s.max_model_len // s.block_size * per_block
        row["kv_peak_bytes"] = summary.get("max_blocks_used", 0) * per_block


def ratios(rows: list[dict]) -> dict[str, dict]:
    """Per workload: every ok row's throughput / the first HF row's (the baseline's)."""
    out = {}
    for w in dict.fromkeys(r["workload"] for r in rows):
        ws = [r for r in rows if r["workload"] == w and r["status"] == "ok"]
        base = next((r for r in ws if r["kind"] == "hf"), None)
        if base:
            out[w] = {r["config"]: r["throughput_tok_s"] / base["throughput_tok_s"] for r in ws}
    return out


def format_table(rows: list[dict]) -> str:
    """The rows as a text table, one block per workload; throughput also as a multiple of the HF baseline."""
    rel = ratios(rows)
    head = (f"{'config':<34} {'tok/s':>9} {'x HF':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
            f"{'ITL p99':>8} {'KV peak':>8} {'KV budget':>9}  notes")
    units = f"{'':<34} {'':>9} {'':>6} {'(s)':>9} {'(s)':>9} {'(ms)':>9} {'(ms)':>8} {'(MiB)':>8} {'(MiB)':>9}"
    lines = []
    for w in dict.fromkeys(r["workload"] for r in rows):
        lines += [f"--- {w}", head, units]
        for r in (r for r in rows if r["workload"] == w):
            if r["status"] != "ok":
                lines.append(f"{r['config']:<34} {r['status']}")
                continue
            notes = []
            if r.get("prefix_cache_hit_rate"):
                notes.append(f"hit {r['prefix_cache_hit_rate']:.0%}")
            if sum((r.get("preemptions") or {}).values()):
                notes.append(f"preempted {sum(r['preemptions'].values())}")
            if r.get("spec_acceptance_rate") is not None:
                notes.append(f"acceptance {r['spec_acceptance_rate']:.2f}")
            if r.get("spec_tokens_per_target_forward") is not None:
                notes.append(f"{r['spec_tokens_per_target_forward']:.1f} tokens/target pass")
            if "same_tokens_as_hf" in r and r["kind"] != "hf":
                notes.append(f"same tokens as HF {r['same_tokens_as_hf']:.0%}")
            if r.get("num_errors"):
                notes.append(f"{r['num_errors']} rejected")
            x = rel.get(w, {}).get(r["config"])
            x = "-" if x is None else f"{x:.2f}"
            lines.append(f"{r['config']:<34} {r['throughput_tok_s']:9.1f} {x:>6} {r['ttft_p50']:9.3f} "
                         f"{r['ttft_p99']:9.3f} {1e3 * r['tpot_p50']:9.2f} {1e3 * r['itl_p99']:8.2f} "
                         f"{r['kv_peak_bytes'] / 2**20:8.2f} {r['kv_budget_bytes'] / 2**20:9.2f}  {', '.join(notes)}")
    return "\n".join(lines)
