"""The course's model against transformers (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM) built locally
from random small configs: the same logits and greedy tokens, after ``hf.save_pretrained`` + ``load_pretrained``."""
import copy
import dataclasses

import pytest
import torch

import course_lib  # first: resolves the device before anything imports triton
from course_lib import ModelConfig, load_pretrained, save_pretrained
from course_lib.model.generate import greedy_generate
from course_lib.model.kv_cache import KVCache

transformers = pytest.importorskip("transformers")

# Llama-3.1/3.2's RoPE scaling on a context of 16 tokens "pretrained", 128 allowed: with D = 16 and theta = 1e4 the
# wavelengths 2π/inv_freq are 6.3 (< 16/4: kept), 20 (between 16/4 and 16/1: blended) and 63 ... 2.5e4 (> 16: / 8)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)

CONFIGS = {
    "gqa": dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "mha-tied": dict(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                     num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=64,
                     tie_word_embeddings=True, rope_theta=500000.0),
    "mqa": dict(vocab_size=50, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64),
    # Llama-3.x: RoPE scaling "llama3" (tied, as Llama-3.2-1B/3B); and the older "linear" scaling
    "llama3-rope": dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    "linear-rope": dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    # Qwen2: the LLaMA architecture plus biases on the q/k/v projections (its model_type selects them)
    "qwen2": dict(vocab_size=89, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000000.0),
    # Qwen3: q/k RMSNorm per head before RoPE, no biases, head_dim given (32, not hidden_size / heads = 16)
    "qwen3": dict(vocab_size=89, hidden_size=64, intermediate_size=112, num_hidden_layers=2, head_dim=32,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000000.0),
    "qwen3-tied": dict(vocab_size=71, hidden_size=48, intermediate_size=96, num_hidden_layers=3, head_dim=16,
                       num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True, rms_norm_eps=1e-6),
    # Mistral: LLaMA under another name (its sliding window off here: the loader refuses one shorter than the
    # context); head_dim given apart from hidden_size / heads, as Mistral-Nemo does
    "mistral": dict(vocab_size=83, hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=32,
                    num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128, sliding_window=None),
}


def hf_classes(name: str):
    """(config class, model class) of transformers for CONFIGS[name]."""
    family = name.split("-")[0]
    return {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}.get(
        family, (transformers.LlamaConfig, transformers.LlamaForCausalLM))


def make_hf_model(name: str, **changes):
    """A random transformers model of CONFIGS[name] (| changes), with random norm weights (q/k norms included)
    and biases so that neither is left at its initial value, and q/k projections large enough that attention
    is far from uniform (with HF's std 0.02 every score is ~0 and positions, hence RoPE, hardly matter)."""
    config_cls, model_cls = hf_classes(name)
    hf = model_cls(config_cls(**(CONFIGS[name] | changes), attn_implementation="eager"))
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if pname.endswith("norm.weight"):       # RMSNorm weights start at ones
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif pname.endswith(".bias"):           # HF initializes biases to zero
                p.copy_(0.5 * torch.randn_like(p))
            elif pname.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(1.5 * torch.randn_like(p) / p.shape[1] ** 0.5)
    return hf.float().eval()


@pytest.fixture(params=list(CONFIGS))
def hf_and_ours(request, tmp_path):
    torch.manual_seed(0)
    hf = make_hf_model(request.param)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    return hf, ours


def test_logits_match_transformers(hf_and_ours):
    hf, ours = hf_and_ours
    ids = torch.randint(0, ours.config.vocab_size, (3, 17))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_greedy_tokens_match_transformers(hf_and_ours):
    hf, ours = hf_and_ours
    prompt = torch.randint(0, ours.config.vocab_size, (1, 5))
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = greedy_generate(ours, prompt[0].tolist(), max_new_tokens=20, use_cache=True)
    assert got == want[0, 5:].tolist()


def test_cached_forward_equals_full_forward(hf_and_ours):
    _, ours = hf_and_ours
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    full = ours(ids)
    cache = KVCache(ours.config, batch_size=2, max_seq_len=12, device=ours.device)
    parts = [ours(ids[:, :5], cache=cache), ours(ids[:, 5:6], cache=cache), ours(ids[:, 6:], cache=cache)]
    # float32 rounding only (matmuls of other shapes; ~1e-5 seen in a sibling test): a wrong cache is off by O(1)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)
    assert cache.length == 12


