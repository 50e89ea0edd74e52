"""The course's model against transformers.LlamaForCausalLM built locally from a random small config."""
import pytest
import torch

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib import ModelConfig, load_pretrained
from course_lib.generate import greedy_generate
from course_lib.kv_cache import KVCache

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "gqa": dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "mha-tied": dict(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                     num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=64,
                     tie_word_embeddings=True, rope_theta=500000.0),
    "mqa": dict(vocab_size=50, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64),
    # Qwen2: the LLaMA architecture plus biases on the q/k/v projections (its model_type selects them)
    "qwen2": dict(vocab_size=89, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000000.0),
}


def make_hf_model(name: str):
    """A random transformers model of CONFIGS[name] (Qwen2ForCausalLM for "qwen2", else LlamaForCausalLM), with
    random norm weights and biases so that neither is left at its initial value."""
    if name == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**CONFIGS[name], attn_implementation="eager"))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIGS[name], attn_implementation="eager"))
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if pname.endswith("norm.weight"):       # RMSNorm weights start at ones
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif pname.endswith(".bias"):           # HF initializes biases to zero
                p.copy_(0.5 * torch.randn_like(p))
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
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
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
    from course_lib.checkpoint import CHECKPOINTS

    ours, tokenizer = load_tiny(name, dtype=torch.float32, device="cpu")
    hf = transformers.LlamaForCausalLM.from_pretrained(CHECKPOINTS / f"tiny-{name}", dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("Genesis 1\n1 In the beginning God created")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-4)
