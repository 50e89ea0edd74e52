"""The Q&A document's 14 "numbers to remember", each checked (lesson 11, Part 2).

The document ends with a table of 14 numbers (``DOCUMENT_NUMBERS``: its figure and what it is for, as it says
them). ``document_numbers`` gives each one back with

* a **value** that is *recomputed* by the course's own code (a formula, a simulation with a fixed seed),
  *measured* (read from a recorded result in ``benchmarks/results/``) or *sourced* (a published figure, whose
  source is named),
* the **kind** of that value (``KINDS``) and its **source** (the function, result file or publication), and
* what the course measured **instead** or beside it (its own engine, its own kernels, on its own machines).

A row that would be *measured* falls back to *sourced* when its result file is missing, and then says which
command records it. Nothing here is timed: the recorded results are passed in by the caller (lesson 11 reads
them with ``course_lib.review.review.latest``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from course_lib.analysis.feature_lines import batching_ratio_text
from course_lib.analysis.memory_hierarchy import GPU_SPECS, smem_bandwidth
from course_lib.model.config import PRESETS
from course_lib.model.kv_cache import kv_cache_bytes
from course_lib.paging.waste import sample_request_lengths, waste_fraction
from course_lib.parallel.comm import LINKS, cross_node_bytes_per_token
from course_lib.review.review import not_recorded, source
from course_lib.serving.config import EngineConfig

KINDS = ("recomputed", "measured", "sourced")

#: The document's table, in its order: (its number, what it is for), as it writes them.
DOCUMENT_NUMBERS: tuple[tuple[str, str], ...] = (
    ("PagedAttention vs HF: 14-24x", "吞吐提升"),
    ("PagedAttention vs TGI: 2.2-3.5x", "吞吐提升"),
    ("A100 SRAM: 19 TB/s", "FlashAttention关键"),
    ("A100 HBM: 2 TB/s", "FlashAttention关键"),
    ("传统KV Cache浪费: 60-80%", "PagedAttention动机"),
    ("PagedAttention浪费: <4%", "PagedAttention效果"),
    ("FlashAttention加速: 2-4x", "速度提升"),
    ("FlashAttention显存: 5-20x减少", "显存优化"),
    ("KsanaLLM跨机通信: 降低98.3%", "多机调度优化"),
    ("KsanaLLM推理单价: 低20%+", "成本优势"),
    ("LLaMA-13B单序列KV: ~1.7GB", "KV Cache规模"),
    ("NVLink带宽: 50-450 GB/s", "TP适用场景"),
    ("Block size: 16 tokens", "PagedAttention默认"),
    ("Continuous Batching: 2-3x吞吐", "调度收益"),
)

VLLM_BLOG = "vLLM launch blog (Kwon et al., June 2023)"


@dataclass(frozen=True)
class DocNumber:
    number: str     # the document's row, as it says it
    use: str        # what the document says it is for
    value: str      # the value checked here
    kind: str       # one of KINDS
    source: str     # function, result file or named publication
    course: str     # what the course measured instead (or why it cannot)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.value or not self.source:
            raise ValueError(f"{self.number}: every row needs a value and a source")


def _human(x: float, unit: str) -> str:
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if x >= div:
            return f"{x / div:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _waste(seed: int = 0) -> dict[str, float]:
    """Lesson 02's waste on 10,000 ShareGPT-like requests caught mid-flight (same seeds as lessons 02 and 11)."""
    prompt, output = sample_request_lengths(10_000, max_len=2048, seed=seed)
    progress = np.random.default_rng(seed + 1).uniform(size=prompt.shape)
    out = {lay: waste_fraction(prompt, output, lay, progress=progress) for lay in ("max", "oracle")}
    for P in (8, 16, 64):
        out[f"paged{P}"] = waste_fraction(prompt, output, "paged", block_size=P, progress=progress)
    return out


def _engine_ratios(engine: dict | None) -> tuple[float, float] | None:
    ratios = [max(v for k, v in by.items() if not k.startswith(("HF", "static")))
              for by in (engine or {}).get("ratios_to_hf", {}).values()]
    return (min(ratios), max(ratios)) if ratios else None


def _real_size(comparisons: list[tuple[dict, dict]] | None) -> str | None:
    """'LLMEngine vs transformers' strongest system ...: 12.8-43.0x over 3 traces (devices)', or None."""
    if not comparisons:
        return None
    ratios = [x["ratio"] for _, x in comparisons]
    devices = ", ".join(dict.fromkeys(run["device"] for run, _ in comparisons))
    setups = sorted({x["hf_setup"] for _, x in comparisons if x.get("hf_setup")})
    return (f"LLMEngine vs transformers' strongest system on the same trace and card, real model shapes (random "
            f"weights): {min(ratios):.1f}-{max(ratios):.1f}x over {len(ratios)} traces ({devices}; lesson 10"
            + (f"; its continuous batching as run: {', '.join(setups)}" if setups else "") + ")")