def test_bad_input_is_named():
    model = course_lib.Llama(ModelConfig(vocab_size=10, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8))
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="context of 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(num_attention_heads=6, num_key_value_heads=4)


@pytest.mark.parametrize("name", ["target", "draft"])
def test_shipped_checkpoints_load_in_transformers(name):
    """The shipped checkpoints are real Hugging Face checkpoints: transformers reads them and agrees."""
    from course_lib import load_tiny
    from course_lib.model.checkpoint import CHECKPOINTS

    ours, tokenizer = load_tiny(name, dtype=torch.float32, device="cpu")
    hf = transformers.LlamaForCausalLM.from_pretrained(CHECKPOINTS / f"tiny-{name}", dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("Genesis 1\n1 In the beginning God created")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-4)


def _without(model, **config_changes):
    """The same weights with other config values (a shallow copy: the forward reads ``model.config``)."""
    other = copy.copy(model)
    other.config = dataclasses.replace(model.config, **config_changes)
    return other


@pytest.mark.parametrize("name, rope_type", [("llama3-rope", "llama3"), ("linear-rope", "linear")])
def test_rope_scaling_matches_transformers_beyond_the_original_context(name, rope_type, tmp_path):
    """Positions up to 6x the 16 of 'pretraining': the scaled RoPE agrees with transformers; the plain one doesn't."""
    torch.manual_seed(0)
    hf = make_hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    assert ours.config.rope_scaling.rope_type == rope_type
    ids = torch.randint(0, ours.config.vocab_size, (2, 96))
    with torch.no_grad():
        want = hf(ids).logits
        got, plain = ours(ids), _without(ours, rope_scaling=None)(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert torch.equal(plain[:, 0], got[:, 0])                    # position 0 is not rotated at all
    assert (plain[:, 16:] - want[:, 16:]).abs().amax() > 0.1      # so the test would catch a loader dropping it


def test_llama3_frequencies_equal_transformers():
    """rope_inv_freq against transformers' own function, on Llama-3.2-1B's real settings."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from course_lib.model.rope import RopeScaling, rope_inv_freq

    cfg = ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                      rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192))
    hf_config = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "rope_scaling"})
    want, attention_scale = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    got = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert attention_scale == 1.0 and torch.equal(got, want)
    base = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    assert torch.equal(got[:8], base[:8]) and torch.allclose(got[-8:], base[-8:] / 32)   # fast kept, slow / factor


def test_qwen3_q_k_norms_are_loaded_and_matter(tmp_path):
    torch.manual_seed(0)
    hf = make_hf_model("qwen3")
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    assert ours.config.qk_norm and ours.config.head_dim == 32 and not ours.config.attention_bias
    attn = ours.model.layers[0].self_attn
    torch.testing.assert_close(attn.q_norm.weight, hf.model.layers[0].self_attn.q_norm.weight, rtol=0, atol=0)
    no_norm = copy.deepcopy(ours)
    for layer in no_norm.model.layers:
        layer.self_attn.q_norm = layer.self_attn.k_norm = None
    ids = torch.randint(0, ours.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert (no_norm(ids) - hf(ids).logits).abs().amax() > 0.1


@pytest.mark.parametrize("name", ["llama3-rope", "linear-rope", "qwen2", "qwen3", "qwen3-tied"])
def test_course_checkpoint_loads_in_transformers_as_its_family(name, tmp_path):
    """save_pretrained writes a config.json that AutoModelForCausalLM builds as the same model (Qwen3 for q/k norms,
    Qwen2 for q/k/v biases, LLaMA with its RoPE scaling), and load_pretrained reads back the same config."""
    torch.manual_seed(0)
    make_hf_model(name).save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf", dtype=torch.float32, device="cpu")
    save_pretrained(ours, tmp_path / "ours", dtype=torch.float32)
    assert load_pretrained(tmp_path / "ours", dtype=torch.float32, device="cpu").config == ours.config
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(hf) is hf_classes(name)[1]
    ids = torch.randint(0, ours.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-4)
