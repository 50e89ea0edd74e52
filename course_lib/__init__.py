"""course_lib: the shared library of the LLM-inference course. Its packages, bottom to top (an import never
climbs: ``tests/test_layering.py``):

    kernels/              (beside course_lib) the Triton kernels and their plain-torch references; imports no course_lib
    course_lib.device     where code runs: DEVICE, HAS_GPU, the interpreter switch (from kernels.device), setup()
    course_lib.notebook   what lessons use to show things: explorer (sliders), show_source, timing / observe
    course_lib.model      lessons 00-03: config and presets, the LLaMA/Qwen model (llama), rope, attention,
                          kv_cache, checkpoint (load_pretrained, load_tiny), tokenizer, corpus, generate, sampling,
                          noise (counter-based, for sampling on the device), online_softmax
    course_lib.analysis   lessons 00-01: roofline (what bounds a kernel), flops (what a step computes and reads),
                          memory_hierarchy (SRAM / L2 / HBM bandwidths from the spec sheet); serving_results, claims
                          (every headline ratio computed from benchmarks/results/)
    course_lib.paging     lesson 02: block_manager (allocator, block tables, copy-on-write), paged_cache, waste
    course_lib.quant      lesson 07: kv_quant (8-bit K/V caches), kv_quality (what it costs in accuracy)
    course_lib.serving    lessons 04-06, 10: the engine in vLLM's vocabulary: engine (LLMEngine: add_request / step /
                          generate), config (EngineConfig), validation, scheduler, partial_swap (tail-first
                          swap), sequence, prefix_cache, prefix_hash, model_runner, kv_pool, speculative (lesson 06's
                          algorithm), spec_decode (its worker in the engine), metrics, static_batching, hf_baseline
    course_lib.experiments  traces and what is run on them: workloads, prefix_workloads, capstone_workloads,
                          ablation (lesson 10's ladder), timeline (pictures of a run), swap (whole vs partial swap),
                          prefetch (predictive swap-in simulated on the scheduler), multimodal (an encoder budget
                          and encoder cache on the scheduler, images hashed by content)
    course_lib.parallel   lessons 08-09: tensor and pipeline parallelism on torch.distributed
    course_lib.review     lesson 11: review (answers from recorded results), crosswalk (the Q&A document's questions
                          -> lesson cells), doc_numbers (its 14 numbers to remember, checked), quiz, glossary
    course_lib.grading    the checks of every exercise and the grader (``python -m course_lib.grade``)

Shape legend, used in every signature, comment and notebook of the course:

    B    batch size (number of sequences)
    S    sequence length (tokens in this forward pass);  Skv: tokens of keys/values (cache + new)
    Hq   query heads;  Hkv  key/value heads (GQA: Hq % Hkv == 0;  MQA: Hkv == 1)
    D    head dimension (head_dim)
    E    model (embedding) dimension = Hq * D;  F  MLP hidden dimension
    V    vocabulary size
    L    number of layers
    P    tokens per KV block (block_size);  N  number of KV blocks

Importing this package resolves the device first, so that ``TRITON_INTERPRET=1`` is set before Triton is
imported on a machine without a GPU. The names below are loaded on first use, so ``import course_lib`` stays
light (no transformers, tokenizers or matplotlib until a lesson asks for them).
"""
from course_lib.device import DEVICE, HAS_GPU, INTERPRET, setup  # first: sets TRITON_INTERPRET before triton loads

_LAZY = {
    "ModelConfig": "course_lib.model.config", "PRESETS": "course_lib.model.config", "Llama": "course_lib.model.llama",
    "load_pretrained": "course_lib.model.checkpoint", "load_tiny": "course_lib.model.checkpoint",
    "save_pretrained": "course_lib.model.checkpoint", "Tokenizer": "course_lib.model.tokenizer",
}
__all__ = ["DEVICE", "HAS_GPU", "INTERPRET", "setup", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'course_lib' has no attribute {name!r}")