def document_numbers(*, flash: dict | None = None, batching: dict | None = None, engine: dict | None = None,
                     roofline: dict | None = None, memory: dict | None = None,
                     serving: list[tuple[dict, dict]] | None = None) -> list[DocNumber]:
    """The document's 14 numbers, in its order, each recomputed, measured or sourced (see the module docstring).

    flash: a ``flash_attention`` result (lesson 03); batching: an ``engine_batching`` result (lesson 04);
    engine: the capstone's ``engine`` result (lesson 10); roofline: a GPU ``roofline`` result (lesson 00);
    memory: a ``memory_hierarchy`` result; serving: the real-size comparisons of
    ``course_lib.analysis.claims.strongest_hf_per_trace``. Any of them may be None (not recorded on this machine).
    """
    doc = iter(DOCUMENT_NUMBERS)
    rows: list[DocNumber] = []

    def add(value, kind, src, course):
        rows.append(DocNumber(*next(doc), value, kind, src, course))

    # 1-2: vLLM vs HF and TGI: published, with the course's own engine vs generate() beside it
    r = _engine_ratios(engine)
    tiny = (f"the tiny model's capstone (host-bound steps, not a serving result): {r[0]:.1f}-{r[1]:.1f}x "
            f"transformers' generate() over the four workloads ({source(engine)})" if r else None)
    course = "; ".join(x for x in (_real_size(serving), tiny) if x)
    add("14-24x with one completion per request (8.5-15x with three)", "sourced",
        f"{VLLM_BLOG}: LLaMA-7B on an A10G, LLaMA-13B on an A100, ShareGPT-like requests",
        course or not_recorded("engine", gpu=True))
    add("2.2-2.5x with one completion per request; 3.3-3.5x with three (the 'up to 3.5x')", "sourced", VLLM_BLOG,
        "not measured: the course runs no TGI; lesson 10 compares with transformers' generate() instead")

    # 3-4: A100 SRAM and HBM
    a100 = GPU_SPECS["A100 SXM4 80GB"]
    smem = smem_bandwidth(a100)
    hbm = {name: spec.hbm_bandwidth for name, spec in GPU_SPECS.items() if name.startswith("A100")}
    mem_line = (f"measured on {source(memory)}: L2-resident reads {_human(memory['l2_bytes_per_s'], 'B/s')}, "
                f"HBM-sized {_human(memory['hbm_bytes_per_s'], 'B/s')}" if memory
                else not_recorded("memory_hierarchy", gpu=True))
    add(f"{a100.num_sms} SMs x {a100.smem_bytes_per_clock} B/clock x {a100.clock_hz / 1e9:.2f} GHz = "
        f"{_human(smem, 'B/s')} (an estimate summed over all SMs)", "recomputed",
        "FlashAttention paper (Dao et al., 2022) §2.1 'estimated around 19TB/s'; SMs and clock: NVIDIA A100 "
        "whitepaper; 32 banks x 4 B per clock: CUDA C++ Programming Guide", mem_line)
    roof_line = (f"copy bandwidth measured on {source(roofline)}: "
                 f"{_human(roofline['roofline']['peak_bandwidth'], 'B/s')}" if roofline
                 else not_recorded("roofline", gpu=True))
    add(", ".join(f"{name}: {_human(bw, 'B/s')} (SRAM estimate {smem / bw:.1f}x)" for name, bw in hbm.items()),
        "sourced", "NVIDIA A100 datasheet (1.5 TB/s for the 40 GB card, 2.0 for the 80 GB; the FlashAttention paper: "
        "1.5-2.0)", roof_line)

    # 5-6: KV memory waste, recomputed on lesson 02's length distribution
    w = _waste()
    add(f"{w['max']:.0%} reserved-but-empty with max_len = 2,048 slots per request ({w['oracle']:.0%} even when "
        "each final length is known)", "recomputed",
        "paging.waste on 10,000 ShareGPT-like requests (seed 0), caught mid-flight; vLLM blog: 60-80%",
        "lesson 02 shows the distribution and the per-layout waste")
    add(f"{w['paged16']:.1%} at P = 16 ({w['paged8']:.1%} at P = 8, {w['paged64']:.1%} at P = 64)", "recomputed",
        "paging.waste, same requests; vLLM blog: 'under 4%'", "lesson 02: only the last block of each sequence is "
        "partly empty")

    # 7-8: FlashAttention speed and memory, from the course's recorded forward runs
    if flash:
        speed = [s["naive_seconds"] / s["ours_seconds"] for s in flash["speed"] if "naive_seconds" in s]
        mem = {m["N"]: m["naive_peak_bytes"] / m["flash_peak_bytes"] for m in flash["memory"]}
        ns = [s["N"] for s in flash["speed"]]
        add(f"{min(speed):.1f}-{max(speed):.1f}x vs naive attention, forward only, N {min(ns):,}-{max(ns):,}",
            "measured", source(flash), "FlashAttention's README: 2-4x forward + backward on an A100, N 128-4K, D = 64")
        add(", ".join(f"N={n:,}: {x:.0f}x" for n, x in sorted(mem.items())) + " less peak memory", "measured",
            source(flash), "FlashAttention's README: 10x at 2K, 20x at 4K; the saving grows with N (O(N^2) vs O(N))")
    else:
        add("2-4x forward + backward vs PyTorch attention (A100, N 128-4K, D = 64)", "sourced",
            "FlashAttention's README (first release)", not_recorded("flash_attention", gpu=True))
        add("10x at N = 2K, 20x at N = 4K; grows with N", "sourced", "FlashAttention's README (first release)",
            not_recorded("flash_attention", gpu=True))

    # 9-10: KsanaLLM's vendor numbers
    layers_983 = 2 / (2 * (1 - 0.983))
    c70 = PRESETS["llama-2-70b"]
    cut70 = 1 - cross_node_bytes_per_token(c70.num_hidden_layers, c70.hidden_size, layout="pp",
                                           tensors_per_boundary=2) / \
        cross_node_bytes_per_token(c70.num_hidden_layers, c70.hidden_size, layout="tp")
    add(f"simplest count (TP: each all-reduce's message once; PP: hidden + residual once): 1 - 2 / (2 L) = 98.3% "
        f"at L = {layers_983:.0f} layers; LLaMA-2-70B (L = {c70.num_hidden_layers}): {cut70:.1%}", "recomputed",
        "parallel.comm.cross_node_bytes_per_token; the vendor's own assumptions are unpublished",
        "lesson 09 computes TP-across-nodes vs PP bytes for real configurations")
    add("20%+ lower cost per token than vLLM / TensorRT-LLM (vendor claim)", "sourced",
        "KsanaLLM (Tencent), the vendor's own claim", "not measurable here: it needs both engines on the same "
        "hardware, workload and prices")

    # 11: the KV cache of one LLaMA-2-13B sequence
    c13 = PRESETS["llama-2-13b"]
    kv = kv_cache_bytes(c13, 2048)
    add(f"2 x {c13.num_hidden_layers} x {c13.num_key_value_heads} x {c13.head_dim} x 2,048 x 2 B = {kv / 1e9:.2f} GB"
        f" = {kv / 2**30:.2f} GiB", "recomputed",
        "model.kv_cache.kv_cache_bytes (LLaMA-2-13B, fp16)", "lesson 01 computes it for every preset")

    # 12: NVLink
    nv = next(link for link in LINKS if link.name.startswith("NVLink 4"))
    n_links = int(nv.name.split(", ")[1].split()[0])
    add(f"{_human(nv.bytes_per_s / n_links, 'B/s')} per link each way ({_human(2 * nv.bytes_per_s / n_links, 'B/s')} "
        f"both ways); {_human(nv.bytes_per_s, 'B/s')} per H100 each way over {n_links} links", "sourced",
        "NVIDIA H100 datasheet (NVLink 4: 900 GB/s per GPU, both directions)",
        "lesson 08: a layer's all-reduce bytes per token over NVLink, PCIe and InfiniBand")

    # 13: block size
    add(f"16 tokens: vLLM's default on CUDA; the course's EngineConfig default is {EngineConfig.block_size}",
        "sourced", "vLLM engine arguments (--block-size)",
        f"waste recomputed above: {w['paged8']:.1%} / {w['paged16']:.1%} / {w['paged64']:.1%} at P = 8 / 16 / 64; "
        "lesson 02's kernel reads K/V through the block table")

    # 14: continuous batching
    if batching:
        add(f"continuous over static batching's throughput, same trace, the tiny model: "
            f"{batching_ratio_text(batching)}", "measured", source(batching),
            "the scheduling's factor is what continuous batching buys; it grows with the spread of output lengths "
            "and the batch the KV memory allows (lesson 04)")
    else:
        add("2-3x (the document); up to 23x in Anyscale's 2023 blog, vLLM included", "sourced",
            "Anyscale blog (2023), 'How continuous batching enables 23x throughput'", not_recorded("batching"))
    assert len(rows) == len(DOCUMENT_NUMBERS)
    return rows
