"""The real model families of load_pretrained (Llama-3.x, Qwen2.5, Qwen3): their presets against the published
config.json and parameter counts, the KV/FLOP formulas with an explicit head_dim (Qwen3: D != E / Hq), and the
serving engine on Qwen3-shaped and Llama-3-scaled models (same greedy tokens as plain generation)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from course_lib.device import DEVICE
from torch.utils.flop_counter import FlopCounterMode

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib import PRESETS, Llama, ModelConfig
from course_lib.analysis import flops
from course_lib.serving.engine import LLMEngine
from course_lib.model.generate import generate
from course_lib.model.kv_cache import KVCache, kv_cache_bytes
from course_lib.model.rope import RopeScaling
from course_lib.model.sampling import SamplingParams
from kernels.flash_attention import HEAD_DIMS

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

# The config.json files as published on the Hugging Face hub (Qwen/Qwen2.5-0.5B, Qwen/Qwen3-0.6B,
# meta-llama/Llama-3.2-1B), without initializer_range, use_cache and the like.
PUBLISHED = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
        "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
        "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_mrope": False,
        "use_sliding_window": False, "vocab_size": 151936},
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
        "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936},
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256},
}

# Parameter counts as the model cards state them (billions, rounded to 2 digits): total, without the embedding
PUBLISHED_PARAMS = {"qwen2.5-0.5b": (0.49, 0.36), "qwen3-0.6b": (0.60, 0.44), "llama-3.2-1b": (1.24, 0.97)}


# ---------------------------------------------------------------- presets
def test_existing_preset_names_are_kept():
    assert {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "mistral-7b",
            "qwen2-7b"} <= PRESETS.keys()


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_is_what_the_published_config_json_loads_as(name):
    loaded = ModelConfig.from_dict(PUBLISHED[name])
    assert dataclasses.replace(loaded, bos_token_id=None, eos_token_id=None) == PRESETS[name]


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_preset_parameter_count_is_the_published_one(name):
    """Built on the 'meta' device (shapes, no memory): the model's own parameters, counted."""
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = Llama(cfg)
    counted = sum(p.numel() for p in model.parameters())          # a tied head is one parameter, counted once
    embedding = cfg.vocab_size * cfg.hidden_size
    assert counted == cfg.num_parameters()
    assert (round(counted / 1e9, 2), round((counted - embedding) / 1e9, 2)) == PUBLISHED_PARAMS[name]


def test_presets_carry_each_family_feature():
    assert PRESETS["qwen3-0.6b"].qk_norm and not PRESETS["qwen3-0.6b"].attention_bias
    assert PRESETS["qwen2.5-0.5b"].attention_bias and not PRESETS["qwen2.5-0.5b"].qk_norm
    assert PRESETS["llama-3.2-1b"].rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    assert all(PRESETS[n].tie_word_embeddings for n in PUBLISHED)


# ---------------------------------------------------------------- head_dim in the KV and FLOP formulas
def test_kv_cache_bytes_use_the_explicit_head_dim():
    """Qwen3-0.6B: D = 128, not E / Hq = 64; its cache is twice what hidden_size / heads would say."""
    cfg = PRESETS["qwen3-0.6b"]
    assert cfg.head_dim == 128 != cfg.hidden_size // cfg.num_attention_heads
    assert kv_cache_bytes(cfg, 1) == 2 * 28 * 8 * 128 * 2 == 114_688             # 112 KiB per token in 16-bit
    assert kv_cache_bytes(cfg, 4096, 8) == 8 * 4096 * 114_688


def test_flop_formulas_use_the_explicit_head_dim():
    cfg = PRESETS["qwen3-0.6b"]
    E, F, D, Hq, Hkv = 1024, 3072, 128, 16, 8
    assert flops.linear_params_per_layer(cfg) == E * Hq * D + 2 * E * Hkv * D + Hq * D * E + 3 * E * F
    with torch.device("meta"):
        layer = Llama(dataclasses.replace(cfg, num_hidden_layers=1)).model.layers[0]
    matmul_weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_weights == flops.linear_params_per_layer(cfg)
    assert flops.forward_flops_breakdown(cfg, 1, 99)["attention"] == 4 * 28 * Hq * D * 100


def tiny_qwen3(**changes) -> Llama:
    """A random Qwen3-shaped model: q/k norms (random weights), head_dim 32 != E / Hq = 16, tied embeddings;
    weights scaled so that attention and logits are peaked (no near-ties in greedy decoding)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                             qk_norm=True, tie_word_embeddings=True, rms_norm_eps=1e-6) | changes)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5 * (4 if "embed" in name else 1.5))
            else:                                                   # every RMSNorm, q/k norms included
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def test_flop_counter_agrees_on_a_qwen3_shaped_model():
    """torch's FLOP counter on the real forward: D = 32 for every head although E / Hq = 16."""
    model = tiny_qwen3()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    assert counter.get_total_flops() == flops.forward_flops(model.config, 9, batch_size=2, count_masked=True)


def test_kv_cache_holds_head_dim_wide_keys():
    model = tiny_qwen3()
    cache = KVCache(model.config, batch_size=1, max_seq_len=8, device="cpu")
    assert cache.k[0].shape == (1, 1, 8, 32) and cache.nbytes() == kv_cache_bytes(model.config, 8, 1, 4)
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    # float32: two chunks through the cache vs one pass differ only by rounding (matmuls of other shapes: up to ~1e-5
    # in these peaked logits, seen in CI); a cache that dropped or misplaced a key would be off by O(1)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([model(ids[:, :5], cache=cache), model(ids[:, 5:], cache=cache)], 1),
                                   model(ids), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the engine on these families
PROMPTS = [[3, 9, 4, 1, 7], [5, 2] * 9, [2, 8], [11, 40, 33, 7, 1, 9, 60, 21, 4, 4, 17, 30]]
MAX_TOKENS = [6, 9, 12, 5]


@pytest.mark.parametrize("use_kernels", [False, True], ids=["torch", "kernels"])
@pytest.mark.parametrize("family", ["qwen3", "llama3-rope"])
def test_engine_greedy_tokens_equal_plain_generation(family, use_kernels):
    """LLMEngine (paged KV, flattened steps with explicit positions, chunked prefill) against
    course_lib.model.generate.generate (contiguous cache): the same greedy tokens. "llama3-rope": RoPE scaled with a
    pretraining context of 8, so prompts and outputs run far past it."""
    changes = {} if family == "qwen3" else dict(
        qk_norm=False, head_dim=16, rope_scaling=RopeScaling("llama3", 4.0, 1.0, 4.0, 8))
    model = tiny_qwen3(**changes).to(DEVICE if use_kernels else "cpu")   # compiled kernels read GPU memory
    assert model.config.head_dim in HEAD_DIMS                    # the flash and paged kernels take it
    want = [generate(model, p, n).token_ids for p, n in zip(PROMPTS, MAX_TOKENS)]
    assert len({tuple(w) for w in want}) == len(want)            # not one repeated token: the test can fail
    engine = LLMEngine(model, block_size=4, num_blocks=32, max_num_seqs=3, max_num_batched_tokens=10,
                       use_kernels=use_kernels)
    outputs = engine.generate(PROMPTS, [SamplingParams(max_tokens=n) for n in MAX_TOKENS], use_tqdm=False)
    assert [o.token_ids for o in outputs] == want
    assert max(s.num_prefill_tokens for s in engine.metrics.steps) > 1      # prefill chunks, not only decodes
