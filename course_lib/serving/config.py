"""``EngineConfig``: every knob of ``LLMEngine`` (lessons 04-07, 10) in one validated dataclass, with vLLM's names.

    LLMEngine(model, max_num_seqs=8, enable_prefix_caching=True)            # keyword arguments, as in vLLM's LLM(...)
    LLMEngine(model, config=EngineConfig(max_num_seqs=8))                   # or a config (keywords override it)

A field that is wrong raises a ``ValueError`` naming it when the config is built (``__post_init__``, nano-vllm's
way), before any memory is allocated. What depends on the model (its context length, a draft model's vocabulary)
is checked, and the defaults that depend on it are filled in, by ``resolve(model, speculative_model)``: the
engine keeps the resolved config as ``engine.config``.

The objects an engine runs with are arguments of ``LLMEngine`` itself, not fields: the model, the ``tokenizer``
and the draft model (``speculative_model``).
"""
from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, fields, replace

from course_lib.serving.kv_pool import KV_CACHE_DTYPES
from course_lib.serving.scheduler import PREEMPTION_MODES
from course_lib.serving.spec_decode import check_speculative_config


#: ``EngineConfig.cudagraph_mode``'s values (vLLM's ``CUDAGraphMode`` names that the engine implements)
CUDAGRAPH_MODES = ("NONE", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE", "FULL")


def _positive_int(name: str, value, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")


def _bool(name: str, value, *, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        raise ValueError(f"{name} must be True or False{' (or None)' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """What ``LLMEngine`` is built with (``None``: a default that ``resolve`` derives from the model). The names are
    vLLM's where vLLM has the knob, with two exceptions: vLLM's ``kv_cache_dtype`` has FP8 formats but no ``"int8"``,
    and current vLLM takes the speculative settings as one ``speculative_config={"num_speculative_tokens": k,
    "disable_by_batch_size": n, ...}`` (the flat names here are those of its older releases).

    block_size              tokens per KV block (P)
    num_blocks              KV blocks on the device (vLLM: num_gpu_blocks_override); default: enough for
                            max_num_seqs full-context sequences
    max_num_seqs            sequences in the running batch at most
    max_num_batched_tokens  tokens per step (the token budget); default 512 with chunked prefill, else the model's
                            context length (a whole prompt must fit one step); at least max_num_seqs * (1 + k)
    enable_prefix_caching   reuse the K/V blocks of prompt prefixes computed before (lesson 05); the cache lives
                            as long as the engine (``LLMEngine.reset_prefix_cache`` empties it)
    enable_chunked_prefill  split long prompts into chunks that share steps with decodes
    preemption_mode         "recompute" or "swap" (to ``num_cpu_blocks`` CPU blocks)
    num_cpu_blocks          the CPU pool of swapping (default num_blocks; 0 with recompute)
    enable_partial_swap     with preemption_mode "swap": a victim moves only the blocks the step needs, tail first,
                            and keeps its prefix on the device; a resuming one copies back only what it moved
                            (``course_lib.serving.partial_swap``; the course's variant of what KsanaLLM does)
    kv_cache_dtype          "auto" (K/V in the model's dtype) or "int8" / "fp8" (8-bit codes + a float16 scale per
                            token and kv head, lesson 07: ~half the bytes, so a memory budget holds ~twice the blocks;
                            size ``num_blocks`` with ``course_lib.quant.kv_quant.num_blocks_for_memory``)
    use_kernels             Triton kernels (default for a model on a GPU) or their plain-torch references (default
                            for a model on the CPU)
    seed                    draws the seeds of requests without a seed of their own (course_lib.model.sampling)
    num_speculative_tokens  draft tokens per sequence and step (k; 0 = off), with ``LLMEngine(speculative_model=)``
    speculative_disable_by_batch_size
                            no drafts in a step that starts with this many running sequences or more (default None:
                            always speculate). A big batch already fills a step: a verify pass of 1 + k tokens per
                            sequence then costs more than the drafts it accepts save
    enforce_eager           run every step eagerly, never through a captured CUDA graph (vLLM's switch to debug or
                            compare against graphs; the same as cudagraph_mode "NONE")
    cudagraph_mode          which steps replay CUDA graphs (vLLM's names), with the kernels on a GPU (on a CPU any mode
                            runs every step eagerly): "FULL" (the default) one whole graph per batch-size bucket for
                            decode-only steps (``course_lib.serving.cuda_graph``) and one whole graph per token count
                            for mixed steps with prompt chunks, attention included (``course_lib.serving.full_graph``);
                            "FULL_AND_PIECEWISE" the decode graphs, and for mixed steps piecewise graphs cut at each
                            attention (``course_lib.serving.piecewise_graph``); "FULL_DECODE_ONLY" the decode graphs
                            only, mixed steps eager (the default until the full graphs, measured on an H100:
                            serving_step_nvidia-h100-80gb-hbm3_f.json); "NONE" no graph (what ``enforce_eager=True``
                            forces, whatever the mode)
    async_scheduling        plan step k + 1 on the host while the GPU runs step k (vLLM's name;
                            ``course_lib.serving.async_scheduling``): greedy steps launch without waiting for their
                            tokens, which are read back one step later. Default None: on for a model on a GPU, off
                            on a CPU (nothing to overlap there; True runs the same logic, which the tests use)
    gpu_memory_utilization  the fraction of the GPU's memory the engine may take (model, activations and KV blocks),
                            in (0, 1]: on a GPU without ``num_blocks``, the KV cache gets what a profiling pass of the
                            largest step leaves of it (``course_lib.serving.memory``), up to max_num_seqs full
                            contexts (what the running batch can hold at once; with prefix caching more blocks keep
                            more prefixes: pass ``num_blocks``); on a CPU, ``num_blocks`` defaults to that cap
    """

    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = False
    enable_chunked_prefill: bool = True
    preemption_mode: str = "recompute"
    num_cpu_blocks: int | None = None
    enable_partial_swap: bool = False
    kv_cache_dtype: str = "auto"
    use_kernels: bool | None = None
    seed: int = 0
    num_speculative_tokens: int = 0
    speculative_disable_by_batch_size: int | None = None
    enforce_eager: bool = False
    cudagraph_mode: str = "FULL"
    async_scheduling: bool | None = None
    gpu_memory_utilization: float = 0.9

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs"):
            _positive_int(name, getattr(self, name))
        for name in ("num_blocks", "max_num_batched_tokens", "speculative_disable_by_batch_size"):
            _positive_int(name, getattr(self, name), optional=True)
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "enforce_eager", "enable_partial_swap"):
            _bool(name, getattr(self, name))
        if self.enable_partial_swap and self.preemption_mode != "swap":
            raise ValueError(f"enable_partial_swap=True needs preemption_mode='swap', got "
                             f"preemption_mode={self.preemption_mode!r}")
        _bool("use_kernels", self.use_kernels, optional=True)
        _bool("async_scheduling", self.async_scheduling, optional=True)
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        if self.num_cpu_blocks is not None:
            if self.preemption_mode == "swap":
                _positive_int("num_cpu_blocks", self.num_cpu_blocks)     # swapping needs somewhere to swap to
            elif isinstance(self.num_cpu_blocks, bool) or not isinstance(self.num_cpu_blocks, int) \
                    or self.num_cpu_blocks < 0:
                raise ValueError(f"num_cpu_blocks must be an int >= 0 or None, got {self.num_cpu_blocks!r}")
        if self.cudagraph_mode not in CUDAGRAPH_MODES:
            raise ValueError(f"cudagraph_mode must be one of {CUDAGRAPH_MODES}, got {self.cudagraph_mode!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"num_speculative_tokens must be an int >= 0 (0 = no speculation), got {k!r}")
        if self.speculative_disable_by_batch_size is not None and not k:
            raise ValueError("speculative_disable_by_batch_size needs speculative decoding on "
                             "(speculative_model and num_speculative_tokens)")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs * (1 + k):
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs})" + (f" x (1 + num_speculative_tokens ({k}))" if k else "") +
                             ": every running sequence must be able to decode in every step")
        u = self.gpu_memory_utilization
        if not isinstance(u, numbers.Real) or isinstance(u, bool) or not (math.isfinite(u) and 0 < u <= 1):
            raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1], got {u!r}")

    def resolve(self, model, speculative_model=None) -> EngineConfig:
        """This config for ``model`` (and its draft): the model-dependent checks, and every ``None`` default that
        depends on the model filled in (num_blocks, max_num_batched_tokens, num_cpu_blocks, async_scheduling)."""
        max_model_len = model.config.max_position_embeddings
        k = check_speculative_config(model, speculative_model, self.num_speculative_tokens)
        num_blocks = self.num_blocks
        if num_blocks is None:     # every running sequence may grow to the whole context
            num_blocks = self.max_num_seqs * -(-max_model_len // self.block_size)
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = max(512 if self.enable_chunked_prefill else max_model_len, self.max_num_seqs * (1 + k))
        if not self.enable_chunked_prefill and budget < max_model_len:
            raise ValueError(f"max_num_batched_tokens ({budget}) must be >= the model's context "
                             f"({max_model_len}) without chunked prefill: a whole prompt must fit one step")
        swap = self.preemption_mode == "swap"
        num_cpu_blocks = (num_blocks if self.num_cpu_blocks is None else self.num_cpu_blocks) if swap else 0
        overlap = model.device.type == "cuda" if self.async_scheduling is None else self.async_scheduling
        return replace(self, num_blocks=num_blocks, max_num_batched_tokens=budget, num_cpu_blocks=num_cpu_blocks,
                       async_scheduling=overlap)


CONFIG_FIELDS = tuple(f.name for f in fields(EngineConfig))


def make_engine_config(config: EngineConfig | None = None, **kwargs) -> EngineConfig:
    """``config`` (default ``EngineConfig()``) with the fields named in ``kwargs`` replaced: what
    ``LLMEngine(model, config=..., **kwargs)`` runs with. An unknown name raises a TypeError, as a wrong keyword
    argument does, suggesting the field it resembles."""
    for name in kwargs:
        if name not in CONFIG_FIELDS:
            near = difflib.get_close_matches(name, CONFIG_FIELDS, n=1)
            raise TypeError(f"LLMEngine got an unexpected keyword argument {name!r}"
                            + (f" (did you mean {near[0]!r}?)" if near else "")
                            + f"; EngineConfig has {', '.join(CONFIG_FIELDS)}")
    if config is not None and not isinstance(config, EngineConfig):
        raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
    return EngineConfig(**kwargs) if config is None else replace(config, **kwargs)
